//! The gate every command passes before anything runs: size, signature by a trusted key,
//! strict parsing, time window, target and the key's restrictions. Pure (no I/O), so every
//! rule is unit-tested and fuzzed; the replay cache and the plugin catalog are checked by the
//! agent, which owns them.

use std::time::Duration;

use crate::{
    names::NodeName,
    signing::{self, AuthorizedKeys, Purpose, SignError},
    wire::{self, Command, Target, WireError},
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Why a command was refused. [`Rejection::class`] names the kind for counters and the
/// audit log; `Display` is the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("command of {size} bytes is over the {limit} byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Signature(SignError),
    #[error("signed by key {0}, which is not in this agent's authorized keys")]
    UnknownKey(String),
    #[error("{0}")]
    Malformed(String),
    #[error("command has no expiry time; runners always set one")]
    NoExpiry,
    #[error("command is valid for {ttl_s}s, longer than agent.max_command_ttl ({max_s}s)")]
    TtlTooLong { ttl_s: i64, max_s: u64 },
    #[error("command expired at {expires_at} (now {now}, clock skew allowance {skew_s}s)")]
    Expired {
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        skew_s: u64,
    },
    #[error(
        "command issued at {issued_at} is in the future (now {now}); allowed clock skew is {skew_s}s: check the runner's and this node's clocks"
    )]
    FromTheFuture {
        issued_at: DateTime<Utc>,
        now: DateTime<Utc>,
        skew_s: u64,
    },
    #[error("command is for node {0}")]
    OtherNode(NodeName),
    #[error("request {0} was already received (replay)")]
    Replayed(Uuid),
    #[error(
        "the replay cache holds {limit} request ids that have not expired yet, its limit: new commands are refused until some expire. Someone with a runner key is sending commands faster than they expire (the audit log's accepted lines name the key); remove that key, or lower agent.max_command_ttl"
    )]
    ReplayCacheFull { limit: usize },
    #[error("{0}")]
    Denied(String),
    /// Authentic and well-formed, for a plugin this node lacks: the command is kept so the
    /// agent can answer "no such plugin".
    #[error("no plugin {} on this node", .0.plugin)]
    UnknownPlugin(Box<Command>),
}

impl Rejection {
    /// Every name [`Rejection::class`] gives, for counters and docs.
    pub const CLASSES: [&'static str; 13] = [
        "too_large",
        "unsigned",
        "bad_signature",
        "unknown_key",
        "malformed",
        "bad_ttl",
        "expired",
        "future",
        "other_node",
        "replayed",
        "replay_cache_full",
        "denied",
        "unknown_plugin",
    ];

    /// A stable name for the kind of rejection.
    pub fn class(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::Signature(SignError::Unsigned) => "unsigned",
            Rejection::Signature(_) => "bad_signature",
            Rejection::UnknownKey(_) => "unknown_key",
            Rejection::Malformed(_) => "malformed",
            Rejection::NoExpiry | Rejection::TtlTooLong { .. } => "bad_ttl",
            Rejection::Expired { .. } => "expired",
            Rejection::FromTheFuture { .. } => "future",
            Rejection::OtherNode(_) => "other_node",
            Rejection::Replayed(_) => "replayed",
            Rejection::ReplayCacheFull { .. } => "replay_cache_full",
            Rejection::Denied(_) => "denied",
            Rejection::UnknownPlugin(_) => "unknown_plugin",
        }
    }
}

/// Where a command came from and what it claims, as far as the checks got: the audit log
/// records it for accepted and refused commands alike.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub request_id: Option<Uuid>,
    /// The signer's key id, once the signature checked out.
    pub key_id: Option<String>,
    pub plugin: Option<String>,
}

/// The rules of one agent.
#[derive(Debug, Clone)]
pub struct Guard {
    pub node: NodeName,
    pub keys: AuthorizedKeys,
    pub max_clock_skew: Duration,
    pub max_ttl: Duration,
}

