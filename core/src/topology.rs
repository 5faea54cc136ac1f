//! AMQP topology: every exchange, queue and routing-key name, and their declaration.
//!
//! ```text
//! runner --(command, key "all" | "node.<name>")--> <c>.commands (topic)
//!   --> <c>.agent.<node>   (durable; one per agent, bound to "all" and "node.<name>")
//! agent  --(result, key "result.<request id>"; announce, key "announce.<node>")--> <c>.results (topic)
//!   --> <c>.ingest         (durable; bound to "#", drained by the servers; bounded, and
//!                           refused messages go to <c>.dead (fanout) --> <c>.dead-letters)
//!   --> reply queue        (exclusive; one per runner request, bound to "result.<request id>")
//! ```
//! `<c>` is the collective, so several fleets or test runs can share one broker. Every program
//! checks the shared part on connect with passive declarations (which need no permissions)
//! and declares what is missing, so results are kept in the durable queue even when no
//! server has ever run. No exchange shares a queue's name, so broker permissions (regular
//! expressions over names, see `deploy/rabbitmq/`) can tell them apart.

use std::time::Duration;

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use uuid::Uuid;

use crate::{names::NodeName, wire::Target};

/// The binding that makes the results queue receive every result and announcement.
const EVERYTHING: &str = "#";

/// Which kind of queue holds results. Quorum queues are replicated across a RabbitMQ
/// cluster and survive losing a node; classic queues are lighter and enough for one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    #[default]
    Classic,
    Quorum,
}

impl QueueKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "classic" => Ok(QueueKind::Classic),
            "quorum" => Ok(QueueKind::Quorum),
            other => Err(format!(
                "{other:?} is not a queue type; use classic or quorum"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            QueueKind::Classic => "classic",
            QueueKind::Quorum => "quorum",
        }
    }
}

/// How the results queue is declared. Only the server declares it with these; agents and
/// runners create it with the same defaults only when it does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultsQueue {
    pub kind: QueueKind,
    /// Results held at most; beyond it publishes are refused (and retried by the agent)
    /// rather than old results silently dropped.
    pub max_length: u64,
}

impl Default for ResultsQueue {
    fn default() -> Self {
        Self {
            kind: QueueKind::Classic,
            max_length: 1_000_000,
        }
    }
}

/// Bounds of each agent's command queue, so an agent offline for long does not collect
/// commands without end: beyond `max_length` the broker refuses new commands (the runner
/// reports "queue full"), and commands older than `max_age` are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentQueue {
    pub max_length: u64,
    pub max_age: Duration,
}

