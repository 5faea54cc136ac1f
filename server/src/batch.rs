//! The server's batch logic as pure code, unit-tested without a broker or a database:
//!
//! - [`InFlight`]: which batches may be written at once. Batches that share a node wait for
//!   each other, so one server applies each node's results in queue order (and records every
//!   change in the history).
//! - [`admit`]: what the results queue takes (results and announcements, nothing else).
//! - [`Writer`]: store a batch, and when the database refuses the whole request for good (one
//!   message too large, say) store its messages one by one, so only the poison message is
//!   refused and the rest is stored.
//! - [`Settlement`]: which messages to ack and which to dead-letter with which reason.

use std::collections::BTreeSet;

use tracing::warn;
use vogeler_proto::wire::Message;

use crate::store::Stored;

/// A batch being written, as [`InFlight`] knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// The batches being written and the nodes each touches.
#[derive(Debug)]
pub struct InFlight {
    capacity: usize,
    next: u64,
    busy: Vec<(Ticket, BTreeSet<String>)>,
}

impl InFlight {
    /// At most `capacity` batches at once (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            next: 0,
            busy: Vec::new(),
        }
    }

    /// Whether a batch touching `nodes` may start now: there is room, and no batch in flight
    /// shares a node with it.
    pub fn can_start(&self, nodes: &BTreeSet<String>) -> bool {
        self.busy.len() < self.capacity && self.busy.iter().all(|(_, b)| b.is_disjoint(nodes))
    }

    /// Record a batch as started; [`InFlight::finish`] it with the ticket.
    pub fn start(&mut self, nodes: BTreeSet<String>) -> Ticket {
        let ticket = Ticket(self.next);
        self.next += 1;
        self.busy.push((ticket, nodes));
        ticket
    }

    /// The batch is written (or given up): its nodes are free again. Only this ticket's:
    /// two batches may touch the same (empty) set of nodes.
    pub fn finish(&mut self, ticket: Ticket) {
        self.busy.retain(|(t, _)| *t != ticket);
    }

    pub fn len(&self) -> usize {
        self.busy.len()
    }
    pub fn is_empty(&self) -> bool {
        self.busy.is_empty()
    }
}

/// Whether the results queue takes `message` (a result or an announcement within every
/// limit, stamped no later than the allowed clock skew past `now`); the error is the
/// dead-letter reason.
pub fn admit(message: &Message, now: chrono::DateTime<chrono::Utc>) -> Result<(), String> {
    vogeler_proto::limits::check_message(message, now)
}

/// Why the database did not take a request, as [`Writer`] needs to judge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Retrying the same request cannot help (400, 413, 415 from CouchDB).
    Permanent(String),
    /// Down, overloaded, refusing the account for now: try again later.
    Transient(String),
}

impl From<&vogeler_core::couch::CouchError> for Failure {
    fn from(e: &vogeler_core::couch::CouchError) -> Self {
        // Everything but a request CouchDB can never take (database down, authentication,
        // conflicts) is retried: holding the queue beats losing results.
        let permanent = matches!(e, vogeler_core::couch::CouchError::Status { status, .. }
            if matches!(status.as_u16(), 400 | 413 | 415));
        if permanent {
            Failure::Permanent(e.to_string())
        } else {
            Failure::Transient(e.to_string())
        }
    }
}

/// What the I/O loop does next for a batch being written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Store the messages at these indexes in one request, and [`Writer::answer`] with how
    /// it went.
    Apply(Vec<usize>),
    /// The database failed for now (why): wait with backoff, then [`Writer::resume`]. On
    /// shutdown, give up: nothing of the batch may be settled.
    Wait(String),
    /// One outcome per message, in order: settle them.
    Done(Vec<Stored>),
}

/// Storing one batch until the database answered for each message: the whole batch in one
/// request; when the database refuses that request for good (one message too large, say),
/// each message on its own, so only the poison one is refused. A transient failure, during
/// the split too, starts the whole batch again after a wait: half a batch stored is fine
/// (writes are idempotent), half settled is not.
#[derive(Debug)]
pub struct Writer {
    len: usize,
    /// `Some(i)`: storing message `i` alone, after the whole batch was refused.
    single: Option<usize>,
    outcome: Vec<Stored>,
}

impl Writer {
    pub fn new(len: usize) -> Self {
        Self {
            len,
            single: None,
            outcome: Vec::new(),
        }
    }

    /// The first step.
    pub fn start(&mut self) -> Step {
        self.single = None;
        self.outcome.clear();
        if self.len == 0 {
            return Step::Done(Vec::new());
        }
        Step::Apply((0..self.len).collect())
    }

    /// After a [`Step::Wait`].
    pub fn resume(&mut self) -> Step {
        self.start()
    }

