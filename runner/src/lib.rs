//! vogeler-runner: publish a command to a node set and collect who answered.
//!
//! - [`report`]: the collected replies and their table.
//! - [`app`]: what each command line does, printed.
//! - [`collect`]: one fan-out's bookkeeping, a state machine without I/O.
//! - [`diff`]: what changed between two values of a plugin (`history`, `changes`).
//! - [`inventory`]: questions answered from CouchDB (`find`, `history`, `changes`), and
//!   each one's rows.
//! - [`output`]: the one rule for `--output`: what table, json, jsonl, yaml and csv print.
//! - [`target`]: node sets (`-n`) and how they resolve against the registry.
//!
//! [`query`] reads the expected nodes from the node registry in CouchDB (for `all`), binds a
//! private reply queue *before* publishing so no reply is missed, and returns as soon as
//! every expected node answered, or at the timeout.

pub mod app;
pub mod ask;
pub mod cli;
pub mod collect;
pub mod diff;
pub mod inventory;
pub mod output;
pub mod report;
pub mod select;
pub mod target;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;
use vogeler_config::{CouchSettings, RunnerSettings};
use vogeler_core::{
    amqp::{
        self, AmqpError, Connection, Publisher,
        consume::{Consume, Consumer, FromAgents},
    },
    couch::CouchError,
    exit::{self, ExitStatus},
};
use vogeler_proto::signing::{KeyError, PrivateKey};
use vogeler_proto::{
    names::{NodeName, PluginName},
    topology::Topology,
    wire::{Command, Message, PluginResult, Target},
};

use crate::collect::{Collect, Delivered, Keys, Notice, RegistryAnswer, Step};
pub use crate::report::Report;
use crate::target::{NodeSet, RegisteredNode};

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
    #[error("the registry read failed: {0}")]
    Task(String),
    #[error("{0}")]
    Usage(String),
    #[error(
        "cannot update node {node}: {source}; `nodes forget`, `nodes accept` and `nodes reject` write, so run them with the server's CouchDB account (couchdb.username = \"vogeler-server\")"
    )]
    Write {
        node: String,
        // Boxed: a node name beside a whole CouchError made every runner Result large.
        #[source]
        source: Box<CouchError>,
    },
    #[error("node {0} has no document in the inventory")]
    NoSuchNode(String),
    /// An enrollment decision that cannot be taken as asked (no such key, several keys).
    #[error("{0}")]
    Enrollment(String),
    #[error(
        "{0}; commands must be signed: create a key pair with `vogeler-runner keygen --out /etc/vogeler/keys`, install runner.pub in every agent's authorized keys, and point runner.signing_key (or --signing-key, or VOGELER_RUNNER__SIGNING_KEY) at runner.key"
    )]
    SigningKey(#[source] KeyError),
}

impl ExitStatus for RunnerError {
    /// The signing key is missing or unusable, CouchDB refuses the account: 78. Broker or
    /// database unreachable: 69. A registry read that failed otherwise (a panicked task, a
    /// database answering nonsense): 1.
    fn exit_code(&self) -> u8 {
        match self {
            RunnerError::Broker(e) => e.exit_code(),
            RunnerError::SigningKey(_) | RunnerError::Denied(_) => exit::CONFIG,
            RunnerError::Registry(e) if e.is_transient() => exit::UNAVAILABLE,
            RunnerError::Write { source, .. } => source.exit_code(),
            RunnerError::Registry(_)
            | RunnerError::NotReady(_)
            | RunnerError::NoSuchNode(_)
            | RunnerError::Enrollment(_)
            | RunnerError::Task(_) => exit::FAILURE,
            RunnerError::Http(_) => exit::CONFIG,
            RunnerError::Usage(_) => exit::USAGE,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            RunnerError::Broker(e) => e.hint(),
            _ => None,
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
    /// Answer from stored values this fresh; ask only the other nodes.
    pub cached: Option<MaxAge>,
}

/// `--cached`: which stored values may answer instead of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxAge {
    /// Collected successfully within this long.
    Within(Duration),
    /// `fresh`: on the node's schedule and not overdue (collected within twice its
    /// interval), the notion `nodes` and `/metrics` use.
    Fresh,
}

impl MaxAge {
    /// `fresh`, or a duration (`1h`, `30m`).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "fresh" {
            return Ok(MaxAge::Fresh);
        }
        vogeler_proto::duration::parse(s)
            .map(MaxAge::Within)
            .map_err(|e| format!("{e}, or \"fresh\" for values not overdue on their schedule"))
    }
}