impl Default for AgentQueue {
    fn default() -> Self {
        Self {
            max_length: 1000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Names and declarations for one collective.
#[derive(Debug, Clone)]
pub struct Topology {
    collective: String,
    /// `x-expires` for the queues we declare: unused queues vanish after this long. Test runs
    /// and short-lived collectives set it so they leave nothing behind on a shared broker.
    queue_expires: Option<Duration>,
    results: ResultsQueue,
    agent: AgentQueue,
}

impl Topology {
    /// `collective` must already be validated (see [`crate::config`]).
    pub fn new(collective: impl Into<String>, queue_expires: Option<Duration>) -> Self {
        Self {
            collective: collective.into(),
            queue_expires,
            results: ResultsQueue::default(),
            agent: AgentQueue::default(),
        }
    }

    /// The same topology with these agent queue bounds.
    pub fn with_agent_queue(mut self, agent: AgentQueue) -> Self {
        self.agent = agent;
        self
    }

    /// The same topology with these results queue settings.
    pub fn with_results_queue(mut self, results: ResultsQueue) -> Self {
        self.results = results;
        self
    }

    pub fn collective(&self) -> &str {
        &self.collective
    }
    pub fn queue_expires(&self) -> Option<Duration> {
        self.queue_expires
    }
    pub fn results_queue_settings(&self) -> ResultsQueue {
        self.results
    }
    pub fn agent_queue_bounds(&self) -> AgentQueue {
        self.agent
    }
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.collective)
    }
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.collective)
    }
    pub fn results_queue(&self) -> String {
        format!("{}.ingest", self.collective)
    }
    /// Where refused messages go, with the reason in the `x-vogeler-reason` header.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.collective)
    }
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letters", self.collective)
    }
    pub fn agent_queue(&self, node: &NodeName) -> String {
        format!("{}.agent.{node}", self.collective)
    }

    /// The routing key a command for `target` is published with.
    pub fn command_routing_key(target: &Target) -> String {
        match target {
            Target::All => "all".to_string(),
            Target::Node(n) => format!("node.{n}"),
        }
    }
    /// The keys an agent's queue is bound with: everything a command for it may carry.
    pub fn agent_binding_keys(node: &NodeName) -> [String; 2] {
        [
            Self::command_routing_key(&Target::All),
            Self::command_routing_key(&Target::Node(node.clone())),
        ]
    }
    /// Results carry their request id so a runner can bind to exactly its own replies.
    pub fn result_routing_key(request_id: Uuid) -> String {
        format!("result.{request_id}")
    }
    pub fn announce_routing_key(node: &NodeName) -> String {
        format!("announce.{node}")
    }

    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(d) = self.queue_expires {
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        args
    }

    fn results_queue_args(&self) -> FieldTable {
        let mut args = self.queue_args();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.results.kind.name().into()),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange().into()),
        );
        let max = i64::try_from(self.results.max_length).unwrap_or(i64::MAX);
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }

    async fn declare_exchanges(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for ex in [self.commands_exchange(), self.results_exchange()] {
            ch.exchange_declare(
                ex.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        }
        ch.exchange_declare(
            self.dead_letter_exchange().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
    }

    async fn declare_results_queue(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let dlq = self.dead_letter_queue();
        ch.queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions::durable(),
            self.queue_args(),
        )
        .await?;
        ch.queue_bind(
            dlq.as_str().into(),
            self.dead_letter_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let q = self.results_queue();
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::durable(),
            self.results_queue_args(),
        )
        .await?;
        ch.queue_bind(
            q.as_str().into(),
            self.results_exchange().as_str().into(),
            EVERYTHING.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// What agents and runners need before they publish: the exchanges, and the results
    /// queue so results are kept even before any server ran. An existing results queue is
    /// left as the server declared it (classic or quorum), whatever this program's settings.
    pub async fn declare_shared(&self, conn: &Connection) -> Result<(), lapin::Error> {
        let exchanges = [
            (self.commands_exchange(), ExchangeKind::Topic),
            (self.results_exchange(), ExchangeKind::Topic),
            (self.dead_letter_exchange(), ExchangeKind::Fanout),
        ];
        let mut missing_exchange = false;
        for (name, kind) in &exchanges {
            missing_exchange |= !self.exists(conn, name, Some(kind.clone())).await?;
        }
        let missing_queue = !self.exists(conn, &self.results_queue(), None).await?;
        if !missing_exchange && !missing_queue {
            return Ok(());
        }
        // Only a fresh broker gets here; declaring needs configure permissions, which a
        // least-privilege agent or runner lacks until the server has run once.
        let ch = conn.create_channel().await?;
        self.declare_exchanges(&ch).await?;
        if missing_queue {
            self.declare_results_queue(&ch).await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Whether an exchange (with `kind`) or a queue exists. A passive declaration of a
    /// missing one closes its channel, hence a channel of its own.
    async fn exists(
        &self,
        conn: &Connection,
        name: &str,
        kind: Option<ExchangeKind>,
    ) -> Result<bool, lapin::Error> {
        let probe = conn.create_channel().await?;
        let found = match kind {
            Some(kind) => {
                let opts = ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                probe
                    .exchange_declare(name.into(), kind, opts, FieldTable::default())
                    .await
                    .is_ok()
            }
            None => {
                let opts = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                probe
                    .queue_declare(name.into(), opts, FieldTable::default())
                    .await
                    .is_ok()
            }
        };
        if found {
            let _ = probe.close(200, "done".into()).await;
        }
        Ok(found)
    }

    pub async fn declare_server(&self, ch: &Channel) -> Result<(), lapin::Error> {
        self.declare_exchanges(ch).await?;
        self.declare_results_queue(ch).await
    }

    /// An agent's own durable command queue, bound for commands addressed to it.
    pub async fn declare_agent_queue(
        &self,
        conn: &Connection,
        node: &NodeName,
    ) -> Result<String, lapin::Error> {
        let q = self.agent_queue(node);
        let mut args = self.queue_args();
        let max = i64::try_from(self.agent.max_length).unwrap_or(i64::MAX);
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let age = i64::try_from(self.agent.max_age.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(age.max(1)));
        let mut ch = conn.create_channel().await?;
        if let Err(e) = ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::durable(),
                args.clone(),
            )
            .await
        {
            if !crate::amqp::is_precondition_failed(&e) {
                return Err(e);
            }
            // Declared by an older release or with other bounds. It holds only commands,
            // which the runner can send again: replace it rather than refuse to start.
            tracing::warn!(queue = %q, "agent queue exists with other settings; replacing it (pending commands in it are dropped)");
            ch = conn.create_channel().await?;
            ch.queue_delete(q.as_str().into(), Default::default())
                .await?;
            ch.queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), args)
                .await?;
        }
        for key in Self::agent_binding_keys(node) {
            ch.queue_bind(
                q.as_str().into(),
                self.commands_exchange().as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(q)
    }

    pub async fn declare_reply_queue(
        &self,
        ch: &Channel,
        request_id: Uuid,
    ) -> Result<String, lapin::Error> {
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let q = ch
            .queue_declare("".into(), opts, FieldTable::default())
            .await?;
        let name = q.name().to_string();
        ch.queue_bind(
            name.as_str().into(),
            self.results_exchange().as_str().into(),
            Self::result_routing_key(request_id).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_by_collective() {
        let t = Topology::new("fleet-a", None);
        let n = NodeName::new("web01.example.com").expect("name");
        assert_eq!(t.commands_exchange(), "fleet-a.commands");
        assert_eq!(t.results_queue(), "fleet-a.ingest");
        assert_eq!(t.agent_queue(&n), "fleet-a.agent.web01.example.com");
        assert_eq!(Topology::command_routing_key(&Target::All), "all");
        assert_eq!(
            Topology::agent_binding_keys(&n),
            ["all".to_string(), "node.web01.example.com".to_string()]
        );
        // A node command must match exactly the bound key, never another node's.
        assert_eq!(
            Topology::command_routing_key(&Target::Node(n.clone())),
            Topology::agent_binding_keys(&n)[1]
        );
    }
}
