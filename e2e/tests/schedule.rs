//! Scheduled collection through the whole path, with no runner involved: agent schedule →
//! plugin → signed result → server → CouchDB, on the real broker and database. Change-only
//! results, the schedule surviving a restart, and no burst after downtime.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use vogeler_e2e::{
    TestStack, ask, plugin_dir,
    programs::{program, run, with_couch},
    spawn_agent, spawn_server, wait_for,
};

/// A plugin whose output changes on every run (nanoseconds since the epoch).
const TICK: &str =
    "name = \"tick\"\ncommand = [\"date\", \"+%s%N\"]\nformat = \"string\"\ninterval = \"2s\"\n";
/// A plugin whose output never changes.
const SAME: &str =
    "name = \"same\"\ncommand = [\"printf\", \"steady\"]\nformat = \"string\"\ninterval = \"2s\"\n";

/// History entries of one node's plugin.
async fn history_of(stack: &TestStack, node: &str, plugin: &str) -> usize {
    let prefix = format!("{node}:{plugin}:");
    stack
        .history_ids()
        .await
        .iter()
        .filter(|id| id.starts_with(&prefix))
        .count()
}

/// The times the agent's schedule ran `plugin`, from its audit log.
fn scheduled_runs(stack: &TestStack, node: &str, plugin: &str) -> Vec<DateTime<Utc>> {
    stack
        .audit_events(node, "finished")
        .iter()
        .filter(|e| e["key"] == "schedule" && e["plugin"] == plugin)
        .filter_map(|e| e["time"].as_str()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_plugin_whose_output_changes_is_stored_on_every_run_and_one_that_does_not_is_only_confirmed()
 {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let plugins = plugin_dir(&[("tick.toml", TICK), ("same.toml", SAME)]);
    let started = Instant::now();
    let agent = spawn_agent(stack.agent_settings("sched01", plugins.path()));

    // Changing output on a 2 s interval: three values stored (the first and two changes)
    // within 8 s of the agent's start.
    wait_for(
        "three values of tick stored",
        Duration::from_secs(8),
        || async { history_of(&stack, "sched01", "tick").await >= 2 },
    )
    .await;
    let three = started.elapsed();

    // Unchanging output: its first value, then only confirmations, each in the node's
    // freshness document: the node document is not rewritten.
    wait_for(
        "two confirmations of same",
        Duration::from_secs(20),
        || async {
            let runs = scheduled_runs(&stack, "sched01", "same").len();
            let node = stack.node("sched01").await;
            runs >= 3
                && node.is_some_and(|n| {
                    n.plugin("same")
                        .is_some_and(|m| m.confirmed_at.is_some() && m.confirmed_at > m.value_at)
                })
        },
    )
    .await;
    let node = stack.node("sched01").await.expect("node");
    let first = node.plugin("same").expect("same");

    wait_for(
        "a later confirmation of same",
        Duration::from_secs(20),
        || async {
            let n = stack.node("sched01").await.expect("node");
            n.plugin("same").expect("same").confirmed_at > first.confirmed_at
        },
    )
    .await;
    let node = stack.node("sched01").await.expect("node");
    let doc = &node.doc;
    let same = node.plugin("same").expect("same");
    assert_eq!(history_of(&stack, "sched01", "same").await, 0, "no history");
    assert_eq!(doc.value("same"), Some(&serde_json::json!("steady")));
    // Not rewritten: the stored value is still the one of the first run, and the confirmation
    // is the freshness document's.
    assert_eq!(same.value_at, first.value_at);
    assert_eq!(same.value_request_id, first.value_request_id);
    assert!(
        node.fresh.fresh.plugins.contains_key("same"),
        "{:?}",
        node.fresh
    );
    assert!(doc.meta.plugins["same"].collected_at < same.collected_at);
    assert_eq!(same.outcome, "ok");
    assert_eq!(same.interval_s, Some(2));
    let due = same.next_due.expect("next due");
    assert_eq!(
        due - same.collected_at,
        chrono::TimeDelta::seconds(2),
        "next due an interval after the last run"
    );
    assert!(!same.overdue(Utc::now()), "{same:?}");
    let tick = node.plugin("tick").expect("tick");
    assert_eq!(tick.interval_s, Some(2));
    assert!(tick.confirmed_at.is_none(), "tick changed every time");

    // The scheduled changes are in `changes`, and `same` is not.
    let mut cmd = with_couch(program("vogeler-runner", &stack), &stack);
    cmd.args([
        "changes", "--since", "1h", "-n", "sched01", "--output", "jsonl",
    ]);
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert!(rows.len() >= 2, "{text}");
    assert!(
        rows.iter()
            .all(|r| r["plugin"] == "tick" && r["node"] == "sched01"),
        "{text}"
    );
    println!(
        "tick: 3 values stored {:.1} s after the agent started; same: {} runs, {} history entries, value from {}",
        three.as_secs_f64(),
        scheduled_runs(&stack, "sched01", "same").len(),
        history_of(&stack, "sched01", "same").await,
        same.value_at.expect("value_at")
    );
    agent.stop().await.expect("agent");
}

#[tokio::test]
async fn a_restart_resumes_the_schedule_instead_of_running_at_once() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    // Six seconds: a restart without the record would run within 6 s of the new start,
    // that is usually well before 6 s after the last run.
    let every6 =
        "name = \"slow\"\ncommand = [\"printf\", \"x\"]\nformat = \"string\"\ninterval = \"6s\"\n";
    let plugins = plugin_dir(&[("slow.toml", every6)]);
    let settings = stack.agent_settings("sched02", plugins.path());
    let agent = spawn_agent(settings.clone());
    wait_for(
        "the first scheduled run",
        Duration::from_secs(20),
        || async { !scheduled_runs(&stack, "sched02", "slow").is_empty() },
    )
    .await;
    agent.stop().await.expect("agent");
    let record = vogeler_agent::schedule::LastRuns::load(&settings.state_dir).expect("record");
    assert!(record.last_run.contains_key("slow"), "{record:?}");

    let agent = spawn_agent(settings);
    wait_for(
        "the run after the restart",
        Duration::from_secs(20),
        || async { scheduled_runs(&stack, "sched02", "slow").len() >= 2 },
    )
    .await;
    let runs = scheduled_runs(&stack, "sched02", "slow");
    let gap = (runs[1] - runs[0]).to_std().expect("ordered");
    assert!(
        gap >= Duration::from_millis(5500),
        "the restarted agent ran {gap:?} after the last run, before the interval was up"
    );
    println!("restart: the next run came {gap:?} after the last one (interval 6 s)");
    agent.stop().await.expect("agent");
}

#[tokio::test]
async fn downtime_of_many_intervals_gives_one_catch_up_run_not_a_burst() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let every3 = "name = \"missed\"\ncommand = [\"printf\", \"x\"]\nformat = \"string\"\ninterval = \"3s\"\n";
    let plugins = plugin_dir(&[("missed.toml", every3)]);
    let settings = stack.agent_settings("sched03", plugins.path());
    // Last ran 100 intervals ago.
    std::fs::create_dir_all(&settings.state_dir).expect("state dir");
    let mut record = vogeler_agent::schedule::LastRuns::default();
    record.last_run.insert(
        "missed".into(),
        Utc::now() - chrono::TimeDelta::seconds(300),
    );
    record.save(&settings.state_dir).expect("record");
    let started = Utc::now();
    let agent = spawn_agent(settings);
    wait_for(
        "the catch-up run and the one after",
        Duration::from_secs(20),
        || async { scheduled_runs(&stack, "sched03", "missed").len() >= 2 },
    )
    .await;
    let runs = scheduled_runs(&stack, "sched03", "missed");
    let catch_up = (runs[0] - started).to_std().unwrap_or_default();
    let gap = (runs[1] - runs[0]).to_std().expect("ordered");
    assert!(
        catch_up < Duration::from_secs(4),
        "catch-up after {catch_up:?}"
    );
    assert!(
        gap >= Duration::from_millis(2500),
        "a second run {gap:?} after the catch-up: a burst"
    );
    println!(
        "downtime of 100 intervals: catch-up {catch_up:?} after the start, the next {gap:?} later"
    );
    agent.stop().await.expect("agent");
}

