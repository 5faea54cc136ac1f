//! End-to-end tests: the three real binaries, as an operator runs them, against the real
//! broker and database.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::json;
use tokio::process::Child;
use vogeler_e2e::{
    HELLO, TestStack, plugin_dir,
    programs::{program, run, with_couch},
    wait_for,
};

/// SIGTERM a daemon and check it exits 0 within its grace period (10 s) and a margin; on
/// failure, show what it logged.
async fn terminate(mut child: Child, what: &str, log: &Path) {
    let pid = Pid::from_raw(i32::try_from(child.id().expect("pid")).expect("pid fits"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    let waited = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let logged = || std::fs::read_to_string(log).unwrap_or_default();
    let Ok(status) = waited else {
        let _ = child.kill().await;
        panic!(
            "{what} still running 15 s after SIGTERM; it logged:\n{}",
            logged()
        );
    };
    let status = status.expect("wait");
    assert!(
        status.success(),
        "{what} exited with {status} after SIGTERM; it logged:\n{}",
        logged()
    );
}

/// A file for a daemon's stderr.
fn log_file(dir: &Path, name: &str) -> (PathBuf, std::fs::File) {
    let path = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&path).expect("log file");
    (path, file)
}

#[tokio::test]
async fn runner_agents_server_and_couchdb_end_to_end() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let logs = tempfile::tempdir().expect("log dir");
    let (server_log, file) = log_file(logs.path(), "vogeler-server");
    let server = with_couch(program("vogeler-server", &stack), &stack)
        .stderr(file)
        .spawn()
        .expect("server");
    let nodes = ["e2e-web01", "e2e-web02", "e2e-db01"];
    let agents: Vec<(Child, PathBuf)> = nodes
        .iter()
        .map(|n| {
            let (log, file) = log_file(logs.path(), n);
            let mut cmd = program("vogeler-agent", &stack);
            cmd.args(["--node", n, "--plugin-dir"])
                .arg(plugins.path())
                .stderr(file);
            (cmd.spawn().expect("agent"), log)
        })
        .collect();
    stack.wait_registered(&nodes).await;

    let mut request_ids = vec![];
    for round in 1..=2 {
        let mut runner = with_couch(program("vogeler-runner", &stack), &stack);
        runner.args(["-c", "hello", "-n", "all", "--timeout", "10"]);
        let out = run(runner).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("3/3 nodes answered"), "{stdout}");
        for n in nodes {
            assert!(
                stdout.lines().any(|l| l.starts_with(n)
                    && l.contains(" ok ")
                    && l.contains("2 items: alpha, beta")),
                "{stdout}"
            );
        }
        // Every node's document carries this round's value; wait for the newest request id.
        wait_for(
            &format!("round {round} stored for every node"),
            Duration::from_secs(10),
            || async {
                let mut ids = vec![];
                for n in nodes {
                    match stack
                        .document(n)
                        .await
                        .and_then(|d| d.meta.plugins.get("hello").map(|m| m.request_id))
                    {
                        Some(id) if !request_ids.contains(&id) => ids.push(id),
                        _ => return false,
                    }
                }
                ids.windows(2).all(|w| w[0] == w[1])
            },
        )
        .await;
        request_ids
            .push(stack.document(nodes[0]).await.expect("doc").meta.plugins["hello"].request_id);
    }
    // Updated, not duplicated: still exactly one document per node, with the value in place.
    let mut ids = stack.node_ids().await;
    ids.sort();
    let mut want: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(ids, want);
    for n in nodes {
        let raw: serde_json::Value = stack
            .couch
            .get(&stack.database, n)
            .await
            .expect("read")
            .expect("doc");
        assert_eq!(raw["hello"], json!(["alpha", "beta"]), "{raw:#}");
        assert!(
            raw["_rev"].as_str().is_some_and(|r| !r.starts_with("1-")),
            "{raw:#}"
        );
    }

    // Machine-readable output parses back, from the real binary.
    for format in ["json", "yaml"] {
        let mut runner = with_couch(program("vogeler-runner", &stack), &stack);
        runner.args(["-c", "hello", "-n", "e2e-*", "--output", format, "--full"]);
        let out = run(runner).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = match format {
            "json" => serde_json::from_slice(&out.stdout).expect("json output"),
            _ => serde_yaml_ng::from_slice(&out.stdout).expect("yaml output"),
        };
        assert_eq!(doc["summary"]["answered"], 3, "{doc:#}");
        assert_eq!(
            doc["results"]["e2e-db01"]["value"],
            json!(["alpha", "beta"]),
            "{doc:#}"
        );
    }
    let mut runner = with_couch(program("vogeler-runner", &stack), &stack);
    runner.args([
        "-c",
        "hello",
        "-n",
        "e2e-web01,e2e-gone",
        "--output",
        "jsonl",
        "--timeout",
        "2",
    ]);
    let out = run(runner).await;
    assert_eq!(out.status.code(), Some(1), "a node did not answer");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(
        (lines[0]["node"].as_str(), lines[0]["status"].as_str()),
        (Some("e2e-web01"), Some("ok"))
    );
    // e2e-gone never connected: the broker returned its command.
    assert_eq!(
        (lines[1]["node"].as_str(), lines[1]["status"].as_str()),
        (Some("e2e-gone"), Some("not_delivered"))
    );
    assert!(
        lines[1]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("never connected")),
        "{lines:#?}"
    );
    // Global flags work after a subcommand too.
    let mut nodes_cmd = with_couch(program("vogeler-runner", &stack), &stack);
    nodes_cmd.args(["nodes", "--output", "json", "-n", "e2e-web*"]);
    let out = run(nodes_cmd).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nodes json");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed:#}");

    for ((agent, log), n) in agents.into_iter().zip(nodes) {
        terminate(agent, n, &log).await;
    }
    terminate(server, "vogeler-server", &server_log).await;
}

