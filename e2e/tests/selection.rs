//! Where an expression is decided must not change its answer: the runner's selection (the
//! values and packages views, marker rows, `_find` for the rest, on the real CouchDB) must
//! select exactly the nodes [`Expr::matches`] selects from the whole documents.
//!
//! Documents are generated from a fixed seed (`VOGELER_TEST_SEED` picks another), with what
//! nodes send that the views cannot hold as they are: strings past the values view's bound,
//! paths deeper than it indexes, more values than it keeps, numbers JavaScript rewrites
//! (`12.0`, 2^53 + 1, `1e21`), `_`-keys, a fact named like a package plugin, package lists
//! with plain-string elements, numeric versions, over-long fields and repeated names, and
//! inventories declared by some nodes only. Each expression is a random tree of leaves over
//! those values with `and`, `or` and `not`.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};
use vogeler_core::query::Inventory;
use vogeler_e2e::TestStack;
use vogeler_proto::{
    expr::{self, Catalog},
    names::NodeName,
};
use vogeler_runner::{
    ask::{self, Field},
    select::Selector,
    target::{self, Files},
};

const NODES: usize = 40;
const EXPRESSIONS: usize = 300;

/// xorshift64*: deterministic, and enough to spread choices.
struct Rng(u64);

impl Rng {
    /// Any seed, 0 included (xorshift stays at 0 forever).
    fn new(seed: u64) -> Self {
        Self((seed ^ 0x9e37_79b9_7f4a_7c15).max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

fn record(name: &str, version: Value, status: &str) -> Value {
    json!({"name": name, "version": version, "arch": "amd64", "status": status})
}

fn document(rng: &mut Rng, i: usize) -> Value {
    let mut facts = Map::new();
    if rng.chance(80) {
        facts.insert(
            "os".into(),
            json!({"family": rng.pick(&["Debian", "RedHat"]),
                   "version": rng.pick(&[json!("12"), json!("11"), json!(12), json!(12.0)])}),
        );
    }
    if rng.chance(70) {
        let big = json!(9_007_199_254_740_993u64);
        facts.insert(
            "memory_mb".into(),
            rng.pick(&[
                json!(2048),
                json!(4096),
                json!("4096"),
                json!(4096.0),
                json!(16000),
                big,
                json!(1e21),
                json!(-0.5),
            ]),
        );
    }
    if rng.chance(50) {
        facts.insert(
            "kernel".into(),
            rng.pick(&[json!("6.1.0-18"), json!("5.14.0")]),
        );
    }
    if rng.chance(10) {
        // A fact named like the package plugin: `dpkg has` still reads the plugin.
        facts.insert("dpkg".into(), json!(["openssl"]));
    }
    if rng.chance(10) {
        facts.insert("_x".into(), json!(1));
    }
    // CouchDB's collation ignores control and format characters: these sort as `kernel`,
    // `os.family` and `Debian` in a view, and are none of them.
    if rng.chance(15) {
        facts.insert("ker\u{ad}nel".into(), json!("6.1.0-18"));
    }
    if let Some(os) = facts.get_mut("os").filter(|_| rng.chance(15)) {
        os["fam\u{200b}ily"] = json!("Debian");
    }
    if let Some(os) = facts.get_mut("os").filter(|_| rng.chance(15)) {
        os["family"] = json!(rng.pick(&["Debian\u{0}", "De\u{ad}bian", "Débian"]));
    }
    let mut vogeler = json!({"facts": facts, "last_seen": "2026-12-07T00:00:00Z"});
    if rng.chance(50) {
        vogeler["packages"] = json!({"pip": "rpm"});
    }
    let mut doc = json!({"_id": format!("n{i:02}"), "vogeler": vogeler});

    let mut sysinfo = Map::new();
    sysinfo.insert(
        "memory_mb".into(),
        rng.pick(&[json!(1024), json!(3000), json!("2999"), json!(8192.5)]),
    );
    sysinfo.insert(
        "flag".into(),
        rng.pick(&[json!(true), json!(false), json!(null), json!("true")]),
    );
    if rng.chance(30) {
        sysinfo.insert(
            "long".into(),
            json!(format!("x{}", "y".repeat(rng.pick(&[10, 600])))),
        );
    }
    if rng.chance(25) {
        // sysinfo.deep.a.b.c.d.e.f.g = 7 keys under sysinfo: 9 in all.
        sysinfo.insert(
            "deep".into(),
            json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": rng.pick(&[1, 2])}}}}}}}),
        );
    }
    if rng.chance(10) {
        let many: Map<String, Value> = (0..2100).map(|k| (format!("k{k}"), json!(k))).collect();
        sysinfo.insert("many".into(), Value::Object(many));
    } else if rng.chance(30) {
        sysinfo.insert("many".into(), json!({"k5": 5, "k2050": 2050}));
    }
    doc["sysinfo"] = Value::Object(sysinfo);

    let mut dpkg: Vec<Value> = vec![];
    if rng.chance(70) {
        dpkg.push(record(
            "openssl",
            rng.pick(&[
                json!("3.0.9-1"),
                json!("3.0.13-1"),
                json!("3.0.13~rc1-1"),
                json!("1:0.1-1"),
            ]),
            rng.pick(&["installed", "installed", "config-files"]),
        ));
    }
    if rng.chance(50) {
        dpkg.push(record(
            "libfoo",
            rng.pick(&[json!("1.10-1"), json!("1.9-1")]),
            "installed",
        ));
    }
    match rng.below(12) {
        0 => dpkg.push(json!("openssl")),
        1 => dpkg.push(json!({"name": 7, "version": "1.0"})),
        2 => dpkg.push(record("tool", json!(2.0), "installed")),
        3 => dpkg.push(record("tool", json!("1".repeat(300)), "installed")),
        4 => dpkg.extend((0..70).map(|_| record("dup", json!("1.0"), "installed"))),
        5 => dpkg.push(json!({"version": "9"})),
        6 => dpkg.push(record("open\u{ad}ssl", json!("3.0.1-1"), "installed")),
        7 => dpkg.push(record("openssl", json!("3.0.9-1\u{0}"), "installed")),
        _ => {}
    }
    if rng.chance(90) {
        doc["dpkg"] = Value::Array(dpkg);
    }
    if rng.chance(50) {
        doc["rpms"] = json!([{"name": "bash",
            "epoch": rng.pick(&[json!("(none)"), json!("1"), json!(1)]),
            "version": rng.pick(&["5.2", "4.4"]), "release": "1.el9", "arch": "x86_64"}]);
    }
    if rng.chance(60) {
        doc["pip"] = json!([{"name": "requests", "version": rng.pick(&["2.31.0", "2.0"])}]);
    }
    if rng.chance(60) {
        doc["disks"] = json!([{"target": "/", "use_percent": rng.pick(&[10, 60, 95])},
                              {"target": "/var", "use_percent": rng.pick(&[5, 91])}]);
    }
    doc
}

const LEAVES: &[&str] = &[
    "memory_mb > 4096",
    "memory_mb = 4096",
    "memory_mb < 5000",
    "memory_mb <= 4096",
    "memory_mb = 9007199254740993",
    "memory_mb >= 9007199254740992",
    "memory_mb = 1e21",
    "memory_mb =~ ^40",
    "memory_mb =~ e",
    "memory_mb > abc",
    "memory_mb != 4096",
    "os.version = 12",
    "os.version = 12.0",
    "os.version =~ ^12$",
    "os.family = Debian",
    "os.family != Debian",
    "os = Debian",
    "kernel =~ ^6",
    "not kernel =~ ^6",
    "kernel = 5.14.0",
    "sysinfo.memory_mb < 3000",
    "sysinfo.memory_mb =~ 5$",
    "sysinfo.long =~ ^xy",
    "sysinfo.long = xyyyyyyyyyy",
    "sysinfo.deep.a.b.c.d.e.f.g = 1",
    "sysinfo.deep.a.b.c.d.e.f.g > 0",
    "exists sysinfo.deep.a.b.c.d.e.f.g",
    "sysinfo.many.k5 = 5",
    "sysinfo.many.k2050 = 2050",
    "sysinfo.flag = true",
    "sysinfo.flag = null",
    "sysinfo.flag != false",
    "_x = 1",
    "_id = n03",
    "exists sysinfo.flag",
    "dpkg has openssl",
    "dpkg has openssl < 3.0.13",
    "dpkg has openssl >= 1:0",
    "dpkg has openssl != 3.0.9-1",
    "dpkg has libfoo > 1.9-1",
    "dpkg has name=openssl and version=~^3",
    "dpkg has name=openssl and arch=amd64",
    "dpkg has tool > 1.5",
    "dpkg has tool",
    "dpkg has dup",
    "dpkg has 7",
    "dpkg has (version < 1)",
    "dpkg has (name = openssl and status = config-files)",
    "dpkg has (not name = openssl)",
    "disks has (not target = /)",
    "disks has (not (use_percent < 50 or target = /var))",
    "rpms has bash >= 1:5.0",
    "rpms has bash = 5.2",
    "rpms has bash < 5",
    "pip has requests",
    "pip has requests > 2.1",
    "disks[].use_percent > 90",
    "disks has (target = / and use_percent > 50)",
    "n0*",
    "n05,n17",
];

fn expression(rng: &mut Rng, depth: usize) -> String {
    if depth == 0 || rng.chance(35) {
        return rng.pick(LEAVES).to_string();
    }
    match rng.below(3) {
        0 => format!("not ({})", expression(rng, depth - 1)),
        1 => format!(
            "({}) and ({})",
            expression(rng, depth - 1),
            expression(rng, depth - 1)
        ),
        _ => format!(
            "({}) or ({})",
            expression(rng, depth - 1),
            expression(rng, depth - 1)
        ),
    }
}

#[tokio::test]
async fn selecting_in_couchdb_picks_exactly_the_nodes_matches_picks() {
    let seed = std::env::var("VOGELER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026_1207_u64);
    let mut rng = Rng::new(seed);
    let stack = TestStack::new().await;
    vogeler_server::prepare_database(&stack.couch, &stack.database)
        .await
        .expect("database and design documents");
    let docs: Vec<Value> = (0..NODES).map(|i| document(&mut rng, i)).collect();
    for r in stack
        .couch
        .bulk_docs(&stack.database, &docs)
        .await
        .expect("bulk write")
    {
        assert!(r.error.is_none(), "stored: {r:?}");
    }
    // Decide `matches` on the documents as CouchDB gives them back, as `_find` does.
    let ids: Vec<String> = (0..NODES).map(|i| format!("n{i:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let stored: Vec<(String, Value)> = stack
        .couch
        .get_many::<Value>(&stack.database, &refs)
        .await
        .expect("read back")
        .into_iter()
        .map(|(id, d)| (id, d.found().expect("stored document")))
        .collect();
    let universe: BTreeSet<NodeName> = ids.iter().map(|i| NodeName::new(i).unwrap()).collect();
    let inventory = Inventory::new(stack.couch.clone(), stack.database.clone());
    let selector = Selector::new(&inventory, &universe);

    let mut leaves_seen = BTreeSet::new();
    let mut nonempty = 0;
    let mut failures = Vec::new();
    let mut exprs: Vec<String> = LEAVES.iter().map(|l| l.to_string()).collect();
    exprs.extend((0..EXPRESSIONS).map(|_| expression(&mut rng, 3)));
    for text in &exprs {
        let e = expr::parse(text).unwrap_or_else(|err| panic!("{text}: {err}"));
        let want: BTreeSet<NodeName> = stored
            .iter()
            .filter(|(id, doc)| e.matches_with(id, doc, &Catalog::of_document(doc)))
            .map(|(id, _)| NodeName::new(id).unwrap())
            .collect();
        let got = selector.select(&e).await.expect("selection");
        if LEAVES.contains(&text.as_str()) && !want.is_empty() && want.len() < NODES {
            leaves_seen.insert(text.clone());
        }
        nonempty += usize::from(!want.is_empty());
        if got != want {
            let extra: Vec<_> = got.difference(&want).collect();
            let missed: Vec<_> = want.difference(&got).collect();
            failures.push(format!("{text}\n  selected but not matched: {extra:?}\n  matched but not selected: {missed:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {} expressions disagree:\n{}",
        failures.len(),
        exprs.len(),
        failures.join("\n")
    );
    // The fleet must make most leaves split it, or agreeing would prove little.
    assert!(
        leaves_seen.len() * 4 >= LEAVES.len() * 3,
        "seed {seed}: only {} of {} leaves split the fleet: {leaves_seen:?}",
        leaves_seen.len(),
        LEAVES.len()
    );
    assert!(
        nonempty * 2 > exprs.len(),
        "most expressions select someone"
    );
    let reads = selector.reads();
    assert!(reads.view_reads > 0 && reads.finds > 0, "{reads:?}");

    // `count` adds what the views leave out from the documents: the same spread as
    // counting every stored document here, over the fleet (reduce) and over a set (rows).
    let settings = stack.runner_settings("5s").couch;
    let week = std::time::Duration::from_secs(7 * 86_400 * 1000);
    for field in [
        "memory_mb",
        "os.version",
        "os.family",
        "kernel",
        "sysinfo.long",
        "sysinfo.many.k5",
        "sysinfo.many.k2050",
        "sysinfo.flag",
        "dpkg:openssl",
        "dpkg:tool",
        "dpkg:dup",
        "rpms:bash",
        "pip:requests",
    ] {
        let f = ask::parse_field(field).expect(field);
        for set in ["all", "n0* or n2*"] {
            let e = expr::parse(set).expect(set);
            let mut want: Vec<(Value, u64)> = vec![];
            for (_, doc) in stored.iter().filter(|(id, d)| e.matches(id, d)) {
                let values: Vec<Value> = match &f {
                    Field::Path { path, .. } => match path.read(doc).as_slice() {
                        [v] if !v.is_array() && !v.is_object() => vec![(*v).clone()],
                        _ => vec![],
                    },
                    // Only where the node's catalog makes the plugin a package inventory.
                    Field::Package { plugin, .. }
                        if Catalog::of_document(doc).scheme(plugin.as_str()).is_none() =>
                    {
                        vec![]
                    }
                    Field::Package { plugin, name } => expr::installed_versions(
                        doc.get(plugin.as_str()).unwrap_or(&Value::Null),
                        name,
                    )
                    .into_iter()
                    .map(|v| v.map_or(Value::Null, Value::String))
                    .collect(),
                };
                for v in values {
                    match want.iter_mut().find(|(w, _)| same_value(w, &v)) {
                        Some((_, n)) => *n += 1,
                        None => want.push((v, 1)),
                    }
                }
            }
            let set = target::parse(set, &Files).expect("set");
            let got = ask::count(&settings, &f, &set, week)
                .await
                .unwrap_or_else(|e| panic!("count {field}: {e}"));
            let mut got = got.values;
            let key = |v: &(Value, u64)| (v.0.to_string(), v.1);
            want.sort_by_key(key);
            got.sort_by_key(key);
            assert_eq!(
                got.len(),
                want.len(),
                "count {field} -n {e}: {got:?} != {want:?}"
            );
            for ((g, gn), (w, wn)) in got.iter().zip(&want) {
                assert!(
                    same_value(g, w) && gn == wn,
                    "count {field} -n {e}: {got:?} != {want:?}"
                );
            }
        }
    }
}

/// Values equal as CouchDB keys are: numbers by value (`12` and `12.0` are one key).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

#[tokio::test]
async fn an_inventory_past_the_packages_views_bounds_is_answered_from_its_document() {
    let stack = TestStack::new().await;
    vogeler_server::prepare_database(&stack.couch, &stack.database)
        .await
        .expect("database and design documents");
    let openssl = |v: &str| record("openssl", json!(v), "installed");
    // One node lists more records than the view indexes of one inventory (and one version
    // far past its field bound); the other is an ordinary node.
    let mut big: Vec<Value> = (0..20_001)
        .map(|k| record(&format!("pkg{k}"), json!("1.0"), "installed"))
        .collect();
    big.push(openssl("3.0.2-1"));
    let long = format!("3.0.{}", "9".repeat(6 * 1024 * 1024));
    let docs = [
        json!({"_id": "big", "vogeler": {"facts": {}}, "dpkg": big}),
        json!({"_id": "long", "vogeler": {"facts": {}}, "dpkg": [openssl(&long)]}),
        json!({"_id": "plain", "vogeler": {"facts": {}}, "dpkg": [openssl("3.0.9-1")]}),
    ];
    for r in stack
        .couch
        .bulk_docs(&stack.database, &docs)
        .await
        .expect("bulk write")
    {
        assert!(r.error.is_none(), "stored: {r:?}");
    }
    let inventory = Inventory::new(stack.couch.clone(), stack.database.clone());
    assert_eq!(
        inventory.unindexed_packages("dpkg").await.expect("markers"),
        BTreeSet::from(["big".to_string(), "long".to_string()]),
        "the view marks what it does not index"
    );
    assert_eq!(
        inventory
            .packages("openssl", Some("dpkg"))
            .await
            .expect("rows")
            .len(),
        1,
        "and holds only the ordinary node's record"
    );
    let universe: BTreeSet<NodeName> = ["big", "long", "plain"]
        .into_iter()
        .map(|n| NodeName::new(n).unwrap())
        .collect();
    let selector = Selector::new(&inventory, &universe);
    for (text, want) in [
        ("dpkg has openssl < 3.0.13", vec!["big", "plain"]),
        ("dpkg has openssl > 3.0.13", vec!["long"]),
        ("dpkg has pkg20000", vec!["big"]),
        ("not dpkg has openssl", vec![]),
    ] {
        let got = selector
            .select(&expr::parse(text).unwrap())
            .await
            .expect(text);
        let got: Vec<&str> = got.iter().map(NodeName::as_str).collect();
        assert_eq!(got, want, "{text}");
    }
    let settings = stack.runner_settings("5s").couch;
    let all = target::parse("all", &Files).expect("all");
    let counted = ask::count(
        &settings,
        &ask::parse_field("dpkg:openssl").unwrap(),
        &all,
        std::time::Duration::from_secs(3600),
    )
    .await
    .expect("count");
    let mut versions: Vec<(String, u64)> = counted
        .values
        .iter()
        .map(|(v, n)| (v.as_str().unwrap_or_default().chars().take(8).collect(), *n))
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        [
            ("3.0.2-1".to_string(), 1),
            ("3.0.9-1".to_string(), 1),
            ("3.0.9999".to_string(), 1)
        ]
    );
}
