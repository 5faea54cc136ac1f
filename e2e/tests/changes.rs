//! `vogeler-runner changes` and `history` through the real binaries: two agents report a
//! package list and a config object, both change, and the runner says what changed across
//! the fleet (table and jsonl, filtered by -n and --plugin, cut by --limit).

use std::{path::Path, time::Duration};

use serde_json::Value;
use vogeler_e2e::{
    TestStack, plugin_dir,
    programs::{program, run, with_couch},
    spawn_agent, spawn_server, wait_for,
};

const WEB: &str = "chg-web01";
const DB: &str = "chg-db01";

/// A dpkg-like plugin and a JSON object plugin, each printing a file the test rewrites.
fn plugins(pkgs: &Path, conf: &Path) -> tempfile::TempDir {
    let pkgs = format!(
        "name = \"pkgs\"\ncommand = [\"cat\", \"{}\"]\nformat = \"fields\"\nfields = [\"name\", \"version\", \"arch\"]\nseparator = \"\\t\"\n",
        pkgs.display()
    );
    let conf = format!(
        "name = \"conf\"\ncommand = [\"cat\", \"{}\"]\nformat = \"json\"\n",
        conf.display()
    );
    plugin_dir(&[("pkgs.toml", &pkgs), ("conf.toml", &conf)])
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write plugin data");
}

