//! The wire format: every message that crosses the broker, in one place.
//!
//! Each message is a JSON object `{"schema": 1, "kind": "...", ...}`. The schema version is
//! checked before anything else so that a message from a newer release is refused with a
//! clear reason instead of a confusing field error. Unknown fields are ignored: adding an
//! optional field is compatible, anything else bumps [`SCHEMA_VERSION`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::names::{NodeName, PluginName};

/// The schema version this release reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

// The size limits live with the other limits; re-exported where messages are decoded.
pub use crate::limits::{MAX_COMMAND_BYTES, MAX_MESSAGE_BYTES, MAX_VALUE_BYTES};

/// Every message Vogeler sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Runner → agents: run one plugin.
    Command(Command),
    /// Agent → server and runner: what a plugin run produced.
    Result(PluginResult),
    /// Agent → server: "I exist", sent when an agent (re)connects.
    Announce(Announce),
}

impl Message {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Command(_) => "command",
            Message::Result(_) => "result",
            Message::Announce(_) => "announce",
        }
    }
}

/// Which nodes a command is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every agent of the collective.
    All,
    /// One node by name.
    Node(NodeName),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::Node(n) => write!(f, "{n}"),
        }
    }
}

/// A request to run one configured plugin. It carries no arguments: an agent runs only what
/// its own plugin files define.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Ties results to the request; also the idempotency key in the node document.
    pub request_id: Uuid,
    pub plugin: PluginName,
    pub target: Target,
    pub issued_at: DateTime<Utc>,
    /// An agent that receives the command after this does not run it (it was offline too
    /// long for the answer to matter to whoever asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Command {
    /// A command issued at `issued_at` that expires `ttl` later (a TTL past the end of
    /// time gives no expiry, which agents refuse).
    pub fn new(
        request_id: Uuid,
        plugin: PluginName,
        target: Target,
        issued_at: DateTime<Utc>,
        ttl: chrono::TimeDelta,
    ) -> Self {
        Self {
            request_id,
            plugin,
            target,
            issued_at,
            expires_at: issued_at.checked_add_signed(ttl),
        }
    }
}

/// How a plugin run ended. `status` is what the runner shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Exit 0 and the output parsed in the plugin's format.
    Ok,
    /// The plugin exited non-zero or was killed by a signal.
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
        stderr_tail: String,
    },
    /// Exit 0, but the output did not parse in the plugin's format.
    InvalidOutput { format: String, error: String },
    /// The plugin ran past its timeout; its whole process group was killed.
    TimedOut { timeout_ms: u64 },
    /// The program could not be started (not found, not executable, ...).
    FailedToStart { error: String },
    /// The agent has no plugin of that name.
    UnknownPlugin,
    /// A scheduled run whose value has the hash of the value this agent last published for
    /// the plugin: the value is left out. Only scheduled runs send it; a server that does
    /// not hold that value ignores it and gets the value in full with the agent's next full
    /// result (see `agent.full_every`). A release before this variant refuses it (to the
    /// dead letters) rather than storing an empty value: upgrade servers first.
    Unchanged { hash: String },
}

impl Outcome {
    /// Whether the run succeeded and its output parsed (a value, or "unchanged").
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Unchanged { .. })
    }
    /// The `status` tag, for tables and metadata.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed { .. } => "failed",
            Outcome::InvalidOutput { .. } => "invalid_output",
            Outcome::TimedOut { .. } => "timed_out",
            Outcome::FailedToStart { .. } => "failed_to_start",
            Outcome::UnknownPlugin => "unknown_plugin",
            Outcome::Unchanged { .. } => "unchanged",
        }
    }
    /// The exit code when the process exited on its own.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Outcome::Ok | Outcome::Unchanged { .. } | Outcome::InvalidOutput { .. } => Some(0),
            Outcome::Failed { exit_code, .. } => *exit_code,
            _ => None,
        }
    }
    /// A one-line explanation for anything but `ok`.
    pub fn error_text(&self) -> Option<String> {
        match self {
            Outcome::Ok | Outcome::Unchanged { .. } => None,
            Outcome::Failed {
                exit_code,
                signal,
                stderr_tail,
            } => {
                let how = match (exit_code, signal) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    (None, None) => "ended abnormally".to_string(),
                };
                let tail = stderr_tail.trim();
                Some(if tail.is_empty() {
                    how
                } else {
                    format!("{how}: {tail}")
                })
            }
            Outcome::InvalidOutput { format, error } => {
                Some(format!("output is not valid {format}: {error}"))
            }
            Outcome::TimedOut { timeout_ms } => Some(format!("timed out after {timeout_ms} ms")),
            Outcome::FailedToStart { error } => Some(format!("failed to start: {error}")),
            Outcome::UnknownPlugin => Some("no such plugin on this node".to_string()),
        }
    }
}

