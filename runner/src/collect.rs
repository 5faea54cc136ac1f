//! One fan-out's bookkeeping as a state machine, with no I/O, so every rule is unit-tested
//! without a broker: which waves go out (one broadcast, one command per node, or `--batch`
//! waves with a pause between them), which nodes are expected (the registry answer may arrive
//! after a broadcast went out), who answered, which commands no queue took, and when a wave
//! and the whole query are done. The I/O loop in the crate root feeds it events (publish
//! outcomes, verified replies, the registry answer, timers, cancellation) and performs the
//! [`Step`] it answers with.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::Duration,
};

use tokio::time::Instant;
use vogeler_proto::{
    names::NodeName,
    signing::PublicKey,
    wire::{PluginResult, Target},
};

use crate::{BatchSize, Report};

/// Why a command no queue took is not waited for.
pub const NO_QUEUE: &str = "no agent queue: the agent never connected, or its queue expired";
/// Why a command a full queue refused is not waited for.
pub const QUEUE_FULL: &str = "the agent's queue is full: it has been offline for long";

/// What the broker did with one published command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// In a queue (or several).
    Queued,
    /// No queue is bound for the routing key.
    Unroutable,
    /// A queue refused it (an agent offline long enough for its bounded queue to fill).
    Refused,
}

/// What the I/O loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Publish these commands in order, tell each outcome with [`Collect::published`], then
    /// call [`Collect::sent`].
    Publish(Vec<Target>),
    /// Wait for replies, the registry answer or the wave's deadline.
    Wait { until: Instant },
    /// The wave is over but whom it expected is still unknown: wait for the registry answer.
    AwaitRegistry,
    /// Pause between waves, then [`Collect::pause_over`].
    Pause { until: Instant },
    /// The query is over: [`Collect::finish`].
    Done,
}

/// Each registered node's pinned key (base64), which its replies must be signed with.
pub type Keys = BTreeMap<NodeName, String>;

/// What the registry said, once it answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryAnswer {
    /// For a broadcast, the nodes expected to answer; `None` keeps the named ones.
    pub expected: Option<BTreeSet<NodeName>>,
    pub keys: Keys,
}

/// Something to show as the query goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// This many nodes are expected.
    Sent { expected: usize },
    /// A node answered (each node once).
    Reply(NodeName),
}

/// One fan-out in progress.
#[derive(Debug)]
pub struct Collect {
    report: Report,
    waves: VecDeque<Vec<Target>>,
    /// Waves in all, for logs.
    waves_total: usize,
    /// The nodes the current wave names (none for a broadcast).
    wave_nodes: Vec<NodeName>,
    /// Nodes asked (expected and not answered from stored values), when the query started.
    asked: Vec<NodeName>,
    timeout: Duration,
    pause: Duration,
    /// The pinned keys, once the registry answered (`None` until then).
    keys: Option<Keys>,
    /// Replies that arrived before the keys, judged when they come.
    held: Vec<(PluginResult, String)>,
    /// The current wave's broadcast went to no queue at all: nobody can answer it.
    nobody_listens: bool,
    cancelled: bool,
    deadline: Option<Instant>,
    notices: Vec<Notice>,
}

impl Collect {
    /// Plan the waves for `report.expected` (minus the nodes already in `report.cached`).
    /// `keys` is `None` while the registry is still being read: then [`Collect::registry`]
    /// tells the pinned keys (and, for a broadcast, whom to expect).
    pub fn new(
        mut report: Report,
        batch: Option<(BatchSize, Duration)>,
        timeout: Duration,
        keys: Option<Keys>,
    ) -> Self {
        // Named nodes are expected whatever the registry says.
        let registry_known = keys.is_some() || !report.broadcast;
        let asked: Vec<NodeName> = report
            .expected
            .iter()
            .filter(|n| !report.cached.contains_key(*n))
            .cloned()
            .collect();
        let waves: VecDeque<Vec<Target>> = match (&batch, report.broadcast) {
            (None, true) => [vec![Target::All]].into(),
            (None, false) => [asked.iter().cloned().map(Target::Node).collect()].into(),
            (Some((size, _)), _) => asked
                .chunks(size.of(asked.len()))
                .map(|c| c.iter().cloned().map(Target::Node).collect())
                .collect(),
        };
        // Batched, `all` means the registered nodes, each commanded by name.
        if batch.is_some() {
            report.broadcast = false;
        }
        let mut notices = Vec::new();
        if registry_known {
            notices.push(Notice::Sent {
                expected: report.expected.len(),
            });
        }
        Self {
            waves_total: waves.len(),
            waves,
            report,
            wave_nodes: Vec::new(),
            asked,
            timeout,
            pause: batch.map_or(Duration::ZERO, |(_, pause)| pause),
            keys,
            held: Vec::new(),
            nobody_listens: false,
            cancelled: false,
            deadline: None,
            notices,
        }
    }

