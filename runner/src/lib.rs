//! vogeler-runner: publish a command to a node set and collect who answered.
//!
//! - [`report`]: the collected replies and their table.
//! - [`inventory`]: questions answered from CouchDB (`find`, `history`).
//!
//! [`query`] reads the expected nodes from the node registry in CouchDB (for `all`), binds a
//! private reply queue *before* publishing so no reply is missed, and returns as soon as
//! every expected node answered, or at the timeout.

pub mod cli;
pub mod inventory;
pub mod report;
pub mod target;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::{options::BasicConsumeOptions, types::FieldTable};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;
use vogeler_core::{
    amqp::{self, AmqpError},
    config::{CouchSettings, RunnerSettings},
    couch::CouchError,
    design,
    names::{NodeName, PluginName},
    signing::{KeyError, PrivateKey, Purpose},
    topology::Topology,
    wire::PluginResult,
    wire::{self, Command, Message, Target},
};

pub use crate::report::Report;
use crate::target::{Known, NodeSet};

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error("cannot read the node registry: {0}")]
    Registry(#[source] CouchError),
    #[error("CouchDB refused to let this account read the inventory: {0}")]
    Denied(#[source] CouchError),
    #[error(
        "{0}; vogeler-server creates the databases and views when it starts: is it running against this database?"
    )]
    NotReady(#[source] CouchError),
    #[error("{0}")]
    Http(String),
    #[error(
        "cannot update node {node}'s document: {source}; `nodes forget` writes, so run it with the server's CouchDB account (couchdb.username = \"vogeler-server\")"
    )]
    Write {
        node: String,
        // Boxed: a node name beside a whole CouchError made every runner Result large.
        #[source]
        source: Box<CouchError>,
    },
    #[error("node {0} has no document in the inventory")]
    NoSuchNode(String),
    #[error(
        "{0}; commands must be signed: create a key pair with `vogeler-runner keygen --out /etc/vogeler/keys`, install runner.pub in every agent's authorized keys, and point runner.signing_key (or --signing-key, or VOGELER_RUNNER__SIGNING_KEY) at runner.key"
    )]
    SigningKey(#[source] KeyError),
}

impl RunnerError {
    /// The signing key is missing or unusable, CouchDB refuses the account (exit 78).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            RunnerError::SigningKey(_)
                | RunnerError::Denied(_)
                | RunnerError::Http(_)
                | RunnerError::Broker(AmqpError::Tls(_))
        ) || matches!(self, RunnerError::Write { source, .. } if source.is_denied())
    }

    /// Broker or database unreachable (exit 69).
    pub fn is_unavailable(&self) -> bool {
        match self {
            RunnerError::Broker(AmqpError::Unavailable { .. }) => true,
            RunnerError::Registry(e) => e.is_transient(),
            RunnerError::Write { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}

/// One fan-out: which plugin, on which nodes, waiting how long.
#[derive(Debug, Clone)]
pub struct Query {
    pub plugin: PluginName,
    pub nodes: NodeSet,
    /// The `-n` expression as typed, for reports.
    pub nodes_text: String,
    pub timeout: Duration,
    pub ttl: Duration,
    /// Run on at most this many nodes at a time (each batch waited for, up to `timeout`).
    pub batch: Option<Batch>,
    /// Answer from stored values no older than this; ask only the other nodes.
    pub cached: Option<Duration>,
}

/// Stored `plugin` values of `nodes` collected (successfully) within `max_age`.
pub async fn stored_values(
    settings: &CouchSettings,
    plugin: &PluginName,
    nodes: &std::collections::BTreeSet<NodeName>,
    max_age: Duration,
) -> Result<BTreeMap<NodeName, report::Cached>, RunnerError> {
    let couch = inventory::client(settings)?;
    let params = [
        ("startkey", serde_json::json!([plugin]).to_string()),
        ("endkey", serde_json::json!([plugin, {}]).to_string()),
    ];
    let rows = couch
        .view(&settings.database, design::NODES_DDOC, "collected", &params)
        .await
        .map_err(inventory::registry_error)?;
    let cutoff = Utc::now() - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    let fresh: Vec<String> = rows
        .into_iter()
        .filter(|r| r.value.get("outcome").and_then(|o| o.as_str()) == Some("ok"))
        .filter(|r| {
            r.value
                .get("collected_at")
                .and_then(|t| t.as_str())
                .and_then(|t| t.parse::<chrono::DateTime<Utc>>().ok())
                .is_some_and(|t| t >= cutoff)
        })
        .filter_map(|r| r.id)
        .filter(|id| nodes.iter().any(|n| n.as_str() == id))
        .collect();
    let ids: Vec<&str> = fresh.iter().map(String::as_str).collect();
    let docs = couch
        .get_many::<vogeler_core::document::NodeDocument>(&settings.database, &ids)
        .await
        .map_err(inventory::registry_error)?;
    Ok(docs
        .into_iter()
        .filter_map(|(id, doc)| {
            let doc = doc?;
            let collected_at = doc.meta.plugins.get(plugin.as_str())?.collected_at;
            let value = doc.value(plugin.as_str())?.clone();
            Some((
                NodeName::new(id).ok()?,
                report::Cached {
                    value,
                    collected_at,
                },
            ))
        })
        .collect())
}

/// `--batch`: how many nodes at a time, and the pause between batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batch {
    pub size: BatchSize,
    pub pause: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Nodes(usize),
    Percent(u8),
}

impl BatchSize {
    /// `5` or `20%`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: write a number of nodes (5) or a percentage (20%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p @ 1..=100) => Ok(BatchSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.parse::<usize>() {
                Ok(n @ 1..) => Ok(BatchSize::Nodes(n)),
                _ => Err(bad()),
            },
        }
    }

    /// Nodes per batch out of `total` (at least one).
    pub fn of(self, total: usize) -> usize {
        match self {
            BatchSize::Nodes(n) => n,
            BatchSize::Percent(p) => (total * usize::from(p)).div_ceil(100),
        }
        .max(1)
    }
}