#[tokio::test]
async fn wait_stored_returns_once_every_answer_is_stored_with_two_servers_on_the_queue() {
    let stack = TestStack::new().await;
    let _one = spawn_server(stack.server_settings());
    let _two = spawn_server(stack.server_settings());
    let plugins = plugin_dir(&[("hello.toml", vogeler_e2e::HELLO)]);
    let nodes = ["wait01", "wait02", "wait03", "wait04"];
    let _agents: Vec<_> = nodes
        .iter()
        .map(|n| spawn_agent(stack.agent_settings(n, plugins.path())))
        .collect();
    stack.wait_registered(&nodes).await;
    let settings = stack.runner_settings("10");
    for round in 0..3 {
        let report = ask(&stack, "hello", "wait0*", "10").await;
        assert_eq!(report.replies.len(), 4, "round {round}");
        let plugin = vogeler_proto::names::PluginName::new("hello").expect("plugin");
        let check =
            vogeler_runner::wait_stored(&settings.couch, &plugin, &report, Duration::from_secs(10))
                .await
                .expect("wait");
        assert!(check.all_stored(), "round {round}: {check:?}");
        assert_eq!(check.stored, 4);
        // Consistent right after: every document holds this round's run.
        for (node, reply) in &report.replies {
            let doc = stack.document(node.as_str()).await.expect("document");
            assert!(
                doc.meta.plugins["hello"].collected_at >= reply.collected_at,
                "round {round}: {node} not stored"
            );
        }
        println!(
            "round {round}: all 4 stored {} ms after the replies",
            check.waited_ms
        );
    }
    // An answer that is never stored is named, within the limit.
    let mut report = ask(&stack, "hello", "wait01", "10").await;
    let reply = report.replies.values_mut().next().expect("reply");
    reply.collected_at += chrono::TimeDelta::hours(1);
    let plugin = vogeler_proto::names::PluginName::new("hello").expect("plugin");
    let check =
        vogeler_runner::wait_stored(&settings.couch, &plugin, &report, Duration::from_secs(1))
            .await
            .expect("wait");
    assert_eq!(check.waiting, vec!["wait01".to_string()]);
}