/// What one plugin run on one node produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginResult {
    pub request_id: Uuid,
    pub node: NodeName,
    pub plugin: PluginName,
    pub outcome: Outcome,
    /// The parsed output; present only when `outcome` is `ok`. A plugin whose output is
    /// JSON `null` has `Some(Null)`, which must survive the trip (found by proptest).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub value: Option<Value>,
    /// The output hit the agent's cap and was cut before parsing.
    #[serde(default)]
    pub truncated: bool,
    pub collected_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub agent_version: String,
    /// Present when the agent's own schedule ran the plugin (no command asked): the
    /// request id is then the agent's own, and no runner waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<Schedule>,
}

/// How a scheduled run's plugin is scheduled on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The plugin's interval on this node: the server marks the plugin overdue when no run
    /// is stored within twice this.
    pub interval_s: u64,
}

/// A present field, even `null`, is `Some`; an absent one is `None` (via `default`).
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A plugin an agent offers, with a hash of its definition so changes are visible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub name: PluginName,
    pub hash: String,
}

/// Sent by an agent when it connects, when its plugins change, and as a heartbeat, so the
/// server knows the node exists and when it was last seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    pub node: NodeName,
    pub agent_version: String,
    pub plugins: Vec<PluginInfo>,
    pub started_at: DateTime<Utc>,
    pub sent_at: DateTime<Utc>,
    /// A few facts about the node (OS, kernel, architecture), for targeting and views.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub facts: serde_json::Map<String, Value>,
    /// The announced plugins the agent runs on a schedule, with each interval in seconds, so
    /// the server stops expecting runs of one whose schedule was turned off. `None` from
    /// agents that did not say (before 0.1.0's scheduling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedules: Option<std::collections::BTreeMap<String, u64>>,
    /// The announced plugins that declared themselves package inventories (`packages = ...`
    /// in their files), with their version order, so the package index and `has` cover them
    /// as they cover `dpkg` and `rpms` (package inventories by name, never listed here unless
    /// declared). `None` from agents that did not say (before 0.1.0's declarations), which
    /// cannot load a file that declares one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<std::collections::BTreeMap<String, crate::version::Scheme>>,
}

