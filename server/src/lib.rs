//! vogeler-server: drains the results queue into CouchDB, one document per node.
//!
//! - [`store`]: the read-merge-write of node documents.
//!
//! A result is acked only after CouchDB accepted the write; while the database is down the
//! server keeps retrying with backoff and the result stays unacked in the queue. [`run`] takes
//! its settings and a shutdown token so tests run it in-process.

pub mod store;

use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::{
    Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use vogeler_core::{
    amqp::{self, AmqpError},
    backoff,
    config::{CouchSettings, ServerSettings},
    couch::{CouchClient, CouchError},
    document::Change,
    wire::{self, Message},
};

use crate::store::Store;

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
    #[error("cannot use database {db:?}: {source}")]
    Database {
        db: String,
        #[source]
        source: CouchError,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

impl ServerError {
    /// Broker or database unreachable at start-up (exit 69).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ServerError::Broker(AmqpError::Unavailable { .. })
                | ServerError::DatabaseUnavailable { .. }
        )
    }
}

/// Connect to CouchDB, waiting up to the connect timeout for it to answer.
pub async fn connect_database(
    settings: &CouchSettings,
    cancel: &CancellationToken,
) -> Result<Option<CouchClient>, ServerError> {
    let couch = CouchClient::new(&settings.url, settings.credentials.clone())
        .map_err(|e| ServerError::Http(e.to_string()))?;
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

/// Run the server until `cancel` fires.
pub async fn run(settings: ServerSettings, cancel: CancellationToken) -> Result<(), ServerError> {
    let Some(couch) = connect_database(&settings.couch, &cancel).await? else {
        return Ok(());
    };
    let db = &settings.couch.database;
    match couch.ensure_database(db).await {
        Ok(true) => info!(database = %db, "created database"),
        Ok(false) => {}
        Err(source) => {
            return Err(ServerError::Database {
                db: db.clone(),
                source,
            });
        }
    }
    let store = Store::new(couch, db.clone());

    let b = &settings.broker;
    let mut conn =
        match amqp::connect_with_retry(&b.url, "vogeler-server", Some(b.connect_timeout), &cancel)
            .await
        {
            Ok(c) => c,
            Err(AmqpError::Cancelled) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
    loop {
        match serve(&conn, &settings, &store, &cancel).await {
            Ok(()) => break,
            Err(e) => warn!(error = %e, "lost the broker connection; reconnecting"),
        }
        conn = match amqp::connect_with_retry(&b.url, "vogeler-server", None, &cancel).await {
            Ok(c) => c,
            Err(_) => break,
        };
    }
    let _ = conn.close(200, "server shutting down".into()).await;
    info!("server stopped");
    Ok(())
}

/// One connection's life: consume results and store them, one at a time, in order.
async fn serve(
    conn: &Connection,
    settings: &ServerSettings,
    store: &Store,
    cancel: &CancellationToken,
) -> Result<(), AmqpError> {
    let topology = &settings.broker.topology;
    let ch = conn.create_channel().await?;
    topology.declare_shared(&ch).await?;
    ch.basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let queue = topology.results_queue();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "vogeler-server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = %queue, database = %store.database(), "storing results");
    loop {
        let delivery = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(AmqpError::ConsumerEnded { queue }),
        };
        if !handle(store, delivery, cancel).await {
            return Ok(());
        }
    }
}

/// Store one delivery. Returns false when shutdown interrupted it (the message stays unacked
/// and is redelivered to whoever consumes next).
async fn handle(store: &Store, delivery: Delivery, cancel: &CancellationToken) -> bool {
    let message = match wire::decode(&delivery.data) {
        Ok(m @ (Message::Result(_) | Message::Announce(_))) => m,
        Ok(other) => {
            reject(
                &delivery,
                &format!("the results queue does not take {} messages", other.kind()),
            )
            .await;
            return true;
        }
        Err(e) => {
            reject(&delivery, &e.to_string()).await;
            return true;
        }
    };
    let node = match &message {
        Message::Result(r) => &r.node,
        Message::Announce(a) => &a.node,
        Message::Command(_) => unreachable!("filtered above"),
    };
    let mut delays = backoff::delays();
    loop {
        let outcome = store
            .update(node, |doc| match &message {
                Message::Result(r) => doc.apply_result(r, Utc::now()),
                Message::Announce(a) => doc.apply_announce(a, Utc::now()),
                Message::Command(_) => Change::Unchanged,
            })
            .await;
        match outcome {
            Ok(change) => {
                log_stored(&message, change);
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    // The write is idempotent, so a redelivery after this is harmless.
                    warn!(node = %node, error = %e, "stored but could not ack; it will be redelivered");
                }
                return true;
            }
            Err(e) if is_permanent(&e) => {
                error!(node = %node, error = %e, "database refused this document; dropping the message");
                reject(&delivery, &e.to_string()).await;
                return true;
            }
            Err(e) => {
                let delay = delays.next().unwrap_or(backoff::MAX_DELAY);
                warn!(node = %node, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot store result yet, retrying; it stays in the queue");
                tokio::select! {
                    () = cancel.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Errors that retrying cannot fix for this document. Everything else (database down,
/// authentication, conflicts) is retried: holding the queue beats losing results.
fn is_permanent(e: &CouchError) -> bool {
    match e {
        CouchError::Status { status, .. } => matches!(status.as_u16(), 400 | 413 | 415),
        _ => false,
    }
}

fn log_stored(message: &Message, change: Change) {
    let changed = change == Change::Updated;
    match message {
        Message::Result(r) => {
            info!(node = %r.node, plugin = %r.plugin, request_id = %r.request_id, outcome = r.outcome.status(), changed, "result stored")
        }
        Message::Announce(a) => {
            info!(node = %a.node, agent_version = %a.agent_version, changed, "node announced")
        }
        Message::Command(_) => {}
    }
}

async fn reject(delivery: &Delivery, reason: &str) {
    warn!(reason = %reason, redelivered = delivery.redelivered, "refused a message from the results queue");
    // Not requeued: it would come straight back and block the queue.
    let _ = delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await;
}
