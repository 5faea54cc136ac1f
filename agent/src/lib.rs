//! vogeler-agent: runs on every node, waits for commands on its queue, runs the named plugin
//! (only ever a configured one) and publishes the result.
//!
//! - [`plugin`]: plugin files and the catalog of a plugin directory.
//! - [`format`]: how plugin output becomes JSON (from `vogeler_plugin_spec`).
//! - [`exec`]: bounded plugin execution.
//! - [`reload`]: hot reload of the plugin directory (inotify and SIGHUP).
//! - [`local`]: `plugins list|check|run`, the tools for plugin authors.
//! - [`guard`]: the checks every command passes (signature, time, target, restrictions), from
//!   `vogeler_proto`.
//! - [`admission`]: the guard as the consumer's verifier, the catalog and replay checks after
//!   it, and the result a run becomes.
//! - [`replay`]: the on-disk cache of request ids that refuses replays.
//! - [`schedule`]: plugins run on their own interval, and change-only results.
//! - [`security`]: the keys, state directory, replay cache and audit log an agent starts with.
//! - [`audit`]: the audit log of accepted, refused and finished commands, rotated by size.
//! - [`throttle`]: how many refusals of a class the audit log and the log write under a
//!   flood.
//!
//! [`run`] is the whole agent; it takes its settings and a shutdown token so tests run it
//! in-process against a real broker.

pub mod admission;
pub mod audit;
pub mod cli;
pub mod exec;
pub mod facts;
// Plugin output formats live with the plugin-file syntax, in the pure crate.
pub use vogeler_plugin_spec::format;
pub use vogeler_proto::guard;
pub mod local;
pub mod plugin;
pub mod reload;
pub mod replay;
pub mod schedule;
pub mod security;
pub mod simulate;
pub mod throttle;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use tokio::sync::{Semaphore, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};
use vogeler_config::AgentSettings;
use vogeler_core::{
    VERSION,
    amqp::{
        self, AmqpError, Connection, Publisher, Supervisor,
        consume::{Consume, Consumer, Received},
    },
    exit::{self, ExitStatus},
    observe::{self, AgentMetrics},
};
use vogeler_proto::{
    guard::{Guard, Provenance, Rejection},
    names::PluginName,
    signing::PrivateKey,
    wire::{Announce, Command, Message, Outcome, PluginResult},
};

pub use crate::security::Security;
use crate::{
    admission::{Admission, GuardCheck, Run},
    audit::AuditLog,
    plugin::Catalog,
    replay::ReplayCache,
};

/// Pause before a command whose result could not be published goes back to the queue.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// Where, in a node's state directory, running plugins' process groups are recorded (see
/// [`exec::reap_orphans`]).
pub(crate) const RUNNING_DIR: &str = "running";