/// Why a message was refused. The text goes into logs (and later the dead-letter reason).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {size} bytes is larger than the {limit} byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("message repeats a key or is not JSON: {0}")]
    Ambiguous(#[source] serde_json::Error),
    #[error("expected a command, got a {0} message")]
    NotACommand(&'static str),
    #[error("message is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("message has no schema version")]
    NoSchema,
    #[error("message has schema version {0}, this release reads {SCHEMA_VERSION}; upgrade it")]
    UnsupportedSchema(u64),
    #[error("message does not match schema {SCHEMA_VERSION}: {0}")]
    Invalid(#[source] serde_json::Error),
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    schema: u32,
    #[serde(flatten)]
    message: &'a Message,
}

/// The slow path's shape (the schema field is checked separately, and ignored here).
#[derive(Deserialize)]
struct Envelope {
    #[serde(flatten)]
    message: Message,
}

#[derive(Deserialize)]
struct SchemaProbe {
    schema: Option<Value>,
}

/// The two fields that say how to read the rest; every other field is skipped.
#[derive(Deserialize)]
struct Header {
    schema: Option<Value>,
    kind: Option<String>,
}

/// Serialize a message with the current schema version.
pub fn encode(message: &Message) -> Vec<u8> {
    let env = EnvelopeRef {
        schema: SCHEMA_VERSION,
        message,
    };
    // Serializing these types cannot fail: every map key is a string.
    serde_json::to_vec(&env).unwrap_or_else(|e| unreachable!("wire encode: {e}"))
}

/// Parse and validate a message received from the broker.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    // The common case: read the schema and kind first (the rest is skipped without
    // allocating), then parse the body straight into its type. Going through `Envelope`
    // (flatten + an internally tagged enum) buffers the whole message twice before building
    // it, which made decoding the largest share of the server's CPU on 50 KiB results.
    if let Ok(Header {
        schema: Some(Value::Number(n)),
        kind: Some(kind),
    }) = serde_json::from_slice::<Header>(bytes)
        && n.as_u64() == Some(u64::from(SCHEMA_VERSION))
    {
        let parsed = match kind.as_str() {
            "command" => serde_json::from_slice(bytes).map(Message::Command),
            "result" => serde_json::from_slice(bytes).map(Message::Result),
            "announce" => serde_json::from_slice(bytes).map(Message::Announce),
            // An unknown kind: the slow path below says so in serde's words.
            _ => serde_json::from_slice::<Envelope>(bytes).map(|e| e.message),
        };
        return parsed.map_err(WireError::Invalid);
    }
    let probe: SchemaProbe = serde_json::from_slice(bytes).map_err(WireError::NotJson)?;
    match probe.schema {
        None => Err(WireError::NoSchema),
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {
            serde_json::from_slice::<Envelope>(bytes)
                .map(|e| e.message)
                .map_err(WireError::Invalid)
        }
        Some(Value::Number(n)) => Err(WireError::UnsupportedSchema(n.as_u64().unwrap_or(0))),
        Some(_) => Err(WireError::NoSchema),
    }
}

/// Parse a command strictly: size-capped, and refused when any object repeats a key
/// (parsers disagree on which copy wins, and a signed command must mean one thing).
pub fn decode_command(bytes: &[u8]) -> Result<Command, WireError> {
    if bytes.len() > MAX_COMMAND_BYTES {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: MAX_COMMAND_BYTES,
        });
    }
    serde_json::from_slice::<unique::Unique>(bytes).map_err(WireError::Ambiguous)?;
    match decode(bytes)? {
        Message::Command(c) => Ok(c),
        other => Err(WireError::NotACommand(other.kind())),
    }
}

/// A JSON walker that fails on a repeated object key at any depth.
mod unique {
    use std::collections::HashSet;

    use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

