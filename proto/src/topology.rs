//! AMQP topology: every exchange, queue and routing-key name, the arguments each queue is
//! declared with, and which exchange and key each message travels by. Declaring them on a
//! broker is `vogeler_core::amqp::declare`'s.
//!
//! ```text
//! runner --(command, key "all" | "node.<name>")--> <c>.commands (topic)
//!   --> <c>.agent.<node>   (durable; one per agent, bound to "all" and "node.<name>")
//! agent  --(result, key "result.<request id>"; announce, key "announce.<node>")--> <c>.results (topic)
//!   --> <c>.ingest         (durable; bound to "#", drained by the servers; bounded, and
//!                           refused messages go to <c>.dead (fanout) --> <c>.dead-letters,
//!                           bounded too, keeping the newest)
//!   --> reply queue        (exclusive; one per runner request, bound to "result.<request id>")
//! ```
//! `<c>` is the collective, so several fleets or test runs can share one broker. Every program
//! checks the shared part on connect with passive declarations (which need no permissions)
//! and declares what is missing, so results are kept in the durable queue even when no
//! server has ever run. No exchange shares a queue's name, so broker permissions (regular
//! expressions over names, see `deploy/rabbitmq/`) can tell them apart.

use std::time::Duration;

use uuid::Uuid;

use crate::{
    names::NodeName,
    wire::{Message, Target},
};

/// The binding that makes the results queue receive every result and announcement.
pub const EVERYTHING: &str = "#";

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
///
/// `kind` decides what a broker cluster does when the queue's node dies: a classic queue is
/// unusable until that node returns (its agent waits, reconnecting), a quorum queue moves
/// to a surviving replica at once. Declared without `x-queue-type` when classic, as
/// releases before it were (and `deploy/rabbitmq/setup.sh` does), so existing queues match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentQueue {
    pub kind: QueueKind,
    pub max_length: u64,
    pub max_age: Duration,
}

