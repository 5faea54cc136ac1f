//! vogeler-agent: runs on every node, waits for commands on its queue, runs the named plugin
//! (only ever a configured one) and publishes the result.
//!
//! - [`plugin`]: plugin files and the catalog of a plugin directory.
//! - [`format`]: how plugin output becomes JSON.
//! - [`exec`]: bounded plugin execution.
//! - [`reload`]: hot reload of the plugin directory (inotify and SIGHUP).
//! - [`local`]: `plugins list|check|run`, the tools for plugin authors.
//!
//! [`run`] is the whole agent; it takes its settings and a shutdown token so tests run it
//! in-process against a real broker.

pub mod exec;
pub mod facts;
pub mod format;
pub mod local;
pub mod plugin;
pub mod reload;

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    },
    types::FieldTable,
};
use tokio::sync::{Semaphore, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};
use vogeler_core::{
    VERSION,
    amqp::{self, AmqpError},
    config::AgentSettings,
    topology::Topology,
    wire::{self, Announce, Command, Message, Outcome, PluginResult, Target},
};

use crate::plugin::Catalog;

/// Pause before a command whose result could not be published goes back to the queue.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// How long in-flight plugin runs may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
}

impl AgentError {
    /// The broker could not be reached at start-up (exit 69).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AgentError::Broker(AmqpError::Unavailable { .. }))
    }
}

/// The host name, used as the node name when none is configured.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
}

/// What every command handler shares.
struct Shared {
    settings: AgentSettings,
    /// The current plugins; the reloader task replaces them.
    catalog: watch::Receiver<Arc<Catalog>>,
    runs: Semaphore,
}

/// Run the agent until `cancel` fires. Gives up with [`AmqpError::Unavailable`] only when the
/// broker cannot be reached within the connect timeout at start-up; later losses of the
/// connection are retried without limit.
pub async fn run(settings: AgentSettings, cancel: CancellationToken) -> Result<(), AgentError> {
    let catalog = reload::load_logged(&settings.plugin_dir);
    let names: Vec<&str> = catalog.plugins().map(|p| p.name.as_str()).collect();
    info!(dir = %settings.plugin_dir.display(), plugins = %names.join(","), "plugins loaded");
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(catalog));
    let reloader = tokio::spawn(reload::watch(
        settings.plugin_dir.clone(),
        catalog_tx,
        cancel.clone(),
    ));
    let shared = Arc::new(Shared {
        runs: Semaphore::new(settings.concurrency),
        catalog: catalog_rx,
        settings,
    });
    let s = &shared.settings;
    let name = format!("vogeler-agent {}", s.node);
    let started_at = Utc::now();
    let tracker = TaskTracker::new();

    let mut conn = match amqp::connect_with_retry(
        &s.broker.url,
        &name,
        Some(s.broker.connect_timeout),
        &cancel,
    )
    .await
    {
        Ok(c) => c,
        Err(AmqpError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    loop {
        match serve(&conn, &shared, started_at, &tracker, &cancel).await {
            Ok(()) => break,
            Err(e) => warn!(node = %s.node, error = %e, "lost the broker connection; reconnecting"),
        }
        conn = match amqp::connect_with_retry(&s.broker.url, &name, None, &cancel).await {
            Ok(c) => c,
            Err(_) => break,
        };
    }

    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "plugin runs still in flight at shutdown; their commands will be redelivered"
        );
    }
    let _ = conn.close(200, "agent shutting down".into()).await;
    let _ = reloader.await;
    info!(node = %s.node, "agent stopped");
    Ok(())
}

/// One connection's life: declare, announce, consume until cancelled or the connection fails.
async fn serve(
    conn: &Connection,
    shared: &Arc<Shared>,
    started_at: chrono::DateTime<Utc>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), AmqpError> {
    let s = &shared.settings;
    let topology = &s.broker.topology;
    let publisher = amqp::publisher_channel(conn).await?;
    topology.declare_shared(conn).await?;

    let consumer_ch = conn.create_channel().await?;
    let prefetch = u16::try_from(s.concurrency).unwrap_or(u16::MAX);
    consumer_ch
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let queue = topology.declare_agent_queue(&consumer_ch, &s.node).await?;

    let mut catalog = shared.catalog.clone();
    let current = catalog.borrow_and_update().clone();
    announce(shared, &publisher, started_at, &current).await?;

    let tag = format!("vogeler-agent-{}", s.node);
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(node = %s.node, queue = %queue, "waiting for commands");
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + s.heartbeat, s.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let delivery = tokio::select! {
            _ = heartbeat.tick() => {
                let current = catalog.borrow().clone();
                announce(shared, &publisher, started_at, &current).await?;
                continue;
            }
            Ok(()) = catalog.changed() => {
                // Tell the server which plugins this node now has.
                let current = catalog.borrow_and_update().clone();
                announce(shared, &publisher, started_at, &current).await?;
                continue;
            }
            () = cancel.cancelled() => {
                let _ = consumer_ch.basic_cancel(tag.as_str().into(), Default::default()).await;
                return Ok(());
            }
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(AmqpError::ConsumerEnded { queue }),
        };
        let shared = Arc::clone(shared);
        let publisher = publisher.clone();
        tracker.spawn(async move { handle(&shared, &publisher, delivery).await });
    }
}

