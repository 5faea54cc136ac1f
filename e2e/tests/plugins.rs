//! Plugin behaviour through the whole path (runner → agent → plugin → result), against the
//! real broker: timeouts, floods, hot reload, user switching, the concurrency limit, and every
//! shipped plugin run with `vogeler-agent plugins run`.

use std::{path::Path, process::Stdio, time::Duration};

use serde_json::Value;
use vogeler_e2e::{
    HELLO, TestStack, ask, node, plugin_dir,
    programs::{bare, program},
    spawn_agent, spawn_server, wait_for,
};
use vogeler_proto::wire::Outcome;

/// A server, so agents register; commands to a node are only routed once its queue exists.
async fn ready(
    stack: &TestStack,
    nodes: &[&str],
) -> vogeler_e2e::Running<vogeler_server::ServerError> {
    let server = spawn_server(stack.server_settings());
    stack.wait_registered(nodes).await;
    server
}

/// Command lines of live processes containing `needle` (zombies have none, so they do not count).
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

#[tokio::test]
async fn a_hung_plugin_with_a_stdout_holding_grandchild_times_out_and_leaves_nothing() {
    let stack = TestStack::new().await;
    // A unique sleep length marks this test's processes.
    let marker = format!("7{}.5", std::process::id() % 10_000);
    let hang = format!(
        "name = \"hang\"\ncommand = [\"sh\", \"-c\", \"sleep {marker} & echo started; sleep {marker}\"]\nformat = \"lines\"\ntimeout = \"1s\"\n"
    );
    let plugins = plugin_dir(&[("hang.toml", &hang)]);
    let _agent = spawn_agent(stack.agent_settings("hang01", plugins.path()));
    let _server = ready(&stack, &["hang01"]).await;
    let r = ask(&stack, "hang", "hang01", "15").await;
    let reply = &r.replies[&node("hang01")];
    assert_eq!(reply.outcome, Outcome::TimedOut { timeout_ms: 1000 });
    // The contract: a timed-out result within timeout + 2 s (measured from the runner).
    assert!(
        r.elapsed < Duration::from_secs(3),
        "answered after {:?}",
        r.elapsed
    );
    assert!(
        processes_with(&format!("sleep {marker}")).is_empty(),
        "{:?}",
        processes_with(&marker)
    );
}

#[tokio::test]
async fn a_plugin_added_while_the_agent_runs_is_callable_without_restart() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _agent = spawn_agent(stack.agent_settings("reload01", plugins.path()));
    let _server = ready(&stack, &["reload01"]).await;
    let before = ask(&stack, "late", "reload01", "10").await;
    assert_eq!(
        before.replies[&node("reload01")].outcome,
        Outcome::UnknownPlugin
    );

    let late = "name = \"late\"\ncommand = [\"echo\", \"arrived\"]\nformat = \"string\"\n";
    std::fs::write(plugins.path().join("late.toml"), late).expect("drop in plugin");
    wait_for(
        "the new plugin answers",
        Duration::from_secs(10),
        || async {
            ask(&stack, "late", "reload01", "5")
                .await
                .replies
                .get(&node("reload01"))
                .is_some_and(|r| r.outcome.is_ok())
        },
    )
    .await;
    let r = ask(&stack, "late", "reload01", "10").await;
    assert_eq!(
        r.replies[&node("reload01")].value,
        Some(Value::String("arrived".into()))
    );

    // Removing the file removes the plugin.
    std::fs::remove_file(plugins.path().join("late.toml")).expect("remove plugin");
    wait_for(
        "the removed plugin is unknown",
        Duration::from_secs(10),
        || async {
            ask(&stack, "late", "reload01", "5")
                .await
                .replies
                .get(&node("reload01"))
                .is_some_and(|r| r.outcome == Outcome::UnknownPlugin)
        },
    )
    .await;
}

#[tokio::test]
async fn user_nobody_runs_as_uid_65534() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches users and must run as root (CI does)"
    );
    let stack = TestStack::new().await;
    let whoami =
        "name = \"whoami\"\ncommand = [\"id\", \"-u\"]\nformat = \"string\"\nuser = \"nobody\"\n";
    let plugins = plugin_dir(&[("whoami.toml", whoami)]);
    let _agent = spawn_agent(stack.agent_settings("user01", plugins.path()));
    let _server = ready(&stack, &["user01"]).await;
    let r = ask(&stack, "whoami", "user01", "10").await;
    assert_eq!(
        r.replies[&node("user01")].value,
        Some(Value::String("65534".into())),
        "{}",
        r.render_table()
    );
}

