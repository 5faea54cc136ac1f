//! Whole-stack faults that stop the shared RabbitMQ or kill real processes: `#[ignore]`d so
//! the parallel suite never runs them; `scripts/faults.sh` runs them one at a time.

use std::{
    collections::BTreeSet,
    process::Stdio,
    time::{Duration, Instant},
};

use chrono::Utc;
use uuid::Uuid;
use vogeler_core::amqp;
use vogeler_e2e::{
    TestStack, plugin_dir,
    programs::{program, with_couch},
    spawn_agent, spawn_server, wait_for,
};
use vogeler_proto::{
    names::{NodeName, PluginName},
    topology::Topology,
    wire::{Message, Outcome, PluginResult},
};

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Request ids every agent finished, from their audit logs.
fn finished(stack: &TestStack, nodes: &[String]) -> BTreeSet<(String, String)> {
    let mut done = BTreeSet::new();
    for n in nodes {
        for v in stack.audit_events(n, "finished") {
            done.insert((
                n.clone(),
                v["request_id"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    done
}

#[tokio::test]
#[ignore = "stops the shared RabbitMQ: run by scripts/faults.sh"]
async fn broker_restart_loses_nothing() {
    let stack = TestStack::new().await;
    // Each run's value is its own request id, so every stored result is a change and
    // leaves a history entry naming it.
    let plugins = plugin_dir(&[(
        "rid.toml",
        "name = \"rid\"\ncommand = [\"sh\", \"-c\", \"echo $VOGELER_REQUEST_ID\"]\nformat = \"string\"\n",
    )]);
    let nodes: Vec<String> = (1..=20).map(|i| format!("bounce{i:02}")).collect();
    let _server = spawn_server(stack.server_settings());
    let _agents: Vec<_> = nodes
        .iter()
        .map(|n| spawn_agent(stack.agent_settings(n, plugins.path())))
        .collect();
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    stack.wait_registered(&names).await;

    let runner = stack.runner_settings("5");
    let started = Instant::now();
    let (mut sent, mut failed_asks) = (0, 0);
    let mut stopped_at = None;
    let mut resumed = None;
    while started.elapsed() < Duration::from_secs(60) {
        if stopped_at.is_none() && started.elapsed() >= Duration::from_secs(10) {
            rabbitmqctl(&["stop_app"]);
            stopped_at = Some(Instant::now());
            println!("broker stopped");
            tokio::time::sleep(Duration::from_secs(15)).await; // the outage itself
            rabbitmqctl(&["start_app"]);
            println!("broker started again");
            continue;
        }
        let q = vogeler_runner::Query {
            plugin: PluginName::new("rid").expect("plugin"),
            nodes: vogeler_runner::target::parse("all", &vogeler_runner::target::Files)
                .expect("all"),
            nodes_text: "all".into(),
            timeout: runner.timeout,
            ttl: runner.ttl,
            batch: None,
            cached: None,
        };
        match vogeler_runner::query(
            &runner,
            &q,
            &tokio_util::sync::CancellationToken::new(),
            &mut |_| {},
        )
        .await
        {
            Ok(r) => {
                sent += 1;
                if let Some(at) = stopped_at
                    && resumed.is_none()
                    && r.replies.len() == nodes.len()
                {
                    resumed = Some(at.elapsed() - Duration::from_secs(15));
                }
            }
            Err(_) => failed_asks += 1,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let published = finished(&stack, &nodes);
    wait_for(
        "every published result stored",
        Duration::from_secs(120),
        || async { stack.history_ids().await.len() + nodes.len() >= published.len() },
    )
    .await;
    let history = stack.history_ids().await;
    // History ids are <node>:<plugin>:<time>:<request id>; one request goes to every node.
    let stored: BTreeSet<(String, String)> = history
        .iter()
        .filter_map(|id| {
            let node = id.split(':').next()?;
            let request = id.rsplit(':').next()?;
            Some((node.to_string(), request.to_string()))
        })
        .collect();
    let duplicates = history.len() - stored.len();
    let stored_count = history.len() + nodes.len();
    let lost = published.len().saturating_sub(stored_count);
    println!(
        "broker restart (15 s down), 20 agents: queries sent {sent}, refused while down {failed_asks}; results published {}, stored {stored_count}, lost {lost}, duplicates {duplicates}; all 20 answering again {:.1}s after the broker came back",
        published.len(),
        resumed.map_or(f64::NAN, |d| d.as_secs_f64())
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicates, 0);
    assert!(resumed.is_some(), "the fleet answered again");
}

#[tokio::test]
#[ignore = "kills server processes: run by scripts/faults.sh"]
async fn a_server_killed_mid_batch_20_times_stores_every_result_once() {
    let stack = TestStack::new().await;
    let (conn, ch) = stack.publisher("test-kill").await;
    let t = stack.topology();
    let start = Utc::now();
    let mut last = std::collections::BTreeMap::new();
    let total = 4000;
    for i in 0..total {
        let node = format!("kill{:03}", i % 200);
        let r = PluginResult {
            request_id: Uuid::new_v4(),
            node: NodeName::new(node.clone()).expect("node"),
            plugin: PluginName::new("seq").expect("plugin"),
            outcome: Outcome::Ok,
            value: Some(serde_json::json!(i)),
            truncated: false,
            collected_at: start + chrono::Duration::milliseconds(i as i64),
            duration_ms: 1,
            agent_version: "test".into(),
            scheduled: None,
        };
        let signer = stack.key_for(&node);
        last.insert(node, i);
        amqp::publish(
            &ch,
            &t.results_exchange(),
            &Topology::result_routing_key(r.request_id),
            &Message::Result(r),
            &signer,
        )
        .await
        .expect("publish");
    }
    let _ = conn.close(200, "done".into()).await;
    let mut kills = 0;
    let mut written = Vec::new();
    for k in 0..20u64 {
        let mut server = with_couch(program("vogeler-server", &stack), &stack)
            .stderr(Stdio::null())
            .spawn()
            .expect("server");
        // Once it is writing (the history grew), at a varying point after that.
        let before = stack.history_ids().await.len();
        wait_for("the server writing", Duration::from_secs(60), || async {
            stack.history_ids().await.len() > before
        })
        .await;
        tokio::time::sleep(Duration::from_millis((k * 53) % 300)).await;
        let pid = nix::unistd::Pid::from_raw(server.id().expect("pid") as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
        let _ = server.wait().await;
        kills += 1;
        written.push(stack.history_ids().await.len());
    }
    let stored_after_kills = stack.node_ids().await.len();
    let mut server = with_couch(program("vogeler-server", &stack), &stack)
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let started = Instant::now();
    wait_for(
        "every node's last result stored",
        Duration::from_secs(120),
        || async {
            let mut all = true;
            for (node, i) in &last {
                all &= stack
                    .document(node)
                    .await
                    .is_some_and(|d| d.value("seq") == Some(&serde_json::json!(i)));
                if !all {
                    break;
                }
            }
            all
        },
    )
    .await;
    let history = stack.history_ids().await;
    let unique: BTreeSet<&String> = history.iter().collect();
    println!(
        "server SIGKILLed {kills} times mid-ingest of {total} results for 200 nodes (history entries after each kill: {written:?}; {stored_after_kills} nodes written before the last start): all stored, {} history entries (expected {}), {} duplicates; drained {:.1}s after the last start",
        history.len(),
        total - 200,
        history.len() - unique.len(),
        started.elapsed().as_secs_f64()
    );
    // Each value change recorded exactly once: every result but each node's first.
    assert_eq!(history.len(), total - 200);
    let _ = server.kill().await;
}
