//! `vogeler-agent simulate`: many agents in one process, for load tests and benchmarks.
//!
//! Each simulated node is a full agent: its own name, key, state directory (replay cache,
//! audit log), queue and signed results, and it runs real plugin processes through the same
//! [`serve`](crate::serve) and [`handle`](crate::handle) code as `vogeler-agent`. What they
//! share is what one machine would sensibly share: broker connections (one per
//! `per_connection` nodes, each node on its own channels), the plugin catalog (one directory
//! watch instead of one inotify instance per node) and the limit on plugin processes running
//! at once.

use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::{Semaphore, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};
use vogeler_config::AgentSettings;
use vogeler_core::{
    amqp::{AmqpError, Connection, Supervisor},
    backoff,
    observe::AgentMetrics,
};
use vogeler_proto::names::NodeName;

use crate::{AgentError, NodeAgent, Security, reload, serve, serve_http};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// How many nodes.
    pub count: usize,
    /// Node names are the prefix and a four-digit number: `sim-0001`, ...
    pub prefix: String,
    /// Nodes per broker connection.
    pub per_connection: usize,
    /// Plugin processes running at once across all simulated nodes.
    pub concurrency: usize,
}

/// The name of simulated node `i` (1-based).
pub fn node_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:04}")
}

/// Run `sim.count` agents configured like `template` until `cancel` fires.
pub async fn run(
    template: AgentSettings,
    sim: Simulation,
    cancel: CancellationToken,
    metrics: AgentMetrics,
) -> Result<(), AgentError> {
    let base = template
        .state_dir
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| template.state_dir.clone());
    raise_open_file_limit(sim.count);
    serve_http(&template, &metrics, &cancel).await?;
    let catalog = reload::load_logged(&template.plugin_dir);
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(catalog));
    let reloader = tokio::spawn(reload::watch(
        template.plugin_dir.clone(),
        catalog_tx,
        cancel.clone(),
    ));
    let runs = Arc::new(Semaphore::new(sim.concurrency.max(1)));
    let keys = Security::authorized_keys(&template)?;

    // Keys and state directories, created on first start like a real agent's.
    let started = std::time::Instant::now();
    let mut nodes = Vec::with_capacity(sim.count);
    for i in 1..=sim.count {
        let name = node_name(&sim.prefix, i);
        let node = NodeName::new(name.clone())
            .map_err(|e| AgentError::Simulation(format!("node name {name:?}: {e}")))?;
        let mut settings = template.clone();
        settings.state_dir = base.join(node.as_str());
        settings.node = node;
        // Facts that differ between nodes, so fact filters have something to select.
        settings.facts.insert("sim_index".into(), i.into());
        settings
            .facts
            .insert("sim_group".into(), format!("g{}", i % 10).into());
        let security = Security::with_keys(&settings, keys.clone())?;
        nodes.push(NodeAgent::new(
            settings,
            security,
            catalog_rx.clone(),
            runs.clone(),
            metrics.clone(),
        ));
    }
    info!(nodes = sim.count, prefix = %sim.prefix, per_connection = sim.per_connection, setup_ms = started.elapsed().as_millis() as u64, "simulated nodes ready");

    let tracker = TaskTracker::new();
    let started_at = chrono::Utc::now();
    let groups: Vec<Vec<Arc<NodeAgent>>> = nodes
        .chunks(sim.per_connection.max(1))
        .map(<[Arc<NodeAgent>]>::to_vec)
        .collect();
    let connections = groups.len();
    let results = join_all(groups.into_iter().enumerate().map(|(g, group)| {
        let template = &template;
        let cancel = cancel.clone();
        let tracker = &tracker;
        let metrics = &metrics;
        async move {
            let name = format!("vogeler-agent simulate {}/{connections}", g + 1);
            let mut broker = match Supervisor::connect(&template.broker, &name, &cancel).await {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(()),
                Err(e) => {
                    // Like a single agent: no broker within the connect timeout at
                    // start-up stops the whole simulation (exit 69), not one group.
                    cancel.cancel();
                    return Err(AgentError::from(e));
                }
            };
            loop {
                metrics.broker_up.set(true);
                let conn = broker.connection();
                join_all(
                    group
                        .iter()
                        .map(|shared| serve_node(conn, shared, started_at, tracker, &cancel)),
                )
                .await;
                metrics.broker_up.set(false);
                // Every node returns once the connection is gone or on shutdown.
                let served = if cancel.is_cancelled() {
                    Ok(())
                } else {
                    Err(AmqpError::ConsumerEnded {
                        queue: format!("{} nodes' queues", group.len()),
                    })
                };
                match broker.again(served).await {
                    Ok(true) => {}
                    Ok(false) => {
                        broker.close().await;
                        return Ok(());
                    }
                    Err(e) => return Err(AgentError::from(e)),
                }
            }
        }
    }))
    .await;
    tracker.close();
    let _ = tokio::time::timeout(crate::SHUTDOWN_GRACE, tracker.wait()).await;
    for node in &nodes {
        node.sum_up_suppressed(true);
    }
    let _ = reloader.await;
    results
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .map(|_| ())
}

/// Each node keeps its replay cache and audit log open, and plugin runs need pipes: ask for
/// the hard limit on open files when the soft one is too low for `count` nodes.
fn raise_open_file_limit(count: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let wanted = (count as u64) * 3 + 1024;
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < wanted
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(wanted.max(soft)), hard);
        if hard < wanted {
            warn!(
                nodes = count,
                limit = hard,
                "the open-file limit may be too low for this many nodes; raise it (ulimit -n)"
            );
        }
    }
}

/// One simulated node on a shared connection: serve until cancelled or the connection is
/// gone; a failure of this node's own channels is retried on the same connection.
async fn serve_node(
    conn: &Connection,
    shared: &Arc<NodeAgent>,
    started_at: chrono::DateTime<chrono::Utc>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let mut delays = backoff::delays();
    loop {
        match serve(conn, shared, started_at, tracker, cancel).await {
            Ok(()) => return,
            Err(_) if !conn.status().connected() => return,
            Err(e) => {
                let delay = delays.next().unwrap_or(backoff::MAX_DELAY);
                warn!(node = %shared.settings.node, error = %e, retry_in_ms = delay.as_millis() as u64, "node's channels failed; retrying on the same connection");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
