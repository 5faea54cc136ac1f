//! Whether a command runs, and what its result says, as pure code unit-tested without a
//! broker: the consumer's [`Verify`] is the [`Guard`] (size, signature by a trusted key,
//! strict parsing, time window, target, restrictions); then [`admit`] checks the catalog and
//! records the request id in the replay cache, last, so only commands that would run are
//! remembered; [`result`] builds the signed answer with the value limit applied.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;
use vogeler_core::amqp::consume::{Raw, Verify};
use vogeler_proto::{
    guard::{Guard, Provenance, Rejection},
    limits::{self, MAX_VALUE_BYTES},
    names::NodeName,
    wire::{Command, Outcome, PluginResult},
};

use crate::replay::ReplayError;

/// The agent's trust boundary on its command queue: the guard, at the time of delivery.
#[derive(Debug, Clone)]
pub struct GuardCheck(pub Guard);

impl Verify for GuardCheck {
    type Message = (Command, Provenance);
    type Refusal = (Rejection, Provenance);

    fn verify(&self, raw: &Raw<'_>) -> Result<Self::Message, Self::Refusal> {
        let mut provenance = Provenance::default();
        match self.0.check(
            raw.body,
            raw.key,
            raw.signature,
            Utc::now(),
            &mut provenance,
        ) {
            Ok(command) => Ok((command, provenance)),
            Err(rejection) => Err((rejection, provenance)),
        }
    }
}

/// What to do with a command the guard let through.
#[derive(Debug)]
pub enum Admission {
    /// Run it once, then ack.
    Run(Command),
    /// The broker handing back a command this node took before a reconnect is not an attack:
    /// it ran (or is running) once already, and that is all it gets. Ack without running.
    AlreadyAccepted(Uuid),
    /// Refuse it (reject, not requeued: it would come straight back). An
    /// [`Rejection::UnknownPlugin`] is answered, so the runner can tell "no such plugin"
    /// from "no answer".
    Refuse(Rejection),
}

/// The checks after the guard, in order: the plugin exists here, then the request id is
/// recorded until `remember_until` by `record` (which says false for an id it already holds).
/// A replay cache that cannot record denies the command (without a durable record it could
/// be replayed later), and a full one refuses it as `replay_cache_full`.
pub fn admit(
    command: Command,
    redelivered: bool,
    has_plugin: bool,
    remember_until: DateTime<Utc>,
    record: impl FnOnce(Uuid, DateTime<Utc>) -> Result<bool, ReplayError>,
) -> Admission {
    if !has_plugin {
        return Admission::Refuse(Rejection::UnknownPlugin(Box::new(command)));
    }
    match record(command.request_id, remember_until) {
        Ok(true) => Admission::Run(command),
        Ok(false) if redelivered => Admission::AlreadyAccepted(command.request_id),
        Ok(false) => Admission::Refuse(Rejection::Replayed(command.request_id)),
        Err(ReplayError::Full { limit }) => Admission::Refuse(Rejection::ReplayCacheFull { limit }),
        Err(e @ ReplayError::Io(_)) => Admission::Refuse(Rejection::Denied(e.to_string())),
    }
}

/// What a plugin run produced, before it becomes a result.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub outcome: Outcome,
    pub value: Option<Value>,
    pub truncated: bool,
    pub duration: Duration,
}

impl Run {
    /// Nothing ran (an unknown plugin).
    pub fn nothing(outcome: Outcome) -> Self {
        Self {
            outcome,
            value: None,
            truncated: false,
            duration: Duration::ZERO,
        }
    }
}

/// The result of `command` on `node`. A value over [`MAX_VALUE_BYTES`] as JSON, or over
/// any other limit of [`limits::check_value`], is not sent: the outcome says so instead (in
/// the words of the plugin's `format`), since the broker or the server would refuse the
/// message and the run would be lost without a word.
pub fn result(
    node: &NodeName,
    command: &Command,
    run: Run,
    format: &str,
    agent_version: &str,
    collected_at: DateTime<Utc>,
) -> PluginResult {
    let asked = Asked {
        request_id: command.request_id,
        plugin: &command.plugin,
        scheduled: None,
    };
    result_for(node, asked, run, format, agent_version, collected_at)
}