    /// The report so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// `(current wave, waves in all)`, 1-based, for logs.
    pub fn wave(&self) -> (usize, usize) {
        (self.waves_total - self.waves.len(), self.waves_total)
    }

    /// What happened since the last call, to show.
    pub fn notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// The first step.
    pub fn start(&mut self) -> Step {
        self.next_wave()
    }

    fn next_wave(&mut self) -> Step {
        let Some(wave) = self.waves.pop_front() else {
            return Step::Done;
        };
        self.nobody_listens = false;
        self.wave_nodes = wave
            .iter()
            .filter_map(|t| match t {
                Target::Node(n) => Some(n.clone()),
                Target::All => None,
            })
            .collect();
        Step::Publish(wave)
    }

    /// What the broker did with the command for `target`.
    pub fn published(&mut self, target: &Target, delivered: Delivered) {
        let why = match delivered {
            Delivered::Queued => return,
            Delivered::Unroutable => NO_QUEUE,
            Delivered::Refused => QUEUE_FULL,
        };
        match target {
            Target::Node(n) => {
                self.report.undelivered.insert(n.clone(), why.to_string());
            }
            Target::All => {
                self.nobody_listens = true;
                for n in &self.asked {
                    self.report.undelivered.insert(n.clone(), why.to_string());
                }
            }
        }
    }

    /// Whether a broadcast of the current wave reached no queue (worth a warning).
    pub fn nobody_listens(&self) -> bool {
        self.nobody_listens
    }

    /// The wave is out: wait for it until `now` plus the timeout.
    pub fn sent(&mut self, now: Instant) -> Step {
        self.deadline = Some(now + self.timeout);
        self.after_event(now)
    }

    /// A reply whose signature checked out, with its signer (base64). It counts as the
    /// node's answer only when the signer is the node's pinned key; until the registry
    /// answered it is held. Replies to another request, and a node's second answer, are
    /// ignored.
    pub fn reply(&mut self, result: PluginResult, signer: &str, now: Instant) -> Step {
        if result.request_id == self.report.request_id {
            match &self.keys {
                Some(_) => self.judge(result, signer),
                None => self.held.push((result, signer.to_string())),
            }
        }
        self.after_event(now)
    }

    /// Count `result` as its node's answer, or report it as unverified.
    fn judge(&mut self, result: PluginResult, signer: &str) {
        let node = &result.node;
        let Some(keys) = &self.keys else {
            return;
        };
        let id = |b64: &str| {
            PublicKey::from_base64(b64).map_or_else(|| "(unreadable)".to_string(), |k| k.id())
        };
        let unverified = match keys.get(node) {
            Some(pinned) if pinned == signer => None,
            Some(pinned) => Some(format!(
                "signed by key {}, not the node's pinned key {}",
                id(signer),
                id(pinned)
            )),
            None => Some(format!(
                "signed by key {}, but the registry has no pinned key for this node yet",
                id(signer)
            )),
        };
        match unverified {
            None if !self.report.replies.contains_key(node) => {
                self.notices.push(Notice::Reply(node.clone()));
                self.report.replies.insert(node.clone(), result);
            }
            None => {}
            Some(why) => {
                self.report.unverified.entry(node.clone()).or_insert(why);
            }
        }
    }