/// How long in-flight plugin runs may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often the throttle's windows that are over are summed up in the audit log: a flood
/// that stops has no later refusal to do it.
const SUPPRESSED_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error(
        "no runner key is authorized in {path}: this agent would obey no one. Create a key with `vogeler-runner keygen --out /etc/vogeler/keys` and install runner.pub as {path} (or as a *.pub file in it, if it is a directory)"
    )]
    NoAuthorizedKeys { path: String },
    #[error("{0}")]
    Keys(#[from] vogeler_proto::signing::KeyError),
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

impl ExitStatus for AgentError {
    /// Keys, TLS files or the listen address are wrong: restarting will not help (78, which
    /// the unit's RestartPreventExitStatus keeps systemd from retrying). A busy port or a
    /// state-directory I/O error (disk full, a read-only remount) can pass, so neither is
    /// one: systemd restarts the agent for those. No broker at start-up: 69.
    fn exit_code(&self) -> u8 {
        match self {
            AgentError::Broker(e) => e.exit_code(),
            AgentError::Listen { source, .. } if exit::listen_error_is_config(source) => {
                exit::CONFIG
            }
            AgentError::Listen { .. } | AgentError::State { .. } => exit::FAILURE,
            AgentError::NoAuthorizedKeys { .. }
            | AgentError::Keys(_)
            | AgentError::Simulation(_) => exit::CONFIG,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            // The broker, not this node, is the likely cause.
            AgentError::Broker(e) if e.exit_code() != exit::CONFIG => {
                Some("check that the broker is running and the URL is right")
            }
            _ => None,
        }
    }
}

/// The host name, used as the node name when none is configured.
pub fn hostname() -> Option<String> {
    vogeler_core::hostname()
}

/// One node's agent: its settings, plugins, keys, replay cache and audit log, and where it
/// publishes; every command handler of the node holds it (a simulation has one per node).
struct NodeAgent {
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
    /// The publisher of the current connection: a result computed before a reconnect is
    /// published on the new one.
    publisher: Mutex<Option<Publisher>>,
    /// Woken when a connection's publisher is in place, so a result that waited for the
    /// broker (a scheduled run before the first connection) goes out at once.
    publisher_ready: tokio::sync::Notify,
    /// One lock per plugin: a scheduled run holds it alone, so it never overlaps another
    /// run of its plugin; commands share it (two runners may ask for one plugin at once, as
    /// before schedules), and wait for a scheduled run to end.
    locks: Mutex<BTreeMap<PluginName, Arc<tokio::sync::RwLock<()>>>>,
    /// The value each plugin last published in full, for change-only scheduled results.
    /// In memory only: the first run after a start always sends the value.
    published: Mutex<BTreeMap<PluginName, schedule::Published>>,
}

impl NodeAgent {
    fn new(
        settings: AgentSettings,
        security: Security,
        catalog: watch::Receiver<Arc<Catalog>>,
        runs: Arc<Semaphore>,
        metrics: AgentMetrics,
    ) -> Arc<Self> {
        Arc::new(NodeAgent {
            runs,
            catalog,
            settings,
            guard: security.guard,
            key: security.key,
            replay: Mutex::new(security.replay),
            audit: security.audit,
            metrics,
            publisher: Mutex::default(),
            publisher_ready: tokio::sync::Notify::new(),
            locks: Mutex::default(),
            published: Mutex::default(),
        })
    }

    fn plugin_lock(&self, plugin: &PluginName) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(plugin.clone()).or_default().clone()
    }

    /// Remember a value that went out in full (a command's or a scheduled run's).
    fn note_published(&self, result: &PluginResult) {
        if let (Outcome::Ok, Some(value)) = (&result.outcome, &result.value) {
            let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
            // A command's result noted after a newer scheduled run's must not replace it.
            if published
                .get(&result.plugin)
                .is_some_and(|p| p.full_at > result.collected_at)
            {
                return;
            }
            published.insert(
                result.plugin.clone(),
                schedule::Published {
                    hash: vogeler_proto::document::value_hash(value),
                    full_at: result.collected_at,
                },
            );
        }
    }

    fn publisher(&self) -> Option<Publisher> {
        self.publisher.lock().ok().and_then(|p| p.clone())
    }

    /// Sum up the refusals the throttle held back in windows over by now; with `all`, every
    /// open window too (at shutdown).
    fn sum_up_suppressed(&self, all: bool) {
        let now = Utc::now();
        let summaries = if all {
            self.audit.drain(now)
        } else {
            self.audit.expired(now)
        };
        for s in &summaries {
            warn_suppressed(&self.settings.node, s);
        }
    }
}