#[tokio::test]
async fn exit_codes_tell_what_went_wrong() {
    let stack = TestStack::new().await;

    // Usage errors: 2.
    let out = run(with_couch(program("vogeler-runner", &stack), &stack)).await;
    assert_eq!(out.status.code(), Some(2), "missing -c");
    let mut bad_name = with_couch(program("vogeler-runner", &stack), &stack);
    bad_name.args(["-c", "../etc/passwd"]);
    let out = run(bad_name).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("plugin name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Broker unreachable: 69, the URL named, the password not.
    let mut unreachable = with_couch(program("vogeler-runner", &stack), &stack);
    unreachable.args([
        "-c",
        "hello",
        "-n",
        "web01",
        "--amqp-url",
        "amqp://guest:hunter2@127.0.0.1:1/%2f",
        "--connect-timeout",
        "300ms",
    ]);
    let out = run(unreachable).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("amqp://guest:***@127.0.0.1:1") && !stderr.contains("hunter2"),
        "{stderr}"
    );

    // Database unreachable for the server: 69.
    let mut server = program("vogeler-server", &stack);
    server.args([
        "--couchdb-url",
        "http://127.0.0.1:1",
        "--connect-timeout",
        "300ms",
    ]);
    let out = run(server).await;
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Bad configuration: 78, every problem listed.
    let mut agent = program("vogeler-agent", &stack);
    agent.args([
        "--node",
        "_bad",
        "--collective",
        "no spaces",
        "--check-config",
    ]);
    let out = run(agent).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("agent.node") && stderr.contains("amqp.collective"),
        "{stderr}"
    );

    // A valid configuration checks without contacting anything: 0.
    let mut ok = with_couch(program("vogeler-server", &stack), &stack);
    ok.args(["--check-config", "--amqp-url", "amqp://127.0.0.1:1/%2f"]);
    assert_eq!(run(ok).await.status.code(), Some(0));

    // A database URL that reaches CouchDB but not its root (a wrong path prefix: 404) will
    // not improve with waiting: 78, not 69.
    let mut server = program("vogeler-server", &stack);
    let prefixed = format!(
        "{}/not-a-prefix/",
        stack.couch_first().trim_end_matches('/')
    );
    server.args(["--couchdb-url", &prefixed, "--database", &stack.database]);
    let out = run(server).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("404"), "{stderr}");

    // A port another process holds can be freed: 1, so systemd restarts the program
    // (78 would stop it for good through RestartPreventExitStatus). An address this
    // machine does not have is a configuration error: 78.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("state dir");
    for (addr, want) in [(taken.as_str(), 1), ("192.0.2.1:9188", 78)] {
        let mut agent = program("vogeler-agent", &stack);
        agent
            .args([
                "--node",
                "exit-listen",
                "--http-listen",
                addr,
                "--state-dir",
            ])
            .arg(dir.path());
        let mut server = with_couch(program("vogeler-server", &stack), &stack);
        server.args(["--http-listen", addr]);
        for (name, cmd) in [("agent", agent), ("server", server)] {
            let out = run(cmd).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(want), "{name} on {addr}: {stderr}");
            assert!(stderr.contains("cannot listen on"), "{name}: {stderr}");
            assert!(!stderr.contains("broker is running"), "{name}: {stderr}");
        }
    }
}