    /// The registry answered: the pinned keys, and for a broadcast whom to expect.
    pub fn registry(&mut self, answer: RegistryAnswer, now: Instant) -> Step {
        let expected_known = self.registry_known();
        self.keys = Some(answer.keys);
        for (result, signer) in std::mem::take(&mut self.held) {
            self.judge(result, &signer);
        }
        if !expected_known {
            self.report.expected = answer.expected.unwrap_or_default();
            self.notices.push(Notice::Sent {
                expected: self.report.expected.len(),
            });
            if self.nobody_listens {
                for n in &self.report.expected {
                    self.report
                        .undelivered
                        .insert(n.clone(), NO_QUEUE.to_string());
                }
            }
        }
        match self.deadline {
            Some(_) => self.after_event(now),
            // Awaited after the wave ended (or before it began, for an empty plan).
            None => self.end_wave(now),
        }
    }

    /// Something that changes nothing arrived (a message for someone else): go on waiting,
    /// unless the deadline passed meanwhile.
    pub fn tick(&mut self, now: Instant) -> Step {
        self.after_event(now)
    }

    /// The wave's deadline passed.
    pub fn deadline(&mut self, now: Instant) -> Step {
        self.end_wave(now)
    }

    /// The pause between waves is over.
    pub fn pause_over(&mut self) -> Step {
        self.next_wave()
    }

    /// Shutdown: stop asking and waiting (the registry answer is still awaited, so the report
    /// knows whom it expected).
    pub fn cancelled(&mut self, now: Instant) -> Step {
        self.cancelled = true;
        self.end_wave(now)
    }

    /// The report, with how long the query took.
    pub fn finish(mut self, elapsed: Duration) -> Report {
        self.report.elapsed = elapsed;
        self.report
    }

    /// Whether whom to expect is known (named nodes, or the registry answered).
    fn registry_known(&self) -> bool {
        self.keys.is_some() || !self.report.broadcast
    }

    /// Whether the current wave still waits for someone.
    fn waiting(&self) -> bool {
        if self.nobody_listens {
            return false;
        }
        let r = &self.report;
        let pending = |n: &NodeName| !r.replies.contains_key(n) && !r.undelivered.contains_key(n);
        if r.broadcast {
            self.keys.is_none() || r.expected.is_empty() || r.expected.iter().any(pending)
        } else {
            self.wave_nodes.iter().any(pending)
        }
    }

    fn after_event(&mut self, now: Instant) -> Step {
        match self.deadline {
            Some(until) if self.waiting() && now < until => Step::Wait { until },
            _ => self.end_wave(now),
        }
    }