impl Default for AgentQueue {
    fn default() -> Self {
        Self {
            kind: QueueKind::Classic,
            max_length: 1000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Bounds of the dead-letter queue. It holds full persistent copies of what could never be
/// stored, for an operator to read: anyone holding the agent credential can fill it, so it
/// is bounded in messages and in bytes (of bodies, as the broker counts them). Beyond either,
/// the oldest copies are dropped (`drop-head`): refusing new ones would lose exactly the
/// letters an operator is about to look for, and the oldest are the likeliest read already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterQueue {
    pub max_length: u64,
    pub max_bytes: u64,
}

impl Default for DeadLetterQueue {
    /// 10,000 copies is days of a broken node's results at a realistic rate; 256 MiB keeps
    /// at least three messages of the 64 MiB the server admits, and a broker's disk whole.
    fn default() -> Self {
        Self {
            max_length: 10_000,
            max_bytes: 256 * 1024 * 1024,
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
    dead_letters: DeadLetterQueue,
}

impl Topology {
    /// `collective` must already be validated (see [`crate::config`]).
    pub fn new(collective: impl Into<String>, queue_expires: Option<Duration>) -> Self {
        Self {
            collective: collective.into(),
            queue_expires,
            results: ResultsQueue::default(),
            agent: AgentQueue::default(),
            dead_letters: DeadLetterQueue::default(),
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

    /// The same topology with these dead-letter queue bounds.
    pub fn with_dead_letters(mut self, dead_letters: DeadLetterQueue) -> Self {
        self.dead_letters = dead_letters;
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
    pub fn dead_letter_bounds(&self) -> DeadLetterQueue {
        self.dead_letters
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

    /// The exchange and routing key `message` is published with: the one place that decides
    /// where each kind of message goes.
    pub fn route(&self, message: &Message) -> Route {
        match message {
            Message::Command(c) => Route {
                exchange: self.commands_exchange(),
                routing_key: Self::command_routing_key(&c.target),
            },
            Message::Result(r) => Route {
                exchange: self.results_exchange(),
                routing_key: Self::result_routing_key(r.request_id),
            },
            Message::Announce(a) => Route {
                exchange: self.results_exchange(),
                routing_key: Self::announce_routing_key(&a.node),
            },
        }
    }

    /// `x-expires` for every queue we declare, when set.
    pub fn queue_arguments(&self) -> Vec<(&'static str, QueueArgument)> {
        self.queue_expires
            .map(|d| {
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1);
                ("x-expires", QueueArgument::Int(ms))
            })
            .into_iter()
            .collect()
    }

    /// The results queue: its type, bound, overflow policy and dead-letter exchange.
    pub fn results_queue_arguments(&self) -> Vec<(&'static str, QueueArgument)> {
        let mut args = self.queue_arguments();
        args.extend([
            (
                "x-queue-type",
                QueueArgument::Text(self.results.kind.name().into()),
            ),
            (
                "x-dead-letter-exchange",
                QueueArgument::Text(self.dead_letter_exchange()),
            ),
            (
                "x-max-length",
                QueueArgument::Int(i64::try_from(self.results.max_length).unwrap_or(i64::MAX)),
            ),
            ("x-overflow", QueueArgument::Text("reject-publish".into())),
        ]);
        args
    }

    /// The dead-letter queue: bounded in messages and bytes, dropping the oldest beyond.
    pub fn dead_letter_queue_arguments(&self) -> Vec<(&'static str, QueueArgument)> {
        let int = |n: u64| QueueArgument::Int(i64::try_from(n).unwrap_or(i64::MAX));
        let mut args = self.queue_arguments();
        args.extend([
            ("x-max-length", int(self.dead_letters.max_length)),
            ("x-max-length-bytes", int(self.dead_letters.max_bytes)),
            ("x-overflow", QueueArgument::Text("drop-head".into())),
        ]);
        // Beside the results queue, of its type: a classic dead-letter queue whose node
        // died would stop the server, which declares it, on every other node too.
        if self.results.kind != QueueKind::Classic {
            args.push((
                "x-queue-type",
                QueueArgument::Text(self.results.kind.name().into()),
            ));
        }
        args
    }

    /// An agent's command queue: bounded in length (refusing new commands when full) and in
    /// the age of what it holds.
    pub fn agent_queue_arguments(&self) -> Vec<(&'static str, QueueArgument)> {
        let mut args = self.queue_arguments();
        let age = i64::try_from(self.agent.max_age.as_millis()).unwrap_or(i64::MAX);
        args.extend([
            (
                "x-max-length",
                QueueArgument::Int(i64::try_from(self.agent.max_length).unwrap_or(i64::MAX)),
            ),
            ("x-overflow", QueueArgument::Text("reject-publish".into())),
            ("x-message-ttl", QueueArgument::Int(age.max(1))),
        ]);
        if self.agent.kind != QueueKind::Classic {
            args.push((
                "x-queue-type",
                QueueArgument::Text(self.agent.kind.name().into()),
            ));
        }
        args
    }
}

/// Where a message is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub exchange: String,
    pub routing_key: String,
}

/// A queue argument's value, as the broker takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueArgument {
    Int(i64),
    Text(String),
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

    #[test]
    fn every_message_has_one_route() {
        let t = Topology::new("fleet-a", None);
        let node = NodeName::new("web01").expect("name");
        let plugin = crate::names::PluginName::new("dpkg").expect("plugin");
        let at = chrono::DateTime::UNIX_EPOCH;
        let id = Uuid::from_u128(7);
        let command = Message::Command(crate::wire::Command::new(
            id,
            plugin.clone(),
            Target::Node(node.clone()),
            at,
            chrono::Duration::seconds(60),
        ));
        assert_eq!(
            t.route(&command),
            Route {
                exchange: "fleet-a.commands".into(),
                routing_key: "node.web01".into()
            }
        );
        let announce = Message::Announce(crate::wire::Announce {
            node: node.clone(),
            agent_version: "1".into(),
            plugins: vec![],
            started_at: at,
            sent_at: at,
            facts: Default::default(),
            schedules: None,
            packages: None,
        });
        assert_eq!(t.route(&announce).exchange, "fleet-a.results");
        assert_eq!(t.route(&announce).routing_key, "announce.web01");
    }

    #[test]
    fn queue_arguments_carry_bounds_and_expiry() {
        let t = Topology::new("c", Some(Duration::from_secs(60)));
        let args = t.agent_queue_arguments();
        assert!(args.contains(&("x-expires", QueueArgument::Int(60_000))));
        assert!(args.contains(&("x-max-length", QueueArgument::Int(1000))));
        assert!(args.contains(&("x-message-ttl", QueueArgument::Int(24 * 3600 * 1000))));
        assert!(!args.iter().any(|(k, _)| *k == "x-queue-type"));
        let quorum = Topology::new("c", None).with_agent_queue(AgentQueue {
            kind: QueueKind::Quorum,
            ..AgentQueue::default()
        });
        assert!(
            quorum
                .agent_queue_arguments()
                .contains(&("x-queue-type", QueueArgument::Text("quorum".into())))
        );
        let results = Topology::new("c", None).results_queue_arguments();
        assert!(!results.iter().any(|(k, _)| *k == "x-expires"));
        assert!(results.contains(&(
            "x-dead-letter-exchange",
            QueueArgument::Text("c.dead".into())
        )));
        assert!(results.contains(&("x-overflow", QueueArgument::Text("reject-publish".into()))));
        // The dead letters take the results queue's type when it is not classic.
        let dead = |kind| {
            Topology::new("c", None)
                .with_results_queue(ResultsQueue {
                    kind,
                    ..ResultsQueue::default()
                })
                .dead_letter_queue_arguments()
        };
        assert!(
            !dead(QueueKind::Classic)
                .iter()
                .any(|(k, _)| *k == "x-queue-type")
        );
        assert!(
            dead(QueueKind::Quorum)
                .contains(&("x-queue-type", QueueArgument::Text("quorum".into())))
        );
    }

    #[test]
    fn dead_letters_are_bounded_and_keep_the_newest() {
        let t = Topology::new("c", Some(Duration::from_secs(60)));
        assert_eq!(
            t.dead_letter_queue_arguments(),
            vec![
                ("x-expires", QueueArgument::Int(60_000)),
                ("x-max-length", QueueArgument::Int(10_000)),
                ("x-max-length-bytes", QueueArgument::Int(256 * 1024 * 1024)),
                ("x-overflow", QueueArgument::Text("drop-head".into())),
            ]
        );
        let small = Topology::new("c", None).with_dead_letters(DeadLetterQueue {
            max_length: 5,
            max_bytes: u64::MAX,
        });
        let args = small.dead_letter_queue_arguments();
        assert!(args.contains(&("x-max-length", QueueArgument::Int(5))));
        assert!(
            args.contains(&("x-max-length-bytes", QueueArgument::Int(i64::MAX))),
            "saturates rather than wraps"
        );
        assert!(!args.iter().any(|(k, _)| *k == "x-expires"));
    }
}