fn warn_suppressed(node: &vogeler_proto::names::NodeName, s: &throttle::Suppressed) {
    warn!(
        node = %node,
        class = s.class,
        suppressed = s.count,
        since = %s.since,
        "{} more refusals of class {} suppressed (in this log and the audit log; commands_rejected_total counts them all)",
        s.count,
        s.class
    );
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
    let shared = NodeAgent::new(settings, security, catalog_rx, runs, metrics);
    let s = &shared.settings;
    let name = format!("vogeler-agent {}", s.node);
    let started_at = Utc::now();
    let tracker = TaskTracker::new();
    // Its own token, cancelled on every way out of here (a fatal broker error too), so the
    // agent never waits for a scheduler that nothing stops.
    let schedule_stop = cancel.child_token();
    let _stop_on_exit = schedule_stop.clone().drop_guard();
    let scheduler = tokio::spawn(scheduled(
        Arc::clone(&shared),
        tracker.clone(),
        schedule_stop.clone(),
    ));

    let served = match Supervisor::connect(&s.broker, &name, &cancel).await {
        Ok(Some(mut broker)) => loop {
            shared.metrics.broker_up.set(true);
            let served = serve(broker.connection(), &shared, started_at, &tracker, &cancel).await;
            shared.metrics.broker_up.set(false);
            match broker.again(served).await {
                Ok(true) => {}
                Ok(false) => break Ok::<_, AmqpError>(Some(broker)),
                Err(e) => break Err(e),
            }
        },
        Ok(None) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // Only once the scheduler stopped, no more runs join the tracker.
    schedule_stop.cancel();
    let _ = scheduler.await;
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
    shared.sum_up_suppressed(true);
    // Closed only after in-flight runs finished, so their results could still go out.
    let broker = served?;
    if let Some(broker) = broker {
        broker.close().await;
    }
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
    shared: &Arc<NodeAgent>,
    started_at: chrono::DateTime<Utc>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), AmqpError> {
    let s = &shared.settings;
    let topology = &s.broker.topology;
    let publisher = Publisher::open(conn, topology).await?;
    amqp::declare::shared(topology, conn).await?;
    if let Ok(mut current) = shared.publisher.lock() {
        *current = Some(publisher.clone());
    }
    shared.publisher_ready.notify_waiters();
    let queue = amqp::declare::agent_queue(topology, conn, &s.node).await?;

    let mut catalog = shared.catalog.clone();
    let current = catalog.borrow_and_update().clone();
    announce(shared, &publisher, started_at, &current).await?;

    let tag = format!("vogeler-agent-{}", s.node);
    let how = Consume {
        queue: &queue,
        tag: &tag,
        prefetch: Some(u16::try_from(s.concurrency).unwrap_or(u16::MAX)),
        no_ack: false,
    };
    let mut consumer = Consumer::open(conn, how, GuardCheck(shared.guard.clone())).await?;
    info!(node = %s.node, queue = %queue, "waiting for commands");
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + s.heartbeat, s.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut suppressed = tokio::time::interval(SUPPRESSED_EVERY);
    suppressed.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let delivery = tokio::select! {
            _ = suppressed.tick() => {
                shared.sum_up_suppressed(false);
                continue;
            }
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
                consumer.cancel().await;
                return Ok(());
            }
            d = consumer.next() => d?,
        };
        let shared = Arc::clone(shared);
        let cancel = cancel.clone();
        tracker.spawn(async move { handle(&shared, delivery, &cancel).await });
    }
}

async fn announce(
    shared: &NodeAgent,
    publisher: &Publisher,
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
        schedules: Some(
            catalog
                .plugins()
                .filter_map(|p| {
                    let every = schedule::every(p, &s.schedule)?;
                    Some((p.name.to_string(), every.interval_s()))
                })
                .collect(),
        ),
        packages: Some(catalog.packages()),
    });
    publisher.publish(&message, &shared.key).await
}

/// A delivery from the agent's queue, checked by the guard.
type Delivered = Received<(Command, Provenance), (Rejection, Provenance)>;

/// Handle one delivery from the agent's queue: admit it, run it at most once, publish the
/// signed result.
async fn handle(shared: &NodeAgent, delivery: Delivered, cancel: &CancellationToken) {
    shared.metrics.commands_received.inc();
    let (incoming, command, provenance) = match delivery {
        Ok(incoming) => {
            let (command, provenance) = incoming.message.clone();
            (incoming, command, provenance)
        }
        Err(refused) => {
            let (rejection, provenance) = &refused.refusal;
            refuse(shared, provenance, rejection);
            let _ = refused.settlement.reject().await;
            return;
        }
    };
    let now = Utc::now();
    let has_plugin = shared.catalog.borrow().contains(&command.plugin);
    let until = shared.guard.remember_until(&command);
    let admission = admission::admit(
        command,
        incoming.settlement.redelivered(),
        has_plugin,
        until,
        |id, until| match shared.replay.lock() {
            Ok(mut cache) => cache.insert(id, until, now),
            Err(poisoned) => poisoned.into_inner().insert(id, until, now),
        },
    );
    let command = match admission {
        Admission::Run(command) => command,
        Admission::AlreadyAccepted(id) => {
            info!(request_id = %id, "redelivered command was already accepted; not run again");
            let _ = incoming.settlement.ack().await;
            return;
        }
        Admission::Refuse(rejection) => {
            refuse(shared, &provenance, &rejection);
            let _ = incoming.settlement.reject().await;
            if let Rejection::UnknownPlugin(command) = rejection {
                let result = result_of(shared, &command, Run::nothing(Outcome::UnknownPlugin), "");
                publish_result(shared, &result, cancel).await;
            }
            return;
        }
    };
    shared.audit.accepted(&provenance);
    let span = info_span!("command", request_id = %command.request_id, plugin = %command.plugin, key = provenance.key_id.as_deref().unwrap_or(""));
    async {
        let result = run_command(shared, &command).await;
        shared.audit.finished(&provenance, result.outcome.status());
        shared
            .metrics
            .plugin_run(command.plugin.as_str(), result.outcome.status());
        if publish_result(shared, &result, cancel).await {
            shared.note_published(&result);
            // Ack only once the broker holds the result.
            if let Err(e) = incoming.settlement.ack().await {
                warn!(error = %e, "could not ack command; a redelivery will be refused as a replay");
            }
        } else {
            // Shutting down before the result got out: it is lost, but the command will
            // not run twice (a redelivery is refused by the replay cache).
            let _ = incoming.settlement.requeue().await;
        }
    }
    .instrument(span)
    .await;
}