    fn end_wave(&mut self, now: Instant) -> Step {
        self.deadline = None;
        if self.keys.is_none() {
            return Step::AwaitRegistry;
        }
        if self.cancelled || self.waves.is_empty() {
            return Step::Done;
        }
        if self.pause.is_zero() {
            return self.next_wave();
        }
        Step::Pause {
            until: now + self.pause,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;
    use uuid::Uuid;
    use vogeler_proto::{names::PluginName, wire::Outcome};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn node(n: &str) -> NodeName {
        NodeName::new(n).expect("node")
    }

    fn nodes(names: &[&str]) -> BTreeSet<NodeName> {
        names.iter().map(|n| node(n)).collect()
    }

    fn report(broadcast: bool, expected: &[&str]) -> Report {
        Report {
            stale: 0,
            request_id: Uuid::from_u128(42),
            plugin: PluginName::new("dpkg").expect("plugin"),
            nodes: "test".into(),
            broadcast,
            expected: nodes(expected),
            replies: BTreeMap::new(),
            cached: BTreeMap::new(),
            undelivered: BTreeMap::new(),
            unverified: BTreeMap::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// The key every test node's replies are signed with (and pinned to).
    const K: &str = "test-key";

    fn keys() -> Keys {
        ('a'..='z')
            .map(|c| (node(&c.to_string()), K.to_string()))
            .collect()
    }

    fn answer(expected: &[&str]) -> RegistryAnswer {
        RegistryAnswer {
            expected: Some(nodes(expected)),
            keys: keys(),
        }
    }

    fn reply_from(n: &str, request: u128) -> PluginResult {
        PluginResult {
            request_id: Uuid::from_u128(request),
            node: node(n),
            plugin: PluginName::new("dpkg").expect("plugin"),
            outcome: Outcome::Ok,
            value: Some(serde_json::json!([])),
            truncated: false,
            collected_at: Utc::now(),
            duration_ms: 1,
            agent_version: "1".into(),
            scheduled: None,
        }
    }

    /// Publish every target of a `Publish` step as `delivered`, then say it is sent.
    fn send(c: &mut Collect, step: Step, now: Instant, delivered: Delivered) -> Step {
        let Step::Publish(targets) = step else {
            panic!("expected a publish, got {step:?}")
        };
        for t in &targets {
            c.published(t, delivered);
        }
        c.sent(now)
    }

    #[test]
    fn a_broadcast_is_done_when_every_registered_node_answered() {
        let now = Instant::now();
        let mut c = Collect::new(report(true, &["a", "b"]), None, TIMEOUT, Some(keys()));
        let step = c.start();
        assert_eq!(step, Step::Publish(vec![Target::All]));
        let step = send(&mut c, step, now, Delivered::Queued);
        assert_eq!(
            step,
            Step::Wait {
                until: now + TIMEOUT
            }
        );
        assert!(matches!(
            c.reply(reply_from("a", 42), K, now),
            Step::Wait { .. }
        ));
        assert_eq!(c.reply(reply_from("b", 42), K, now), Step::Done);
        assert_eq!(
            c.notices(),
            vec![
                Notice::Sent { expected: 2 },
                Notice::Reply(node("a")),
                Notice::Reply(node("b"))
            ]
        );
        let r = c.finish(Duration::from_secs(1));
        assert_eq!(r.replies.len(), 2);
        assert!(r.missing().is_empty());
    }

    #[test]
    fn a_broadcast_is_not_done_before_the_registry_answered() {
        let now = Instant::now();
        let mut c = Collect::new(report(true, &[]), None, TIMEOUT, None);
        let step = c.start();
        let step = send(&mut c, step, now, Delivered::Queued);
        assert!(matches!(step, Step::Wait { .. }));
        // A reply before the registry: held (its key is not known yet), still waiting.
        assert!(matches!(
            c.reply(reply_from("a", 42), K, now),
            Step::Wait { .. }
        ));
        assert_eq!(c.notices(), vec![]);
        assert!(matches!(
            c.registry(answer(&["a", "b"]), now),
            Step::Wait { .. }
        ));
        assert_eq!(
            c.notices(),
            vec![Notice::Reply(node("a")), Notice::Sent { expected: 2 }]
        );
        assert_eq!(c.reply(reply_from("b", 42), K, now), Step::Done);
    }

    #[test]
    fn a_reply_not_signed_by_the_pinned_key_is_never_the_nodes_answer() {
        let now = Instant::now();
        let mut c = Collect::new(report(false, &["a", "b"]), None, TIMEOUT, None);
        let step = c.start();
        send(&mut c, step, now, Delivered::Queued);
        // A rogue answers as `a` first, and as `zz` (a name the registry has no key for).
        c.reply(reply_from("a", 42), "rogue-key", now);
        let mut stranger = reply_from("b", 42);
        stranger.node = node("zz");
        c.reply(stranger, "rogue-key", now);
        c.registry(
            RegistryAnswer {
                expected: None,
                keys: keys(),
            },
            now,
        );
        let r = c.report();
        assert!(r.replies.is_empty(), "{:?}", r.replies);
        assert!(r.unverified[&node("a")].contains("not the node's pinned key"));
        assert!(r.unverified[&node("zz")].contains("no pinned key for this node yet"));
        // The real `a` still counts; the wave ends when both named nodes answered.
        c.reply(reply_from("a", 42), K, now);
        assert_eq!(c.reply(reply_from("b", 42), K, now), Step::Done);
        let r = c.report();
        assert_eq!(r.replies.len(), 2);
        assert!(r.missing().is_empty());
        assert!(
            r.render_table()
                .contains("unverified reply as a (not shown)")
        );
    }

    #[test]
    fn without_the_registry_every_reply_is_unverified() {
        let now = Instant::now();
        let mut c = Collect::new(report(false, &["a"]), None, TIMEOUT, None);
        let step = c.start();
        send(&mut c, step, now, Delivered::Queued);
        c.reply(reply_from("a", 42), K, now);
        // The registry could not be read: no keys.
        c.registry(RegistryAnswer::default(), now);
        assert_eq!(c.deadline(now + TIMEOUT), Step::Done);
        let r = c.report();
        assert_eq!(r.missing(), vec![&node("a")]);
        assert!(r.unverified.contains_key(&node("a")));
    }

    #[test]
    fn a_broadcast_with_nobody_registered_waits_for_the_timeout() {
        let now = Instant::now();
        let mut c = Collect::new(report(true, &[]), None, TIMEOUT, Some(keys()));
        let step = c.start();
        let step = send(&mut c, step, now, Delivered::Queued);
        assert_eq!(
            step,
            Step::Wait {
                until: now + TIMEOUT
            }
        );
        // Any agent answering is welcome; still waiting until the deadline.
        assert!(matches!(
            c.reply(reply_from("x", 42), K, now),
            Step::Wait { .. }
        ));
        assert_eq!(c.deadline(now + TIMEOUT), Step::Done);
    }

    #[test]
    fn an_unroutable_broadcast_marks_every_node_undelivered_and_waits_for_nobody() {
        let now = Instant::now();
        let mut c = Collect::new(report(true, &["a", "b"]), None, TIMEOUT, Some(keys()));
        let step = c.start();
        assert_eq!(send(&mut c, step, now, Delivered::Unroutable), Step::Done);
        assert!(c.nobody_listens());
        let r = c.finish(Duration::ZERO);
        assert_eq!(r.undelivered.len(), 2);
        assert_eq!(r.undelivered[&node("a")], NO_QUEUE);
    }

    #[test]
    fn an_unroutable_broadcast_before_the_registry_marks_the_registered_nodes() {
        let now = Instant::now();
        let mut c = Collect::new(report(true, &[]), None, TIMEOUT, None);
        let step = c.start();
        assert_eq!(
            send(&mut c, step, now, Delivered::Unroutable),
            Step::AwaitRegistry
        );
        assert_eq!(c.registry(answer(&["a"]), now), Step::Done);
        assert_eq!(c.report().undelivered[&node("a")], NO_QUEUE);
    }

    #[test]
    fn named_nodes_that_no_queue_or_a_full_queue_took_are_not_waited_for() {
        let now = Instant::now();
        let mut c = Collect::new(report(false, &["a", "b", "c"]), None, TIMEOUT, Some(keys()));
        let Step::Publish(targets) = c.start() else {
            panic!()
        };
        assert_eq!(targets.len(), 3);
        c.published(&targets[0], Delivered::Unroutable);
        c.published(&targets[1], Delivered::Refused);
        c.published(&targets[2], Delivered::Queued);
        assert!(matches!(c.sent(now), Step::Wait { .. }));
        assert_eq!(c.reply(reply_from("c", 42), K, now), Step::Done);
        let r = c.finish(Duration::ZERO);
        assert_eq!(r.undelivered[&node("a")], NO_QUEUE);
        assert_eq!(r.undelivered[&node("b")], QUEUE_FULL);
    }

    #[test]
    fn duplicates_and_replies_to_other_requests_are_ignored() {
        let now = Instant::now();
        let mut c = Collect::new(report(false, &["a", "b"]), None, TIMEOUT, Some(keys()));
        let step = c.start();
        send(&mut c, step, now, Delivered::Queued);
        c.notices();
        assert!(matches!(
            c.reply(reply_from("a", 7), K, now),
            Step::Wait { .. }
        ));
        assert!(c.notices().is_empty(), "another request's reply");
        let mut first = reply_from("a", 42);
        first.duration_ms = 111;
        c.reply(first, K, now);
        c.reply(reply_from("a", 42), K, now);
        assert_eq!(c.notices(), vec![Notice::Reply(node("a"))]);
        assert_eq!(
            c.report().replies[&node("a")].duration_ms,
            111,
            "the first one"
        );
    }

    #[test]
    fn the_timeout_leaves_the_silent_nodes_missing() {
        let now = Instant::now();
        let mut c = Collect::new(report(false, &["a", "b"]), None, TIMEOUT, Some(keys()));
        let step = c.start();
        send(&mut c, step, now, Delivered::Queued);
        c.reply(reply_from("a", 42), K, now);
        assert_eq!(c.deadline(now + TIMEOUT), Step::Done);
        let r = c.finish(TIMEOUT);
        assert_eq!(r.missing(), vec![&node("b")]);
    }

    #[test]
    fn a_reply_after_the_deadline_ends_the_wait() {
        let now = Instant::now();
        let mut c = Collect::new(report(false, &["a", "b"]), None, TIMEOUT, Some(keys()));
        let step = c.start();
        send(&mut c, step, now, Delivered::Queued);
        assert_eq!(c.reply(reply_from("a", 42), K, now + TIMEOUT), Step::Done);
    }

    #[test]
    fn batches_go_out_one_after_the_other_with_the_pause_between() {
        let now = Instant::now();
        let pause = Duration::from_secs(2);
        let mut c = Collect::new(
            report(true, &["a", "b", "c"]),
            Some((BatchSize::Nodes(2), pause)),
            TIMEOUT,
            Some(keys()),
        );
        assert!(
            !c.report().broadcast,
            "batched, all means each node by name"
        );
        let step = c.start();
        assert_eq!(
            step,
            Step::Publish(vec![Target::Node(node("a")), Target::Node(node("b"))])
        );
        assert_eq!(c.wave(), (1, 2));
        send(&mut c, step, now, Delivered::Queued);
        c.reply(reply_from("a", 42), K, now);
        // b never answers: the wave ends at its deadline, then the pause.
        let later = now + TIMEOUT;
        assert_eq!(
            c.deadline(later),
            Step::Pause {
                until: later + pause
            }
        );
        let step = c.pause_over();
        assert_eq!(step, Step::Publish(vec![Target::Node(node("c"))]));
        assert_eq!(c.wave(), (2, 2));
        send(&mut c, step, later + pause, Delivered::Queued);
        assert_eq!(c.reply(reply_from("c", 42), K, later + pause), Step::Done);
    }

    #[test]
    fn a_percentage_batch_without_a_pause_goes_on_at_once() {
        let now = Instant::now();
        let mut c = Collect::new(
            report(false, &["a", "b", "c", "d"]),
            Some((BatchSize::Percent(50), Duration::ZERO)),
            TIMEOUT,
            Some(keys()),
        );
        let step = c.start();
        let Step::Publish(first) = &step else {
            panic!()
        };
        assert_eq!(first.len(), 2);
        send(&mut c, step, now, Delivered::Queued);
        c.reply(reply_from("a", 42), K, now);
        let next = c.reply(reply_from("b", 42), K, now);
        assert_eq!(
            next,
            Step::Publish(vec![Target::Node(node("c")), Target::Node(node("d"))])
        );
    }

    #[test]
    fn cancel_stops_after_the_registry_answered() {
        let now = Instant::now();
        let mut c = Collect::new(report(true, &[]), None, TIMEOUT, None);
        let step = c.start();
        send(&mut c, step, now, Delivered::Queued);
        assert_eq!(c.cancelled(now), Step::AwaitRegistry);
        assert_eq!(c.registry(answer(&["a"]), now), Step::Done);
        let mut b = Collect::new(
            report(false, &["a", "b"]),
            Some((BatchSize::Nodes(1), Duration::from_secs(5))),
            TIMEOUT,
            Some(keys()),
        );
        let step = b.start();
        send(&mut b, step, now, Delivered::Queued);
        assert_eq!(b.cancelled(now), Step::Done, "no further wave");
    }

    #[test]
    fn cached_nodes_are_not_asked() {
        let now = Instant::now();
        let mut r = report(false, &["a", "b"]);
        r.cached.insert(
            node("a"),
            crate::report::Cached {
                value: serde_json::json!(1),
                collected_at: Utc::now(),
            },
        );
        let mut c = Collect::new(r, None, TIMEOUT, Some(keys()));
        let step = c.start();
        assert_eq!(step, Step::Publish(vec![Target::Node(node("b"))]));
        send(&mut c, step, now, Delivered::Queued);
        assert_eq!(c.reply(reply_from("b", 42), K, now), Step::Done);
    }

    #[test]
    fn nothing_to_ask_is_done_at_once() {
        let now = Instant::now();
        let mut c = Collect::new(report(false, &[]), None, TIMEOUT, Some(keys()));
        let step = c.start();
        assert_eq!(send(&mut c, step, now, Delivered::Queued), Step::Done);
        let mut batched = Collect::new(
            report(false, &[]),
            Some((BatchSize::Nodes(5), Duration::ZERO)),
            TIMEOUT,
            Some(keys()),
        );
        assert_eq!(batched.start(), Step::Done);
    }
}