/// The node registry: every registered node with its facts and whether it was seen within
/// `freshness`. A database the server has not created yet is an empty registry.
pub async fn registry(
    settings: &CouchSettings,
    freshness: Duration,
) -> Result<BTreeMap<NodeName, Known>, RunnerError> {
    let couch = inventory::client(settings)?;
    let rows = match couch
        .view(&settings.database, design::NODES_DDOC, "registry", &[])
        .await
    {
        Ok(rows) => rows,
        // Missing database or missing view: the error bodies differ between CouchDB and
        // PouchDB, so ask about the database itself.
        Err(e @ CouchError::Status { status, .. }) if status.as_u16() == 404 => {
            match couch.doc_count(&settings.database).await {
                Err(CouchError::Status { status, .. }) if status.as_u16() == 404 => {
                    warn!(database = %settings.database, "database does not exist yet: no node is registered (has vogeler-server run?)");
                    return Ok(BTreeMap::new());
                }
                _ => return Err(inventory::registry_error(e)),
            }
        }
        Err(e) => return Err(inventory::registry_error(e)),
    };
    let cutoff =
        Utc::now() - chrono::Duration::from_std(freshness).unwrap_or(chrono::Duration::MAX);
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            // Anything that is not a valid node name was not written by Vogeler; leave it out.
            let name = NodeName::new(r.id?).ok()?;
            let last_seen = r
                .value
                .get("last_seen")
                .and_then(|v| v.as_str())
                .and_then(|t| t.parse::<chrono::DateTime<Utc>>().ok());
            let facts = r
                .value
                .get("facts")
                .and_then(|f| f.as_object())
                .cloned()
                .unwrap_or_default();
            let agent_version = r
                .value
                .get("agent_version")
                .and_then(|v| v.as_str())
                .map(str::to_string);
            Some((
                name,
                Known {
                    facts,
                    fresh: last_seen.is_some_and(|t| t >= cutoff),
                    last_seen,
                    agent_version,
                },
            ))
        })
        .collect())
}

/// What a running query reports as it goes, for progress display and streaming output.
#[derive(Debug)]
pub enum Progress<'a> {
    /// The command is out; this many nodes are expected (0 for `all` with none registered).
    Sent { expected: usize },
    /// A node answered (each node once).
    Reply(&'a PluginResult),
}