async fn announce(
    shared: &Shared,
    publisher: &Channel,
    started_at: chrono::DateTime<Utc>,
    catalog: &Catalog,
) -> Result<(), AmqpError> {
    let s = &shared.settings;
    let message = Message::Announce(Announce {
        node: s.node.clone(),
        agent_version: VERSION.to_string(),
        plugins: catalog.infos(),
        started_at,
        sent_at: Utc::now(),
        facts: {
            let mut f = facts::collect();
            f.extend(s.facts.clone());
            f
        },
    });
    let key = Topology::announce_routing_key(&s.node);
    amqp::publish(
        publisher,
        &s.broker.topology.results_exchange(),
        &key,
        &message,
    )
    .await
}

/// Handle one delivery from the agent's queue.
async fn handle(shared: &Shared, publisher: &Channel, delivery: Delivery) {
    let node = &shared.settings.node;
    let command = match wire::decode(&delivery.data) {
        Ok(Message::Command(c)) => c,
        Ok(other) => {
            return refuse(
                &delivery,
                node,
                format!("expected a command, got a {} message", other.kind()),
            )
            .await;
        }
        Err(e) => return refuse(&delivery, node, e.to_string()).await,
    };
    if let Target::Node(n) = &command.target
        && n != node
    {
        return refuse(&delivery, node, format!("command is for node {n}")).await;
    }
    if let Some(expired) = command.expires_at.filter(|t| *t < Utc::now()) {
        // Whoever asked gave up long ago; running it now would only surprise.
        info!(request_id = %command.request_id, plugin = %command.plugin, expired_at = %expired, "expired command not run");
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        return;
    }
    let span = info_span!("command", request_id = %command.request_id, plugin = %command.plugin);
    async {
        let result = run_command(shared, &command).await;
        let topology = &shared.settings.broker.topology;
        let key = Topology::result_routing_key(command.request_id);
        match amqp::publish(
            publisher,
            &topology.results_exchange(),
            &key,
            &Message::Result(result),
        )
        .await
        {
            Ok(()) => {
                // Ack only once the broker holds the result: a crash before this re-runs the plugin.
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    warn!(error = %e, "could not ack command; it will be redelivered");
                }
            }
            Err(e) => {
                warn!(error = %e, retry_in_s = PUBLISH_RETRY.as_secs(), "could not publish result (broker down or results queue full); command returned to the queue");
                // Requeued at once it would come straight back and re-run the plugin in a
                // tight loop while the results queue is full.
                tokio::time::sleep(PUBLISH_RETRY).await;
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Run the plugin a command names, within the concurrency limit. Unknown plugins are
/// answered, not ignored, so the runner can tell "no such plugin" from "no answer".
async fn run_command(shared: &Shared, command: &Command) -> PluginResult {
    let collected = |outcome, value, truncated, duration: Duration| PluginResult {
        request_id: command.request_id,
        node: shared.settings.node.clone(),
        plugin: command.plugin.clone(),
        outcome,
        value,
        truncated,
        collected_at: Utc::now(),
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        agent_version: VERSION.to_string(),
    };
    let catalog = shared.catalog.borrow().clone();
    let Some(plugin) = catalog.get(&command.plugin) else {
        info!("unknown plugin requested");
        return collected(Outcome::UnknownPlugin, None, false, Duration::ZERO);
    };
    let Ok(_permit) = shared.runs.acquire().await else {
        unreachable!("the run semaphore is never closed")
    };
    debug!(program = %plugin.program.display(), "running plugin");
    let mut e = exec::execute(plugin).await;
    if let Some(v) = &e.value {
        let size = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        if size > wire::MAX_VALUE_BYTES {
            e.value = None;
            e.outcome = Outcome::InvalidOutput {
                format: plugin.format.name().to_string(),
                error: format!(
                    "value is {size} bytes as JSON, over the {} MiB limit of one result; lower max_output or narrow the output",
                    wire::MAX_VALUE_BYTES >> 20
                ),
            };
        }
    }
    info!(
        outcome = e.outcome.status(),
        duration_ms = e.duration.as_millis() as u64,
        truncated = e.truncated,
        "plugin finished"
    );
    collected(e.outcome, e.value, e.truncated, e.duration)
}

async fn refuse(delivery: &Delivery, node: &vogeler_core::names::NodeName, reason: String) {
    warn!(node = %node, reason = %reason, "refused a malformed message");
    // Not requeued: it would come straight back.
    let _ = delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await;
}