/// Count a refusal, and write it to the audit log and the log unless the throttle holds it
/// back: the metric counts every one, the lines only the first of each class a minute.
fn refuse(shared: &NodeAgent, provenance: &Provenance, rejection: &Rejection) {
    let class = rejection.class();
    let total = shared.metrics.rejected(class);
    let reason = rejection.to_string();
    let decision = shared
        .audit
        .rejected(provenance, class, &reason, Utc::now());
    if let Some(s) = &decision.closed {
        warn_suppressed(&shared.settings.node, s);
    }
    if decision.write {
        warn!(
            node = %shared.settings.node,
            class,
            request_id = ?provenance.request_id,
            key = provenance.key_id.as_deref().unwrap_or("-"),
            reason = %audit::clip(&reason),
            rejected_of_class = total,
            "refused a command"
        );
    }
}

/// Publish a result, retrying in place while the broker refuses it (results queue full) so
/// the command is never run twice. Returns false only when shutting down first.
async fn publish_result(
    shared: &NodeAgent,
    result: &PluginResult,
    cancel: &CancellationToken,
) -> bool {
    let message = Message::Result(result.clone());
    loop {
        // Created before looking, so a publisher set in between still wakes this.
        let ready = shared.publisher_ready.notified();
        let sent = match shared.publisher() {
            Some(publisher) => publisher.publish(&message, &shared.key).await,
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
                    () = ready => {}
                    () = tokio::time::sleep(PUBLISH_RETRY) => {}
                }
            }
        }
    }
}

/// The result of `command` on this node.
fn result_of(shared: &NodeAgent, command: &Command, run: Run, format: &str) -> PluginResult {
    admission::result(
        &shared.settings.node,
        command,
        run,
        format,
        VERSION,
        Utc::now(),
    )
}

/// Run the plugin a command names, within the concurrency limit. Unknown plugins are
/// answered, not ignored, so the runner can tell "no such plugin" from "no answer".
async fn run_command(shared: &NodeAgent, command: &Command) -> PluginResult {
    let catalog = shared.catalog.borrow().clone();
    let Some(plugin) = catalog.get(&command.plugin) else {
        info!("unknown plugin requested");
        return result_of(shared, command, Run::nothing(Outcome::UnknownPlugin), "");
    };
    let lock = shared.plugin_lock(&command.plugin);
    let _running = lock.read().await;
    let run = execute(shared, plugin, command.request_id, "command").await;
    result_of(shared, command, run, plugin.format.name())
}

/// Run a plugin within the concurrency limit (the caller holds the plugin's lock).
async fn execute(
    shared: &NodeAgent,
    plugin: &plugin::Plugin,
    request_id: uuid::Uuid,
    why: &'static str,
) -> Run {
    let Ok(_permit) = shared.runs.acquire().await else {
        unreachable!("the run semaphore is never closed")
    };
    debug!(program = %plugin.program.display(), why, "running plugin");
    let request_id = request_id.to_string();
    let run_env = [
        ("VOGELER_REQUEST_ID", request_id.as_str()),
        ("VOGELER_NODE", shared.settings.node.as_str()),
        ("VOGELER_RUN", why),
    ];
    let running = shared.settings.state_dir.join(RUNNING_DIR);
    let e = exec::execute_with(plugin, &run_env, Some(&running)).await;
    info!(
        plugin = %plugin.name,
        why,
        outcome = e.outcome.status(),
        duration_ms = e.duration.as_millis() as u64,
        truncated = e.truncated,
        "plugin finished"
    );
    Run {
        outcome: e.outcome,
        value: e.value,
        truncated: e.truncated,
        duration: e.duration,
    }
}