#[tokio::test]
async fn changes_across_the_fleet_newest_first_and_filtered() {
    let stack = TestStack::new().await;
    let data = tempfile::tempdir().expect("data");
    let file = |name: &str| data.path().join(name);
    write(
        &file("web.pkgs"),
        "openssl\t3.0.11-1\tamd64\ntelnet\t0.17-44\tamd64\nbash\t5.2-1\tamd64\n",
    );
    write(&file("db.pkgs"), "postgresql\t15.5-0\tamd64\n");
    write(&file("web.conf"), r#"{"workers": 4}"#);
    write(
        &file("db.conf"),
        r#"{"memory_mb": 2048, "os": {"version": "11"}}"#,
    );
    let web_plugins = plugins(&file("web.pkgs"), &file("web.conf"));
    let db_plugins = plugins(&file("db.pkgs"), &file("db.conf"));
    let _server = spawn_server(stack.server_settings());
    let _web = spawn_agent(stack.agent_settings(WEB, web_plugins.path()));
    let _db = spawn_agent(stack.agent_settings(DB, db_plugins.path()));
    stack.wait_registered(&[WEB, DB]).await;

    let runner = |args: &[&str]| {
        let mut cmd = with_couch(program("vogeler-runner", &stack), &stack);
        cmd.args(args);
        run(cmd)
    };
    let collect = |plugin: &'static str| {
        let runner = &runner;
        async move {
            let out = runner(&["-c", plugin, "-n", "chg-*", "--timeout", "10"]).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    };
    // First values (not history), then one change of each.
    collect("pkgs").await;
    collect("conf").await;
    write(
        &file("web.pkgs"),
        "openssl\t3.0.13-1\tamd64\nbash\t5.2-1\tamd64\nnginx\t1.22.1-9\tamd64\n",
    );
    write(&file("db.pkgs"), "postgresql\t15.6-0\tamd64\n");
    write(
        &file("db.conf"),
        r#"{"memory_mb": 4096, "os": {"version": "12"}}"#,
    );
    collect("pkgs").await;
    collect("conf").await;
    wait_for(
        "three changes recorded",
        Duration::from_secs(20),
        || async { stack.history_ids().await.len() >= 3 },
    )
    .await;

    let stdout = |args: &'static [&'static str]| {
        let runner = &runner;
        async move {
            let out = runner(args).await;
            assert!(
                out.status.success(),
                "changes {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (
                String::from_utf8(out.stdout).expect("utf8"),
                String::from_utf8(out.stderr).expect("utf8"),
            )
        }
    };
    let jsonl = |text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
            .collect()
    };

    let (table, _) = stdout(&["changes", "--since", "1h"]).await;
    println!("$ vogeler-runner changes --since 1h\n{table}");
    for line in [
        "  openssl 3.0.11-1 → 3.0.13-1\n",
        "  + nginx 1.22.1-9\n",
        "  - telnet 0.17-44\n",
        "  postgresql 15.5-0 → 15.6-0\n",
        "  memory_mb: 2048 → 4096\n",
        "  os.version: 11 → 12\n",
        "3 change(s) since ",
    ] {
        assert!(table.contains(line), "{line:?} missing from:\n{table}");
    }
    assert!(!table.contains("more changes exist"), "{table}");

    let (all, _) = stdout(&["changes", "--since", "1h", "--output", "jsonl"]).await;
    let rows = jsonl(&all);
    assert_eq!(rows.len(), 3, "{all}");
    let times: Vec<&str> = rows.iter().map(|r| r["at"].as_str().expect("at")).collect();
    let mut newest_first = times.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, newest_first, "newest first");
    let web = rows
        .iter()
        .find(|r| r["node"] == WEB && r["plugin"] == "pkgs")
        .expect("web01's package change");
    assert!(web["request_id"].is_string(), "{web}");
    assert_eq!(web["kind"], "packages");
    assert_eq!(web["changed"][0]["name"], "openssl");
    assert_eq!(
        (&web["changed"][0]["old"], &web["changed"][0]["new"]),
        (&Value::from("3.0.11-1"), &Value::from("3.0.13-1"))
    );
    assert_eq!(web["added"][0]["name"], "nginx");
    assert_eq!(web["removed"][0]["name"], "telnet");
    let conf = rows
        .iter()
        .find(|r| r["node"] == DB && r["plugin"] == "conf")
        .expect("db01's config change");
    assert_eq!(conf["kind"], "object");
    assert!(
        conf["changed"]
            .as_array()
            .expect("changed")
            .iter()
            .any(|c| c["path"] == "os.version" && c["old"] == "11" && c["new"] == "12"),
        "{conf}"
    );

    // -n and --plugin narrow it.
    let (one_node, _) = stdout(&["changes", "--since", "1h", "-n", WEB, "--output", "jsonl"]).await;
    let rows = jsonl(&one_node);
    assert!(rows.len() == 1 && rows[0]["node"] == WEB, "{one_node}");
    let (by_glob, _) = stdout(&["changes", "-n", "chg-db*", "--plugin", "conf"]).await;
    assert!(
        by_glob.contains(DB) && !by_glob.contains(WEB) && by_glob.contains("1 change(s)"),
        "{by_glob}"
    );
    let (pkgs, _) = stdout(&["changes", "-c", "pkgs", "--output", "jsonl"]).await;
    let rows = jsonl(&pkgs);
    assert!(
        rows.len() == 2 && rows.iter().all(|r| r["plugin"] == "pkgs"),
        "{pkgs}"
    );
    let (none, _) = stdout(&["changes", "--since", "1h", "--plugin", "nothing"]).await;
    assert!(none.starts_with("no changes since "), "{none}");

    // --limit keeps the newest and says more exist: in the table, and on stderr for jsonl.
    let (cut, _) = stdout(&["changes", "--limit", "1"]).await;
    assert!(
        cut.contains("1 change(s)") && cut.contains("more changes exist"),
        "{cut}"
    );
    let (cut, note) = stdout(&["changes", "--limit", "2", "--output", "jsonl"]).await;
    let rows = jsonl(&cut);
    assert_eq!(rows.len(), 2, "{cut}");
    assert_eq!(rows[0]["at"].as_str(), Some(times[0]), "the newest kept");
    assert!(note.contains("more changes exist"), "{note}");
    let (doc, _) = stdout(&["changes", "--output", "json"]).await;
    let doc: Value = serde_json::from_str(&doc).expect("json");
    assert_eq!(doc.as_array().map(Vec::len), Some(3), "{doc}");

    // The window is a bound: nothing changed in the last second once two have passed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (recent, _) = stdout(&["changes", "--since", "1s"]).await;
    assert!(recent.starts_with("no changes since "), "{recent}");

    // `history` says a change the same way.
    let (history, _) = stdout(&["history", WEB, "pkgs"]).await;
    println!("$ vogeler-runner history {WEB} pkgs\n{history}");
    assert!(
        history.contains("  openssl 3.0.11-1 → 3.0.13-1\n  + nginx 1.22.1-9\n  - telnet 0.17-44\n"),
        "{history}"
    );
}