#[tokio::test]
async fn a_plugin_whose_agent_stopped_is_overdue_after_twice_its_interval() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let every1 =
        "name = \"pulse\"\ncommand = [\"printf\", \"x\"]\nformat = \"string\"\ninterval = \"1s\"\n";
    let plugins = plugin_dir(&[("pulse.toml", every1)]);
    let agent = spawn_agent(stack.agent_settings("sched04", plugins.path()));
    let settings = stack.runner_settings("10");
    let set =
        vogeler_runner::target::parse("sched04", &vogeler_runner::target::Files).expect("set");
    let listed = || async {
        vogeler_runner::inventory::nodes(&settings.couch, &set, settings.freshness)
            .await
            .expect("nodes")
    };
    wait_for("pulse stored", Duration::from_secs(20), || async {
        stack
            .document("sched04")
            .await
            .is_some_and(|d| d.meta.plugins.contains_key("pulse"))
    })
    .await;
    assert!(listed().await[0].overdue.is_empty(), "running: not overdue");
    agent.stop().await.expect("agent");
    let stopped = Instant::now();
    wait_for("pulse overdue", Duration::from_secs(20), || async {
        listed()
            .await
            .first()
            .is_some_and(|n| n.overdue == ["pulse"])
    })
    .await;
    let table = vogeler_runner::inventory::render_nodes(&listed().await);
    assert!(table.contains("overdue: pulse"), "{table}");
    assert!(table.contains("1 with overdue plugins"), "{table}");
    println!(
        "overdue {:.1} s after the agent stopped (interval 1 s):\n{table}",
        stopped.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn confirmations_and_heartbeats_leave_the_node_document_alone() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let plugins = plugin_dir(&[("same.toml", SAME)]);
    let mut settings = stack.agent_settings("sched06", plugins.path());
    settings.heartbeat = Duration::from_secs(1);
    let agent = spawn_agent(settings.clone());
    wait_for(
        "the first value of same",
        Duration::from_secs(20),
        || async {
            stack
                .document("sched06")
                .await
                .is_some_and(|d| d.value("same").is_some())
        },
    )
    .await;
    let before = stack.document("sched06").await.expect("document");
    let started = Instant::now();
    // Three confirmations (2 s apart) and several heartbeats (1 s apart) later...
    wait_for(
        "three confirmations of same",
        Duration::from_secs(20),
        || async {
            scheduled_runs(&stack, "sched06", "same").len() >= 4
                && stack.node("sched06").await.is_some_and(|n| {
                    n.fresh.fresh.plugins.contains_key("same")
                        && n.announced_at() > before.meta.announced_at
                })
        },
    )
    .await;
    let node = stack.node("sched06").await.expect("node");
    // ...the node document is the same revision: nothing rewrote its value.
    assert_eq!(node.doc.rev, before.rev, "{:?}", node.doc.meta);
    assert!(node.last_seen() > before.meta.last_seen, "{:?}", node.fresh);
    let same = node.plugin("same").expect("same");
    assert!(!same.overdue(Utc::now()), "{same:?}");
    println!(
        "{} scheduled runs and heartbeats over {:.1} s: node document still at {:?}",
        scheduled_runs(&stack, "sched06", "same").len(),
        started.elapsed().as_secs_f64(),
        node.doc.rev
    );
    agent.stop().await.expect("agent");

    // The schedule turned off in the agent's config: the plugin is no longer expected, so
    // it never turns overdue.
    settings.schedule.insert(
        vogeler_proto::names::PluginName::new("same").expect("plugin"),
        vogeler_config::ScheduleOverride::Off,
    );
    let agent = spawn_agent(settings);
    wait_for("the schedule cleared", Duration::from_secs(20), || async {
        stack
            .node("sched06")
            .await
            .and_then(|n| n.plugin("same"))
            .is_some_and(|m| m.interval_s.is_none())
    })
    .await;
    agent.stop().await.expect("agent");
}
