//! `vogeler-runner query`, `count` and `-n` expressions over stored values, through the real
//! binaries on the real broker and CouchDB: three agents store package lists (dpkg and rpm
//! records with the tricky version cases) and a JSON value; the runner selects nodes by
//! package versions in the package manager's order, by values and list elements, shows
//! fields, counts from the reduce views, and commands exactly the nodes an expression names.

use std::{collections::BTreeSet, path::Path, time::Duration};

use serde_json::{Value, json};
use vogeler_e2e::{
    TestStack, plugin_dir,
    programs::{program, run, with_couch},
    spawn_agent, spawn_server, wait_for,
};

const A: &str = "q-a";
const B: &str = "q-b";
const C: &str = "q-c";

/// `dpkg` and `rpms` plugins (package inventories by name) and a JSON `sysinfo`, each
/// printing a file of the test's.
fn plugins(dir: &Path) -> tempfile::TempDir {
    let cat = |f: &str| format!("command = [\"cat\", \"{}\"]\n", dir.join(f).display());
    let dpkg = format!(
        "name = \"dpkg\"\n{}format = \"fields\"\nfields = [\"name\", \"version\", \"arch\", \"status\"]\nseparator = \"\\t\"\n",
        cat("dpkg")
    );
    let rpms = format!(
        "name = \"rpms\"\n{}format = \"fields\"\nfields = [\"name\", \"epoch\", \"version\", \"release\", \"arch\"]\nseparator = \"\\t\"\n",
        cat("rpms")
    );
    let sysinfo = format!("name = \"sysinfo\"\n{}format = \"json\"\n", cat("sysinfo"));
    // Any plugin may declare itself a package inventory, here in rpm's order.
    let apk = format!(
        "name = \"apk\"\n{}format = \"fields\"\nfields = [\"name\", \"version\"]\nseparator = \"\\t\"\npackages = \"rpm\"\n",
        cat("apk")
    );
    plugin_dir(&[
        ("apk.toml", &apk),
        ("dpkg.toml", &dpkg),
        ("rpms.toml", &rpms),
        ("sysinfo.toml", &sysinfo),
    ])
}

fn node_files(dpkg: &str, rpms: &str, sysinfo: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("data");
    let apk = match dpkg.contains("tool\t2.0") {
        true => "musl\t1.2.10-r0\n",
        false if dpkg.contains("libfoo\t1.10") => "musl\t1.2.4-r2\n",
        false => "",
    };
    std::fs::write(dir.path().join("apk"), apk).expect("apk");
    std::fs::write(dir.path().join("dpkg"), dpkg).expect("dpkg");
    std::fs::write(dir.path().join("rpms"), rpms).expect("rpms");
    std::fs::write(dir.path().join("sysinfo"), sysinfo.to_string()).expect("sysinfo");
    dir
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn names(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["node"].as_str().expect("node").to_string())
        .collect()
}

