//! vogeler-agent: runs on every node, waits for commands on its queue, runs the named plugin
//! (only ever a configured one) and publishes the result.
//!
//! - [`plugin`]: plugin files and the catalog of a plugin directory.
//! - [`format`]: how plugin output becomes JSON (from `vogeler_plugin_spec`).
//! - [`exec`]: bounded plugin execution.
//! - [`reload`]: hot reload of the plugin directory (inotify and SIGHUP).
//! - [`local`]: `plugins list|check|run`, the tools for plugin authors.
//! - [`guard`]: the checks every command passes (signature, time, target, restrictions).
//! - [`replay`]: the on-disk cache of request ids that refuses replays.
//! - [`audit`]: the audit log of accepted, refused and finished commands.
//!
//! [`run`] is the whole agent; it takes its settings and a shutdown token so tests run it
//! in-process against a real broker.

pub mod audit;
pub mod cli;
pub mod exec;
pub mod facts;
// Plugin output formats live with the plugin-file syntax, in the pure crate.
pub use vogeler_plugin_spec::format;
pub mod guard;
pub mod local;
pub mod plugin;
pub mod reload;
pub mod replay;
pub mod simulate;

use std::{
    os::unix::fs::DirBuilderExt,
    sync::{Arc, Mutex},
    time::Duration,
};

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
    observe::{self, AgentMetrics},
    signing::{AuthorizedKeys, PrivateKey},
    topology::Topology,
    wire::{self, Announce, Command, Message, Outcome, PluginResult},
};

use crate::{
    audit::AuditLog,
    guard::{Guard, Rejection, Seen},
    plugin::Catalog,
    replay::ReplayCache,
};

/// Pause before a command whose result could not be published goes back to the queue.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// Where, in a node's state directory, running plugins' process groups are recorded (see
/// [`exec::reap_orphans`]).
const RUNNING_DIR: &str = "running";

/// How long in-flight plugin runs may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error(
        "no runner key is authorized in {path}: this agent would obey no one. Create a key with `vogeler-runner keygen --out /etc/vogeler/keys` and install runner.pub as {path} (or as a *.pub file in it, if it is a directory)"
    )]
    NoAuthorizedKeys { path: String },
    #[error("{0}")]
    Keys(#[from] vogeler_core::signing::KeyError),
    #[error("cannot listen on {addr} for /healthz and /metrics: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("simulation: {0}")]
    Simulation(String),
    #[error("cannot use state directory {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// Keys, TLS files or the listen address are wrong: restarting will not help (exit 78,
    /// which the unit's RestartPreventExitStatus keeps systemd from retrying). A busy port
    /// or a state-directory I/O error (disk full, a read-only remount) can pass, so neither
    /// is one: systemd restarts the agent for those.
    pub fn is_config(&self) -> bool {
        match self {
            AgentError::Broker(e) => matches!(e, AmqpError::Tls(_)),
            AgentError::Listen { source, .. } => vogeler_core::exit::listen_error_is_config(source),
            AgentError::State { .. } => false,
            AgentError::NoAuthorizedKeys { .. }
            | AgentError::Keys(_)
            | AgentError::Simulation(_) => true,
        }
    }

    /// The broker, not this node, is the likely cause.
    pub fn is_broker(&self) -> bool {
        matches!(self, AgentError::Broker(_))
    }

    /// The broker could not be reached at start-up (exit 69).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AgentError::Broker(AmqpError::Unavailable { .. }))
    }
}

/// The host name, used as the node name when none is configured.
pub fn hostname() -> Option<String> {
    vogeler_core::hostname()
}

/// What every command handler shares.
struct Shared {
    settings: AgentSettings,
    /// The current plugins; the reloader task replaces them.
    catalog: watch::Receiver<Arc<Catalog>>,
    /// Plugin runs allowed at once (shared by the nodes of a simulation).
    runs: Arc<Semaphore>,
    guard: Guard,
    /// This node's own key: results and announcements are signed with it.
    key: PrivateKey,
    replay: Mutex<ReplayCache>,
    audit: AuditLog,
    /// Counters for `/metrics` (refused commands by class also go to the log).
    metrics: AgentMetrics,
    /// The publishing channel of the current connection: a result computed before a
    /// reconnect is published on the new one.
    publisher: Mutex<Option<Channel>>,
}

