//! vogeler-server: drains the results queue into CouchDB, one document per node.
//!
//! - [`batch`]: which batches are written at once, and narrowing a refusal to its message.
//! - [`budget`]: how many history entries a flapping value may write.
//! - [`database`]: reaching CouchDB at start-up and preparing its databases.
//! - [`store`]: batched read-merge-write of node documents, and the history of changes.
//! - [`maintenance`]: design documents, stale nodes, history retention, `prune`.
//!
//! Results are taken in batches (up to `batch_size`, or whatever arrived within a few
//! milliseconds), written with one `_bulk_docs` request, and acked only after CouchDB
//! accepted them; while the database is down the server retries with backoff and the results
//! stay unacked in the queue. Messages that can never be stored go to the dead-letter queue
//! with their reason. [`run`] takes its settings and a shutdown token so tests run it
//! in-process.

pub mod batch;
pub mod budget;
pub mod cli;
pub mod database;
pub mod maintenance;
pub mod store;

use std::{collections::BTreeSet, time::Duration};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use vogeler_config::ServerSettings;
use vogeler_core::{
    amqp::{
        self, AmqpError, Connection,
        consume::{
            Budget, Consume, Consumer, DeadLetters, FromAgents, Incoming, QueueLength, Received,
            Settlement,
        },
    },
    backoff,
    couch::CouchError,
    exit::{self, ExitStatus},
    observe::{self, ServerMetrics},
};
use vogeler_proto::{trust::Signed, wire::Message};

pub use crate::database::{connect_database, prepare_database};
use crate::{
    batch::InFlight,
    store::{Store, Stored},
};

/// How long to wait for more results to fill a batch once one has arrived: long enough to
/// group a fan-out's replies, short enough not to be noticed.
const LINGER: Duration = Duration::from_millis(20);
/// Batches written to the database at once.
const WRITERS: usize = 2;
/// How often stale nodes are reported and old history expired.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(3600);
/// How often the results queue's length is read for the `queue_messages` gauge.
const QUEUE_POLL_EVERY: Duration = Duration::from_secs(5);
/// What a result costs the server while it is stored, per byte it arrived in: its decoded
/// tree, the node document read back, the merged copy, the history entry and the request
/// body. Measured with `bench/run.sh server-memory`.
const DECODED_PER_BYTE: u32 = 24;
/// How long batches in flight may take to be stored after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often throughput is logged at DEBUG (and every tenth time at INFO).
const THROUGHPUT_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error("database server at {url} is unavailable after {}: {source}", vogeler_proto::duration::format(*waited))]
    DatabaseUnavailable {
        url: String,
        waited: Duration,
        #[source]
        source: CouchError,
    },
    #[error("database server at {url} refused the request: {source}")]
    DatabaseRefused {
        url: String,
        #[source]
        source: CouchError,
    },
    #[error("cannot use database {db:?}: {source}")]
    Database {
        db: String,
        #[source]
        source: CouchError,
    },
    #[error("{0}")]
    Http(String),
    #[error("cannot listen on {addr} for /healthz and /metrics: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ExitStatus for ServerError {
    /// A results or dead-letter queue declared with other settings, bad TLS files, a listen
    /// address that cannot be used, a database account or URL CouchDB refuses: 78. A port
    /// another process holds is not one: it can be freed, so systemd may retry. Broker or
    /// database unreachable at start-up: 69.
    fn exit_code(&self) -> u8 {
        match self {
            ServerError::Broker(e) => e.exit_code(),
            ServerError::DatabaseUnavailable { .. } => exit::UNAVAILABLE,
            ServerError::DatabaseRefused { .. } | ServerError::Http(_) => exit::CONFIG,
            ServerError::Database { source, .. } => source.exit_code(),
            ServerError::Listen { source, .. } if exit::listen_error_is_config(source) => {
                exit::CONFIG
            }
            ServerError::Listen { .. } => exit::FAILURE,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            ServerError::Broker(e) => e.hint(),
            _ => None,
        }
    }
}

/// Run the server until `cancel` fires.
pub async fn run(settings: ServerSettings, cancel: CancellationToken) -> Result<(), ServerError> {
    run_with(settings, cancel, ServerMetrics::default()).await
}