#[tokio::test]
async fn expressions_select_by_stored_values_in_each_package_managers_order() {
    let stack = TestStack::new().await;
    let a = node_files(
        "openssl\t3.0.9-1\tamd64\tinstalled\nlibfoo\t1.10-1\tamd64\tinstalled\nold\t1.0\tamd64\tconfig-files\n",
        "bash\t(none)\t5.2\t1.el9\tx86_64\n",
        json!({"memory_mb": 2048, "os_version": "12", "disks": [
            {"target": "/", "use_percent": 95}, {"target": "/var", "use_percent": 10}]}),
    );
    let b = node_files(
        "openssl\t3.0.13-1\tamd64\tinstalled\nlibfoo\t1.9-1\tamd64\tinstalled\ntool\t1:0.1-1\tamd64\tinstalled\n",
        "",
        json!({"memory_mb": 16384, "os_version": "12", "disks": [{"target": "/", "use_percent": 50}]}),
    );
    let c = node_files(
        "openssl\t3.0.13~rc1-1\tamd64\tinstalled\ntool\t2.0-1\tamd64\tinstalled\n",
        "kernel\t(none)\t5.14.0\t362.el9\tx86_64\nbash\t1\t5.1\t8.el9\tx86_64\n",
        json!({"memory_mb": 8192, "os_version": "11", "disks": []}),
    );
    let (pa, pb, pc) = (plugins(a.path()), plugins(b.path()), plugins(c.path()));
    let _server = spawn_server(stack.server_settings());
    let _a = spawn_agent(stack.agent_settings(A, pa.path()));
    let _b = spawn_agent(stack.agent_settings(B, pb.path()));
    let _c = spawn_agent(stack.agent_settings(C, pc.path()));
    stack.wait_registered(&[A, B, C]).await;

    let runner = |args: Vec<String>| {
        let mut cmd = with_couch(program("vogeler-runner", &stack), &stack);
        cmd.args(args);
        run(cmd)
    };
    let ok = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let runner = &runner;
        async move {
            let out = runner(args.clone()).await;
            let stdout = String::from_utf8(out.stdout).expect("utf8");
            assert!(
                out.status.success(),
                "vogeler-runner {args:?}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        }
    };
    for plugin in ["apk", "dpkg", "rpms", "sysinfo"] {
        ok(&[
            "-c",
            plugin,
            "-n",
            "q-*",
            "--wait",
            "stored",
            "--timeout",
            "10",
        ])
        .await;
    }

    let query = |expr: &'static str| {
        let ok = &ok;
        async move { names(&lines(&ok(&["query", expr, "-o", "jsonl"]).await)) }
    };
    // dpkg's order: `~rc` sorts before the release, 1.10 after 1.9, an epoch above all.
    assert_eq!(query("dpkg has openssl < 3.0.13").await, [A, C]);
    assert_eq!(query("dpkg has openssl >= 3.0.13").await, [B]);
    assert_eq!(query("dpkg has libfoo > 1.9-1").await, [A], "1.10 > 1.9");
    assert_eq!(query("dpkg has tool > 2.0-1").await, [B], "1:0.1 > 2.0");
    assert_eq!(
        query(r"dpkg has name=openssl and version=~^3\.0\.13").await,
        [B, C]
    );
    assert!(
        query("dpkg has old").await.is_empty(),
        "config-files is not installed"
    );
    assert_eq!(
        query("dpkg has (name = old and status = config-files)").await,
        [A],
        "unless the conditions ask about status"
    );
    // rpm's: epochs from the records, a bound without release meets any release.
    assert_eq!(query("rpms has bash >= 1:5.0").await, [C]);
    assert_eq!(query("rpms has kernel = 5.14.0").await, [C]);
    assert_eq!(query("rpms has kernel < 5.14.0-400.el9").await, [C]);
    // A declared inventory: rpm's order (1.2.10 > 1.2.9, which text order denies).
    assert_eq!(query("apk has musl > 1.2.9").await, [C]);
    assert_eq!(query("apk has musl").await, [A, C]);
    // Plugin values by path, list elements, and the combinations.
    assert_eq!(query("sysinfo.memory_mb < 10000").await, [A, C]);
    assert_eq!(query("sysinfo.os_version = 12").await, [A, B]);
    assert_eq!(query("sysinfo.disks[].use_percent > 90").await, [A]);
    assert_eq!(
        query("sysinfo.memory_mb < 10000 and not dpkg has tool").await,
        [A]
    );
    assert_eq!(query("q-b or sysinfo.os_version != 12").await, [B, C]);
    assert_eq!(query("all").await, [A, B, C]);

    // --fields: values by path, a package's version, list elements.
    let rows = lines(
        &ok(&[
            "query",
            "dpkg has openssl < 3.0.13",
            "--fields",
            "sysinfo.memory_mb,dpkg:openssl,sysinfo.disks[].target",
            "-o",
            "jsonl",
        ])
        .await,
    );
    assert_eq!(
        rows,
        [
            json!({"node": A, "sysinfo.memory_mb": 2048, "dpkg:openssl": "3.0.9-1",
                   "sysinfo.disks[].target": ["/", "/var"]}),
            json!({"node": C, "sysinfo.memory_mb": 8192, "dpkg:openssl": "3.0.13~rc1-1",
                   "sysinfo.disks[].target": null}),
        ]
    );
    let table = ok(&["query", "dpkg has openssl", "--fields", "dpkg:openssl"]).await;
    println!("$ vogeler-runner query 'dpkg has openssl' --fields dpkg:openssl\n{table}");
    assert!(
        table.starts_with("NODE  DPKG:OPENSSL\nq-a   3.0.9-1\n"),
        "{table}"
    );
    assert!(table.ends_with("3 node(s)\n"), "{table}");

    // count: from the reduce views, or over -n.
    let counts = |args: &'static [&'static str]| {
        let ok = &ok;
        async move {
            let mut all = vec!["count"];
            all.extend_from_slice(args);
            all.extend_from_slice(&["-o", "json"]);
            serde_json::from_str::<Value>(&ok(&all).await).expect("json")
        }
    };
    assert_eq!(
        counts(&["sysinfo.os_version"]).await,
        json!([{"value": "12", "nodes": 2}, {"value": "11", "nodes": 1}])
    );
    let spread = counts(&["dpkg:openssl"]).await;
    let versions: BTreeSet<&str> = spread
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["value"].as_str().expect("version"))
        .collect();
    assert_eq!(
        versions,
        ["3.0.13-1", "3.0.13~rc1-1", "3.0.9-1"].into(),
        "{spread}"
    );
    assert_eq!(
        counts(&["sysinfo.os_version", "-n", "dpkg has tool"]).await,
        json!([{"value": "11", "nodes": 1}, {"value": "12", "nodes": 1}])
    );
    let table = ok(&["count", "sysinfo.memory_mb", "-n", "q-a,q-b"]).await;
    println!("$ vogeler-runner count sysinfo.memory_mb -n q-a,q-b\n{table}");
    assert!(table.contains("2 value(s) over 2 node(s)"), "{table}");
    assert_eq!(
        counts(&["apk:musl"]).await.as_array().map(Vec::len),
        Some(2),
        "declared inventories are counted too"
    );
    let rpm_count = ok(&["count", "rpms:bash"]).await;
    assert!(rpm_count.contains("1:5.1-8.el9"), "{rpm_count}");
    assert!(
        rpm_count.contains("5.2-1.el9"),
        "(none) is no epoch: {rpm_count}"
    );

    // A path through a list is not counted: the error says what to do instead.
    let out = runner(vec!["count".into(), "sysinfo.disks[].target".into()]).await;
    assert_eq!(out.status.code(), Some(2), "usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("query all --fields sysinfo.disks[].target"),
        "{err}"
    );

    // -n with the same expressions commands exactly the matching nodes.
    let report: Value = serde_json::from_str(
        &ok(&[
            "-c",
            "sysinfo",
            "-n",
            "dpkg has openssl < 3.0.13",
            "-o",
            "json",
            "--timeout",
            "10",
        ])
        .await,
    )
    .expect("report");
    let answered: BTreeSet<&str> = report["results"]
        .as_object()
        .expect("results")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(answered, [A, C].into(), "{report:#}");
    assert_eq!(report["summary"]["expected"], json!(2), "{report:#}");
    let commanded = |node: &str| {
        stack
            .audit_events(node, "finished")
            .iter()
            .filter(|e| e["plugin"] == "sysinfo")
            .count()
    };
    wait_for(
        "the targeted runs audited",
        Duration::from_secs(5),
        || async { commanded(A) >= 2 && commanded(C) >= 2 },
    )
    .await;
    // One collection each, plus the targeted command on A and C only.
    assert_eq!(
        (commanded(A), commanded(B), commanded(C)),
        (2, 1, 2),
        "only the matching nodes ran the command"
    );

    // A selection that matches nobody says so, and sends nothing.
    let out = runner(
        ["-c", "sysinfo", "-n", "dpkg has no-such-package"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "nobody answered");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("no registered node matches -n 'dpkg has no-such-package'"),
        "{out}"
    );
    assert_eq!((commanded(A), commanded(B), commanded(C)), (2, 1, 2));

    // A bad expression is a usage error that says where.
    let out = runner(vec!["query".into(), "dpkg has (openssl".into()]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("column"), "{err}");
}