/// If a plugin is due while it still runs (a command, or a run longer than its interval),
/// look again this soon: it runs once right after, never twice at once.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// The agent's own schedule: runs plugins that have an interval when they are due, until
/// `cancel`. Runs join `tracker`, so shutdown waits for them as for commands.
async fn scheduled(shared: Arc<NodeAgent>, tracker: TaskTracker, cancel: CancellationToken) {
    let s = &shared.settings;
    let mut record = match schedule::LastRuns::load(&s.state_dir) {
        Ok(r) => r,
        Err(e) => {
            warn!(node = %s.node, "{e}");
            schedule::LastRuns::default()
        }
    };
    let mut catalog = shared.catalog.clone();
    // Each scheduled plugin's schedule, the start of its current slot, and when it runs.
    let mut due: BTreeMap<
        PluginName,
        (
            schedule::Every,
            chrono::DateTime<Utc>,
            chrono::DateTime<Utc>,
        ),
    > = BTreeMap::new();
    loop {
        let current = catalog.borrow_and_update().clone();
        let now = Utc::now();
        due.retain(|name, _| current.contains(name));
        for plugin in current.plugins() {
            let Some(every) = schedule::every(plugin, &s.schedule) else {
                due.remove(&plugin.name);
                continue;
            };
            if due.get(&plugin.name).is_some_and(|(e, _, _)| *e == every) {
                continue;
            }
            let last = record.last_run.get(plugin.name.as_str()).copied();
            let at = schedule::first_due(every, last, now, schedule::random_fraction());
            info!(
                node = %s.node,
                plugin = %plugin.name,
                interval = %vogeler_proto::duration::format(every.interval),
                splay = %vogeler_proto::duration::format(every.splay),
                next_run = %at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "plugin scheduled"
            );
            due.insert(plugin.name.clone(), (every, at, at));
        }
        let wait = due
            .values()
            .map(|(_, _, at)| (*at - now).to_std().unwrap_or_default())
            .min()
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            () = cancel.cancelled() => return,
            Ok(()) = catalog.changed() => continue,
            () = tokio::time::sleep(wait) => {}
        }
        let now = Utc::now();
        let mut ran = false;
        for (name, (every, base, at)) in due.iter_mut() {
            if *at > now {
                continue;
            }
            let Some(plugin) = current.get(name).cloned() else {
                continue;
            };
            let Ok(running) = shared.plugin_lock(name).try_write_owned() else {
                *at = now + chrono::TimeDelta::from_std(BUSY_RETRY).unwrap_or_default();
                continue;
            };
            record.last_run.insert(name.to_string(), now);
            ran = true;
            (*base, *at) = schedule::next_slot(*every, *base, now, schedule::random_fraction());
            let shared = Arc::clone(&shared);
            let cancel = cancel.clone();
            let every = *every;
            tracker.spawn(async move {
                let _running = running;
                run_scheduled(&shared, &plugin, every, &cancel).await;
            });
        }
        if ran && let Err(e) = record.save(&s.state_dir) {
            warn!(node = %s.node, error = %e, "cannot record when plugins ran; after a restart they run within their splay");
        }
    }
}

/// One scheduled run: execute, send the value or "unchanged", publish signed.
async fn run_scheduled(
    shared: &NodeAgent,
    plugin: &plugin::Plugin,
    every: schedule::Every,
    cancel: &CancellationToken,
) {
    let request_id = uuid::Uuid::new_v4();
    let run = execute(shared, plugin, request_id, "schedule").await;
    let asked = admission::Asked {
        request_id,
        plugin: &plugin.name,
        scheduled: Some(vogeler_proto::wire::Schedule {
            interval_s: every.interval_s(),
        }),
    };
    let mut result = admission::result_for(
        &shared.settings.node,
        asked,
        run,
        plugin.format.name(),
        VERSION,
        Utc::now(),
    );
    if let (Outcome::Ok, Some(value)) = (&result.outcome, &result.value) {
        let hash = vogeler_proto::document::value_hash(value);
        let skip = {
            let published = shared.published.lock().unwrap_or_else(|e| e.into_inner());
            schedule::may_skip_value(
                published.get(&plugin.name),
                &hash,
                result.collected_at,
                shared.settings.full_every,
            )
        };
        if skip {
            result.value = None;
            result.outcome = Outcome::Unchanged { hash };
        }
    }
    shared
        .metrics
        .plugin_run(plugin.name.as_str(), result.outcome.status());
    let provenance = Provenance {
        request_id: Some(request_id),
        key_id: Some("schedule".into()),
        plugin: Some(plugin.name.to_string()),
    };
    shared.audit.finished(&provenance, result.outcome.status());
    if publish_result(shared, &result, cancel).await {
        shared.note_published(&result);
    }
}