#[tokio::test]
async fn no_more_than_the_concurrency_limit_of_runs_overlap() {
    let stack = TestStack::new().await;
    let log = tempfile::NamedTempFile::new().expect("log");
    let body = vogeler_e2e::busy_plugin(log.path());
    let plugins = plugin_dir(&[("busy.toml", &body)]);
    let mut sources = stack.sources();
    sources
        .set("agent.node", Some("busy01"))
        .set("agent.plugin_dir", Some(plugins.path().display()))
        .set("agent.concurrency", Some(2));
    let settings = vogeler_config::load(&sources)
        .expect("load")
        .agent(None)
        .expect("settings");
    let _agent = spawn_agent(settings);
    let _server = ready(&stack, &["busy01"]).await;

    let asks: Vec<_> = (0..6)
        .map(|_| ask(&stack, "busy", "busy01", "20"))
        .collect();
    for r in futures_util::future::join_all(asks).await {
        assert!(r.success(), "{}", r.render_table());
    }
    let text = std::fs::read_to_string(log.path()).expect("read log");
    let (peak, runs) = vogeler_e2e::peak_overlap(&text);
    assert_eq!(runs, 6, "{text}");
    assert_eq!(
        peak, 2,
        "runs overlapped {peak} at once with a limit of 2\n{text}"
    );
}

#[tokio::test]
async fn a_100_mib_flood_is_truncated_and_agent_memory_stays_bounded() {
    let stack = TestStack::new().await;
    let flood = "name = \"flood\"\ncommand = [\"sh\", \"-c\", \"yes 0123456789abcdef | head -c 104857600\"]\nformat = \"lines\"\ntimeout = \"60s\"\n";
    let plugins = plugin_dir(&[("flood.toml", flood)]);
    let mut agent = program("vogeler-agent", &stack);
    agent
        .args(["--node", "flood01", "--plugin-dir"])
        .arg(plugins.path())
        .stderr(Stdio::null());
    let child = agent.spawn().expect("agent");
    let pid = child.id().expect("pid");
    let _server = ready(&stack, &["flood01"]).await;

    let r = ask(&stack, "flood", "flood01", "60").await;
    let reply = &r.replies[&node("flood01")];
    assert!(
        reply.outcome.is_ok() && reply.truncated,
        "{}",
        r.render_table()
    );
    let lines = reply
        .value
        .as_ref()
        .and_then(Value::as_array)
        .map(Vec::len)
        .expect("lines");
    // 4 MiB of 17-byte lines.
    assert!((240_000..=250_000).contains(&lines), "{lines} lines");
    let peak_kib = vogeler_e2e::programs::peak_rss_kib(pid);
    eprintln!(
        "agent peak RSS after a 100 MiB flood: {} MiB",
        peak_kib / 1024
    );
    assert!(
        peak_kib < 96 * 1024,
        "agent peak RSS {peak_kib} KiB for a 4 MiB cap"
    );
    drop(child);
}