/// [`run`], counting into `metrics` (tests read them; `/metrics` serves them when
/// `server.http_listen` is set).
pub async fn run_with(
    settings: ServerSettings,
    cancel: CancellationToken,
    metrics: ServerMetrics,
) -> Result<(), ServerError> {
    let Some(couch) = connect_database(&settings.couch, &cancel).await? else {
        return Ok(());
    };
    if let Some(addr) = settings.http_listen {
        observe::serve(addr, &metrics, Some(couch.clone()), cancel.clone())
            .await
            .map_err(|source| ServerError::Listen { addr, source })?;
    }
    let store = prepare_database(&couch, &settings.couch.database)
        .await?
        .with_max_document_bytes(settings.max_document_bytes)
        .with_enrollment(settings.enrollment);
    store
        .load_quarantine()
        .await
        .map_err(|source| ServerError::Database {
            db: settings.couch.database.clone(),
            source,
        })?;
    show_quarantine(&store, &metrics);
    let overdue = tokio::spawn(maintenance::count_overdue(
        vogeler_core::query::Inventory::new(couch.clone(), store.database()),
        {
            let gauge = metrics.overdue.clone();
            move |n| {
                gauge.set(n);
            }
        },
        cancel.clone(),
    ));
    let refresh = tokio::spawn(maintenance::refresh_views(
        vogeler_core::query::Inventory::new(couch.clone(), store.database()),
        cancel.clone(),
    ));
    let maintenance = tokio::spawn(maintenance::periodic(
        vogeler_core::query::Inventory::new(couch.clone(), store.database()),
        settings.stale_after,
        settings.history_retention,
        MAINTENANCE_EVERY,
        cancel.clone(),
    ));

    let mut stats = Throughput::default();
    let broker = amqp::Supervisor::connect(&settings.broker, "vogeler-server", &cancel).await;
    let served = match broker {
        Ok(Some(mut broker)) => loop {
            metrics.broker_up.set(true);
            let serving = serve(
                broker.connection(),
                &settings,
                &store,
                &mut stats,
                &metrics,
                &cancel,
            );
            // Batches in flight at shutdown get SHUTDOWN_GRACE to be stored and acked; a
            // write still waiting on a slow database after that is dropped unacked (the
            // broker redelivers it when the connection closes, and writes are idempotent).
            let served = tokio::select! {
                served = serving => served,
                () = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => {
                    warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "batches still being stored at shutdown; they stay in the queue");
                    Ok(())
                }
            };
            metrics.broker_up.set(false);
            match broker.again(served).await {
                Ok(true) => {}
                Ok(false) => {
                    broker.close().await;
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        },
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if served.is_err() {
        cancel.cancel();
    }
    let _ = maintenance.await;
    let _ = overdue.await;
    let _ = refresh.await;
    served?;
    info!(
        stored = stats.total_stored,
        dead_lettered = stats.total_dead,
        wrong_key = stats.total_wrong_key,
        "server stopped"
    );
    Ok(())
}

/// Counts for the throughput log lines.
#[derive(Debug, Default)]
struct Throughput {
    stored: u64,
    total_stored: u64,
    total_dead: u64,
    /// Results refused because their signer is not the node's pinned key.
    total_wrong_key: u64,
    batches: u64,
    since: Option<tokio::time::Instant>,
    reports: u64,
}

impl Throughput {
    fn record(&mut self, stored: u64, dead: u64, wrong_key: u64) {
        self.total_wrong_key += wrong_key;
        self.stored += stored;
        self.total_stored += stored;
        self.total_dead += dead;
        self.batches += 1;
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        let elapsed = since.elapsed();
        if elapsed >= THROUGHPUT_EVERY {
            let rate = self.stored as f64 / elapsed.as_secs_f64();
            debug!(
                stored = self.stored,
                batches = self.batches,
                per_second = format!("{rate:.0}"),
                "throughput"
            );
            self.reports += 1;
            if self.reports.is_multiple_of(10) {
                info!(
                    stored_total = self.total_stored,
                    dead_lettered_total = self.total_dead,
                    wrong_key_total = self.total_wrong_key,
                    per_second = format!("{rate:.0}"),
                    "ingest summary"
                );
            }
            self.stored = 0;
            self.batches = 0;
            self.since = Some(tokio::time::Instant::now());
        }
    }
}

/// One connection's life: consume results in batches and store them.
async fn serve(
    conn: &Connection,
    settings: &ServerSettings,
    store: &Store,
    stats: &mut Throughput,
    metrics: &ServerMetrics,
    cancel: &CancellationToken,
) -> Result<(), AmqpError> {
    let topology = &settings.broker.topology;
    amqp::declare::server(topology, conn).await?;
    let dead = DeadLetters::open(conn, topology).await?;
    let queue = topology.results_queue();
    let how = Consume {
        queue: &queue,
        tag: "vogeler-server",
        prefetch: Some(settings.prefetch_window()),
        no_ack: false,
    };
    let mut consumer = Consumer::open(conn, how, FromAgents)
        .await?
        .with_budget(Budget::new(settings.decode_budget(), DECODED_PER_BYTE));
    let lag_probe = QueueLength::open(conn, &queue).await?;
    info!(
        queue = %queue,
        database = %store.database(),
        prefetch = settings.prefetch_window(),
        batch_size = settings.batch_window(),
        max_in_flight_bytes = settings.max_in_flight_bytes,
        enrollment = settings.enrollment.name(),
        "storing results"
    );
    // Two stages so the next batch is gathered while the current one is written: the reader
    // hands whole batches to the writer through a channel that holds one.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Delivered>>(1);
    let batch_size = settings.batch_window();
    let consumer = &mut consumer;
    let reader = async move {
        loop {
            let first = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                d = consumer.next() => d?,
            };
            let mut batch = vec![first];
            let linger = tokio::time::Instant::now() + LINGER;
            while batch.len() < batch_size {
                match tokio::time::timeout_at(linger, consumer.next()).await {
                    Ok(d) => batch.push(d?),
                    Err(_) => break,
                }
            }
            metrics.consumed.inc_by(batch.len() as u64);
            if tx.send(batch).await.is_err() {
                return Ok(()); // the writer stopped for shutdown
            }
        }
    };
    // Up to WRITERS batches are written at once, so the database always has a request to
    // work on while the server merges the next batch.
    let writer = async move {
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        let mut busy = InFlight::new(WRITERS);
        let mut waiting: Option<(Vec<Delivered>, BTreeSet<String>)> = None;
        let mut open = true;
        loop {
            if let Some((_, nodes)) = &waiting
                && busy.can_start(nodes)
                && let Some((batch, nodes)) = waiting.take()
            {
                let ticket = busy.start(nodes);
                let dead = &dead;
                inflight.push(async move {
                    (
                        ticket,
                        handle_batch(store, dead, batch, metrics, cancel).await,
                    )
                });
            }
            tokio::select! {
                batch = rx.recv(), if open && waiting.is_none() => match batch {
                    Some(batch) => {
                        let nodes = batch_nodes(&batch);
                        waiting = Some((batch, nodes));
                    }
                    None => open = false,
                },
                Some((ticket, done)) = inflight.next(), if !inflight.is_empty() => {
                    busy.finish(ticket);
                    match done {
                        Some((stored, dead_count, wrong_key)) => stats.record(stored, dead_count, wrong_key),
                        None => return, // shutdown interrupted a batch; it stays unacked
                    }
                }
                else => return,
            }
        }
    };
    // The ingest lag for /metrics.
    let lag = async {
        loop {
            if let Ok(n) = lag_probe.get().await {
                metrics.queue_messages.set(i64::from(n));
            }
            tokio::time::sleep(QUEUE_POLL_EVERY).await;
        }
    };
    // The poll never ends by itself: the reader and writer decide when this connection is
    // done (so batches in flight finish on shutdown).
    tokio::select! {
        (result, ()) = async { tokio::join!(reader, writer) } => result,
        () = lag => Ok(()),
    }
}

/// A delivery from the results queue, verified or refused.
type Delivered = Received<Signed, String>;

/// The nodes a batch touches.
fn batch_nodes(batch: &[Delivered]) -> BTreeSet<String> {
    batch
        .iter()
        .filter_map(|d| {
            d.as_ref()
                .ok()
                .and_then(|i| store::node_of(&i.message.message))
        })
        .map(|n| n.to_string())
        .collect()
}

/// Store one batch and settle its messages; returns how many were stored, dead-lettered and
/// refused for a wrong key, or `None` when shutdown interrupted it (its messages stay
/// unacked and are redelivered to whoever consumes next).
async fn handle_batch(
    store: &Store,
    dead: &DeadLetters,
    batch: Vec<Delivered>,
    metrics: &ServerMetrics,
    cancel: &CancellationToken,
) -> Option<(u64, u64, u64)> {
    let mut valid: Vec<Incoming<Signed>> = Vec::with_capacity(batch.len());
    let mut refused: Vec<(Settlement, String)> = Vec::new();
    let now = chrono::Utc::now();
    for d in batch {
        match d {
            Ok(incoming) => match batch::admit(&incoming.message.message, now) {
                Ok(()) => valid.push(incoming),
                Err(reason) => refused.push((incoming.settlement, reason)),
            },
            Err(r) => refused.push((r.settlement, r.refusal)),
        }
    }
    let mut dead_count = refused.len() as u64;
    metrics.dead_lettered("malformed", dead_count);
    let refs: Vec<(&Settlement, &str)> = refused.iter().map(|(s, r)| (s, r.as_str())).collect();
    dead.send(&refs).await;

    let mut delays = backoff::delays();
    let mut writer = batch::Writer::new(valid.len());
    let mut step = writer.start();
    let outcome = loop {
        step = match step {
            batch::Step::Apply(indexes) => {
                let messages: Vec<&Signed> = indexes.iter().map(|i| &valid[*i].message).collect();
                let answer = store.apply(&messages).await;
                writer.answer(answer.map_err(|e| batch::Failure::from(&e)))
            }
            batch::Step::Wait(why) => {
                metrics.store_retries.inc();
                let delay = delays.next().unwrap_or(backoff::MAX_DELAY);
                warn!(error = %why, batch = valid.len(), retry_in_ms = delay.as_millis() as u64, "cannot store results yet, retrying; they stay in the queue");
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
                writer.resume()
            }
            batch::Step::Done(outcome) => break outcome,
        }
    };
    for stored in &outcome {
        match stored {
            Stored::Refused(reason) => error!(reason = %reason, "database refused a result"),
            Stored::WrongKey(reason) => {
                warn!(reason = %reason, "refused a message signed by another key than its node's")
            }
            Stored::Held(reason) => debug!(reason = %reason, "held back a message"),
            Stored::Unconfirmed(reason) => info!(reason = %reason, "unconfirmed unchanged result"),
            Stored::Done => {}
        }
    }
    let plan = batch::Settlement::of(outcome);
    // Acked one by one: with several batches in flight a `multiple` ack could settle
    // another batch's messages before they are stored.
    for &i in &plan.ack {
        log_stored(&valid[i].message.message);
        if let Err(e) = valid[i].settlement.ack().await {
            // The write is idempotent, so a redelivery after this is harmless.
            warn!(error = %e, "stored but could not ack; it will be redelivered");
        }
    }
    let unstorable: Vec<(&Settlement, &str)> = plan
        .dead
        .iter()
        .map(|(i, r)| (&valid[*i].settlement, r.as_str()))
        .collect();
    dead_count += unstorable.len() as u64;
    let stored_count = plan.ack.len() as u64 - plan.held - plan.unconfirmed;
    metrics.held.inc_by(plan.held);
    metrics.unconfirmed.inc_by(plan.unconfirmed);
    metrics.batches.inc();
    metrics.stored.inc_by(stored_count);
    metrics.dead_lettered("wrong_key", plan.wrong_key);
    metrics.dead_lettered("refused", unstorable.len() as u64 - plan.wrong_key);
    dead.send(&unstorable).await;
    show_quarantine(store, metrics);
    Some((stored_count, dead_count, plan.wrong_key))
}

fn show_quarantine(store: &Store, metrics: &ServerMetrics) {
    let nodes = store.quarantine().nodes();
    metrics.set_quarantined(nodes.iter().map(|(n, _)| n.as_str()));
}

fn log_stored(message: &Message) {
    match message {
        Message::Result(r) => {
            debug!(node = %r.node, plugin = %r.plugin, request_id = %r.request_id, outcome = r.outcome.status(), "result stored")
        }
        Message::Announce(a) => {
            debug!(node = %a.node, agent_version = %a.agent_version, "node announced")
        }
        Message::Command(_) => {}
    }
}
