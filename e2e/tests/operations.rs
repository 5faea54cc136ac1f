//! What operators touch around the programs: the shipped example configs, `--check-config`,
//! `--print-config`, and `/healthz` and `/metrics`.

use std::{path::PathBuf, process::Output, time::Duration};

use vogeler_config as config;
use vogeler_core::observe::{AgentMetrics, ServerMetrics};
use vogeler_e2e::{HELLO, TestStack, ask, plugin_dir, programs::bare, wait_for};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/config")
        .join(name)
}

async fn output(mut cmd: tokio::process::Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("finished within 60 s")
        .expect("run")
}

#[tokio::test]
async fn shipped_configs_check_without_their_files_or_servers() {
    for program in ["agent", "server", "runner"] {
        let file = example(&format!("{program}.toml"));
        let mut cmd = bare(&format!("vogeler-{program}"));
        cmd.arg("--config").arg(&file).arg("--check-config");
        let out = output(cmd).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
    }
}

#[tokio::test]
async fn a_bad_config_file_lists_every_problem_and_exits_78() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
[amqp]
url = "http://not-a-broker"
collective = "has spaces"
[couchdb]
username = "u"
[server]
prefetch = 10
batch_size = 100
http_listen = "localhost"
[log]
level = "loud=["
"#,
    )
    .expect("write");
    let mut cmd = bare("vogeler-server");
    cmd.arg("--config").arg(&file).arg("--check-config");
    let out = output(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    for key in [
        "amqp.url",
        "amqp.collective",
        "couchdb.username",
        "server.batch_size",
        "server.http_listen",
        "log.level",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }

    // A misspelt key is named too.
    std::fs::write(&file, "[agent]\nplugindir = \"/x\"\n").expect("write");
    let mut cmd = bare("vogeler-agent");
    cmd.arg("--config").arg(&file).arg("--check-config");
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugindir"));
}

#[tokio::test]
async fn print_config_redacts_secrets_and_reads_back_as_the_same_config() {
    let dir = tempfile::tempdir().expect("dir");
    let mut cmd = bare("vogeler-runner");
    cmd.env("VOGELER_COUCHDB__USERNAME", "ops")
        .env("VOGELER_COUCHDB__PASSWORD", "hunter2-couch")
        .args([
            "--amqp-url",
            "amqp://runner:hunter2-amqp@broker.example:5672/fleet",
        ])
        .args(["--collective", "blue", "--timeout", "7s", "--print-config"]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(0));
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("runner:***@broker.example"), "{printed}");
    assert!(printed.contains("password = \"***\""), "{printed}");
    assert!(printed.contains("collective = \"blue\""), "{printed}");
    assert!(printed.contains("timeout = \"7s\""), "{printed}");
    assert!(
        printed.contains("database = \"system_records\""),
        "defaults included: {printed}"
    );

    // The output is a config file: fed back, it gives the same effective settings.
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, &printed).expect("write");
    let sources = config::Sources {
        file: Some(file),
        env: Some(Default::default()),
        overrides: vec![],
    };
    let again = config::load(&sources)
        .expect("load")
        .runner()
        .expect("valid");
    use config::ProgramSettings;
    assert_eq!(again.to_toml(), printed);
}

#[tokio::test]
async fn password_files_are_read_at_start_not_when_checking() {
    let stack = TestStack::new().await;
    let mut sources = stack.sources();
    sources.set(
        "amqp.password_file",
        Some("/nonexistent/vogeler/amqp.password"),
    );
    let settings = config::load(&sources)
        .expect("load")
        .server()
        .expect("valid without the file");
    use config::ProgramSettings;
    let err = settings.read_secrets().expect_err("the file is missing");
    let text = err.to_string();
    assert!(
        text.contains("amqp.password_file") && text.contains("/nonexistent/vogeler/amqp.password"),
        "{text}"
    );
}

/// A port nothing listens on now (the OS picks it; the small race with other tests is
/// harmless because binding fails loudly).
fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("http get");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

/// The value of one sample line in Prometheus text output, e.g.
/// `vogeler_server_results_stored_total`.
fn sample(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn healthz_and_metrics_follow_the_work_and_the_database() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);

    let (proxy, mut server_settings) = stack.server_behind_proxy().await;
    let server_addr = free_port();
    server_settings.http_listen = Some(server_addr);
    let server_metrics = ServerMetrics::default();
    let server = vogeler_e2e::spawn_server_with(server_settings, server_metrics.clone());

    let mut agent_settings = stack.agent_settings("ops-web01", plugins.path());
    let agent_addr = free_port();
    agent_settings.http_listen = Some(agent_addr);
    let agent = vogeler_e2e::spawn_agent_with(agent_settings, AgentMetrics::default());
    stack.wait_registered(&["ops-web01"]).await;

    let (status, body) = get(server_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "broker: up\ndatabase: up\n"));
    let (status, body) = get(agent_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "broker: up\n"));

    let report = ask(&stack, "hello", "ops-web01", "10").await;
    assert!(report.success(), "{}", report.render_table());
    // Signed, but not a command.
    stack
        .publish_raw(
            &stack.topology().commands_exchange(),
            "node.ops-web01",
            &[b"not json"],
        )
        .await;

    // Counters move with the work: the agent ran hello once and refused the malformed one.
    wait_for("agent metrics", Duration::from_secs(10), || async {
        let (_, m) = get(agent_addr, "/metrics").await;
        sample(
            &m,
            "vogeler_agent_plugin_runs_total{plugin=\"hello\",outcome=\"ok\"}",
        ) == Some(1.0)
            && sample(
                &m,
                "vogeler_agent_commands_rejected_total{reason=\"malformed\"}",
            ) == Some(1.0)
            && sample(&m, "vogeler_agent_results_published_total") == Some(1.0)
    })
    .await;
    // The server stored the announcement(s) and the result.
    wait_for("server metrics", Duration::from_secs(10), || async {
        let (_, m) = get(server_addr, "/metrics").await;
        sample(&m, "vogeler_server_results_stored_total").is_some_and(|n| n >= 2.0)
            && sample(&m, "vogeler_server_messages_consumed_total").is_some_and(|n| n >= 2.0)
    })
    .await;
    let (_, m) = get(server_addr, "/metrics").await;
    assert!(
        m.contains("# TYPE vogeler_server_queue_messages gauge"),
        "{m}"
    );

    // The database goes away: /healthz says so with 503, and comes back when it does.
    proxy.cut();
    wait_for("healthz 503", Duration::from_secs(10), || async {
        let (status, body) = get(server_addr, "/healthz").await;
        status == 503 && body.contains("database: down")
    })
    .await;
    proxy.restore();
    wait_for("healthz 200", Duration::from_secs(10), || async {
        get(server_addr, "/healthz").await.0 == 200
    })
    .await;
    assert_eq!(get(server_addr, "/nothing").await.0, 404);

    agent.stop().await.expect("agent stops");
    server.stop().await.expect("server stops");
}

#[tokio::test]
async fn a_taken_listen_address_is_a_start_up_error() {
    let stack = TestStack::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut settings = stack.server_settings();
    settings.http_listen = Some(taken.local_addr().expect("addr"));
    let err = vogeler_server::run(settings, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("port is taken");
    // Another process can free the port: not a configuration error (exit 1, systemd retries).
    assert_eq!(
        vogeler_core::exit::ExitStatus::exit_code(&err),
        vogeler_core::exit::FAILURE,
        "{err}"
    );
    assert!(err.to_string().contains("cannot listen on"), "{err}");
}