/// What `plugins run` printed and how it exited.
async fn run_plugin(name: &str) -> (Option<i32>, Value, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let mut cmd = bare("vogeler-agent");
    cmd.args(["plugins", "run", name, "--plugin-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("finished")
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let value = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: stdout is not JSON: {e}"))
    };
    (out.status.code(), value, stderr)
}

fn on_path(program: &str) -> bool {
    std::env::split_paths(vogeler_agent::exec::PLUGIN_PATH).any(|d| d.join(program).is_file())
}

fn assert_records(name: &str, v: &Value, keys: &[&str]) {
    let rows = v
        .as_array()
        .unwrap_or_else(|| panic!("{name}: not a list: {v}"));
    assert!(!rows.is_empty(), "{name}: empty");
    for row in rows {
        for k in keys {
            assert!(row.get(k).is_some(), "{name}: {row} has no {k}");
        }
    }
}

#[tokio::test]
async fn every_shipped_plugin_runs_with_its_documented_shape() {
    let (code, v, _) = run_plugin("hello").await;
    assert_eq!((code, v), (Some(0), serde_json::json!(["alpha", "beta"])));

    let (code, v, e) = run_plugin("facts").await;
    assert_eq!(code, Some(0), "{e}");
    for k in [
        "hostname",
        "fqdn",
        "kernel",
        "arch",
        "cpus",
        "memory_mb",
        "uptime_s",
        "ips",
    ] {
        assert!(
            v.get(k).is_some_and(|x| !x.is_null()),
            "facts.{k} missing: {v}"
        );
    }
    for k in ["id", "family", "name", "version"] {
        assert!(v["os"].get(k).is_some(), "facts.os.{k} missing: {v}");
    }
    assert!(
        v["cpus"].as_u64().is_some_and(|n| n >= 1) && v["ips"].is_array(),
        "{v}"
    );

    let (code, v, e) = run_plugin("dpkg").await;
    assert_eq!(code, Some(0), "{e}");
    assert_records("dpkg", &v, &["name", "version", "arch", "status"]);
    assert!(
        v.as_array()
            .expect("list")
            .iter()
            .any(|p| p["name"] == "dpkg" && p["status"] == "installed"),
        "dpkg lists itself"
    );

    let (code, v, e) = run_plugin("os_release").await;
    assert_eq!(code, Some(0), "{e}");
    assert!(
        v["ID"].is_string() && !v["ID"].as_str().unwrap_or("\"").contains('"'),
        "{v}"
    );

    let (code, v, e) = run_plugin("kernel").await;
    assert_eq!(code, Some(0), "{e}");
    assert!(v.as_str().is_some_and(|k| k.starts_with("Linux ")), "{v}");

    let (code, v, e) = run_plugin("users").await;
    assert_eq!(code, Some(0), "{e}");
    assert_records("users", &v, &["name", "uid", "gid", "home", "shell"]);
    assert!(
        v.as_array()
            .expect("list")
            .iter()
            .any(|u| u["name"] == "root" && u["uid"] == "0")
    );

    let (code, v, e) = run_plugin("disks").await;
    assert_eq!(code, Some(0), "{e}");
    assert_records(
        "disks",
        &v["filesystems"],
        &["source", "fstype", "size", "used", "avail", "target"],
    );

    let (code, v, e) = run_plugin("listening_ports").await;
    assert_eq!(code, Some(0), "{e}");
    // RabbitMQ listens on this machine while the tests run.
    assert_records("listening_ports", &v, &["proto", "state", "local", "peer"]);

    // Where the tool or the kernel interface is missing, the outcome says so clearly.
    for (name, program, present) in [
        ("rpms", "rpm", on_path("rpm")),
        ("facter", "facter", on_path("facter")),
        (
            "kernel_modules",
            "/proc/modules",
            Path::new("/proc/modules").exists(),
        ),
        (
            "services",
            "systemd",
            Path::new("/run/systemd/system").exists(),
        ),
    ] {
        let (code, v, e) = run_plugin(name).await;
        if present {
            assert_eq!(code, Some(0), "{name}: {e}");
            assert!(!v.is_null(), "{name}");
        } else {
            assert_eq!(code, Some(1), "{name}: {e}");
            let expected = if program.starts_with('/') || program == "systemd" {
                "failed"
            } else {
                "failed_to_start"
            };
            assert!(
                e.contains(&format!("plugin {name}: {expected}")),
                "{name}: {e}"
            );
            if expected == "failed_to_start" {
                assert!(
                    e.contains(&format!("{program}: No such file or directory")),
                    "{name}: {e}"
                );
            }
        }
    }
}

#[tokio::test]
async fn plugins_check_is_a_validate_cmd() {
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let out = bare("vogeler-agent")
        .args(["plugins", "check"])
        .arg(&good)
        .output()
        .await
        .expect("check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = plugin_dir(&[
        (
            "typo.toml",
            "name = \"x\"\ncomand = [\"true\"]\nformat = \"lines\"\n",
        ),
        ("ok.toml", HELLO),
    ]);
    let out = bare("vogeler-agent")
        .args(["plugins", "check"])
        .arg(bad.path())
        .output()
        .await
        .expect("check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("typo.toml") && stderr.contains("comand") && stderr.contains("1 error(s)"),
        "{stderr}"
    );

    // A single file, as Ansible's and Puppet's validate_cmd pass it.
    let out = bare("vogeler-agent")
        .args(["plugins", "check"])
        .arg(bad.path().join("typo.toml"))
        .output()
        .await
        .expect("check");
    assert_eq!(out.status.code(), Some(78));
    let out = bare("vogeler-agent")
        .args(["plugins", "check"])
        .arg(bad.path().join("ok.toml"))
        .output()
        .await
        .expect("check");
    assert_eq!(out.status.code(), Some(0));
}