impl Guard {
    /// Check one delivery's body and signature headers at time `now`.
    pub fn check(
        &self,
        body: &[u8],
        key: Option<&str>,
        signature: Option<&str>,
        now: DateTime<Utc>,
        provenance: &mut Provenance,
    ) -> Result<Command, Rejection> {
        // Cheap checks first: nothing below the signature check looks at unsigned bytes.
        if body.len() > wire::MAX_COMMAND_BYTES {
            return Err(Rejection::TooLarge {
                size: body.len(),
                limit: wire::MAX_COMMAND_BYTES,
            });
        }
        let signer = signing::verify(Purpose::Command, body, key, signature)
            .map_err(Rejection::Signature)?;
        let Some(trusted) = self.keys.find(&signer) else {
            return Err(Rejection::UnknownKey(signer.id()));
        };
        provenance.key_id = Some(signer.id());
        let command = wire::decode_command(body).map_err(|e| match e {
            WireError::TooLarge { size, limit } => Rejection::TooLarge { size, limit },
            e => Rejection::Malformed(e.to_string()),
        })?;
        provenance.request_id = Some(command.request_id);
        provenance.plugin = Some(command.plugin.to_string());

        let skew = chrono::Duration::from_std(self.max_clock_skew).unwrap_or(chrono::Duration::MAX);
        let skew_s = self.max_clock_skew.as_secs();
        let Some(expires_at) = command.expires_at else {
            return Err(Rejection::NoExpiry);
        };
        let ttl = expires_at - command.issued_at;
        if ttl > chrono::Duration::from_std(self.max_ttl).unwrap_or(chrono::Duration::MAX) {
            return Err(Rejection::TtlTooLong {
                ttl_s: ttl.num_seconds(),
                max_s: self.max_ttl.as_secs(),
            });
        }
        if command.issued_at > now + skew {
            return Err(Rejection::FromTheFuture {
                issued_at: command.issued_at,
                now,
                skew_s,
            });
        }
        if expires_at + skew < now {
            return Err(Rejection::Expired {
                expires_at,
                now,
                skew_s,
            });
        }
        if let Target::Node(n) = &command.target
            && *n != self.node
        {
            return Err(Rejection::OtherNode(n.clone()));
        }
        trusted
            .permits(command.plugin.as_str(), self.node.as_str())
            .map_err(Rejection::Denied)?;
        Ok(command)
    }

    /// Until when a request id must be remembered to refuse replays of this command.
    pub fn remember_until(&self, command: &Command) -> DateTime<Utc> {
        command.expires_at.unwrap_or(command.issued_at)
            + chrono::Duration::from_std(self.max_clock_skew).unwrap_or(chrono::Duration::zero())
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        names::PluginName,
        signing::PrivateKey,
        wire::{Message, encode},
    };

    use super::*;

    struct Fixture {
        guard: Guard,
        runner: PrivateKey,
        now: DateTime<Utc>,
    }

    fn fixture(restriction: &str) -> Fixture {
        let runner = PrivateKey::generate().expect("key");
        let keys = AuthorizedKeys::parse(
            &format!("{restriction} {}", runner.public().to_line("test")),
            "test",
        )
        .expect("keys");
        Fixture {
            guard: Guard {
                node: NodeName::new("web01").expect("node"),
                keys,
                max_clock_skew: Duration::from_secs(60),
                max_ttl: Duration::from_secs(3600),
            },
            runner,
            now: "2026-11-22T08:00:00Z".parse().expect("time"),
        }
    }

    impl Fixture {
        fn command(&self, plugin: &str, target: Target, issued: i64, ttl: i64) -> Command {
            Command::new(
                Uuid::new_v4(),
                PluginName::new(plugin).expect("plugin"),
                target,
                self.now + chrono::Duration::seconds(issued),
                chrono::Duration::seconds(ttl),
            )
        }
        fn check_with(&self, key: &PrivateKey, c: &Command) -> Result<Command, Rejection> {
            let body = encode(&Message::Command(c.clone()));
            let (k, s) = key.sign(Purpose::Command, &body);
            self.guard.check(
                &body,
                Some(&k),
                Some(&s),
                self.now,
                &mut Provenance::default(),
            )
        }
        fn check(&self, c: &Command) -> Result<Command, Rejection> {
            self.check_with(&self.runner, c)
        }
    }

    #[test]
    fn accepts_a_valid_command() {
        let f = fixture("");
        let c = f.command("dpkg", Target::All, 0, 60);
        assert_eq!(f.check(&c), Ok(c.clone()));
        let c = f.command("dpkg", Target::Node(f.guard.node.clone()), -30, 60);
        assert_eq!(f.check(&c), Ok(c.clone()));
    }