    pub struct Unique;

    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(UniqueVisitor)
        }
    }

    struct UniqueVisitor;

    impl<'de> Visitor<'de> for UniqueVisitor {
        type Value = Unique;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
            while a.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = a.next_key::<String>()? {
                if !seen.insert(key.clone()) {
                    return Err(A::Error::custom(format!("duplicate key {key:?}")));
                }
                a.next_value::<Unique>()?;
            }
            Ok(Unique)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The decoder before the fast path: one parse through `Envelope`, schema checked after.
    fn decode_via_envelope(bytes: &[u8]) -> Option<Message> {
        let probe: SchemaProbe = serde_json::from_slice(bytes).ok()?;
        match probe.schema {
            Some(Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {
                serde_json::from_slice::<Envelope>(bytes)
                    .ok()
                    .map(|e| e.message)
            }
            _ => None,
        }
    }

    /// Valid messages of each kind, as field -> raw JSON, for the differential test to mutate.
    fn bases() -> Vec<Vec<(&'static str, &'static str)>> {
        vec![
            vec![
                ("schema", "1"),
                ("kind", r#""command""#),
                ("request_id", r#""8b0c6f0e-3b8e-4d4f-9b7e-0c1d2e3f4a5b""#),
                ("plugin", r#""dpkg""#),
                ("target", r#""all""#),
                ("issued_at", r#""2026-11-22T10:00:00Z""#),
                ("expires_at", r#""2026-11-22T11:00:00Z""#),
            ],
            vec![
                ("schema", "1"),
                ("kind", r#""result""#),
                ("request_id", r#""8b0c6f0e-3b8e-4d4f-9b7e-0c1d2e3f4a5b""#),
                ("node", r#""web01""#),
                ("plugin", r#""dpkg""#),
                ("outcome", r#"{"status":"ok"}"#),
                ("value", r#"[1,2,{"a":null}]"#),
                ("collected_at", r#""2026-11-22T10:00:00Z""#),
                ("duration_ms", "12"),
                ("agent_version", r#""0.1.0""#),
            ],
            vec![
                ("schema", "1"),
                ("kind", r#""announce""#),
                ("node", r#""web01""#),
                ("agent_version", r#""0.1.0""#),
                ("plugins", "[]"),
                ("started_at", r#""2026-11-22T10:00:00Z""#),
                ("sent_at", r#""2026-11-22T10:00:00Z""#),
            ],
        ]
    }

    /// A JSON object from field names and raw JSON values, in the given order.
    fn object<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
        let members: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", members.join(","))
    }

    proptest::proptest! {
        /// The fast path accepts exactly what the old path accepted, with the same result:
        /// valid messages of every kind with fields replaced, added and removed at random.
        #[test]
        fn fast_decode_agrees_with_the_envelope_path(
            base in 0usize..3,
            changes in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "schema", "kind", "request_id", "node", "plugin", "target", "issued_at",
                        "expires_at", "outcome", "value", "truncated", "collected_at",
                        "duration_ms", "agent_version", "plugins", "started_at", "sent_at",
                        "facts", "extra",
                    ]),
                    proptest::option::of(proptest::sample::select(vec![
                        "1", "2", r#""1""#, "null", r#""command""#, r#""result""#,
                        r#""announce""#, r#""nonsense""#, r#""web01""#, r#""all""#,
                        r#"{"node":"web01"}"#, r#""2026-11-22T10:00:00Z""#,
                        r#"{"status":"ok"}"#, "[1,2]", "false", "[]", "{}",
                    ])),
                ),
                0..4,
            )
        ) {
            let mut fields: BTreeMap<&str, &str> = bases()[base].iter().copied().collect();
            for (key, value) in changes {
                match value {
                    Some(v) => fields.insert(key, v),
                    None => fields.remove(key),
                };
            }
            let body = object(fields);
            let fast = decode(body.as_bytes()).ok();
            proptest::prop_assert_eq!(&fast, &decode_via_envelope(body.as_bytes()), "{}", body);
        }
    }

    #[test]
    fn the_differential_bases_decode() {
        for fields in bases() {
            let body = object(fields);
            assert!(decode(body.as_bytes()).is_ok(), "{body}");
        }
    }

    fn ts(s: &str) -> DateTime<Utc> {
        s.parse().expect("timestamp")
    }

    fn golden(name: &str) -> String {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn command() -> Message {
        Message::Command(Command {
            request_id: "7d0b8a39-52a4-4d3c-9a9f-6a0d1f0c2b11"
                .parse()
                .expect("uuid"),
            plugin: PluginName::new("rpms").expect("name"),
            target: Target::All,
            issued_at: ts("2026-11-22T05:00:00Z"),
            expires_at: Some(ts("2026-11-22T06:00:00Z")),
        })
    }

    fn result() -> Message {
        Message::Result(PluginResult {
            request_id: "7d0b8a39-52a4-4d3c-9a9f-6a0d1f0c2b11"
                .parse()
                .expect("uuid"),
            node: NodeName::new("web01").expect("name"),
            plugin: PluginName::new("hello").expect("name"),
            outcome: Outcome::Ok,
            value: Some(serde_json::json!(["alpha", "beta"])),
            truncated: false,
            collected_at: ts("2026-11-22T05:00:01Z"),
            duration_ms: 12,
            agent_version: "0.1.0".into(),
            scheduled: None,
        })
    }

    fn announce() -> Message {
        Message::Announce(Announce {
            node: NodeName::new("web01").expect("name"),
            agent_version: "0.1.0".into(),
            plugins: vec![PluginInfo {
                name: PluginName::new("hello").expect("name"),
                hash: "sha256:00ff".into(),
            }],
            started_at: ts("2026-11-22T04:59:00Z"),
            sent_at: ts("2026-11-22T04:59:01Z"),
            facts: serde_json::json!({"kernel": "6.1.0", "os": {"family": "Debian"}})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            schedules: None,
            packages: None,
        })
    }

    #[test]
    fn golden_round_trips() {
        for (msg, file) in [
            (command(), "command.json"),
            (result(), "result.json"),
            (announce(), "announce.json"),
        ] {
            let fixture = golden(file);
            let want: Value = serde_json::from_str(&fixture).expect("fixture json");
            let got: Value = serde_json::from_slice(&encode(&msg)).expect("encoded json");
            assert_eq!(
                got, want,
                "encoding of {file} changed: the wire format is an interface"
            );
            assert_eq!(decode(fixture.as_bytes()).expect(file), msg);
        }
    }

    #[test]
    fn failure_outcomes_round_trip() {
        for outcome in [
            Outcome::Failed {
                exit_code: Some(3),
                signal: None,
                stderr_tail: "boom".into(),
            },
            Outcome::InvalidOutput {
                format: "json".into(),
                error: "line 1".into(),
            },
            Outcome::TimedOut { timeout_ms: 500 },
            Outcome::FailedToStart {
                error: "rpm: not found".into(),
            },
            Outcome::UnknownPlugin,
        ] {
            let Message::Result(mut r) = result() else {
                unreachable!()
            };
            r.outcome = outcome;
            r.value = None;
            let msg = Message::Result(r);
            assert_eq!(decode(&encode(&msg)).expect("decode"), msg);
        }
    }

    #[test]
    fn refuses_bad_input_with_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe", "not JSON"),
            (b"{\"kind\":\"command\"}", "no schema"),
            (b"{\"schema\":2,\"kind\":\"command\"}", "schema version 2"),
            (b"{\"schema\":\"1\"}", "no schema"),
            (
                b"{\"schema\":1,\"kind\":\"launch_missiles\"}",
                "does not match",
            ),
            (b"[1,2,3]", "not JSON"),
        ];
        for (bytes, want) in cases {
            let err = decode(bytes).expect_err("must be refused").to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let bad_node = golden("result.json").replace("\"web01\"", "\"_design/x\"");
        let err = decode(bad_node.as_bytes())
            .expect_err("bad node")
            .to_string();
        assert!(err.contains("node name"), "{err}");
    }

    #[test]
    fn commands_are_decoded_strictly() {
        let fixture = golden("command.json");
        assert_eq!(
            decode_command(fixture.as_bytes())
                .map(Message::Command)
                .ok(),
            Some(command())
        );
        for dup in [
            fixture.replace("\"plugin\"", "\"plugin\": \"evil\", \"plugin\""),
            fixture.replace("\"schema\"", "\"schema\": 1, \"schema\""),
            fixture.replace("{", "{\"x\": {\"a\": 1, \"a\": 2},"),
        ] {
            let err = decode_command(dup.as_bytes()).expect_err(&dup).to_string();
            assert!(err.contains("duplicate key"), "{err}");
        }
        let big = format!("{}{}", " ".repeat(MAX_COMMAND_BYTES), fixture);
        assert!(matches!(
            decode_command(big.as_bytes()),
            Err(WireError::TooLarge { .. })
        ));
        let result = golden("result.json");
        assert!(matches!(
            decode_command(result.as_bytes()),
            Err(WireError::NotACommand("result"))
        ));
    }

    #[test]
    fn declared_package_plugins_are_announced_by_order_name() {
        let Message::Announce(mut a) = announce() else {
            unreachable!()
        };
        a.packages = Some(BTreeMap::from([(
            "pip".into(),
            crate::version::Scheme::Rpm,
        )]));
        let msg = Message::Announce(a);
        let json: Value = serde_json::from_slice(&encode(&msg)).expect("json");
        assert_eq!(json["packages"], serde_json::json!({"pip": "rpm"}));
        assert_eq!(decode(&encode(&msg)).expect("decode"), msg);
    }

    #[test]
    fn unknown_fields_are_ignored_for_compatibility() {
        let newer = golden("command.json").replace("{", "{\"added_later\":true,");
        assert_eq!(decode(newer.as_bytes()).expect("decode"), command());
    }
}
