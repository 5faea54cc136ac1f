//! `vogeler-agent simulate`: many full agents in one process, against the real broker and
//! database (the 1,000-node run is in bench/run.sh; this is the same code with fewer nodes).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vogeler_agent::simulate::{self, Simulation};
use vogeler_core::observe::AgentMetrics;
use vogeler_e2e::{TestStack, ask, spawn_server, wait_for};

#[tokio::test]
async fn simulated_nodes_register_answer_with_real_plugin_runs_and_keep_their_own_identity() {
    let stack = TestStack::new().await;
    let server = spawn_server(stack.server_settings());
    let plugins = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let template = stack.agent_settings("template", &plugins);
    let sim = Simulation {
        count: 60,
        prefix: "sim-".into(),
        // Three connections of 25, 25 and 10 nodes.
        per_connection: 25,
        concurrency: 8,
    };
    let cancel = CancellationToken::new();
    let metrics = AgentMetrics::default();
    let running = tokio::spawn(simulate::run(
        template,
        sim.clone(),
        cancel.clone(),
        metrics.clone(),
    ));
    let names: Vec<String> = (1..=sim.count)
        .map(|i| simulate::node_name("sim-", i))
        .collect();
    assert_eq!(names[0], "sim-0001");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    stack.wait_registered(&refs).await;

    // Every node runs the real facts script; a fact filter over the simulated facts works.
    let report = ask(&stack, "facts", "sim-*", "30").await;
    assert!(report.success(), "{}", report.render_table());
    assert_eq!(report.replies.len(), sim.count);
    let report = ask(&stack, "hello", "sim_group=g3", "30").await;
    assert!(report.success(), "{}", report.render_table());
    assert_eq!(report.replies.len(), 6, "{}", report.render_table());
    let runs = metrics
        .plugin_runs
        .get_or_create(&vogeler_core::observe::PluginLabels {
            plugin: "facts".into(),
            outcome: "ok".into(),
        })
        .get();
    assert_eq!(runs, sim.count as u64, "one real facts run per node");

    // Each node has its own key (pinned in its document) and its own audit log.
    let a = stack.document("sim-0001").await.expect("sim-0001");
    let b = stack.document("sim-0060").await.expect("sim-0060");
    assert!(a.meta.key.is_some() && a.meta.key != b.meta.key);
    wait_for("audit lines", Duration::from_secs(10), || async {
        stack.audit_events("sim-0003", "finished").len() == 2
    })
    .await;

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("simulation stops within 30 s")
        .expect("task")
        .expect("simulation ran");
    server.stop().await.expect("server stops");
}