    /// How the last [`Step::Apply`] went: one [`Stored`] per message it held, or why not.
    pub fn answer(&mut self, answer: Result<Vec<Stored>, Failure>) -> Step {
        match (self.single, answer) {
            (None, Ok(outcome)) => Step::Done(outcome),
            (_, Err(Failure::Transient(why))) => Step::Wait(why),
            (None, Err(Failure::Permanent(why))) if self.len == 1 => {
                Step::Done(vec![Stored::Refused(why)])
            }
            (None, Err(Failure::Permanent(why))) => {
                warn!(error = %why, batch = self.len, "database refused the batch; storing its results one at a time");
                self.single = Some(0);
                Step::Apply(vec![0])
            }
            (Some(i), answer) => {
                self.outcome.push(match answer {
                    Ok(mut o) => o.pop().unwrap_or(Stored::Done),
                    Err(Failure::Permanent(why) | Failure::Transient(why)) => Stored::Refused(why),
                });
                if i + 1 == self.len {
                    return Step::Done(std::mem::take(&mut self.outcome));
                }
                self.single = Some(i + 1);
                Step::Apply(vec![i + 1])
            }
        }
    }
}

/// What to do with each message of a written batch, by index.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Stored: ack, in this order.
    pub ack: Vec<usize>,
    /// Never storable: dead-letter with the reason.
    pub dead: Vec<(usize, String)>,
    /// Of `dead`, how many were signed by another key than their node's.
    pub wrong_key: u64,
    /// Of `ack`, how many were held back by enrollment (not stored).
    pub held: u64,
    /// Of `ack`, how many said "unchanged" about a value the database does not hold.
    pub unconfirmed: u64,
}