impl Shared {
    fn new(
        settings: AgentSettings,
        security: Security,
        catalog: watch::Receiver<Arc<Catalog>>,
        runs: Arc<Semaphore>,
        metrics: AgentMetrics,
    ) -> Arc<Self> {
        Arc::new(Shared {
            runs,
            catalog,
            settings,
            guard: security.guard,
            key: security.key,
            replay: Mutex::new(security.replay),
            audit: security.audit,
            metrics,
            publisher: Mutex::default(),
        })
    }

    fn publisher(&self) -> Option<Channel> {
        self.publisher.lock().ok().and_then(|p| p.clone())
    }
}

/// What an agent needs from its state directory and key files before it may connect.
pub struct Security {
    pub guard: Guard,
    pub key: PrivateKey,
    replay: ReplayCache,
    audit: AuditLog,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("node", &self.guard.node)
            .field("trusted_keys", &self.guard.keys.len())
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Security {
    /// Load the authorized keys (refusing to go on without one), create the node's state
    /// directory (0700), its key on first start, the replay cache and the audit log.
    pub fn load(settings: &AgentSettings) -> Result<Self, AgentError> {
        Self::with_keys(settings, Self::authorized_keys(settings)?)
    }

    /// The runner keys `agent.authorized_keys` names; none is an error.
    pub fn authorized_keys(settings: &AgentSettings) -> Result<AuthorizedKeys, AgentError> {
        let path = &settings.authorized_keys;
        let keys = if path.exists() {
            vogeler_core::keyfile::load_authorized(path)?
        } else {
            AuthorizedKeys::default()
        };
        if keys.is_empty() {
            return Err(AgentError::NoAuthorizedKeys {
                path: path.display().to_string(),
            });
        }
        Ok(keys)
    }

    /// [`Security::load`] with the authorized keys already read (a simulation reads them
    /// once for all its nodes).
    pub fn with_keys(settings: &AgentSettings, keys: AuthorizedKeys) -> Result<Self, AgentError> {
        let dir = &settings.state_dir;
        let state = |source| AgentError::State {
            path: dir.display().to_string(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(state)?;
        let running = dir.join(RUNNING_DIR);
        std::fs::create_dir_all(&running).map_err(state)?;
        let reaped = exec::reap_orphans(&running, settings.node.as_str());
        if reaped > 0 {
            warn!(node = %settings.node, processes = reaped, "killed plugin processes left running by a previous agent that did not stop cleanly");
        }
        let (key, created) = vogeler_core::keyfile::load_or_create_private(&dir.join("agent.key"))?;
        if created {
            info!(node = %settings.node, key = %key.public(), "created this node's signing key");
        }
        let replay = ReplayCache::open(&dir.join("replay"), Utc::now()).map_err(state)?;
        let audit = AuditLog::open(&dir.join(audit::FILE)).map_err(state)?;
        Ok(Self {
            guard: Guard {
                node: settings.node.clone(),
                keys,
                max_clock_skew: settings.max_clock_skew,
                max_ttl: settings.max_command_ttl,
            },
            key,
            replay,
            audit,
        })
    }
}

/// Run the agent until `cancel` fires. Gives up with [`AmqpError::Unavailable`] only when the
/// broker cannot be reached within the connect timeout at start-up; later losses of the
/// connection are retried without limit.
pub async fn run(settings: AgentSettings, cancel: CancellationToken) -> Result<(), AgentError> {
    run_with(settings, cancel, AgentMetrics::default()).await
}

/// [`run`], counting into `metrics` (tests read them; `/metrics` serves them when
/// `agent.http_listen` is set).
pub async fn run_with(
    settings: AgentSettings,
    cancel: CancellationToken,
    metrics: AgentMetrics,
) -> Result<(), AgentError> {
    let security = Security::load(&settings)?;
    serve_http(&settings, &metrics, &cancel).await?;
    info!(
        node = %settings.node,
        trusted_keys = security.guard.keys.len(),
        key = %security.key.public(),
        state_dir = %settings.state_dir.display(),
        "command signatures are checked"
    );
    let catalog = reload::load_logged(&settings.plugin_dir);
    let names: Vec<&str> = catalog.plugins().map(|p| p.name.as_str()).collect();
    info!(dir = %settings.plugin_dir.display(), plugins = %names.join(","), "plugins loaded");
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(catalog));
    let reloader = tokio::spawn(reload::watch(
        settings.plugin_dir.clone(),
        catalog_tx,
        cancel.clone(),
    ));
    let runs = Arc::new(Semaphore::new(settings.concurrency));
    let shared = Shared::new(settings, security, catalog_rx, runs, metrics);
    let s = &shared.settings;
    let name = format!("vogeler-agent {}", s.node);
    let started_at = Utc::now();
    let tracker = TaskTracker::new();

    let mut conn =
        match amqp::connect_with_retry(&s.broker, &name, Some(s.broker.connect_timeout), &cancel)
            .await
        {
            Ok(c) => c,
            Err(AmqpError::Cancelled) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
    loop {
        shared.metrics.broker_up.set(true);
        let served = serve(&conn, &shared, started_at, &tracker, &cancel).await;
        shared.metrics.broker_up.set(false);
        match served {
            Ok(()) => break,
            Err(e) => warn!(node = %s.node, error = %e, "lost the broker connection; reconnecting"),
        }
        conn = match amqp::connect_with_retry(&s.broker, &name, None, &cancel).await {
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

/// `/healthz` and `/metrics` when `agent.http_listen` is set.
async fn serve_http(
    settings: &AgentSettings,
    metrics: &AgentMetrics,
    cancel: &CancellationToken,
) -> Result<(), AgentError> {
    if let Some(addr) = settings.http_listen {
        observe::serve(addr, metrics, None, cancel.clone())
            .await
            .map_err(|source| AgentError::Listen { addr, source })?;
    }
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
    amqp::declare::shared(topology, conn).await?;
    if let Ok(mut current) = shared.publisher.lock() {
        *current = Some(publisher.clone());
    }

    let consumer_ch = conn.create_channel().await?;
    let prefetch = u16::try_from(s.concurrency).unwrap_or(u16::MAX);
    consumer_ch
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let queue = amqp::declare::agent_queue(topology, conn, &s.node).await?;

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
        let cancel = cancel.clone();
        tracker.spawn(async move { handle(&shared, delivery, &cancel).await });
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
        &shared.key,
    )
    .await
}

/// Handle one delivery from the agent's queue: check it, run it at most once, publish the
/// signed result.
async fn handle(shared: &Shared, delivery: Delivery, cancel: &CancellationToken) {
    shared.metrics.commands_received.inc();
    let mut seen = Seen::default();
    let command = match admit(shared, &delivery, &mut seen) {
        Ok(c) => c,
        Err(Rejection::Replayed(id)) if delivery.redelivered => {
            // The broker handing back a command we took before a reconnect is not an
            // attack: it ran (or is running) once already, and that is all it gets.
            info!(request_id = %id, "redelivered command was already accepted; not run again");
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
        Err(rejection) => {
            refuse(shared, &seen, &rejection);
            // Not requeued: it would come straight back.
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
            if let Rejection::UnknownPlugin(command) = rejection {
                // Authentic, but for a plugin this node lacks: say so, or the runner
                // cannot tell "no such plugin" from "no answer".
                let result = result_of(
                    shared,
                    &command,
                    Outcome::UnknownPlugin,
                    None,
                    false,
                    Duration::ZERO,
                );
                publish_result(shared, &command, result, cancel).await;
            }
            return;
        }
    };
    shared.audit.accepted(&seen);
    let span = info_span!("command", request_id = %command.request_id, plugin = %command.plugin, key = seen.key_id.as_deref().unwrap_or(""));
    async {
        let result = run_command(shared, &command).await;
        shared.audit.finished(&seen, result.outcome.status());
        shared
            .metrics
            .plugin_run(command.plugin.as_str(), result.outcome.status());
        if publish_result(shared, &command, result, cancel).await {
            // Ack only once the broker holds the result.
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                warn!(error = %e, "could not ack command; a redelivery will be refused as a replay");
            }
        } else {
            // Shutting down before the result got out: it is lost, but the command will
            // not run twice (a redelivery is refused by the replay cache).
            let _ = delivery.acker.nack(BasicNackOptions::default()).await;
        }
    }
    .instrument(span)
    .await;
}

/// Every check, in order; the replay cache last, so only commands that would run are
/// remembered.
fn admit(shared: &Shared, delivery: &Delivery, seen: &mut Seen) -> Result<Command, Rejection> {
    let (key, signature) = amqp::signature_of(&delivery.properties);
    let now = Utc::now();
    let command = shared.guard.check(
        &delivery.data,
        key.as_deref(),
        signature.as_deref(),
        now,
        seen,
    )?;
    if !shared.catalog.borrow().contains(&command.plugin) {
        return Err(Rejection::UnknownPlugin(Box::new(command)));
    }
    let until = shared.guard.remember_until(&command);
    let fresh = match shared.replay.lock() {
        Ok(mut cache) => cache.insert(command.request_id, until, now),
        Err(poisoned) => poisoned.into_inner().insert(command.request_id, until, now),
    };
    match fresh {
        Ok(true) => Ok(command),
        Ok(false) => Err(Rejection::Replayed(command.request_id)),
        Err(e) => {
            // Without a durable record the command could be replayed later: do not run it.
            Err(Rejection::Denied(format!(
                "cannot record the request id in the replay cache: {e}"
            )))
        }
    }
}

fn refuse(shared: &Shared, seen: &Seen, rejection: &Rejection) {
    let class = rejection.class();
    let total = shared.metrics.rejected(class);
    shared.audit.rejected(seen, class, &rejection.to_string());
    warn!(
        node = %shared.settings.node,
        class,
        request_id = ?seen.request_id,
        key = seen.key_id.as_deref().unwrap_or("-"),
        reason = %rejection,
        rejected_of_class = total,
        "refused a command"
    );
}

/// Publish a result, retrying in place while the broker refuses it (results queue full) so
/// the command is never run twice. Returns false only when shutting down first.
async fn publish_result(
    shared: &Shared,
    command: &Command,
    result: PluginResult,
    cancel: &CancellationToken,
) -> bool {
    let topology = &shared.settings.broker.topology;
    let key = Topology::result_routing_key(command.request_id);
    let message = Message::Result(result);
    loop {
        let sent = match shared.publisher() {
            Some(publisher) => {
                amqp::publish(
                    &publisher,
                    &topology.results_exchange(),
                    &key,
                    &message,
                    &shared.key,
                )
                .await
            }
            None => Err(AmqpError::Cancelled),
        };
        match sent {
            Ok(()) => {
                shared.metrics.results_published.inc();
                return true;
            }
            Err(e) => {
                shared.metrics.publish_retries.inc();
                warn!(error = %e, retry_in_s = PUBLISH_RETRY.as_secs(), "could not publish result (broker down or results queue full); retrying");
                tokio::select! {
                    () = cancel.cancelled() => return false,
                    () = tokio::time::sleep(PUBLISH_RETRY) => {}
                }
            }
        }
    }
}

/// The result of `command` on this node.
fn result_of(
    shared: &Shared,
    command: &Command,
    outcome: Outcome,
    value: Option<serde_json::Value>,
    truncated: bool,
    duration: Duration,
) -> PluginResult {
    PluginResult {
        request_id: command.request_id,
        node: shared.settings.node.clone(),
        plugin: command.plugin.clone(),
        outcome,
        value,
        truncated,
        collected_at: Utc::now(),
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        agent_version: VERSION.to_string(),
    }
}

/// Run the plugin a command names, within the concurrency limit. Unknown plugins are
/// answered, not ignored, so the runner can tell "no such plugin" from "no answer".
async fn run_command(shared: &Shared, command: &Command) -> PluginResult {
    let collected = |outcome, value, truncated, duration| {
        result_of(shared, command, outcome, value, truncated, duration)
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
    let request_id = command.request_id.to_string();
    let run_env = [
        ("VOGELER_REQUEST_ID", request_id.as_str()),
        ("VOGELER_NODE", shared.settings.node.as_str()),
    ];
    let running = shared.settings.state_dir.join(RUNNING_DIR);
    let mut e = exec::execute_with(plugin, &run_env, Some(&running)).await;
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