/// Publish the command and collect replies until every expected node answered, the timeout
/// passes, or `cancel` fires. `on_reply` sees each reply as it arrives (streaming output).
pub async fn query(
    settings: &RunnerSettings,
    q: &Query,
    cancel: &CancellationToken,
    on_reply: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<Report, RunnerError> {
    let signer = vogeler_core::keyfile::load_private(&settings.signing_key)
        .map_err(RunnerError::SigningKey)?;
    // Names alone need no registry: they are commanded whatever it says. A plain broadcast
    // needs the registry only to know whom to wait for, so it is read while the command
    // goes out and the first replies arrive: with a large fleet the view can take as long
    // as the replies (the database re-indexes every document the last query updated).
    let mut registry_pending = None;
    let expected = match &q.nodes {
        NodeSet::Names(names) => names.clone(),
        NodeSet::All if q.batch.is_none() && q.cached.is_none() => {
            let (couch, freshness, set) =
                (settings.couch.clone(), settings.freshness, q.nodes.clone());
            registry_pending = Some(tokio::spawn(async move {
                registry(&couch, freshness)
                    .await
                    .map(|known| set.resolve(&known))
            }));
            BTreeSet::new()
        }
        set => set.resolve(&registry(&settings.couch, settings.freshness).await?),
    };
    let b = &settings.broker;
    let conn =
        amqp::connect_with_retry(b, "vogeler-runner", Some(b.connect_timeout), cancel).await?;
    let mut report = Report {
        request_id: Uuid::new_v4(),
        plugin: q.plugin.clone(),
        nodes: q.nodes_text.clone(),
        broadcast: q.nodes.is_all(),
        expected,
        replies: BTreeMap::new(),
        cached: BTreeMap::new(),
        undelivered: BTreeMap::new(),
        elapsed: Duration::ZERO,
    };
    if let Some(max_age) = q.cached {
        report.cached =
            stored_values(&settings.couch, &q.plugin, &report.expected, max_age).await?;
        if !report.cached.is_empty() {
            // Only the rest is asked, by name.
            report.broadcast = false;
        }
    }
    let link = Link {
        conn: &conn,
        topology: b.topology.clone(),
        signer: &signer,
    };
    let result = collect(&link, q, &mut report, registry_pending, cancel, on_reply).await;
    let _ = conn.close(200, "runner done".into()).await;
    result.map(|()| report)
}

/// Why a command no queue took is not waited for.
const NO_QUEUE: &str = "no agent queue: the agent never connected, or its queue expired";

/// The registry read running alongside a broadcast: the nodes it expects.
type PendingRegistry =
    tokio::task::JoinHandle<Result<std::collections::BTreeSet<NodeName>, RunnerError>>;

/// What a query publishes with: the connection, the collective's names and the key.
struct Link<'a> {
    conn: &'a lapin::Connection,
    topology: Topology,
    signer: &'a PrivateKey,
}

