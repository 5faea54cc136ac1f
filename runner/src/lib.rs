//! vogeler-runner: publish a command to a node set and collect who answered.
//!
//! - [`report`]: the collected replies and their table.
//! - [`inventory`]: questions answered from CouchDB (`find`, `history`).
//!
//! [`query`] reads the expected nodes from the node registry in CouchDB (for `all`), binds a
//! private reply queue *before* publishing so no reply is missed, and returns as soon as
//! every expected node answered, or at the timeout.

pub mod inventory;
pub mod report;

use std::{collections::BTreeMap, time::Duration};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::{options::BasicConsumeOptions, types::FieldTable};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;
use vogeler_core::{
    amqp::{self, AmqpError},
    config::{CouchSettings, RunnerSettings},
    couch::{CouchClient, CouchError},
    names::{NodeName, PluginName},
    topology::Topology,
    wire::{self, Command, Message, Target},
};

pub use crate::report::Report;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error("cannot read the node registry: {0}")]
    Registry(#[source] CouchError),
    #[error(
        "{0}; vogeler-server creates the databases and views when it starts: is it running against this database?"
    )]
    NotReady(#[source] CouchError),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

impl RunnerError {
    /// Broker or database unreachable (exit 69).
    pub fn is_unavailable(&self) -> bool {
        match self {
            RunnerError::Broker(AmqpError::Unavailable { .. }) => true,
            RunnerError::Registry(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// One fan-out: which plugin, on which nodes, waiting how long.
#[derive(Debug, Clone)]
pub struct Query {
    pub plugin: PluginName,
    pub target: Target,
    pub timeout: Duration,
}

/// Parse `-n`: `all` or a node name.
pub fn parse_target(s: &str) -> Result<Target, String> {
    match s {
        "all" => Ok(Target::All),
        name => NodeName::new(name)
            .map(Target::Node)
            .map_err(|e| format!("{e}; use 'all' or a node name")),
    }
}

/// The registered nodes: every node document in the database.
pub async fn known_nodes(settings: &CouchSettings) -> Result<Vec<NodeName>, RunnerError> {
    let couch = CouchClient::new(&settings.url, settings.credentials.clone())
        .map_err(|e| RunnerError::Http(e.to_string()))?;
    let Some(ids) = couch
        .all_ids(&settings.database)
        .await
        .map_err(RunnerError::Registry)?
    else {
        warn!(database = %settings.database, "database does not exist yet: no node is registered (has vogeler-server run?)");
        return Ok(vec![]);
    };
    // Anything that is not a valid node name was not written by Vogeler; leave it out.
    Ok(ids
        .into_iter()
        .filter_map(|id| NodeName::new(id).ok())
        .collect())
}

/// Publish the command and collect replies until every expected node answered, the timeout
/// passes, or `cancel` fires.
pub async fn query(
    settings: &RunnerSettings,
    q: &Query,
    cancel: &CancellationToken,
) -> Result<Report, RunnerError> {
    let expected = match &q.target {
        Target::All => known_nodes(&settings.couch).await?.into_iter().collect(),
        Target::Node(n) => [n.clone()].into(),
    };
    let b = &settings.broker;
    let conn =
        match amqp::connect_with_retry(&b.url, "vogeler-runner", Some(b.connect_timeout), cancel)
            .await
        {
            Ok(c) => c,
            Err(e) => return Err(e.into()),
        };
    let request_id = Uuid::new_v4();
    let mut report = Report {
        request_id,
        plugin: q.plugin.clone(),
        target: q.target.clone(),
        expected,
        replies: BTreeMap::new(),
        elapsed: Duration::ZERO,
    };
    let result = collect(&conn, b.topology.clone(), q, &mut report, cancel).await;
    let _ = conn.close(200, "runner done".into()).await;
    result.map(|()| report)
}

async fn collect(
    conn: &lapin::Connection,
    topology: Topology,
    q: &Query,
    report: &mut Report,
    cancel: &CancellationToken,
) -> Result<(), RunnerError> {
    let ch = amqp::publisher_channel(conn)
        .await
        .map_err(AmqpError::from)?;
    topology
        .declare_shared(conn)
        .await
        .map_err(AmqpError::from)?;
    let reply_queue = topology
        .declare_reply_queue(&ch, report.request_id)
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

    let command = Message::Command(Command {
        request_id: report.request_id,
        plugin: q.plugin.clone(),
        target: q.target.clone(),
        issued_at: Utc::now(),
    });
    let started = tokio::time::Instant::now();
    let deadline = started + q.timeout;
    amqp::publish(
        &ch,
        &topology.commands_exchange(),
        &Topology::command_routing_key(&q.target),
        &command,
    )
    .await?;
    info!(request_id = %report.request_id, plugin = %q.plugin, target = %q.target, expected = report.expected.len(), "command sent");

    while report.expected.is_empty()
        || report
            .expected
            .iter()
            .any(|n| !report.replies.contains_key(n))
    {
        let delivery = tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(deadline) => break,
            d = replies.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(AmqpError::from(e).into()),
            None => return Err(AmqpError::ConsumerEnded { queue: reply_queue }.into()),
        };
        match wire::decode(&delivery.data) {
            Ok(Message::Result(r)) if r.request_id == report.request_id => {
                debug!(node = %r.node, outcome = r.outcome.status(), "reply");
                report.replies.entry(r.node.clone()).or_insert(r);
            }
            Ok(other) => debug!(
                kind = other.kind(),
                "ignored a message that is not a reply to this request"
            ),
            Err(e) => warn!(error = %e, "ignored a malformed reply"),
        }
    }
    report.elapsed = started.elapsed();
    Ok(())
}
