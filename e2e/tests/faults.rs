//! Faults an operator will meet, made with fault proxies and private names so they run in
//! the parallel suite: commands that cannot be delivered are reported at once, an offline
//! agent's queue is bounded, and a broker link that goes silent (no reset) is noticed by the
//! AMQP heartbeat and recovered without losing a command. Scenarios that stop the shared
//! broker or database are in `scripts/faults.sh`.

use std::time::{Duration, Instant};

use vogeler_config as config;
use vogeler_e2e::{
    FaultProxy, HELLO, TestStack, ask, ask_using, node, plugin_dir, spawn_agent, spawn_server,
    wait_for,
};

#[tokio::test]
async fn commands_no_queue_takes_are_reported_not_waited_for() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(stack.server_settings());
    let _agent = spawn_agent(stack.agent_settings("web01", plugins.path()));
    stack.wait_registered(&["web01"]).await;

    // web02 never connected: the broker returns its command, and the runner says so at
    // once instead of waiting out the 30 s timeout.
    let started = Instant::now();
    let r = ask(&stack, "hello", "web01,web02", "30").await;
    let took = started.elapsed();
    assert!(
        r.replies.contains_key(&node("web01")),
        "{}",
        r.render_table()
    );
    let why = r
        .undelivered
        .get(&node("web02"))
        .expect("web02 undelivered");
    assert!(why.contains("never connected"), "{why}");
    assert!(!r.success());
    assert!(
        r.render_table().contains("not delivered to: web02"),
        "{}",
        r.render_table()
    );
    // The deadline this checks is the 30 s timeout not being waited for (margin: 20 s).
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test]
async fn an_offline_agents_queue_is_bounded_and_the_runner_is_told() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let mut sources = stack.sources();
    sources
        .set("amqp.agent_queue_max_length", Some(2))
        .set("agent.node", Some("away01"))
        .set("agent.plugin_dir", Some(plugins.path().display()));
    let raw = config::load(&sources).expect("load");
    let _server = spawn_server(raw.server().expect("server"));
    let agent = spawn_agent(raw.agent(None).expect("agent"));
    stack.wait_registered(&["away01"]).await;
    agent.stop().await.expect("agent stopped");

    let runner = raw.runner().expect("runner");
    let mut quick = runner.clone();
    quick.timeout = Duration::from_millis(300);
    for i in 0..2 {
        let r = ask_using(&quick, "hello", "away01", |_| {}).await;
        assert!(
            r.undelivered.is_empty(),
            "command {i} is queued: {}",
            r.render_table()
        );
    }
    let r = ask_using(&quick, "hello", "away01", |_| {}).await;
    let why = r.undelivered.get(&node("away01")).expect("refused");
    assert!(why.contains("queue is full"), "{why}");

    // Back online, the agent runs what its queue kept (two commands) and answers new ones.
    let back = spawn_agent(raw.agent(None).expect("agent"));
    wait_for(
        "the two queued commands run",
        Duration::from_secs(20),
        || async { stack.audit_events("away01", "finished").len() >= 2 },
    )
    .await;
    let r = ask_using(&runner, "hello", "away01", |_| {}).await;
    assert!(r.success(), "{}", r.render_table());
    back.stop().await.expect("stopped");
}

