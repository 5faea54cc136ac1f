//! The runner's node sets, TTLs and inventory questions against several real agents.

use std::{collections::BTreeSet, path::Path, time::Duration};

use vogeler_e2e::{Running, TestStack, ask, plugin_dir, spawn_agent, spawn_server, wait_for};

/// An agent whose `mark` plugin leaves a file named after the node in `marks`, so a test can
/// see which agents actually ran a command (not only which answered).
fn marking_agent(
    stack: &TestStack,
    node: &str,
    role: &str,
    marks: &Path,
) -> (Running<vogeler_agent::AgentError>, tempfile::TempDir) {
    let mark = format!(
        "name = \"mark\"\ncommand = [\"sh\", \"-c\", \"echo ran >> {}/{node}\"]\nformat = \"lines\"\n",
        marks.display()
    );
    let dir = plugin_dir(&[("mark.toml", &mark)]);
    let mut sources = stack.sources();
    sources
        .set("agent.node", Some(node))
        .set("agent.plugin_dir", Some(dir.path().display()))
        .set("agent.facts.role", Some(role));
    let settings = vogeler_config::load(&sources)
        .expect("load")
        .agent(None)
        .expect("settings");
    (spawn_agent(settings), dir)
}

fn ran(marks: &Path) -> BTreeSet<String> {
    std::fs::read_dir(marks)
        .expect("marks")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

fn clear(marks: &Path) {
    for e in std::fs::read_dir(marks).expect("marks").flatten() {
        std::fs::remove_file(e.path()).expect("clear mark");
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Crafted messages per attack class.
const PER_CLASS: usize = 100;

#[tokio::test]
async fn every_targeting_form_reaches_exactly_the_right_agents() {
    let stack = TestStack::new().await;
    let marks = tempfile::tempdir().expect("marks");
    let _server = spawn_server(stack.server_settings());
    let nodes = [
        ("web01", "web"),
        ("web02", "web"),
        ("db-1", "db"),
        ("db-2", "db"),
        ("cache01", "cache"),
    ];
    let _agents: Vec<_> = nodes
        .iter()
        .map(|(n, role)| marking_agent(&stack, n, role, marks.path()))
        .collect();
    stack.wait_registered(&nodes.map(|(n, _)| n)).await;
    // Registration comes from the first announcement; wait until facts are there too.
    wait_for("roles registered", Duration::from_secs(10), || async {
        vogeler_runner::inventory::find_fact(
            &stack.runner_settings("5").couch,
            "role",
            &"db".into(),
        )
        .await
        .is_ok_and(|n| n.len() == 2)
    })
    .await;

    let list = tempfile::NamedTempFile::new().expect("list");
    std::fs::write(list.path(), "web02\n# a comment\ncache01\n").expect("write list");
    let from_file = format!("@{}", list.path().display());
    for (expr, want) in [
        ("all", set(&["web01", "web02", "db-1", "db-2", "cache01"])),
        ("web01", set(&["web01"])),
        ("web01,db-1", set(&["web01", "db-1"])),
        ("web*", set(&["web01", "web02"])),
        ("db-[0-9]*", set(&["db-1", "db-2"])),
        (from_file.as_str(), set(&["web02", "cache01"])),
        ("role=db", set(&["db-1", "db-2"])),
        ("role=~^(web|cache)$", set(&["web01", "web02", "cache01"])),
        (
            "cpus>=1 and not role=web",
            set(&["db-1", "db-2", "cache01"]),
        ),
        (
            "web* or (role=db and not db-2)",
            set(&["web01", "web02", "db-1"]),
        ),
    ] {
        clear(marks.path());
        let r = ask(&stack, "mark", expr, "10").await;
        assert!(r.success(), "{expr}:\n{}", r.render_table());
        let answered: BTreeSet<String> = r.replies.keys().map(|n| n.to_string()).collect();
        assert_eq!(answered, want, "{expr}: who answered");
        // Only the targeted agents ran it (the marks are written before the reply is sent).
        assert_eq!(ran(marks.path()), want, "{expr}: who ran it");
    }

    // A named node nobody knows is still commanded, and reported as not delivered.
    let r = ask(&stack, "mark", "web01,ghost01", "1500ms").await;
    assert!(
        r.render_table()
            .contains("not delivered to: ghost01 (no agent queue"),
        "{}",
        r.render_table()
    );

    // The inventory side of node sets.
    let settings = stack.runner_settings("5");
    let set_db = vogeler_runner::target::parse("db*", &vogeler_runner::target::Files).expect("set");
    let listed = vogeler_runner::inventory::nodes(&settings.couch, &set_db, settings.freshness)
        .await
        .expect("nodes");
    assert_eq!(
        listed.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(),
        ["db-1", "db-2"]
    );
    assert!(listed.iter().all(|n| !n.stale && n.agent_version.is_some()));
    let shown = vogeler_runner::inventory::show(
        &settings.couch,
        &vogeler_e2e::node("web01"),
        Some(&vogeler_proto::names::PluginName::new("mark").expect("plugin")),
    )
    .await
    .expect("show");
    assert_eq!(shown, Some(serde_json::json!([])));
}

#[tokio::test]
async fn a_command_whose_ttl_passed_while_the_agent_was_down_is_not_run() {
    let stack = TestStack::new().await;
    let marks = tempfile::tempdir().expect("marks");
    let _server = spawn_server(stack.server_settings());
    let (agent, dir) = marking_agent(&stack, "late01", "web", marks.path());
    stack.wait_registered(&["late01"]).await;
    agent.stop().await.expect("agent stops");

    // Sent while the agent is down, with a TTL shorter than the outage.
    let stale = vogeler_e2e::ask_with(&stack, "mark", "late01", "500ms", |q| {
        q.ttl = Duration::from_secs(1);
    })
    .await;
    assert!(stale.replies.is_empty());
    let expired_at = chrono::Utc::now() + chrono::Duration::seconds(1);
    wait_for("the TTL to pass", Duration::from_secs(5), || async {
        chrono::Utc::now() > expired_at
    })
    .await;

    // The agent comes back; a fresh command is queued behind the stale one, so once it is
    // answered the stale one has been dealt with.
    let mut sources = stack.sources();
    sources
        .set("agent.node", Some("late01"))
        .set("agent.plugin_dir", Some(dir.path().display()));
    let _back = spawn_agent(
        vogeler_config::load(&sources)
            .expect("load")
            .agent(None)
            .expect("settings"),
    );
    let fresh = ask(&stack, "mark", "late01", "10").await;
    assert!(fresh.success(), "{}", fresh.render_table());
    let runs = std::fs::read_to_string(marks.path().join("late01")).expect("mark file");
    assert_eq!(runs.lines().count(), 1, "only the fresh command ran");
}

#[tokio::test]
async fn batch_2_over_5_agents_never_runs_more_than_2_at_once() {
    let stack = TestStack::new().await;
    let log = tempfile::NamedTempFile::new().expect("log");
    let busy = vogeler_e2e::busy_plugin(log.path());
    let plugins = plugin_dir(&[("busy.toml", &busy)]);
    let _server = spawn_server(stack.server_settings());
    let names = ["b1", "b2", "b3", "b4", "b5"];
    let _agents: Vec<_> = names
        .iter()
        .map(|n| spawn_agent(stack.agent_settings(n, plugins.path())))
        .collect();
    stack.wait_registered(&names).await;

    let r = vogeler_e2e::ask_with(&stack, "busy", "b*", "10", |q| {
        q.batch = Some(vogeler_runner::Batch {
            size: vogeler_runner::BatchSize::Nodes(2),
            pause: Duration::from_millis(100),
        });
    })
    .await;
    assert!(r.success() && r.replies.len() == 5, "{}", r.render_table());

    let text = std::fs::read_to_string(log.path()).expect("log");
    let (peak, runs) = vogeler_e2e::peak_overlap(&text);
    assert_eq!(runs, 5, "{text}");
    assert_eq!(peak, 2, "with --batch 2, {peak} ran at once\n{text}");
}

#[tokio::test]
async fn cached_answers_from_stored_values_and_asks_only_the_rest() {
    let stack = TestStack::new().await;
    let marks = tempfile::tempdir().expect("marks");
    let _server = spawn_server(stack.server_settings());
    let names = ["c1", "c2", "c3"];
    let _agents: Vec<_> = names
        .iter()
        .map(|n| marking_agent(&stack, n, "web", marks.path()))
        .collect();
    stack.wait_registered(&names).await;

    // c1 and c2 have a fresh stored value; c3 has none.
    let first = ask(&stack, "mark", "c1,c2", "10").await;
    assert!(first.success(), "{}", first.render_table());
    wait_for("values stored", Duration::from_secs(10), || async {
        let mut all = true;
        for n in ["c1", "c2"] {
            all &= stack.document(n).await.is_some_and(|d| {
                d.meta
                    .plugins
                    .get("mark")
                    .is_some_and(|m| m.request_id == first.request_id)
            });
        }
        all
    })
    .await;
    clear(marks.path());

    let r = vogeler_e2e::ask_with(&stack, "mark", "all", "10", |q| {
        q.cached = Some(vogeler_runner::MaxAge::Within(Duration::from_secs(3600)));
    })
    .await;
    assert!(r.success(), "{}", r.render_table());
    assert_eq!(
        r.cached.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["c1", "c2"]
    );
    assert_eq!(
        r.replies.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["c3"]
    );
    assert_eq!(
        ran(marks.path()),
        set(&["c3"]),
        "only the node without a fresh value was asked"
    );
    let table = r.render_table();
    assert!(
        table.contains("3/3 nodes answered, 2 from stored values"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("c1") && l.contains("cached") && l.contains("stored")),
        "{table}"
    );
    assert_eq!(r.to_json(false)["results"]["c2"]["status"], "cached");
}

#[tokio::test]
async fn a_rogue_replier_is_reported_unverified_and_never_shown_as_an_answer() {
    use futures_util::StreamExt;
    use vogeler_core::amqp;
    use vogeler_proto::{secret::SecretUrl, topology::Topology, wire};
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    // web01 takes five seconds, so the rogue's 200 replies are in before web01's.
    let slow =
        "name = \"mark\"\ncommand = [\"sh\", \"-c\", \"sleep 5; echo done\"]\nformat = \"lines\"\n";
    let plugins = plugin_dir(&[("mark.toml", slow)]);
    let _agent = spawn_agent(stack.agent_settings("web01", plugins.path()));
    stack.wait_registered(&["web01"]).await;

    // An eavesdropper gets a copy of web01's commands and answers as another node.
    let conn = amqp::connect(
        &SecretUrl::parse(&stack.amqp_first()).expect("url"),
        "test-rogue",
    )
    .await
    .expect("connect");
    let ch = amqp::publisher_channel(&conn).await.expect("channel");
    let t = stack.topology();
    let opts = lapin::options::QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare("".into(), opts, Default::default())
        .await
        .expect("queue");
    ch.queue_bind(
        q.name().clone(),
        t.commands_exchange().as_str().into(),
        "node.web01".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("bind");
    let no_ack = lapin::options::BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut commands = ch
        .basic_consume(q.name().clone(), "".into(), no_ack, Default::default())
        .await
        .expect("consume");
    let rogue = tokio::spawn(async move {
        let d = commands.next().await.expect("stream").expect("delivery");
        let wire::Message::Command(c) = wire::decode(&d.data).expect("command") else {
            panic!("not a command")
        };
        // 100 times posing as web01 (answering before web01 does), each with a key of its
        // own, and as 100 nodes the registry does not know; published back to back, the
        // confirms awaited after, so all are in long before web01's answer.
        let replies = (0..PER_CLASS).flat_map(|i| ["web01".to_string(), format!("rogue{i:03}")]);
        let mut confirms = Vec::new();
        for as_node in replies {
            let rogue_key = vogeler_proto::signing::PrivateKey::generate().expect("key");
            let reply = wire::Message::Result(wire::PluginResult {
                request_id: c.request_id,
                node: vogeler_e2e::node(&as_node),
                plugin: c.plugin.clone(),
                outcome: wire::Outcome::Ok,
                value: Some(serde_json::json!(["not me"])),
                truncated: false,
                collected_at: chrono::Utc::now(),
                duration_ms: 1,
                agent_version: "rogue".into(),
                scheduled: None,
            });
            let body = wire::encode(&reply);
            let headers =
                amqp::signature_headers(&rogue_key, vogeler_proto::signing::Purpose::Agent, &body);
            let confirm = ch
                .basic_publish(
                    t.results_exchange().as_str().into(),
                    Topology::result_routing_key(c.request_id).as_str().into(),
                    Default::default(),
                    &body,
                    lapin::BasicProperties::default().with_headers(headers),
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack(), "reply refused");
        }
        conn
    });

    let r = ask(&stack, "mark", "web01", "15").await;
    let _conn = rogue.await.expect("rogue task");
    let table = r.render_table();
    assert!(
        r.success(),
        "unexpected responders alone do not fail the run:\n{table}"
    );
    // web01's own answer, not the rogue's, though the rogue answered first.
    assert!(
        r.replies
            .get(&vogeler_e2e::node("web01"))
            .is_some_and(|reply| reply.value != Some(serde_json::json!(["not me"]))),
        "{table}"
    );
    assert!(
        table.contains("unverified reply as web01 (not shown): signed by key"),
        "{table}"
    );
    // A replier the registry has no key for is never shown as an answer.
    let strangers = (0..PER_CLASS).map(|i| vogeler_e2e::node(&format!("rogue{i:03}")));
    for n in strangers {
        assert!(!r.replies.contains_key(&n), "{table}");
        assert!(r.unverified.contains_key(&n), "{n} not reported: {table}");
    }
    assert!(
        table.contains("unverified reply as rogue000 (not shown)"),
        "{table}"
    );
    println!(
        "rogue replies: {} sent (100 as web01, 100 as unknown nodes), {} nodes reported unverified, web01's own answer shown",
        2 * PER_CLASS,
        r.unverified.len()
    );
}