async fn collect(
    link: &Link<'_>,
    q: &Query,
    report: &mut Report,
    mut registry_pending: Option<PendingRegistry>,
    cancel: &CancellationToken,
    on_reply: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<(), RunnerError> {
    let Link {
        conn,
        topology,
        signer,
    } = link;
    let ch = amqp::publisher_channel(conn)
        .await
        .map_err(AmqpError::from)?;
    amqp::declare::shared(topology, conn)
        .await
        .map_err(AmqpError::from)?;
    let reply_queue = amqp::declare::reply_queue(topology, conn, report.request_id)
        .await
        .map_err(AmqpError::from)?;
    // The reply queue is private and deleted with the connection: no acks needed.
    let opts = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut replies = ch
        .basic_consume(
            reply_queue.as_str().into(),
            "".into(),
            opts,
            FieldTable::default(),
        )
        .await
        .map_err(AmqpError::from)?;

    let issued_at = Utc::now();
    let ttl = chrono::Duration::from_std(q.ttl).unwrap_or(chrono::Duration::MAX);
    let command = |target: Target| {
        Message::Command(Command::new(
            report.request_id,
            q.plugin.clone(),
            target,
            issued_at,
            ttl,
        ))
    };
    let started = tokio::time::Instant::now();
    // `all` is one broadcast; any other set is one command per node, so only the targeted
    // agents ever see it. Batches go out one after the other, each waited for.
    let asked: Vec<NodeName> = report
        .expected
        .iter()
        .filter(|n| !report.cached.contains_key(*n))
        .cloned()
        .collect();
    let waves: Vec<Vec<Target>> = match (&q.batch, report.broadcast) {
        (None, true) => vec![vec![Target::All]],
        (None, false) => vec![asked.iter().cloned().map(Target::Node).collect()],
        (Some(b), _) => {
            let nodes: Vec<NodeName> = asked.clone();
            let size = b.size.of(nodes.len());
            nodes
                .chunks(size)
                .map(|c| c.iter().cloned().map(Target::Node).collect())
                .collect()
        }
    };
    // Batched, `all` means the registered nodes, each commanded by name.
    if q.batch.is_some() {
        report.broadcast = false;
    }
    if registry_pending.is_none() {
        on_reply(Progress::Sent {
            expected: report.expected.len(),
        });
    }
    let pause = q.batch.as_ref().map_or(Duration::ZERO, |b| b.pause);
    let count = waves.len();
    for (i, wave) in waves.into_iter().enumerate() {
        let wave_nodes: Vec<NodeName> = wave
            .iter()
            .filter_map(|t| match t {
                Target::Node(n) => Some(n.clone()),
                Target::All => None,
            })
            .collect();
        // A broadcast no queue took cannot be answered: do not wait for it.
        let mut nobody_listens = false;
        for target in wave {
            let key = Topology::command_routing_key(&target);
            let delivered = amqp::publish_command(
                &ch,
                &topology.commands_exchange(),
                &key,
                &command(target.clone()),
                signer,
                q.ttl,
            )
            .await?;
            let why = match delivered {
                amqp::Delivery::Queued => continue,
                amqp::Delivery::Unroutable => NO_QUEUE,
                amqp::Delivery::Refused => {
                    "the agent's queue is full: it has been offline for long"
                }
            };
            match target {
                Target::Node(n) => {
                    report.undelivered.insert(n, why.to_string());
                }
                Target::All => {
                    nobody_listens = true;
                    warn!(collective = %topology.collective(), "no agent queue is bound for broadcasts: no agent of this collective has ever connected");
                    for n in &asked {
                        report.undelivered.insert(n.clone(), why.to_string());
                    }
                }
            }
        }
        info!(request_id = %report.request_id, plugin = %q.plugin, nodes = %q.nodes_text, batch = i + 1, of = count, expected = report.expected.len(), "command sent");
        let deadline = tokio::time::Instant::now() + q.timeout;
        let waiting_for = |r: &Report, registry_known: bool| {
            let pending =
                |n: &NodeName| !r.replies.contains_key(n) && !r.undelivered.contains_key(n);
            if r.broadcast {
                !registry_known || r.expected.is_empty() || r.expected.iter().any(pending)
            } else {
                wave_nodes.iter().any(pending)
            }
        };
        while !nobody_listens && waiting_for(report, registry_pending.is_none()) {
            let delivery = tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => break,
                known = async { registry_pending.as_mut().expect("guarded").await }, if registry_pending.is_some() => {
                    registry_pending = None;
                    report.expected = known.map_err(|e| RunnerError::Http(format!("registry task: {e}")))??;
                    on_reply(Progress::Sent { expected: report.expected.len() });
                    continue;
                }
                d = replies.next() => d,
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(AmqpError::from(e).into()),
                None => return Err(AmqpError::ConsumerEnded { queue: reply_queue }.into()),
            };
            let (key, signature) = amqp::signature_of(&delivery.properties);
            if let Err(e) = vogeler_core::signing::verify(
                Purpose::Agent,
                &delivery.data,
                key.as_deref(),
                signature.as_deref(),
            ) {
                warn!(error = %e, "ignored a reply with a bad signature");
                continue;
            }
            match wire::decode(&delivery.data) {
                Ok(Message::Result(r)) if r.request_id == report.request_id => {
                    debug!(node = %r.node, outcome = r.outcome.status(), "reply");
                    if !report.replies.contains_key(&r.node) {
                        on_reply(Progress::Reply(&r));
                        report.replies.insert(r.node.clone(), r);
                    }
                }
                Ok(other) => debug!(
                    kind = other.kind(),
                    "ignored a message that is not a reply to this request"
                ),
                Err(e) => warn!(error = %e, "ignored a malformed reply"),
            }
        }
        if let Some(pending) = registry_pending.take() {
            // Timed out, cancelled or nobody listens before the registry arrived: the
            // report still needs to know whom it expected.
            report.expected = pending
                .await
                .map_err(|e| RunnerError::Http(format!("registry task: {e}")))??;
            on_reply(Progress::Sent {
                expected: report.expected.len(),
            });
            if nobody_listens {
                for n in &report.expected {
                    report.undelivered.insert(n.clone(), NO_QUEUE.to_string());
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        if i + 1 < count && !pause.is_zero() {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes() {
        assert_eq!(BatchSize::parse("2"), Ok(BatchSize::Nodes(2)));
        assert_eq!(BatchSize::parse("25%"), Ok(BatchSize::Percent(25)));
        for bad in ["0", "0%", "101%", "x", "-1"] {
            assert!(BatchSize::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(BatchSize::Percent(25).of(5), 2, "rounded up");
        assert_eq!(BatchSize::Percent(1).of(5), 1, "at least one");
        assert_eq!(BatchSize::Nodes(2).of(5), 2);
    }
}