#[tokio::test]
async fn a_silent_broker_link_is_detected_by_heartbeat_and_nothing_is_lost() {
    // 25 s here; scripts/faults.sh runs it with VOGELER_FAULT_SILENCE_SECS=90.
    let silence = Duration::from_secs(
        std::env::var("VOGELER_FAULT_SILENCE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(25),
    );
    let stack = TestStack::new().await;
    let proxy = FaultProxy::start(&vogeler_e2e::upstream(&stack.amqp_first())).await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let mut sources = stack.sources();
    sources
        .set(
            "amqp.url",
            Some(vogeler_e2e::retarget(
                &stack.amqp_first(),
                "amqp",
                &proxy.addr().ip().to_string(),
                proxy.addr().port(),
            )),
        )
        .set("amqp.heartbeat", Some("10s"))
        .set("agent.node", Some("quiet01"))
        .set("agent.plugin_dir", Some(plugins.path().display()));
    let agent_settings = config::load(&sources)
        .expect("load")
        .agent(None)
        .expect("agent");
    assert!(
        agent_settings
            .broker
            .url
            .first()
            .expose()
            .as_str()
            .contains("heartbeat=10"),
        "{}",
        agent_settings.broker.url
    );
    let _server = spawn_server(stack.server_settings());
    let _agent = spawn_agent(agent_settings);
    stack.wait_registered(&["quiet01"]).await;

    proxy.black_hole();
    let cut_at = Instant::now();
    // Detection: the agent gives up on the silent connection and tries a new one.
    wait_for(
        "the agent to notice the silent link",
        Duration::from_secs(40),
        || async { proxy.refused() >= 1 },
    )
    .await;
    let detected = cut_at.elapsed();
    println!("silent link detected after {:.1}s", detected.as_secs_f64());
    assert!(
        detected <= Duration::from_secs(25),
        "heartbeat of 10 s should detect within 20 s (5 s margin), took {detected:?}"
    );
    // A command sent during the outage waits in the agent's durable queue.
    let asking = tokio::spawn({
        let settings = stack.runner_settings("120");
        async move { ask_using(&settings, "hello", "quiet01", |_| {}).await }
    });
    tokio::time::sleep(silence.saturating_sub(cut_at.elapsed())).await;
    proxy.restore();
    let restored = Instant::now();
    let r = asking.await.expect("runner task");
    assert!(r.success(), "{}", r.render_table());
    println!(
        "answered {:.1}s after the link came back ({}s of silence)",
        restored.elapsed().as_secs_f64(),
        silence.as_secs()
    );
}

/// Processes whose environment says they are a plugin run of `node`.
fn plugin_processes(node: &str) -> usize {
    let marker = format!("VOGELER_NODE={node}");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .filter(|e| {
                    std::fs::read(e.path().join("environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn an_agent_killed_mid_plugin_leaves_no_orphan_and_does_not_run_it_again() {
    let stack = TestStack::new().await;
    let log = tempfile::NamedTempFile::new().expect("log");
    let slow = format!(
        "name = \"slow\"\ncommand = [\"sh\", \"-c\", \"echo start >> {}; sleep 300\"]\nformat = \"lines\"\ntimeout = \"10m\"\n",
        log.path().display()
    );
    let plugins = plugin_dir(&[("slow.toml", &slow)]);
    let agent_cmd = || {
        let mut cmd = vogeler_e2e::programs::program("vogeler-agent", &stack);
        cmd.args(["--node", "orphan01", "--plugin-dir"])
            .arg(plugins.path())
            .stderr(std::process::Stdio::null());
        cmd
    };
    let _server = spawn_server(stack.server_settings());
    let mut agent = agent_cmd().spawn().expect("agent");
    stack.wait_registered(&["orphan01"]).await;
    let asking = tokio::spawn({
        let settings = stack.runner_settings("2");
        async move { ask_using(&settings, "slow", "orphan01", |_| {}).await }
    });
    wait_for("the plugin running", Duration::from_secs(20), || async {
        plugin_processes("orphan01") >= 1
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(agent.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill agent");
    let _ = agent.wait().await;
    let _ = asking.await;
    assert!(
        plugin_processes("orphan01") >= 1,
        "a SIGKILLed agent cannot kill its plugin: the orphan is there to reap"
    );

    let mut again = agent_cmd().spawn().expect("agent again");
    wait_for(
        "the restarted agent to reap the orphan",
        Duration::from_secs(20),
        || async { plugin_processes("orphan01") == 0 },
    )
    .await;
    // The command it was running is redelivered (never acked) and refused as already run.
    stack.wait_consuming("orphan01").await;
    wait_for(
        "the redelivered command consumed",
        Duration::from_secs(20),
        || async {
            stack
                .agent_queue_state("orphan01")
                .await
                .is_some_and(|(_, ready)| ready == 0)
        },
    )
    .await;
    let runs = std::fs::read_to_string(log.path()).expect("log");
    assert_eq!(runs.lines().count(), 1, "the plugin ran once: {runs}");
    assert_eq!(plugin_processes("orphan01"), 0);
    let _ = again.kill().await;
}
