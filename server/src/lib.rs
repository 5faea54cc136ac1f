//! vogeler-server: drains the results queue into CouchDB, one document per node.
//!
//! - [`store`]: batched read-merge-write of node documents, and the history of changes.
//! - [`maintenance`]: design documents, stale nodes, history retention, `prune`.
//!
//! Results are taken in batches (up to `batch_size`, or whatever arrived within a few
//! milliseconds), written with one `_bulk_docs` request, and acked only after CouchDB
//! accepted them; while the database is down the server retries with backoff and the results
//! stay unacked in the queue. Messages that can never be stored go to the dead-letter queue
//! with their reason. [`run`] takes its settings and a shutdown token so tests run it
//! in-process.

pub mod cli;
pub mod maintenance;
pub mod store;

use std::{collections::BTreeSet, time::Duration};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        BasicRejectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use vogeler_core::{
    amqp::{self, AmqpError},
    backoff,
    config::{CouchSettings, ServerSettings},
    couch::{CouchClient, CouchError},
    design,
    observe::{self, ServerMetrics},
    signing::{self, Purpose},
    topology::Topology,
    wire::{self, Message},
};

use crate::store::{Signed, Store, Stored};

/// How long to wait for more results to fill a batch once one has arrived: long enough to
/// group a fan-out's replies, short enough not to be noticed.
const LINGER: Duration = Duration::from_millis(20);
/// Batches written to the database at once.
const WRITERS: usize = 2;
/// How often stale nodes are reported and old history expired.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(3600);
/// How often the results queue's length is read for the `queue_messages` gauge.
const QUEUE_POLL_EVERY: Duration = Duration::from_secs(5);
/// How often throughput is logged at DEBUG (and every tenth time at INFO).
const THROUGHPUT_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error("database server at {url} is unavailable after {}: {source}", vogeler_core::duration::format(*waited))]
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

impl ServerError {
    /// The broker holds a results queue declared with other settings, bad TLS files, a
    /// listen address that cannot be used, a database account CouchDB refuses (exit 78).
    /// A port another process holds is not one: it can be freed, so systemd may retry.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ServerError::Broker(AmqpError::Mismatch { .. } | AmqpError::Tls(_))
                | ServerError::Http(_)
                | ServerError::DatabaseRefused { .. }
        ) || matches!(self, ServerError::Listen { source, .. }
                if vogeler_core::exit::listen_error_is_config(source))
            || matches!(self, ServerError::Database { source, .. } if source.is_denied())
    }

    /// Broker or database unreachable at start-up (exit 69).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ServerError::Broker(AmqpError::Unavailable { .. })
                | ServerError::DatabaseUnavailable { .. }
        ) || matches!(self, ServerError::Database { source, .. } if source.is_transient())
    }
}