impl Settlement {
    pub fn of(outcome: Vec<Stored>) -> Self {
        let mut s = Settlement::default();
        for (i, stored) in outcome.into_iter().enumerate() {
            match stored {
                Stored::Done => s.ack.push(i),
                Stored::Held(_) => {
                    s.held += 1;
                    s.ack.push(i);
                }
                Stored::Unconfirmed(_) => {
                    s.unconfirmed += 1;
                    s.ack.push(i);
                }
                Stored::Refused(reason) => s.dead.push((i, reason)),
                Stored::WrongKey(reason) => {
                    s.wrong_key += 1;
                    s.dead.push((i, reason));
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn disjoint_batches_run_together_up_to_capacity() {
        let mut f = InFlight::new(2);
        assert!(f.can_start(&nodes(&["a", "b"])));
        f.start(nodes(&["a", "b"]));
        assert!(f.can_start(&nodes(&["c"])));
        f.start(nodes(&["c"]));
        assert!(!f.can_start(&nodes(&["d"])), "capacity reached");
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn a_batch_sharing_a_node_waits_for_the_one_in_flight() {
        let mut f = InFlight::new(4);
        let first = f.start(nodes(&["a", "b"]));
        assert!(!f.can_start(&nodes(&["b", "c"])));
        f.finish(first);
        assert!(f.can_start(&nodes(&["b", "c"])));
        assert!(f.is_empty());
    }

    #[test]
    fn finishing_frees_only_its_own_ticket() {
        // All-malformed batches touch no node: two of them are disjoint and both in flight.
        let mut f = InFlight::new(3);
        let one = f.start(nodes(&[]));
        let _two = f.start(nodes(&[]));
        let three = f.start(nodes(&["a"]));
        f.finish(one);
        assert_eq!(f.len(), 2, "the other empty batch is still in flight");
        assert!(!f.can_start(&nodes(&["a"])));
        f.finish(three);
        assert!(f.can_start(&nodes(&["a"])));
    }

    #[test]
    fn capacity_is_at_least_one() {
        let mut f = InFlight::new(0);
        assert!(f.can_start(&nodes(&["a"])));
        f.start(nodes(&["a"]));
        assert!(!f.can_start(&nodes(&["b"])));
    }

    /// Drive a [`Writer`] against a database that refuses, for good, any request holding a
    /// message `>= 100`, and otherwise takes the next scripted answer (`Ok` when the script is
    /// done). Returns the outcome (`None`: shut down while waiting), the requests and waits.
    fn drive(
        items: &[u32],
        mut script: Vec<Result<(), String>>,
        shutdown_on_wait: bool,
    ) -> (Option<Vec<Stored>>, Vec<Vec<u32>>, usize) {
        script.reverse();
        let (mut requests, mut waits) = (Vec::new(), 0);
        let mut w = Writer::new(items.len());
        let mut step = w.start();
        let outcome = loop {
            step = match step {
                Step::Apply(idx) => {
                    let req: Vec<u32> = idx.iter().map(|i| items[*i]).collect();
                    let answer = if req.iter().any(|i| *i >= 100) {
                        Err(Failure::Permanent("too large".into()))
                    } else {
                        match script.pop().unwrap_or(Ok(())) {
                            Ok(()) => Ok(vec![Stored::Done; req.len()]),
                            Err(why) => Err(Failure::Transient(why)),
                        }
                    };
                    requests.push(req);
                    w.answer(answer)
                }
                Step::Wait(_) if shutdown_on_wait => break None,
                Step::Wait(_) => {
                    waits += 1;
                    w.resume()
                }
                Step::Done(outcome) => break Some(outcome),
            }
        };
        (outcome, requests, waits)
    }

    #[test]
    fn a_poison_message_is_refused_and_the_rest_stored() {
        let (out, requests, _) = drive(&[1, 100, 2], vec![], false);
        assert_eq!(
            out.expect("written"),
            vec![
                Stored::Done,
                Stored::Refused("too large".into()),
                Stored::Done
            ]
        );
        assert_eq!(requests, vec![vec![1, 100, 2], vec![1], vec![100], vec![2]]);
    }

    #[test]
    fn a_transient_error_retries_the_whole_batch_after_waiting() {
        let (out, requests, waits) = drive(&[1, 2], vec![Err("down".into())], false);
        assert_eq!(out.expect("written"), vec![Stored::Done, Stored::Done]);
        assert_eq!(waits, 1);
        assert_eq!(requests, vec![vec![1, 2], vec![1, 2]]);
    }

    #[test]
    fn a_permanent_error_on_one_message_refuses_it() {
        let (out, requests, _) = drive(&[100], vec![], false);
        assert_eq!(
            out.expect("written"),
            vec![Stored::Refused("too large".into())]
        );
        assert_eq!(requests.len(), 1, "no split of a single message");
    }

    #[test]
    fn a_transient_error_during_the_split_starts_the_whole_batch_again() {
        // The first single write after the split fails for now: after a wait the batch is
        // written whole again (refused again), split again, and then every write answers.
        let (out, requests, waits) = drive(&[1, 100], vec![Err("down".into())], false);
        assert_eq!(
            out.expect("written"),
            vec![Stored::Done, Stored::Refused("too large".into())]
        );
        assert_eq!(waits, 1);
        assert_eq!(
            requests,
            vec![vec![1, 100], vec![1], vec![1, 100], vec![1], vec![100]]
        );
    }

    #[test]
    fn shutdown_while_waiting_settles_nothing() {
        let (out, _, _) = drive(&[1, 2], vec![Err("down".into())], true);
        assert_eq!(out, None);
    }

    #[test]
    fn an_empty_batch_needs_no_request() {
        let (out, requests, _) = drive(&[], vec![], false);
        assert_eq!(out, Some(vec![]));
        assert!(requests.is_empty());
    }

    #[test]
    fn couch_errors_are_judged_by_status() {
        let status = |code: u16| vogeler_core::couch::CouchError::Status {
            method: vogeler_core::couch::Method::POST,
            path: "/db/_bulk_docs".into(),
            url: "http://127.0.0.1:5984".into(),
            status: code.try_into().expect("status"),
            reason: "x".into(),
        };
        for code in [400, 413, 415] {
            assert!(
                matches!(Failure::from(&status(code)), Failure::Permanent(_)),
                "{code}"
            );
        }
        for code in [401, 403, 409, 500, 503] {
            assert!(
                matches!(Failure::from(&status(code)), Failure::Transient(_)),
                "{code}"
            );
        }
    }

    #[test]
    fn settlement_acks_stored_in_order_and_dead_letters_the_rest() {
        let s = Settlement::of(vec![
            Stored::Done,
            Stored::WrongKey("signed by k2, pinned k1".into()),
            Stored::Refused("too large".into()),
            Stored::Done,
        ]);
        assert_eq!(s.ack, vec![0, 3]);
        assert_eq!(
            s.dead,
            vec![
                (1, "signed by k2, pinned k1".to_string()),
                (2, "too large".to_string())
            ]
        );
        assert_eq!(s.wrong_key, 1);
    }

    #[test]
    fn only_results_and_announcements_within_the_limits_are_admitted() {
        use vogeler_proto::{names, wire};
        let now = chrono::Utc::now();
        let command = Message::Command(wire::Command::new(
            uuid::Uuid::from_u128(1),
            names::PluginName::new("dpkg").expect("plugin"),
            wire::Target::All,
            now,
            chrono::Duration::seconds(60),
        ));
        let err = admit(&command, now).expect_err("a command");
        assert!(err.contains("does not take command messages"), "{err}");

        let result = |at, value| {
            Message::Result(wire::PluginResult {
                request_id: uuid::Uuid::from_u128(2),
                node: names::NodeName::new("web01").expect("node"),
                plugin: names::PluginName::new("hello").expect("plugin"),
                outcome: wire::Outcome::Ok,
                value: Some(value),
                truncated: false,
                collected_at: at,
                duration_ms: 1,
                agent_version: "0.1.0".into(),
                scheduled: None,
            })
        };
        let fine = serde_json::json!({"a": [1, 2]});
        assert_eq!(admit(&result(now, fine.clone()), now), Ok(()));
        // A little skew is a node's clock; a day ahead would win every merge for a day.
        let skewed = now + chrono::Duration::seconds(60);
        assert_eq!(admit(&result(skewed, fine.clone()), now), Ok(()));
        let future = now + chrono::Duration::days(1);
        let err = admit(&result(future, fine), now).expect_err("from the future");
        assert!(err.contains("ahead of the server's clock"), "{err}");
        let mut deep = serde_json::json!(1);
        for _ in 0..100 {
            deep = serde_json::json!([deep]);
        }
        let err = admit(&result(now, deep), now).expect_err("too deep");
        assert!(
            err.contains("value of plugin hello: it nests deeper"),
            "{err}"
        );
    }
}