/// What a result answers: a command, or the agent's own schedule.
#[derive(Debug, Clone)]
pub struct Asked<'a> {
    pub request_id: uuid::Uuid,
    pub plugin: &'a vogeler_proto::names::PluginName,
    pub scheduled: Option<vogeler_proto::wire::Schedule>,
}

/// [`result`] for a command or a scheduled run.
pub fn result_for(
    node: &NodeName,
    asked: Asked<'_>,
    mut run: Run,
    format: &str,
    agent_version: &str,
    collected_at: DateTime<Utc>,
) -> PluginResult {
    if let Some(v) = &run.value {
        let size = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        let refusal = if size > MAX_VALUE_BYTES {
            Some(format!(
                "value is {size} bytes as JSON, over the {} MiB limit of one result; lower max_output or narrow the output",
                MAX_VALUE_BYTES >> 20
            ))
        } else {
            limits::check_value(v)
                .err()
                .map(|e| format!("value is over a limit: {e}; narrow the output"))
        };
        if let Some(error) = refusal {
            run.value = None;
            run.outcome = Outcome::InvalidOutput {
                format: format.to_string(),
                error,
            };
        }
    }
    PluginResult {
        request_id: asked.request_id,
        node: node.clone(),
        plugin: asked.plugin.clone(),
        outcome: run.outcome,
        value: run.value,
        truncated: run.truncated,
        collected_at,
        duration_ms: u64::try_from(run.duration.as_millis()).unwrap_or(u64::MAX),
        agent_version: agent_version.to_string(),
        scheduled: asked.scheduled,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use vogeler_proto::{
        names::PluginName,
        signing::{AuthorizedKeys, PrivateKey, Purpose},
        wire::{self, Message, Target},
    };

    use super::*;

    struct Fixture {
        runner: PrivateKey,
        check: GuardCheck,
    }

    fn fixture() -> Fixture {
        let runner = PrivateKey::generate().expect("key");
        let keys = AuthorizedKeys::parse(&runner.public().to_line("ops"), "test").expect("keys");
        let guard = Guard {
            node: NodeName::new("web01").expect("node"),
            keys,
            max_clock_skew: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
        };
        Fixture {
            runner,
            check: GuardCheck(guard),
        }
    }

    fn command(target: Target, ttl_s: i64) -> Command {
        Command::new(
            Uuid::new_v4(),
            PluginName::new("dpkg").expect("plugin"),
            target,
            Utc::now(),
            chrono::Duration::seconds(ttl_s),
        )
    }

    fn verify(f: &Fixture, c: &Command, signer: &PrivateKey) -> Result<Command, Rejection> {
        let body = wire::encode(&Message::Command(c.clone()));
        let (key, signature) = signer.sign(Purpose::Command, &body);
        let raw = Raw {
            body: &body,
            key: Some(&key),
            signature: Some(&signature),
            redelivered: false,
        };
        f.check.verify(&raw).map(|(c, _)| c).map_err(|(r, _)| r)
    }

    #[test]
    fn the_guard_is_the_consumers_verifier() {
        let f = fixture();
        let c = command(Target::All, 60);
        assert_eq!(verify(&f, &c, &f.runner).expect("trusted"), c);
        let stranger = PrivateKey::generate().expect("key");
        assert_eq!(
            verify(&f, &c, &stranger).expect_err("stranger").class(),
            "unknown_key"
        );
        let other = command(Target::Node(NodeName::new("db01").expect("node")), 60);
        assert_eq!(
            verify(&f, &other, &f.runner)
                .expect_err("other node")
                .class(),
            "other_node"
        );
        let expired = Command::new(
            Uuid::new_v4(),
            PluginName::new("dpkg").expect("plugin"),
            Target::All,
            Utc::now() - chrono::Duration::hours(2),
            chrono::Duration::seconds(60),
        );
        assert_eq!(
            verify(&f, &expired, &f.runner)
                .expect_err("expired")
                .class(),
            "expired"
        );
        let raw = Raw {
            body: b"{}",
            key: None,
            signature: None,
            redelivered: false,
        };
        let (rejection, provenance) = f.check.verify(&raw).expect_err("unsigned");
        assert_eq!(rejection.class(), "unsigned");
        assert!(provenance.request_id.is_none());
    }

    #[test]
    fn the_provenance_of_a_refusal_names_the_signer_and_request() {
        let f = fixture();
        let c = command(Target::Node(NodeName::new("db01").expect("node")), 60);
        let body = wire::encode(&Message::Command(c.clone()));
        let (key, signature) = f.runner.sign(Purpose::Command, &body);
        let raw = Raw {
            body: &body,
            key: Some(&key),
            signature: Some(&signature),
            redelivered: false,
        };
        let (_, provenance) = f.check.verify(&raw).expect_err("other node");
        assert_eq!(provenance.request_id, Some(c.request_id));
        assert_eq!(provenance.key_id, Some(f.runner.public().id()));
        assert_eq!(provenance.plugin.as_deref(), Some("dpkg"));
    }

    /// A replay cache in memory: ids recorded with their deadline.
    fn cache() -> RefCell<Vec<(Uuid, DateTime<Utc>)>> {
        RefCell::default()
    }

    fn record(
        cache: &RefCell<Vec<(Uuid, DateTime<Utc>)>>,
    ) -> impl FnOnce(Uuid, DateTime<Utc>) -> Result<bool, ReplayError> + '_ {
        move |id, until| {
            let mut c = cache.borrow_mut();
            if c.iter().any(|(i, _)| *i == id) {
                return Ok(false);
            }
            c.push((id, until));
            Ok(true)
        }
    }

    #[test]
    fn a_good_command_runs_and_is_remembered_until_it_expires() {
        let f = fixture();
        let c = command(Target::All, 60);
        let until = f.check.0.remember_until(&c);
        let seen = cache();
        let a = admit(c.clone(), false, true, until, record(&seen));
        assert!(matches!(a, Admission::Run(ref run) if *run == c), "{a:?}");
        assert_eq!(*seen.borrow(), vec![(c.request_id, until)]);
        assert!(until >= c.expires_at.expect("expiry"), "kept past expiry");
    }

    #[test]
    fn a_replay_is_refused_and_a_redelivery_acked_without_running() {
        let c = command(Target::All, 60);
        let until = Utc::now();
        let seen = cache();
        assert!(matches!(
            admit(c.clone(), false, true, until, record(&seen)),
            Admission::Run(_)
        ));
        let again = admit(c.clone(), false, true, until, record(&seen));
        assert!(
            matches!(again, Admission::Refuse(Rejection::Replayed(id)) if id == c.request_id),
            "{again:?}"
        );
        let redelivered = admit(c.clone(), true, true, until, record(&seen));
        assert!(
            matches!(redelivered, Admission::AlreadyAccepted(id) if id == c.request_id),
            "{redelivered:?}"
        );
    }

    #[test]
    fn an_unknown_plugin_is_refused_answered_and_not_remembered() {
        let c = command(Target::All, 60);
        let seen = cache();
        let a = admit(c.clone(), false, false, Utc::now(), record(&seen));
        let Admission::Refuse(Rejection::UnknownPlugin(kept)) = a else {
            panic!("{a:?}")
        };
        assert_eq!(*kept, c, "kept whole, to answer it");
        assert!(
            seen.borrow().is_empty(),
            "a later run after a reload is not a replay"
        );
    }

    #[test]
    fn a_replay_cache_that_cannot_record_denies() {
        let c = command(Target::All, 60);
        let a = admit(c, false, true, Utc::now(), |_, _| {
            Err(std::io::Error::other("disk full").into())
        });
        let Admission::Refuse(rejection) = a else {
            panic!("{a:?}")
        };
        assert_eq!(rejection.class(), "denied");
        assert!(rejection.to_string().contains("disk full"), "{rejection}");
    }

    #[test]
    fn a_full_replay_cache_refuses_with_its_own_class() {
        let c = command(Target::All, 60);
        let a = admit(c.clone(), false, true, Utc::now(), |_, _| {
            Err(ReplayError::Full { limit: 7 })
        });
        let Admission::Refuse(rejection) = a else {
            panic!("{a:?}")
        };
        assert_eq!(rejection.class(), "replay_cache_full");
        assert!(
            rejection.to_string().contains("holds 7 request ids"),
            "{rejection}"
        );
        // A redelivery of what was accepted is still acked, full or not.
        let again = admit(c.clone(), true, true, Utc::now(), |_, _| Ok(false));
        assert!(matches!(again, Admission::AlreadyAccepted(id) if id == c.request_id));
    }

    #[test]
    fn a_result_carries_the_command_and_the_run() {
        let node = NodeName::new("web01").expect("node");
        let c = command(Target::All, 60);
        let at = Utc::now();
        let run = Run {
            outcome: Outcome::Ok,
            value: Some(serde_json::json!(["a", "b"])),
            truncated: true,
            duration: Duration::from_millis(1500),
        };
        let r = result(&node, &c, run, "lines", "9.9.9", at);
        assert_eq!(
            (r.request_id, &r.node, &r.plugin),
            (c.request_id, &node, &c.plugin)
        );
        assert_eq!(r.outcome, Outcome::Ok);
        assert_eq!(r.value, Some(serde_json::json!(["a", "b"])));
        assert!(r.truncated);
        assert_eq!(r.duration_ms, 1500);
        assert_eq!(r.agent_version, "9.9.9");
        assert_eq!(r.collected_at, at);
    }

    #[test]
    fn a_value_over_the_limit_is_replaced_by_the_reason() {
        let node = NodeName::new("web01").expect("node");
        let c = command(Target::All, 60);
        let run = Run {
            outcome: Outcome::Ok,
            value: Some(Value::String("x".repeat(MAX_VALUE_BYTES))),
            truncated: false,
            duration: Duration::ZERO,
        };
        let r = result(&node, &c, run, "string", "1", Utc::now());
        assert_eq!(r.value, None);
        let Outcome::InvalidOutput { format, error } = &r.outcome else {
            panic!("{:?}", r.outcome)
        };
        assert_eq!(format, "string");
        assert!(error.contains("over the 7 MiB limit"), "{error}");

        let mut deep = serde_json::json!("x");
        for _ in 0..=limits::MAX_VALUE_DEPTH {
            deep = serde_json::json!({ "k": deep });
        }
        let run = Run {
            outcome: Outcome::Ok,
            value: Some(deep),
            truncated: false,
            duration: Duration::ZERO,
        };
        let r = result(&node, &c, run, "json", "1", Utc::now());
        assert_eq!(r.value, None);
        let Outcome::InvalidOutput { error, .. } = &r.outcome else {
            panic!("{:?}", r.outcome)
        };
        assert!(error.contains("nests deeper than 64"), "{error}");
        // What the agent sends, the server admits.
        assert_eq!(limits::check_result(&r, Utc::now()), Ok(()));
    }

    #[test]
    fn an_unknown_plugin_result_has_no_value() {
        let node = NodeName::new("web01").expect("node");
        let c = command(Target::All, 60);
        let r = result(
            &node,
            &c,
            Run::nothing(Outcome::UnknownPlugin),
            "",
            "1",
            Utc::now(),
        );
        assert_eq!(r.outcome, Outcome::UnknownPlugin);
        assert_eq!((r.value, r.truncated, r.duration_ms), (None, false, 0));
    }
}