/// Connect to CouchDB, waiting up to the connect timeout for it to answer.
pub async fn connect_database(
    settings: &CouchSettings,
    cancel: &CancellationToken,
) -> Result<Option<CouchClient>, ServerError> {
    let couch = CouchClient::from_settings(settings).map_err(ServerError::Http)?;
    let started = tokio::time::Instant::now();
    let mut delays = backoff::delays();
    loop {
        match couch.ping().await {
            Ok(()) => {
                info!(url = %couch.url(), "connected to database server");
                return Ok(Some(couch));
            }
            Err(e) if e.is_transient() && started.elapsed() < settings.connect_timeout => {
                let delay = delays.next().unwrap_or(backoff::MAX_DELAY);
                warn!(url = %couch.url(), error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach database server, retrying");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(None),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            // A wrong password is refused even on GET /, and a redirect or a 404 there means
            // the URL points at something else (a proxy wanting https, a wrong path prefix):
            // waiting will not change either.
            Err(source) if source.is_client_error() => {
                return Err(ServerError::DatabaseRefused {
                    url: couch.url().to_string(),
                    source,
                });
            }
            Err(source) => {
                return Err(ServerError::DatabaseUnavailable {
                    url: couch.url().to_string(),
                    waited: started.elapsed(),
                    source,
                });
            }
        }
    }
}

/// Create the node and history databases if missing and install their design documents.
pub async fn prepare_database(couch: &CouchClient, db: &str) -> Result<Store, ServerError> {
    let store = Store::new(couch.clone(), db);
    for (name, ddoc) in [
        (db, design::nodes()),
        (store.history_database(), design::history()),
    ] {
        let fail = |source| ServerError::Database {
            db: name.to_string(),
            source,
        };
        if couch.ensure_database(name).await.map_err(fail)? {
            info!(database = %name, "created database");
        }
        let done = maintenance::ensure_design(couch, name, ddoc)
            .await
            .map_err(fail)?;
        info!(database = %name, design_version = design::VERSION, status = done, "design document");
    }
    Ok(store)
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
    let store = prepare_database(&couch, &settings.couch.database).await?;
    let maintenance = tokio::spawn(maintenance::periodic(
        vogeler_core::query::Inventory::new(couch.clone(), store.database()),
        settings.stale_after,
        settings.history_retention,
        MAINTENANCE_EVERY,
        cancel.clone(),
    ));

    let b = &settings.broker;
    let mut conn =
        match amqp::connect_with_retry(b, "vogeler-server", Some(b.connect_timeout), &cancel).await
        {
            Ok(c) => c,
            Err(AmqpError::Cancelled) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
    let mut stats = Throughput::default();
    loop {
        metrics.broker_up.set(true);
        let served = serve(&conn, &settings, &store, &mut stats, &metrics, &cancel).await;
        metrics.broker_up.set(false);
        match served {
            Ok(()) => break,
            Err(e @ AmqpError::Mismatch { .. }) => {
                let _ = conn.close(200, "server stopping".into()).await;
                cancel.cancel();
                let _ = maintenance.await;
                return Err(e.into());
            }
            Err(e) => warn!(error = %e, "lost the broker connection; reconnecting"),
        }
        conn = match amqp::connect_with_retry(b, "vogeler-server", None, &cancel).await {
            Ok(c) => c,
            Err(_) => break,
        };
    }
    let _ = conn.close(200, "server shutting down".into()).await;
    let _ = maintenance.await;
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
    let ch = conn.create_channel().await?;
    amqp::declare::server(topology, conn).await.map_err(|e| {
        if amqp::is_precondition_failed(&e) {
            AmqpError::Mismatch {
                queue: topology.results_queue(),
                detail: e.to_string(),
            }
        } else {
            e.into()
        }
    })?;
    ch.basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let dead = amqp::publisher_channel(conn).await?;
    let queue = topology.results_queue();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "vogeler-server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = %queue, database = %store.database(), batch_size = settings.batch_size, "storing results");
    // Two stages so the next batch is gathered while the current one is written: the reader
    // hands whole batches to the writer through a channel that holds one.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Decoded>>(1);
    let batch_size = settings.batch_size;
    let reader = async move {
        loop {
            let first = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                d = consumer.next() => d,
            };
            let mut batch = vec![delivery(first, &queue)?];
            let linger = tokio::time::Instant::now() + LINGER;
            while batch.len() < batch_size {
                match tokio::time::timeout_at(linger, consumer.next()).await {
                    Ok(d) => batch.push(delivery(d, &queue)?),
                    Err(_) => break,
                }
            }
            metrics.consumed.inc_by(batch.len() as u64);
            // Decoding here overlaps it with the writer's database round trips.
            let batch = batch.into_iter().map(|d| (verify(&d), d)).collect();
            if tx.send(batch).await.is_err() {
                return Ok(()); // the writer stopped for shutdown
            }
        }
    };
    // Up to WRITERS batches are written at once, so the database always has a request to
    // work on while the server merges the next batch.
    let writer = async move {
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        let mut busy: Vec<BTreeSet<String>> = Vec::new(); // nodes of each batch in flight
        let mut waiting: Option<(Vec<Decoded>, BTreeSet<String>)> = None;
        let mut open = true;
        loop {
            // A batch that shares a node with one in flight waits for it, so one server
            // applies each node's results in queue order (and records each change).
            if let Some((_, nodes)) = &waiting
                && inflight.len() < WRITERS
                && busy.iter().all(|b| b.is_disjoint(nodes))
                && let Some((batch, nodes)) = waiting.take()
            {
                let id = nodes.clone();
                busy.push(nodes);
                let dead = &dead;
                inflight.push(async move {
                    (
                        id,
                        handle_batch(store, topology, dead, batch, metrics, cancel).await,
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
                Some((nodes, done)) = inflight.next(), if !inflight.is_empty() => {
                    busy.retain(|b| *b != nodes);
                    match done {
                        Some((stored, dead_count, wrong_key)) => stats.record(stored, dead_count, wrong_key),
                        None => return, // shutdown interrupted a batch; it stays unacked
                    }
                }
                else => return,
            }
        }
    };
    // The ingest lag for /metrics: a passive declare answers with the queue's length.
    let lag = async {
        let queue = topology.results_queue();
        loop {
            if let Ok(q) = ch
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            {
                metrics.queue_messages.set(i64::from(q.message_count()));
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

fn delivery(d: Option<Result<Delivery, lapin::Error>>, queue: &str) -> Result<Delivery, AmqpError> {
    match d {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(e.into()),
        None => Err(AmqpError::ConsumerEnded {
            queue: queue.to_string(),
        }),
    }
}

/// The nodes a batch touches.
fn batch_nodes(batch: &[Decoded]) -> BTreeSet<String> {
    batch
        .iter()
        .filter_map(|(m, _)| m.as_ref().ok().and_then(|s| store::node_of(&s.message)))
        .map(|n| n.to_string())
        .collect()
}

/// A delivery with its verified, decoded message (or why it was refused).
type Decoded = (Result<Signed, String>, Delivery);

/// Check the signature over the bytes received, then decode. The signer is only known to be
/// the node's own key once the store compares it with the node's pin.
fn verify(d: &Delivery) -> Result<Signed, String> {
    let (key, signature) = amqp::signature_of(&d.properties);
    let signer = signing::verify(
        Purpose::Agent,
        &d.data,
        key.as_deref(),
        signature.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let message = wire::decode(&d.data).map_err(|e| e.to_string())?;
    Ok(Signed { message, signer })
}

/// Store one batch and settle its messages; returns how many were stored, dead-lettered and refused for a wrong key,
/// or `None` when shutdown interrupted it (its messages stay unacked and are redelivered to
/// whoever consumes next).
async fn handle_batch(
    store: &Store,
    topology: &Topology,
    dead: &Channel,
    batch: Vec<Decoded>,
    metrics: &ServerMetrics,
    cancel: &CancellationToken,
) -> Option<(u64, u64, u64)> {
    let mut valid: Vec<(Signed, Delivery)> = Vec::with_capacity(batch.len());
    let mut refused: Vec<(Delivery, String)> = Vec::new();
    for (decoded, d) in batch {
        match decoded {
            Ok(
                m @ Signed {
                    message: Message::Result(_) | Message::Announce(_),
                    ..
                },
            ) => valid.push((m, d)),
            Ok(other) => {
                let reason = format!(
                    "the results queue does not take {} messages",
                    other.message.kind()
                );
                refused.push((d, reason));
            }
            Err(e) => refused.push((d, e)),
        }
    }
    let mut dead_count = refused.len() as u64;
    metrics.dead_lettered("malformed", dead_count);
    let refs: Vec<(&Delivery, &str)> = refused.iter().map(|(d, r)| (d, r.as_str())).collect();
    dead_letter_all(topology, dead, &refs).await;
    let mut delays = backoff::delays();
    let stored = loop {
        let messages: Vec<&Signed> = valid.iter().map(|(m, _)| m).collect();
        match store.apply(&messages).await {
            Ok(outcome) => break outcome,
            Err(e) if is_permanent(&e) && valid.len() > 1 => {
                // One message poisons the request (too large, say): store them one by one
                // so only that one is dead-lettered.
                warn!(error = %e, batch = valid.len(), "database refused the batch; storing its results one at a time");
                let mut outcome = Vec::with_capacity(valid.len());
                for m in &messages {
                    match store.apply(&[*m]).await {
                        Ok(mut o) => outcome.push(o.pop().unwrap_or(Stored::Done)),
                        Err(e) if is_permanent(&e) => outcome.push(Stored::Refused(e.to_string())),
                        Err(e) => {
                            warn!(error = %e, "cannot store results yet, retrying");
                            outcome.clear();
                            break;
                        }
                    }
                }
                if outcome.len() == messages.len() {
                    break outcome;
                }
            }
            Err(e) if is_permanent(&e) => break vec![Stored::Refused(e.to_string())],
            Err(e) => {
                metrics.store_retries.inc();
                let delay = delays.next().unwrap_or(backoff::MAX_DELAY);
                warn!(error = %e, batch = valid.len(), retry_in_ms = delay.as_millis() as u64, "cannot store results yet, retrying; they stay in the queue");
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    // Acked one by one: with several batches in flight a `multiple` ack could settle
    // another batch's messages before they are stored.
    let mut stored_count = 0;
    let mut wrong_key = 0u64;
    let mut unstorable: Vec<(&Delivery, String)> = Vec::new();
    for ((message, d), outcome) in valid.iter().zip(stored) {
        match outcome {
            Stored::Done => {
                stored_count += 1;
                log_stored(&message.message);
                if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                    // The write is idempotent, so a redelivery after this is harmless.
                    warn!(error = %e, "stored but could not ack; it will be redelivered");
                }
            }
            Stored::Refused(reason) => {
                error!(reason = %reason, "database refused a result");
                unstorable.push((d, reason));
            }
            Stored::WrongKey(reason) => {
                wrong_key += 1;
                warn!(reason = %reason, "refused a message signed by another key than its node's");
                unstorable.push((d, reason));
            }
        }
    }
    dead_count += unstorable.len() as u64;
    metrics.batches.inc();
    metrics.stored.inc_by(stored_count);
    metrics.dead_lettered("wrong_key", wrong_key);
    metrics.dead_lettered("refused", unstorable.len() as u64 - wrong_key);
    let refs: Vec<(&Delivery, &str)> = unstorable.iter().map(|(d, r)| (*d, r.as_str())).collect();
    dead_letter_all(topology, dead, &refs).await;
    Some((stored_count, dead_count, wrong_key))
}

/// Errors that retrying cannot fix for this request. Everything else (database down,
/// authentication, conflicts) is retried: holding the queue beats losing results.
fn is_permanent(e: &CouchError) -> bool {
    match e {
        CouchError::Status { status, .. } => matches!(status.as_u16(), 400 | 413 | 415),
        _ => false,
    }
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

/// Move messages that can never be stored to the dead-letter queue, each with its reason,
/// and ack them so they stop blocking the queue; a message whose copy the broker will not
/// take is rejected instead (the results queue dead-letters it too, without our reason).
/// The copies are published together and then confirmed: one confirm round trip each would
/// make a flood of garbage slow to clear.
async fn dead_letter_all(topology: &Topology, dead: &Channel, refused: &[(&Delivery, &str)]) {
    let mut pending = Vec::with_capacity(refused.len());
    for &(d, reason) in refused {
        warn!(reason = %reason, redelivered = d.redelivered, bytes = d.data.len(), "dead-lettering a message");
        let copy = dead
            .basic_publish(
                topology.dead_letter_exchange().as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &d.data,
                dead_letter_properties(d, reason),
            )
            .await;
        pending.push((d, copy));
    }
    for (d, copy) in pending {
        let confirmed = match copy {
            Ok(c) => c.await.is_ok_and(|c| c.is_ack()),
            Err(_) => false,
        };
        settle_dead(d, confirmed).await;
    }
}

fn dead_letter_properties(d: &Delivery, reason: &str) -> BasicProperties {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-vogeler-reason".into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        "x-vogeler-routing-key".into(),
        AMQPValue::LongString(d.routing_key.as_str().into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Ack a dead-lettered message once its copy is confirmed; otherwise reject it (the results
/// queue dead-letters it too, without our reason).
async fn settle_dead(d: &Delivery, copied: bool) {
    let settled = if copied {
        d.acker.ack(BasicAckOptions::default()).await
    } else {
        d.acker.reject(BasicRejectOptions { requeue: false }).await
    };
    if let Err(e) = settled {
        warn!(error = %e, "could not settle a dead-lettered message; it will be redelivered");
    }
}