/// Stored `plugin` values of `nodes` that `max_age` accepts.
pub async fn stored_values(
    settings: &CouchSettings,
    plugin: &PluginName,
    nodes: &BTreeSet<NodeName>,
    max_age: MaxAge,
) -> Result<BTreeMap<NodeName, report::Cached>, RunnerError> {
    let inventory = inventory::open(settings)?;
    let now = Utc::now();
    let accepts = |c: &vogeler_proto::design::Collected| match max_age {
        MaxAge::Within(age) => c.ok_since(vogeler_proto::duration::before(now, age)),
        MaxAge::Fresh => c.fresh(now),
    };
    // The last run as the views merge it: a confirmation newer than the stored value counts.
    let fresh: BTreeMap<String, chrono::DateTime<Utc>> = inventory
        .collected(plugin.as_str())
        .await
        .map_err(inventory::registry_error)?
        .into_iter()
        .filter(|(id, c)| accepts(c) && nodes.iter().any(|n| n.as_str() == id))
        .filter_map(|(id, c)| Some((id, c.collected_at?)))
        .collect();
    let ids: Vec<&str> = fresh.keys().map(String::as_str).collect();
    let docs = inventory
        .client()
        .get_many::<vogeler_proto::document::NodeDocument>(&settings.database, &ids)
        .await
        .map_err(inventory::registry_error)?;
    Ok(docs
        .into_iter()
        .filter_map(|(id, doc)| {
            let doc = doc.found()?;
            let collected_at = *fresh.get(&id)?;
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
) -> Result<BTreeMap<NodeName, RegisteredNode>, RunnerError> {
    let inventory = inventory::open(settings)?;
    let rows = match inventory.registry().await {
        Ok(rows) => rows,
        // Missing database or missing view: the error bodies differ between CouchDB and
        // PouchDB, so ask about the database itself.
        Err(e) if e.is_not_found() => {
            match inventory.client().doc_count(&settings.database).await {
                Err(missing) if missing.is_not_found() => {
                    warn!(database = %settings.database, "database does not exist yet: no node is registered (has vogeler-server run?)");
                    return Ok(BTreeMap::new());
                }
                _ => return Err(inventory::registry_error(e)),
            }
        }
        Err(e) => return Err(inventory::registry_error(e)),
    };
    let now = Utc::now();
    let cutoff = vogeler_proto::duration::before(now, freshness);
    Ok(rows
        .into_iter()
        .filter_map(|(id, r)| {
            // Anything that is not a valid node name was not written by Vogeler; leave it out.
            let name = NodeName::new(id).ok()?;
            let overdue = r.overdue(now).into_iter().map(str::to_string).collect();
            Some((
                name,
                RegisteredNode {
                    overdue,
                    facts: r.facts,
                    fresh: r.last_seen.is_some_and(|t| t >= cutoff),
                    last_seen: r.last_seen,
                    agent_version: r.agent_version,
                    key: r.key,
                },
            ))
        })
        .collect())
}

/// The nodes `set` selects among the registered ones in `known` (and names given
/// explicitly), decided in the inventory by [`select::Selector`].
pub async fn select_nodes(
    couch: &CouchSettings,
    set: &NodeSet,
    known: &BTreeMap<NodeName, RegisteredNode>,
) -> Result<BTreeSet<NodeName>, RunnerError> {
    let universe: BTreeSet<NodeName> = known.keys().cloned().collect();
    let inventory = inventory::open(couch)?;
    let selector = select::Selector::new(&inventory, &universe);
    let selected = selector
        .select(set.expr())
        .await
        .map_err(inventory::registry_error)?;
    debug!(reads = ?selector.reads(), selected = selected.len(), "node set selected");
    Ok(selected)
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
    // Every reply is checked against its node's pinned key, which the registry holds; for
    // names and a plain broadcast it is read alongside the first replies.
    let mut registry_pending = None;
    let mut keys = None;
    let mut stale = 0;
    let expected = if let Some(names) = q.nodes.names() {
        let couch = settings.couch.clone();
        let freshness = settings.freshness;
        registry_pending = Some(tokio::spawn(async move {
            Ok(match registry(&couch, freshness).await {
                Ok(known) => RegistryAnswer {
                    expected: None,
                    keys: pinned_keys(&known),
                },
                Err(e) => {
                    warn!(error = %e, "cannot read the registry, so no reply can be verified against its node's pinned key: every reply is reported unverified");
                    RegistryAnswer::default()
                }
            })
        }));
        names.clone()
    } else if q.nodes.is_all() && q.batch.is_none() && q.cached.is_none() {
        let (couch, freshness, set) = (settings.couch.clone(), settings.freshness, q.nodes.clone());
        registry_pending = Some(tokio::spawn(async move {
            registry(&couch, freshness).await.map(|known| {
                let everyone = known.keys().cloned().collect();
                RegistryAnswer {
                    expected: Some(set.resolve(&everyone, &known)),
                    keys: pinned_keys(&known),
                }
            })
        }));
        BTreeSet::new()
    } else {
        let known = registry(&settings.couch, settings.freshness).await?;
        keys = Some(pinned_keys(&known));
        let selected = select_nodes(&settings.couch, &q.nodes, &known).await?;
        let resolved = q.nodes.resolve(&selected, &known);
        stale = selected.len().saturating_sub(resolved.len());
        resolved
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
        unverified: BTreeMap::new(),
        stale,
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
    let fanout = Fanout {
        conn: &conn,
        topology: b.topology.clone(),
        signer: &signer,
    };
    let result = collect(&fanout, q, report, keys, registry_pending, cancel, on_reply).await;
    let _ = tokio::time::timeout(amqp::CLOSE_WAIT, conn.close(200, "runner done".into())).await;
    result
}

/// The registry read running alongside the first replies.
type PendingRegistry = tokio::task::JoinHandle<Result<RegistryAnswer, RunnerError>>;

/// The pinned key of every registered node that has one.
fn pinned_keys(known: &BTreeMap<NodeName, RegisteredNode>) -> Keys {
    known
        .iter()
        .filter_map(|(n, r)| Some((n.clone(), r.key.clone()?)))
        .collect()
}

/// Where a query publishes and how it signs.
struct Fanout<'a> {
    conn: &'a Connection,
    topology: Topology,
    signer: &'a PrivateKey,
}

/// The I/O of one fan-out: publish what [`Collect`] asks for, feed it replies, the registry
/// answer and timers, until it is done.
async fn collect(
    fanout: &Fanout<'_>,
    q: &Query,
    report: Report,
    keys: Option<Keys>,
    mut registry_pending: Option<PendingRegistry>,
    cancel: &CancellationToken,
    on_reply: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<Report, RunnerError> {
    let Fanout {
        conn,
        topology,
        signer,
    } = fanout;
    let publisher = Publisher::open(conn, topology).await?;
    amqp::declare::shared(topology, conn).await?;
    let reply_queue = amqp::declare::reply_queue(topology, conn, report.request_id)
        .await
        .map_err(AmqpError::from)?;
    // The reply queue is private and deleted with the connection: no acks needed.
    let how = Consume {
        queue: &reply_queue,
        tag: "",
        prefetch: None,
        no_ack: true,
    };
    let mut replies = Consumer::open(conn, how, FromAgents).await?;

    let issued_at = Utc::now();
    let ttl = chrono::Duration::from_std(q.ttl).unwrap_or(chrono::Duration::MAX);
    let (request_id, plugin) = (report.request_id, q.plugin.clone());
    let command = |target: Target| {
        Message::Command(Command::new(
            request_id,
            plugin.clone(),
            target,
            issued_at,
            ttl,
        ))
    };
    let started = tokio::time::Instant::now();
    let batch = q.batch.map(|b| (b.size, b.pause));
    let mut c = Collect::new(report, batch, q.timeout, keys);
    let mut step = c.start();
    loop {
        for notice in c.notices() {
            match notice {
                Notice::Sent { expected } => on_reply(Progress::Sent { expected }),
                Notice::Reply(node) => {
                    if let Some(r) = c.report().replies.get(&node) {
                        on_reply(Progress::Reply(r));
                    }
                }
            }
        }
        let now = tokio::time::Instant::now;
        step = match step {
            Step::Publish(targets) => {
                for target in targets {
                    let delivered = publisher
                        .command(&command(target.clone()), signer, q.ttl)
                        .await?;
                    c.published(
                        &target,
                        match delivered {
                            amqp::Delivery::Queued => Delivered::Queued,
                            amqp::Delivery::Unroutable => Delivered::Unroutable,
                            amqp::Delivery::Refused => Delivered::Refused,
                        },
                    );
                }
                if c.nobody_listens() {
                    warn!(collective = %topology.collective(), "no agent queue is bound for broadcasts: no agent of this collective has ever connected");
                }
                let (wave, of) = c.wave();
                info!(request_id = %request_id, plugin = %q.plugin, nodes = %q.nodes_text, batch = wave, of, expected = c.report().expected.len(), "command sent");
                c.sent(now())
            }
            Step::Wait { until } => tokio::select! {
                () = cancel.cancelled() => c.cancelled(now()),
                () = tokio::time::sleep_until(until) => c.deadline(now()),
                known = async { registry_pending.as_mut().expect("guarded").await }, if registry_pending.is_some() => {
                    registry_pending = None;
                    let known = known.map_err(|e| RunnerError::Task(e.to_string()))??;
                    c.registry(known, now())
                }
                received = replies.next() => match received? {
                    Ok(incoming) => match incoming.message.message {
                        Message::Result(r) => {
                            debug!(node = %r.node, outcome = r.outcome.status(), "reply");
                            c.reply(r, &incoming.message.signer.to_base64(), now())
                        }
                        other => {
                            debug!(kind = other.kind(), "ignored a message that is not a reply to this request");
                            c.tick(now())
                        }
                    },
                    Err(refused) => {
                        warn!(reason = %refused.refusal, "ignored a reply that failed verification");
                        c.tick(now())
                    }
                },
            },
            Step::AwaitRegistry => {
                // Timed out, cancelled or nobody listens before the registry arrived: the
                // report still needs to know whom it expected.
                let pending = registry_pending.take().expect("the registry is pending");
                let known = pending
                    .await
                    .map_err(|e| RunnerError::Task(e.to_string()))??;
                c.registry(known, now())
            }
            Step::Pause { until } => tokio::select! {
                () = cancel.cancelled() => c.cancelled(now()),
                () = tokio::time::sleep_until(until) => c.pause_over(),
            },
            Step::Done => break,
        };
    }
    replies.close().await;
    publisher.close().await;
    Ok(c.finish(started.elapsed()))
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

/// `--wait stored`: how far the server got with the answers a query reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredCheck {
    /// Answers whose run (or a newer one) is in the node's document.
    pub stored: usize,
    /// Nodes whose answer is not stored yet.
    pub waiting: Vec<String>,
    pub waited_ms: u64,
}

impl StoredCheck {
    pub fn all_stored(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// Wait, up to `limit`, until the server stored every answer of `report` that it stores
/// (an unknown plugin stores nothing): the node's document records that run or a newer one.
/// Read through the `collected` view, so it holds with any number of servers on the queue,
/// and views read right after see the values.
pub async fn wait_stored(
    settings: &CouchSettings,
    plugin: &PluginName,
    report: &Report,
    limit: Duration,
) -> Result<StoredCheck, RunnerError> {
    let started = std::time::Instant::now();
    let inventory = inventory::open(settings)?;
    let expect: BTreeMap<&str, chrono::DateTime<Utc>> = report
        .replies
        .iter()
        .filter(|(_, r)| r.outcome != vogeler_proto::wire::Outcome::UnknownPlugin)
        .map(|(n, r)| (n.as_str(), r.collected_at))
        .collect();
    let mut delay = Duration::from_millis(50);
    loop {
        let rows = inventory
            .collected(plugin.as_str())
            .await
            .map_err(inventory::registry_error)?;
        let done: BTreeSet<&str> = rows
            .iter()
            .filter(|(id, c)| {
                expect
                    .get(id.as_str())
                    .is_some_and(|at| c.collected_at.is_some_and(|stored| stored >= *at))
            })
            .map(|(id, _)| id.as_str())
            .collect();
        let waiting: Vec<String> = expect
            .keys()
            .filter(|n| !done.contains(*n))
            .map(|n| n.to_string())
            .collect();
        if waiting.is_empty() || started.elapsed() >= limit {
            return Ok(StoredCheck {
                stored: expect.len() - waiting.len(),
                waiting,
                waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            });
        }
        tokio::time::sleep(delay.min(limit.saturating_sub(started.elapsed()))).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}