    #[test]
    fn refuses_each_kind_of_bad_command() {
        let f = fixture("");
        let other = NodeName::new("db01").expect("node");
        let stranger = PrivateKey::generate().expect("key");
        let class = |r: Result<Command, Rejection>| r.expect_err("refused").class();
        assert_eq!(
            class(f.check_with(&stranger, &f.command("dpkg", Target::All, 0, 60))),
            "unknown_key"
        );
        assert_eq!(
            class(f.check(&f.command("dpkg", Target::All, -200, 60))),
            "expired"
        );
        assert_eq!(
            class(f.check(&f.command("dpkg", Target::All, 120, 60))),
            "future"
        );
        assert_eq!(
            class(f.check(&f.command("dpkg", Target::All, 0, 7200))),
            "bad_ttl"
        );
        assert_eq!(
            class(f.check(&f.command("dpkg", Target::Node(other), 0, 60))),
            "other_node"
        );
        let mut c = f.command("dpkg", Target::All, 0, 60);
        c.expires_at = None;
        assert_eq!(class(f.check(&c)), "bad_ttl");
        // Within the skew allowance both ways.
        assert!(f.check(&f.command("dpkg", Target::All, 50, 60)).is_ok());
        assert!(f.check(&f.command("dpkg", Target::All, -100, 60)).is_ok());
    }

    #[test]
    fn tampering_and_missing_signatures_are_refused() {
        let f = fixture("");
        let body = encode(&Message::Command(f.command("dpkg", Target::All, 0, 60)));
        let (k, s) = f.runner.sign(Purpose::Command, &body);
        let tampered = String::from_utf8(body.clone())
            .expect("utf8")
            .replace("dpkg", "evil")
            .into_bytes();
        let check = |b: &[u8], k: Option<&str>, s: Option<&str>| {
            f.guard
                .check(b, k, s, f.now, &mut Provenance::default())
                .expect_err("refused")
                .class()
        };
        assert_eq!(check(&tampered, Some(&k), Some(&s)), "bad_signature");
        assert_eq!(check(&body, None, None), "unsigned");
        assert_eq!(check(&body, Some(&k), None), "unsigned");
        let big = vec![b' '; wire::MAX_COMMAND_BYTES + 1];
        assert_eq!(check(&big, Some(&k), Some(&s)), "too_large");
        // Signed garbage is still garbage.
        let junk = b"\xff\xfe{";
        let (k, s) = f.runner.sign(Purpose::Command, junk);
        assert_eq!(check(junk, Some(&k), Some(&s)), "malformed");
    }

    #[test]
    fn every_class_is_listed_once() {
        let f = fixture("");
        let at = f.now;
        let all = [
            Rejection::TooLarge { size: 2, limit: 1 },
            Rejection::Signature(SignError::Unsigned),
            Rejection::Signature(SignError::BadKey),
            Rejection::UnknownKey("k".into()),
            Rejection::Malformed("m".into()),
            Rejection::NoExpiry,
            Rejection::TtlTooLong { ttl_s: 2, max_s: 1 },
            Rejection::Expired {
                expires_at: at,
                now: at,
                skew_s: 0,
            },
            Rejection::FromTheFuture {
                issued_at: at,
                now: at,
                skew_s: 0,
            },
            Rejection::OtherNode(f.guard.node.clone()),
            Rejection::Replayed(Uuid::nil()),
            Rejection::ReplayCacheFull { limit: 1 },
            Rejection::Denied("d".into()),
            Rejection::UnknownPlugin(Box::new(f.command("dpkg", Target::All, 0, 60))),
        ];
        let classes: std::collections::BTreeSet<&str> = all.iter().map(Rejection::class).collect();
        let listed: std::collections::BTreeSet<&str> = Rejection::CLASSES.into_iter().collect();
        assert_eq!(classes, listed);
        assert_eq!(listed.len(), Rejection::CLASSES.len(), "no class twice");
    }

    #[test]
    fn restrictions_deny_by_default() {
        let f = fixture("plugins=dpkg nodes=web*");
        assert!(f.check(&f.command("dpkg", Target::All, 0, 60)).is_ok());
        let err = f
            .check(&f.command("users", Target::All, 0, 60))
            .expect_err("denied");
        assert_eq!(err.class(), "denied");
        assert!(err.to_string().contains("plugins=dpkg"), "{err}");
        let mut f = fixture("nodes=db*");
        f.guard.node = NodeName::new("web01").expect("node");
        assert_eq!(
            f.check(&f.command("dpkg", Target::All, 0, 60))
                .expect_err("denied")
                .class(),
            "denied"
        );
    }
}
