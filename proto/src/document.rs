//! The node document: one CouchDB document per node, shared by server (writes) and runner
//! (reads).
//!
//! ```json
//! { "_id": "web01", "_rev": "...",
//!   "hello": ["alpha", "beta"],
//!   "vogeler": { "created_at": "...", "updated_at": "...", "last_seen": "...",
//!                "agent_version": "0.1.0",
//!                "plugins": { "hello": { "collected_at": "...", "request_id": "...",
//!                                        "outcome": "ok", "exit_code": 0,
//!                                        "duration_ms": 12, "hash": "sha256:..." } },
//!                "packages": { "pip": "rpm" } } }
//! ```
//! Plugin values sit at the top level so people browsing the database see them directly.
//! The merge rules here make writes idempotent and order-independent: a result already
//! applied (same request id) or older than the stored one changes nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::fresh::{Confirmation, Fresh, FreshDocument};
use crate::signing::PublicKey;
use crate::{
    names::{NodeName, RESERVED_PLUGIN_NAME},
    wire::{Announce, Outcome, PluginResult},
};

/// One node's document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeDocument {
    #[serde(rename = "_id")]
    pub id: String,
    /// Present on documents read from CouchDB; a write must carry it back.
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Plugin values by plugin name (and any other top-level fields, kept as they are).
    /// Written before the bookkeeping: CouchDB keeps the order it is given, so someone
    /// opening the document in Fauxton sees the inventory first.
    #[serde(flatten)]
    pub values: BTreeMap<String, Value>,
    /// Missing on documents someone created by hand; adopted with fresh metadata.
    #[serde(rename = "vogeler")]
    pub meta: NodeMeta,
}

/// Read as one JSON object whose entries are then moved into place: a derived
/// implementation with `#[serde(flatten)]` buffers the whole document (every package of
/// every plugin) into an intermediate tree first, which doubled the cost of reading large
/// documents.
impl<'de> Deserialize<'de> for NodeDocument {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = BTreeMap::<String, Value>::deserialize(d)?;
        let id = match fields.remove("_id") {
            Some(Value::String(id)) => id,
            Some(_) => return Err(D::Error::custom("_id is not a string")),
            None => return Err(D::Error::missing_field("_id")),
        };
        let rev = match fields.remove("_rev") {
            Some(Value::String(rev)) => Some(rev),
            None | Some(Value::Null) => None,
            Some(_) => return Err(D::Error::custom("_rev is not a string")),
        };
        let meta = match fields.remove("vogeler") {
            Some(v) => NodeMeta::deserialize(v).map_err(D::Error::custom)?,
            None => NodeMeta::adopted(),
        };
        Ok(Self {
            id,
            rev,
            meta,
            values: fields,
        })
    }
}

/// Vogeler's own bookkeeping, under the reserved `vogeler` key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Set when the document is first written, never changed.
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The newest time the node itself reported, as documents written before the freshness
    /// document ([`crate::fresh`]) recorded it; read as a floor, no longer written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginMeta>,
    /// The plugins the agent last announced, with the hash of each plugin file.
    #[serde(default)]
    pub agent_plugins: BTreeMap<String, String>,
    /// When the agent last announced itself (start, plugin change or heartbeat).
    #[serde(default)]
    pub announced_at: Option<DateTime<Utc>>,
    /// Facts the agent last announced (`os.family`, `kernel`, `arch`, ...).
    #[serde(default)]
    pub facts: serde_json::Map<String, Value>,
    /// The plugins the agent last announced it runs on a schedule, with their intervals in
    /// seconds: what readers expect runs of (see [`NodeDocument::interval_of`]). `None` from
    /// agents that do not say; their results' intervals count instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedules: Option<BTreeMap<String, u64>>,
    /// The announced plugins that declared themselves package inventories, with their version
    /// order (`"dpkg"` or `"rpm"`): what the package index and `has` cover besides `dpkg` and
    /// `rpms`, which are package inventories by name. Text, not [`Scheme`](crate::version::Scheme),
    /// so a document that a newer release wrote with another order still reads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packages: BTreeMap<String, String>,
    /// The node's public key (base64), pinned on first contact: results signed by any other
    /// key are refused. `vogeler-runner nodes forget` clears it for a reinstalled node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl NodeMeta {
    fn new(now: DateTime<Utc>) -> Self {
        Self {
            created_at: now,
            updated_at: now,
            last_seen: None,
            agent_version: None,
            plugins: BTreeMap::new(),
            agent_plugins: BTreeMap::new(),
            announced_at: None,
            facts: serde_json::Map::new(),
            schedules: None,
            packages: BTreeMap::new(),
            key: None,
        }
    }

    fn adopted() -> Self {
        Self::new(Utc::now())
    }
}

/// How and when a plugin's value was last collected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginMeta {
    pub collected_at: DateTime<Utc>,
    pub request_id: Uuid,
    /// The outcome's status (`ok`, `failed`, `timed_out`, ...).
    pub outcome: String,
    /// Why the last run failed; the stored value is then the last good one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    /// Content hash of the stored value, so changes are cheap to detect.
    pub hash: Option<String>,
    #[serde(default)]
    pub truncated: bool,
    /// When the stored value was collected (the last `ok` run), which after a failure is
    /// earlier than `collected_at`. Kept so that results merge to the same document in
    /// any order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_request_id: Option<Uuid>,
    /// The plugin's interval on this node, from its last scheduled run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
    /// When the next scheduled run is due: `collected_at` plus the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<DateTime<Utc>>,
    /// The newest scheduled run that found the stored value unchanged (and so sent none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<DateTime<Utc>>,
}

/// How many intervals a scheduled plugin may go without a stored run before it is overdue.
pub const OVERDUE_INTERVALS: i32 = 2;

impl PluginMeta {
    /// When a scheduled plugin becomes overdue: no run stored within twice its interval.
    pub fn overdue_at(&self) -> Option<DateTime<Utc>> {
        let interval = chrono::TimeDelta::try_seconds(i64::try_from(self.interval_s?).ok()?)?;
        self.collected_at
            .checked_add_signed(interval.checked_mul(OVERDUE_INTERVALS)?)
    }

    /// Whether a scheduled plugin is overdue at `now` (a plugin without a schedule never is).
    pub fn overdue(&self, now: DateTime<Utc>) -> bool {
        self.overdue_at().is_some_and(|at| now > at)
    }
}

/// One change of one plugin's value on one node, kept in the history database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unique per result, so writing it twice is a harmless conflict and two servers never
    /// fight over one document.
    #[serde(rename = "_id")]
    pub id: String,
    pub node: String,
    pub plugin: String,
    pub at: DateTime<Utc>,
    pub request_id: Uuid,
    pub old_hash: Option<String>,
    pub new_hash: String,
    pub old: Value,
    pub new: Value,
    /// Changes of this plugin's value on this node since the previous entry that were not
    /// recorded: a value that flaps faster than the server's history budget (see
    /// `vogeler-server`'s `budget` module) is kept current in the node document, but only so
    /// many of its changes an hour get an entry of their own.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unrecorded: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl HistoryEntry {
    /// `<node>:<plugin>:<time>:<request id>`: sorts by time within a node and plugin.
    pub fn id_for(node: &str, plugin: &str, at: DateTime<Utc>, request_id: Uuid) -> String {
        format!(
            "{node}:{plugin}:{}:{}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            request_id.simple()
        )
    }
}

/// Whether applying a message changed the document (and so needs a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Updated,
    Unchanged,
    /// A scheduled run said its value is unchanged, but this document does not hold that
    /// value (a new or restored database, a pruned or forgotten node, or a result lost on the
    /// way): nothing is recorded until the agent sends the value in full.
    Unconfirmed,
}

/// `sha256:<hex>` of a value's canonical JSON (object keys sorted), hashed as it is
/// serialized, without building the JSON text.
pub fn value_hash(v: &Value) -> String {
    struct Hasher(Sha256);
    impl std::io::Write for Hasher {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Hasher(Sha256::new());
    // Writing into a hasher cannot fail.
    let _ = serde_json::to_writer(&mut h, v);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in h.0.finalize() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether a stored stamp lies further ahead of the server's clock than any node's clock
/// may: the server refuses such stamps, so one already stored came from before that (or
/// from a hand edit), and anything newer in real time replaces it instead of losing to it
/// for good.
fn from_the_future(stored: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    stored > now + crate::limits::MAX_CLOCK_SKEW
}

/// Counts bytes written, so a document's size is known without building its JSON.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl NodeDocument {
    /// The document's size as CouchDB receives it (compact JSON), which is what its
    /// `max_document_size` limits.
    pub fn encoded_len(&self) -> usize {
        let mut c = Counter(0);
        // Writing into a counter cannot fail.
        let _ = serde_json::to_writer(&mut c, self);
        c.0
    }

    /// Whether this document takes a result for `plugin`: a plugin it has not stored yet
    /// needs a free key under [`crate::limits::MAX_PLUGINS_PER_DOCUMENT`].
    pub fn admits_plugin(&self, plugin: &str) -> Result<(), String> {
        let max = crate::limits::MAX_PLUGINS_PER_DOCUMENT;
        if self.meta.plugins.contains_key(plugin) || self.meta.plugins.len() < max {
            return Ok(());
        }
        Err(format!(
            "node {} already stores {max} plugins, the most one document holds; remove plugins from the node (or run: vogeler-runner nodes forget {})",
            self.id, self.id
        ))
    }

    /// A fresh document for a node seen for the first time.
    pub fn new(node: &NodeName, now: DateTime<Utc>) -> Self {
        Self {
            id: node.to_string(),
            rev: None,
            meta: NodeMeta::new(now),
            values: BTreeMap::new(),
        }
    }

    /// Check that `signer` (base64 public key) is this node's key, pinning it if the node has
    /// none yet. Returns whether the pin was set now (the document changed), or why the
    /// signer is refused.
    pub fn pin_key(&mut self, signer: &PublicKey) -> Result<bool, String> {
        let b64 = signer.to_base64();
        match &self.meta.key {
            None => {
                self.meta.key = Some(b64);
                Ok(true)
            }
            Some(pinned) if *pinned == b64 => Ok(false),
            Some(pinned) => Err(format!(
                "node {} is pinned to key {} but this message is signed by key {}; if the node was reinstalled, run: vogeler-runner nodes forget {}",
                self.id,
                PublicKey::from_base64(pinned).map_or_else(|| "(unreadable)".into(), |k| k.id()),
                signer.id(),
                self.id
            )),
        }
    }

    /// The stored value of a plugin.
    pub fn value(&self, plugin: &str) -> Option<&Value> {
        if plugin == RESERVED_PLUGIN_NAME {
            None
        } else {
            self.values.get(plugin)
        }
    }
}

/// What applying messages changed, and so which of a node's two documents need a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub document: bool,
    pub fresh: bool,
}

/// One document of a batch write: a node document or a freshness document.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Write {
    Node(NodeDocument),
    Fresh(FreshDocument),
}

/// A node as the server merges into it: its document and its freshness document
/// ([`crate::fresh`]). Heartbeats, unchanged scheduled runs and "last seen" go to the small
/// freshness document; the node document changes only when a value, a run's status, the
/// facts, the plugins or the key change.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub doc: NodeDocument,
    pub fresh: FreshDocument,
    written: Written,
    /// A confirmation was recorded: the freshness document must be written.
    confirmed: bool,
    /// `from_parts` moved the node document's last seen into a new freshness document.
    moved_last_seen: bool,
}

impl Node {
    /// A node seen for the first time.
    pub fn new(node: &NodeName, now: DateTime<Utc>) -> Self {
        Self::from_parts(NodeDocument::new(node, now), None)
    }

    /// A stored node. Without a freshness document (a database written before there were
    /// any), one starts from what the node document recorded.
    pub fn from_parts(mut doc: NodeDocument, fresh: Option<FreshDocument>) -> Self {
        let moved_last_seen = fresh.is_none() && doc.meta.last_seen.is_some();
        let fresh = fresh.unwrap_or_else(|| {
            let mut f = match NodeName::new(doc.id.clone()) {
                Ok(name) => FreshDocument::new(&name),
                Err(_) => FreshDocument {
                    id: format!("{}{}", crate::fresh::PREFIX, doc.id),
                    rev: None,
                    fresh: Fresh::default(),
                },
            };
            // Moved, so a stamp from the future there cannot outvote the freshness
            // document once the node document is next written.
            f.fresh.last_seen = doc.meta.last_seen.take();
            f.fresh.agent_version = doc.meta.agent_version.take();
            f.fresh.announced_at = doc.meta.announced_at;
            f
        });
        Self {
            doc,
            fresh,
            written: Written::default(),
            confirmed: false,
            moved_last_seen,
        }
    }

    /// Which documents the messages applied so far changed. When the node document is
    /// written anyway it carries last seen itself, and the freshness document is written
    /// only for confirmations, which only it holds: a changed value costs one write.
    pub fn written(&self) -> Written {
        let mut w = self.written;
        if w.document && !self.confirmed {
            w.fresh = false;
        }
        w
    }

    /// The documents to write for what the messages changed (see [`Node::written`]).
    pub fn into_writes(mut self) -> Vec<Write> {
        let w = self.written();
        if w.document {
            // Readers take the newer of the two documents' times, so this never goes back.
            self.doc.meta.last_seen = self.last_seen();
            self.doc.meta.agent_version = self.agent_version().map(str::to_string);
            self.doc.meta.announced_at = self.announced_at();
        }
        let mut out = Vec::new();
        if w.document {
            out.push(Write::Node(self.doc));
        }
        if w.fresh {
            out.push(Write::Fresh(self.fresh));
        }
        out
    }

    /// [`NodeDocument::pin_key`], noting a new pin as a change of the node document.
    pub fn pin_key(&mut self, signer: &PublicKey) -> Result<bool, String> {
        let pinned = self.doc.pin_key(signer)?;
        self.written.document |= pinned;
        Ok(pinned)
    }

    /// The newest time the node reported, from either document.
    pub fn last_seen(&self) -> Option<DateTime<Utc>> {
        self.fresh.fresh.last_seen.max(self.doc.meta.last_seen)
    }

    /// The agent version the node reported at [`Node::last_seen`].
    pub fn agent_version(&self) -> Option<&str> {
        if self.fresh.fresh.last_seen >= self.doc.meta.last_seen {
            self.fresh.fresh.agent_version.as_deref()
        } else {
            self.doc.meta.agent_version.as_deref()
        }
    }

    /// When the agent last announced itself, from either document.
    pub fn announced_at(&self) -> Option<DateTime<Utc>> {
        self.fresh
            .fresh
            .announced_at
            .max(self.doc.meta.announced_at)
    }

    /// The plugin's newest run, as readers see it: its stored status, or a later
    /// confirmation of its stored value.
    pub fn plugin(&self, plugin: &str) -> Option<PluginMeta> {
        let mut m = self.doc.meta.plugins.get(plugin)?.clone();
        if let Some(c) = self.fresh.fresh.plugins.get(plugin)
            && (c.confirmed_at, c.request_id) > (m.collected_at, m.request_id)
        {
            m.collected_at = c.confirmed_at;
            m.request_id = c.request_id;
            m.outcome = Outcome::Ok.status().to_string();
            m.error = None;
            m.exit_code = Some(0);
            m.confirmed_at = Some(c.confirmed_at);
        }
        // What is expected is what the agent last announced, whatever order runs arrive in.
        m.interval_s = self.doc.interval_of(plugin);
        m.next_due = m.interval_s.and_then(|i| next_due(m.collected_at, i));
        Some(m)
    }

    /// Note the node was seen at `at`; returns whether that changed anything.
    fn saw(&mut self, at: DateTime<Utc>, agent_version: &str, now: DateTime<Utc>) -> bool {
        // A stamp from the future would outvote every later one: it goes first (and the
        // document that stores it is written), then `at` is judged against what is left, so
        // a late message cannot move last seen back past a valid stamp.
        if self
            .doc
            .meta
            .last_seen
            .is_some_and(|t| from_the_future(t, now))
        {
            self.doc.meta.last_seen = None;
            self.doc.meta.agent_version = None;
            self.written.document = true;
        }
        if self
            .fresh
            .fresh
            .last_seen
            .is_some_and(|t| from_the_future(t, now))
        {
            self.fresh.fresh.last_seen = None;
            self.fresh.fresh.agent_version = None;
            self.written.fresh = true;
            // Moved there from the node document by `from_parts`, which still stores it.
            if self.moved_last_seen {
                self.written.document = true;
            }
        }
        // Ties go to the greater version string, so the order of arrival does not matter.
        let newer = self.last_seen().is_none_or(|seen| {
            seen < at || (seen == at && self.agent_version() < Some(agent_version))
        });
        if newer {
            self.fresh.fresh.last_seen = Some(at);
            self.fresh.fresh.agent_version = Some(agent_version.to_string());
            self.written.fresh = true;
        }
        newer
    }

    /// Merge one plugin result. A result already applied, or older than the stored one,
    /// changes nothing; a failed run keeps the last good value and records why it failed.
    pub fn apply_result(&mut self, r: &PluginResult, now: DateTime<Utc>) -> Change {
        self.apply_result_recording(r, now, &mut Vec::new())
    }

    /// [`Node::apply_result`], adding a [`HistoryEntry`] to `history` when the plugin's
    /// value changed from an earlier one.
    pub fn apply_result_recording(
        &mut self,
        r: &PluginResult,
        now: DateTime<Utc>,
        history: &mut Vec<HistoryEntry>,
    ) -> Change {
        if r.outcome == Outcome::UnknownPlugin {
            // Nothing was collected, and a typo in a runner command must not leave a key for
            // a plugin that does not exist in every document it reached.
            return if self.saw(r.collected_at, &r.agent_version, now) {
                Change::Updated
            } else {
                Change::Unchanged
            };
        }
        if let Outcome::Unchanged { hash } = &r.outcome {
            return self.confirm(r, hash, now);
        }
        let seen = self.saw(r.collected_at, &r.agent_version, now);
        let stored = self.doc.merge_result(r, now, history);
        if stored {
            self.written.document = true;
        }
        if stored || seen {
            Change::Updated
        } else {
            Change::Unchanged
        }
    }

    /// A scheduled run found the stored value unchanged: record it in the freshness
    /// document, never in the node document.
    fn confirm(&mut self, r: &PluginResult, hash: &str, now: DateTime<Utc>) -> Change {
        let key = r.plugin.as_str();
        let holds = self
            .doc
            .meta
            .plugins
            .get(key)
            .is_some_and(|p| p.hash.as_deref() == Some(hash))
            && self.doc.values.contains_key(key);
        // An unconfirmed one is not stored at all, not even as "seen".
        if !holds {
            return Change::Unconfirmed;
        }
        let Some(schedule) = &r.scheduled else {
            return Change::Unconfirmed;
        };
        let Some(latest) = self.plugin(key) else {
            return Change::Unconfirmed;
        };
        let stamp = (r.collected_at, r.request_id);
        let newer = stamp > (latest.collected_at, latest.request_id)
            || from_the_future(latest.collected_at, now);
        // Every newer confirmation is recorded: it costs a small document's write, and
        // skipping some would make the result depend on the order runs arrive in.
        if !newer {
            return Change::Unchanged;
        }
        self.fresh.fresh.plugins.insert(
            key.to_string(),
            Confirmation {
                confirmed_at: r.collected_at,
                request_id: r.request_id,
                interval_s: schedule.interval_s,
                next_due: next_due(r.collected_at, schedule.interval_s),
            },
        );
        self.written.fresh = true;
        self.confirmed = true;
        self.saw(r.collected_at, &r.agent_version, now);
        Change::Updated
    }

    /// Record an agent's announcement (plugins, facts, last seen); a repeated or older one
    /// changes nothing. A heartbeat that repeats the stored plugins and facts touches only
    /// the freshness document.
    pub fn apply_announce(&mut self, a: &Announce, now: DateTime<Utc>) -> Change {
        if self
            .announced_at()
            .is_some_and(|at| at >= a.sent_at && !from_the_future(at, now))
        {
            return Change::Unchanged;
        }
        if self
            .doc
            .meta
            .announced_at
            .is_some_and(|t| from_the_future(t, now))
        {
            self.doc.meta.announced_at = None;
            self.written.document = true;
        }
        self.fresh.fresh.announced_at = Some(a.sent_at);
        self.written.fresh = true;
        self.saw(a.sent_at, &a.agent_version, now);
        let plugins: BTreeMap<String, String> = a
            .plugins
            .iter()
            .map(|p| (p.name.to_string(), p.hash.clone()))
            .collect();
        // An agent that does not say has declared none: one from before declarations refuses
        // a plugin file that declares one. Reading `None` as "keep the stored ones" instead
        // would make the result depend on the order announcements arrive in.
        let packages: BTreeMap<String, String> = a
            .packages
            .iter()
            .flatten()
            .map(|(name, scheme)| (name.clone(), scheme.to_string()))
            .collect();
        let meta = &mut self.doc.meta;
        let mut changed = false;
        // Schedules and package declarations change with the announcement that says so (the
        // newest wins): a plugin removed, or with its schedule turned off, is no longer
        // expected.
        if meta.agent_plugins != plugins
            || meta.facts != a.facts
            || meta.schedules != a.schedules
            || meta.packages != packages
        {
            meta.agent_plugins = plugins;
            meta.facts = a.facts.clone();
            meta.schedules = a.schedules.clone();
            meta.packages = packages;
            meta.announced_at = Some(a.sent_at);
            changed = true;
        }
        if changed {
            meta.updated_at = now;
            self.written.document = true;
        }
        Change::Updated
    }
}

fn next_due(at: DateTime<Utc>, interval_s: u64) -> Option<DateTime<Utc>> {
    i64::try_from(interval_s)
        .ok()
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|i| at.checked_add_signed(i))
}

impl NodeDocument {
    /// The interval `plugin` is expected to run on: from the agent's announcement when it
    /// says which plugins it schedules (a plugin it no longer announces is expected on none),
    /// else from its last scheduled run.
    pub fn interval_of(&self, plugin: &str) -> Option<u64> {
        match &self.meta.schedules {
            Some(s) => s.get(plugin).copied(),
            None if self.meta.announced_at.is_some()
                && !self.meta.agent_plugins.contains_key(plugin) =>
            {
                None
            }
            None => self.meta.plugins.get(plugin)?.interval_s,
        }
    }

    /// Merge a result that carries a value or a failure (not an unchanged run) into the
    /// plugin's status and value; returns whether the document changed.
    fn merge_result(
        &mut self,
        r: &PluginResult,
        now: DateTime<Utc>,
        history: &mut Vec<HistoryEntry>,
    ) -> bool {
        let key = r.plugin.as_str();
        let stamp = (r.collected_at, r.request_id);
        let previous = self.meta.plugins.get(key).cloned();
        // Two last-writer-wins registers, ordered by (collected_at, request_id): the run's
        // status, and the value of the newest `ok` run. Any order of the same results, with
        // any duplicates, gives the same document.
        // A stored stamp too far ahead of this one (written before the server refused
        // future stamps, or by hand) loses, so it cannot freeze the plugin.
        let status_newer = previous.as_ref().is_none_or(|p| {
            stamp > (p.collected_at, p.request_id) || from_the_future(p.collected_at, now)
        });
        let value_stamp = previous
            .as_ref()
            .and_then(|p| Some((p.value_at?, p.value_request_id?)));
        let value_newer = matches!(r.outcome, Outcome::Ok)
            && value_stamp.is_none_or(|v| stamp > v || from_the_future(v.0, now));
        if !status_newer && !value_newer {
            return false;
        }
        let mut meta = previous.unwrap_or(PluginMeta {
            collected_at: r.collected_at,
            request_id: r.request_id,
            outcome: String::new(),
            error: None,
            exit_code: None,
            duration_ms: 0,
            hash: None,
            truncated: false,
            value_at: None,
            value_request_id: None,
            interval_s: None,
            next_due: None,
            confirmed_at: None,
        });
        if value_newer {
            let value = r.value.clone().unwrap_or(Value::Null);
            let hash = value_hash(&value);
            // The first value is not a change: the node document holds it already.
            if meta.hash.as_deref().is_some_and(|h| h != hash) {
                history.push(HistoryEntry {
                    id: HistoryEntry::id_for(&self.id, key, r.collected_at, r.request_id),
                    node: self.id.clone(),
                    plugin: key.to_string(),
                    at: r.collected_at,
                    request_id: r.request_id,
                    old_hash: meta.hash.clone(),
                    new_hash: hash.clone(),
                    old: self.values.get(key).cloned().unwrap_or(Value::Null),
                    new: value.clone(),
                    unrecorded: 0,
                });
            }
            self.values.insert(key.to_string(), value);
            meta.hash = Some(hash);
            meta.value_at = Some(r.collected_at);
            meta.value_request_id = Some(r.request_id);
        }
        if status_newer {
            meta.collected_at = r.collected_at;
            meta.request_id = r.request_id;
            meta.outcome = r.outcome.status().to_string();
            meta.error = r.outcome.error_text();
            meta.exit_code = r.outcome.exit_code();
            meta.duration_ms = r.duration_ms;
            meta.truncated = r.truncated;
            meta.confirmed_at = None;
            if let Some(schedule) = &r.scheduled {
                meta.interval_s = Some(schedule.interval_s);
                meta.next_due = next_due(r.collected_at, schedule.interval_s);
            }
        }
        self.meta.plugins.insert(key.to_string(), meta);
        self.meta.updated_at = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::PluginName;
    use serde_json::json;

    fn t(s: &str) -> DateTime<Utc> {
        format!("2026-11-22T05:00:{s}Z").parse().expect("time")
    }

    fn result(id: u128, at: &str, outcome: Outcome, value: Option<Value>) -> PluginResult {
        PluginResult {
            request_id: Uuid::from_u128(id),
            node: NodeName::new("web01").expect("node"),
            plugin: PluginName::new("hello").expect("plugin"),
            outcome,
            value,
            truncated: false,
            collected_at: t(at),
            duration_ms: 5,
            agent_version: "0.1.0".into(),
            scheduled: None,
        }
    }

    fn doc() -> Node {
        Node::new(&NodeName::new("web01").expect("node"), t("00"))
    }

    #[test]
    fn a_stamp_from_the_future_does_not_freeze_the_document() {
        // Stored by a release that believed node clocks (or by hand): year 2099.
        let mut d = doc();
        let future: DateTime<Utc> = "2099-01-01T00:00:00Z".parse().expect("time");
        let mut bad = result(1, "00", Outcome::Ok, Some(json!("frozen")));
        bad.collected_at = future;
        d.apply_result(&bad, future);
        assert_eq!(d.last_seen(), Some(future));
        // Real time goes on: a later run replaces the value, status and last seen time.
        let good = result(2, "03", Outcome::Ok, Some(json!("fresh")));
        assert_eq!(d.apply_result(&good, t("04")), Change::Updated);
        assert_eq!(d.doc.values["hello"], json!("fresh"));
        assert_eq!(d.doc.meta.plugins["hello"].collected_at, t("03"));
        assert_eq!(d.last_seen(), Some(t("03")));
        // An older run still loses to the newer one, as before.
        let older = result(3, "01", Outcome::Ok, Some(json!("older")));
        assert_eq!(d.apply_result(&older, t("04")), Change::Unchanged);
        assert_eq!(d.doc.values["hello"], json!("fresh"));
    }

    #[test]
    fn plugin_keys_per_document_are_capped() {
        let mut d = doc();
        for i in 0..crate::limits::MAX_PLUGINS_PER_DOCUMENT {
            let mut r = result(i as u128, "01", Outcome::Ok, Some(json!(i)));
            r.plugin = PluginName::new(format!("p{i}")).expect("plugin");
            assert_eq!(d.doc.admits_plugin(r.plugin.as_str()), Ok(()));
            d.apply_result(&r, t("02"));
        }
        assert_eq!(
            d.doc.admits_plugin("p0"),
            Ok(()),
            "a stored plugin can change"
        );
        let err = d.doc.admits_plugin("one-more").expect_err("full");
        assert!(err.contains("already stores 256 plugins"), "{err}");
        let encoded = serde_json::to_vec(&d.doc).expect("json").len();
        assert_eq!(d.doc.encoded_len(), encoded);
    }

    #[test]
    fn result_lands_under_plugin_key_with_metadata() {
        let mut d = doc();
        let r = result(1, "01", Outcome::Ok, Some(json!(["a", "b"])));
        assert_eq!(d.apply_result(&r, t("02")), Change::Updated);
        // A changed value is one write: the node document, carrying last seen itself.
        assert_eq!(
            d.written(),
            Written {
                document: true,
                fresh: false
            }
        );
        let writes = d.clone().into_writes();
        let [Write::Node(written)] = &writes[..] else {
            panic!("{writes:?}")
        };
        let v = serde_json::to_value(written).expect("json");
        assert_eq!(v["_id"], "web01");
        assert_eq!(v["hello"], json!(["a", "b"]));
        assert_eq!(v["vogeler"]["plugins"]["hello"]["outcome"], "ok");
        assert_eq!(v["vogeler"]["plugins"]["hello"]["exit_code"], 0);
        assert_eq!(v["vogeler"]["created_at"], "2026-11-22T05:00:00Z");
        assert_eq!(v["vogeler"]["last_seen"], "2026-11-22T05:00:01Z");
        assert!(v.get("_rev").is_none());
        let back: NodeDocument = serde_json::from_value(v).expect("round trip");
        assert_eq!(&back, written);
    }

    #[test]
    fn duplicates_and_old_results_change_nothing() {
        let mut d = doc();
        let first = result(1, "05", Outcome::Ok, Some(json!(1)));
        d.apply_result(&first, t("06"));
        let snapshot = d.clone();
        assert_eq!(d.apply_result(&first, t("07")), Change::Unchanged);
        assert_eq!(
            d.apply_result(&result(2, "04", Outcome::Ok, Some(json!(0))), t("07")),
            Change::Unchanged
        );
        assert_eq!(d, snapshot);
    }

    #[test]
    fn order_of_delivery_does_not_matter() {
        let a = result(1, "01", Outcome::Ok, Some(json!("old")));
        let b = result(2, "02", Outcome::Ok, Some(json!("new")));
        let (mut d1, mut d2) = (doc(), doc());
        for r in [&a, &b, &a] {
            d1.apply_result(r, t("09"));
        }
        for r in [&b, &a, &b] {
            d2.apply_result(r, t("09"));
        }
        assert_eq!(d1, d2);
        assert_eq!(d1.doc.value("hello"), Some(&json!("new")));
    }

    #[test]
    fn failure_keeps_last_good_value() {
        let mut d = doc();
        d.apply_result(&result(1, "01", Outcome::Ok, Some(json!(["a"]))), t("01"));
        let good_hash = d.doc.meta.plugins["hello"].hash.clone();
        let failed = Outcome::Failed {
            exit_code: Some(2),
            signal: None,
            stderr_tail: "nope".into(),
        };
        assert_eq!(
            d.apply_result(&result(2, "02", failed, None), t("02")),
            Change::Updated
        );
        assert_eq!(d.doc.value("hello"), Some(&json!(["a"])));
        let meta = &d.doc.meta.plugins["hello"];
        assert_eq!(meta.outcome, "failed");
        assert_eq!(meta.exit_code, Some(2));
        assert_eq!(meta.error.as_deref(), Some("exit code 2: nope"));
        assert_eq!(meta.hash, good_hash);
    }

    #[test]
    fn announce_updates_last_seen_once() {
        let mut d = doc();
        let a = Announce {
            node: NodeName::new("web01").expect("node"),
            agent_version: "0.2.0".into(),
            plugins: vec![],
            started_at: t("01"),
            sent_at: t("03"),
            facts: Default::default(),
            schedules: None,
            packages: None,
        };
        assert_eq!(d.apply_announce(&a, t("04")), Change::Updated);
        assert_eq!(d.apply_announce(&a, t("05")), Change::Unchanged);
        assert_eq!(d.last_seen(), Some(t("03")));
        assert_eq!(d.agent_version(), Some("0.2.0"));
    }

    #[test]
    fn unknown_plugin_adds_no_key() {
        let mut d = doc();
        // Only "last seen" moves, and only once.
        let unknown = result(1, "01", Outcome::UnknownPlugin, None);
        assert_eq!(d.apply_result(&unknown, t("02")), Change::Updated);
        assert_eq!(d.apply_result(&unknown, t("03")), Change::Unchanged);
        assert!(d.doc.meta.plugins.is_empty());
        assert!(d.doc.values.is_empty());
    }

    #[test]
    fn value_changes_are_recorded_once_each() {
        let mut d = doc();
        let mut history = vec![];
        for (id, at, v) in [
            (1, "01", json!(["a"])),
            (2, "02", json!(["a"])),
            (3, "03", json!(["a", "b"])),
            (3, "03", json!(["a", "b"])),
        ] {
            d.apply_result_recording(&result(id, at, Outcome::Ok, Some(v)), t("09"), &mut history);
        }
        let failed = Outcome::Failed {
            exit_code: Some(1),
            signal: None,
            stderr_tail: String::new(),
        };
        d.apply_result_recording(&result(4, "04", failed, None), t("09"), &mut history);
        assert_eq!(
            history.len(),
            1,
            "one real change, recorded once: {history:#?}"
        );
        assert_eq!(
            (history[0].old.clone(), history[0].new.clone()),
            (json!(["a"]), json!(["a", "b"]))
        );
        assert_eq!(history[0].old_hash, Some(value_hash(&json!(["a"]))));
        assert!(
            history[0]
                .id
                .starts_with("web01:hello:2026-11-22T05:00:03.000Z:"),
            "{}",
            history[0].id
        );
    }

    #[test]
    fn announce_after_a_newer_result_still_records_plugins_and_facts() {
        let mut d = doc();
        d.apply_result(&result(1, "05", Outcome::Ok, Some(json!(1))), t("06"));
        let a = Announce {
            node: NodeName::new("web01").expect("node"),
            agent_version: "0.1.0".into(),
            plugins: vec![crate::wire::PluginInfo {
                name: PluginName::new("hello").expect("p"),
                hash: "sha256:1".into(),
            }],
            started_at: t("01"),
            sent_at: t("02"),
            facts: json!({"kernel": "6.1"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            schedules: None,
            packages: None,
        };
        assert_eq!(d.apply_announce(&a, t("07")), Change::Updated);
        assert_eq!(
            d.doc.meta.agent_plugins.get("hello").map(String::as_str),
            Some("sha256:1")
        );
        assert_eq!(d.doc.meta.facts["kernel"], "6.1");
        assert_eq!(d.last_seen(), Some(t("05")), "last_seen never goes back");
    }

    #[test]
    fn hash_is_canonical() {
        assert_eq!(
            value_hash(&json!({"b": 1, "a": 2})),
            value_hash(&json!({"a": 2, "b": 1}))
        );
        assert!(value_hash(&json!(null)).starts_with("sha256:"));
    }

    fn scheduled(mut r: PluginResult, interval_s: u64) -> PluginResult {
        r.scheduled = Some(crate::wire::Schedule { interval_s });
        r
    }

    #[test]
    fn an_unchanged_run_confirms_the_value_without_history_or_rewrite() {
        let mut d = doc();
        let v = json!(["alpha"]);
        let full = scheduled(result(1, "00", Outcome::Ok, Some(v.clone())), 10);
        let mut history = Vec::new();
        assert_eq!(
            d.apply_result_recording(&full, t("00"), &mut history),
            Change::Updated
        );
        let hash = value_hash(&v);
        // As the server reads it back: nothing written yet.
        let mut d = Node::from_parts(d.doc.clone(), Some(d.fresh.clone()));
        let stored = d.doc.clone();
        // Half an interval later or more: the confirmation is recorded, in the freshness
        // document only.
        let same = scheduled(
            result(2, "10", Outcome::Unchanged { hash: hash.clone() }, None),
            10,
        );
        assert_eq!(
            d.apply_result_recording(&same, t("10"), &mut history),
            Change::Updated
        );
        assert!(history.is_empty(), "{history:?}");
        assert_eq!(
            d.written(),
            Written {
                document: false,
                fresh: true
            }
        );
        assert_eq!(d.doc, stored, "the node document is not rewritten");
        assert_eq!(d.last_seen(), Some(t("10")));
        let m = d.plugin("hello").expect("plugin");
        assert_eq!(m.collected_at, t("10"));
        assert_eq!(m.confirmed_at, Some(t("10")));
        assert_eq!(m.value_at, Some(t("00")), "the value is the one sent at 00");
        assert_eq!(m.outcome, "ok");
        assert_eq!(m.next_due, Some(t("20")));
        assert_eq!(m.interval_s, Some(10));
        // An older confirmation, arriving late, changes nothing; a newer one is recorded.
        let mut d = Node::from_parts(d.doc.clone(), Some(d.fresh.clone()));
        let late = scheduled(
            result(3, "05", Outcome::Unchanged { hash: hash.clone() }, None),
            10,
        );
        assert_eq!(
            d.apply_result_recording(&late, t("14"), &mut history),
            Change::Unchanged
        );
        assert_eq!(d.written(), Written::default());
        let soon = scheduled(result(4, "14", Outcome::Unchanged { hash }, None), 10);
        assert_eq!(
            d.apply_result_recording(&soon, t("14"), &mut history),
            Change::Updated
        );
        assert_eq!(d.plugin("hello").expect("plugin").collected_at, t("14"));
    }

    #[test]
    fn a_failure_and_a_confirmation_in_either_order_give_the_same_node() {
        let v = json!(["alpha"]);
        let full = scheduled(result(1, "00", Outcome::Ok, Some(v.clone())), 10);
        let failed = scheduled(
            result(
                2,
                "10",
                Outcome::Failed {
                    exit_code: Some(1),
                    signal: None,
                    stderr_tail: String::new(),
                },
                None,
            ),
            10,
        );
        let same = scheduled(
            result(
                3,
                "20",
                Outcome::Unchanged {
                    hash: value_hash(&v),
                },
                None,
            ),
            10,
        );
        let (mut a, mut b) = (doc(), doc());
        for r in [&full, &failed, &same] {
            a.apply_result(r, t("30"));
        }
        for r in [&full, &same, &failed, &same] {
            b.apply_result(r, t("30"));
        }
        assert_eq!((&a.doc, &a.fresh), (&b.doc, &b.fresh));
        // The newest run (20) found the value unchanged: ok, after the failure at 10.
        let m = a.plugin("hello").expect("plugin");
        assert_eq!((m.outcome.as_str(), m.collected_at), ("ok", t("20")));
        // A failure after the confirmation wins in turn.
        let later = scheduled(
            result(
                4,
                "30",
                Outcome::Failed {
                    exit_code: Some(1),
                    signal: None,
                    stderr_tail: String::new(),
                },
                None,
            ),
            10,
        );
        a.apply_result(&later, t("31"));
        assert_eq!(a.plugin("hello").expect("plugin").outcome, "failed");
    }

    fn announce(at: &str, facts: Value, schedules: Option<&[(&str, u64)]>) -> Announce {
        Announce {
            node: NodeName::new("web01").expect("node"),
            agent_version: "0.1.0".into(),
            plugins: vec![crate::wire::PluginInfo {
                name: PluginName::new("hello").expect("plugin"),
                hash: "sha256:1".into(),
            }],
            started_at: t("00"),
            sent_at: t(at),
            facts: facts.as_object().cloned().unwrap_or_default(),
            schedules: schedules.map(|s| s.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            packages: None,
        }
    }

    #[test]
    fn a_heartbeat_that_repeats_the_facts_touches_only_the_freshness_document() {
        let mut d = doc();
        d.apply_announce(&announce("01", json!({"kernel": "6.1"}), None), t("01"));
        assert_eq!(
            d.written(),
            Written {
                document: true,
                fresh: false
            }
        );
        let mut d = Node::from_parts(d.doc.clone(), Some(d.fresh.clone()));
        let stored = d.doc.clone();
        assert_eq!(
            d.apply_announce(&announce("02", json!({"kernel": "6.1"}), None), t("02")),
            Change::Updated
        );
        assert_eq!(
            d.written(),
            Written {
                document: false,
                fresh: true
            }
        );
        assert_eq!(d.doc, stored);
        assert_eq!(
            (d.last_seen(), d.announced_at()),
            (Some(t("02")), Some(t("02")))
        );
        // New facts are the node document's.
        d.apply_announce(&announce("03", json!({"kernel": "6.2"}), None), t("03"));
        assert_eq!(
            d.written(),
            Written {
                document: true,
                fresh: false
            }
        );
        assert_eq!(d.doc.meta.facts["kernel"], "6.2");
        // An older announcement, arriving late, changes nothing.
        let mut d = Node::from_parts(d.doc.clone(), Some(d.fresh.clone()));
        d.apply_announce(&announce("02", json!({"kernel": "6.1"}), None), t("04"));
        assert_eq!(d.written(), Written::default());
        assert_eq!(d.doc.meta.facts["kernel"], "6.2");
    }

    /// An announcement at `at` of `hello` and `pip`, declaring `packages`.
    fn declaring(at: &str, packages: Option<&[(&str, crate::version::Scheme)]>) -> Announce {
        let mut a = announce(at, json!({}), None);
        a.plugins.push(crate::wire::PluginInfo {
            name: PluginName::new("pip").expect("plugin"),
            hash: "sha256:2".into(),
        });
        a.packages = packages.map(|p| p.iter().map(|(k, v)| (k.to_string(), *v)).collect());
        a
    }

    #[test]
    fn declared_package_plugins_are_stored_from_the_newest_announcement() {
        use crate::version::Scheme::{Dpkg, Rpm};
        let mut d = doc();
        d.apply_announce(&declaring("01", Some(&[("pip", Rpm)])), t("01"));
        assert!(d.written().document);
        let stored = serde_json::to_value(&d.doc).expect("json");
        assert_eq!(stored["vogeler"]["packages"], json!({"pip": "rpm"}));
        // The same declaration again is a heartbeat: the node document is not rewritten.
        let mut d = Node::from_parts(d.doc.clone(), Some(d.fresh.clone()));
        d.apply_announce(&declaring("02", Some(&[("pip", Rpm)])), t("02"));
        assert_eq!(
            d.written(),
            Written {
                document: false,
                fresh: true
            }
        );
        // Another order is a change.
        let mut d = Node::from_parts(d.doc.clone(), Some(d.fresh.clone()));
        d.apply_announce(&declaring("03", Some(&[("pip", Dpkg)])), t("03"));
        assert!(d.written().document);
        assert_eq!(d.doc.meta.packages["pip"], "dpkg");
        // An older announcement, arriving late, changes nothing.
        let mut d = Node::from_parts(d.doc.clone(), Some(d.fresh.clone()));
        d.apply_announce(&declaring("02", Some(&[("pip", Rpm)])), t("04"));
        assert_eq!(d.written(), Written::default());
        assert_eq!(d.doc.meta.packages["pip"], "dpkg");
        // The declaration removed from the file: none left, and none written.
        d.apply_announce(&declaring("05", Some(&[])), t("05"));
        assert!(d.doc.meta.packages.is_empty());
        let stored = serde_json::to_value(&d.doc).expect("json");
        assert_eq!(stored["vogeler"].get("packages"), None);
    }

    #[test]
    fn an_agent_that_does_not_say_has_declared_no_package_plugins() {
        use crate::version::Scheme::Rpm;
        // An agent from before declarations cannot load a file with `packages`, so the
        // plugin it still announces is no package inventory any more.
        let mut d = doc();
        d.apply_announce(&declaring("01", Some(&[("pip", Rpm)])), t("01"));
        d.apply_announce(&declaring("02", None), t("02"));
        assert!(d.doc.meta.packages.is_empty());
        // And the other order ends the same: the older announcement is ignored.
        let mut other = doc();
        other.apply_announce(&declaring("02", None), t("02"));
        other.apply_announce(&declaring("01", Some(&[("pip", Rpm)])), t("03"));
        assert_eq!(other.doc.meta.packages, d.doc.meta.packages);
        // A document written before declarations reads with none.
        let old = json!({"_id": "web01", "vogeler": {"created_at": "2026-11-22T05:00:00Z", "updated_at": "2026-11-22T05:00:00Z"}});
        let old: NodeDocument = serde_json::from_value(old).expect("document");
        assert!(old.meta.packages.is_empty());
    }

    #[test]
    fn a_schedule_turned_off_is_no_longer_expected() {
        let mut d = doc();
        let v = json!(1);
        d.apply_result(
            &scheduled(result(1, "00", Outcome::Ok, Some(v.clone())), 10),
            t("00"),
        );
        d.apply_result(
            &scheduled(
                result(
                    2,
                    "10",
                    Outcome::Unchanged {
                        hash: value_hash(&v),
                    },
                    None,
                ),
                10,
            ),
            t("10"),
        );
        d.apply_announce(&announce("11", json!({}), Some(&[("hello", 10)])), t("11"));
        assert_eq!(d.plugin("hello").expect("plugin").interval_s, Some(10));
        // Lengthened by the agent's config: expected on the announced interval at once.
        let mut longer = d.clone();
        longer.apply_announce(
            &announce("12", json!({}), Some(&[("hello", 3000)])),
            t("12"),
        );
        let m = longer.plugin("hello").expect("plugin");
        assert_eq!(m.interval_s, Some(3000));
        assert!(!m.overdue(t("59")));
        // Still announced, no longer scheduled.
        d.apply_announce(&announce("12", json!({}), Some(&[])), t("12"));
        let m = d.plugin("hello").expect("plugin");
        assert_eq!((m.interval_s, m.next_due), (None, None));
        assert!(!m.overdue(t("59")));
        // An agent that does not say which plugins it schedules leaves schedules alone, but
        // a plugin it no longer announces is not expected either.
        let mut d = doc();
        d.apply_result(
            &scheduled(result(1, "00", Outcome::Ok, Some(v)), 10),
            t("00"),
        );
        d.apply_announce(&announce("01", json!({}), None), t("01"));
        assert_eq!(d.plugin("hello").expect("plugin").interval_s, Some(10));
        let mut gone = announce("02", json!({}), None);
        gone.plugins.clear();
        d.apply_announce(&gone, t("02"));
        assert_eq!(d.plugin("hello").expect("plugin").interval_s, None);
    }

    #[test]
    fn an_unchanged_run_about_a_value_not_held_changes_nothing() {
        let mut d = doc();
        let claim = |id, hash: &str| {
            scheduled(
                result(id, "10", Outcome::Unchanged { hash: hash.into() }, None),
                10,
            )
        };
        // No value at all (a new database, a pruned node).
        let before = d.clone();
        assert_eq!(
            d.apply_result(&claim(1, "sha256:00"), t("10")),
            Change::Unconfirmed
        );
        assert_eq!(d, before);
        // Another value than the one stored.
        d.apply_result(&result(2, "00", Outcome::Ok, Some(json!(1))), t("00"));
        let before = d.clone();
        assert_eq!(
            d.apply_result(&claim(3, "sha256:00"), t("10")),
            Change::Unconfirmed
        );
        assert_eq!(d, before);
        // The value comes back in full: stored as usual.
        let full = scheduled(result(4, "20", Outcome::Ok, Some(json!(2))), 10);
        assert_eq!(d.apply_result(&full, t("20")), Change::Updated);
        assert_eq!(d.doc.value("hello"), Some(&json!(2)));
    }

    #[test]
    fn a_scheduled_plugin_is_overdue_after_twice_its_interval() {
        let mut d = doc();
        d.apply_result(
            &scheduled(result(1, "00", Outcome::Ok, Some(json!(1))), 10),
            t("00"),
        );
        let m = &d.doc.meta.plugins["hello"];
        assert_eq!(m.overdue_at(), Some(t("20")));
        assert!(!m.overdue(t("20")));
        assert!(m.overdue(t("21")));
        // A plugin only ever run by commands has no schedule to miss.
        let mut d = doc();
        d.apply_result(&result(1, "00", Outcome::Ok, Some(json!(1))), t("00"));
        assert!(!d.doc.meta.plugins["hello"].overdue(t("59")));
    }

    #[test]
    fn plugin_values_come_before_the_bookkeeping() {
        let mut d = doc();
        d.apply_result(&result(1, "00", Outcome::Ok, Some(json!(["a"]))), t("00"));
        let text = serde_json::to_string(&d.doc).expect("json");
        let at = |k: &str| text.find(k).expect(k);
        assert!(at("\"_id\"") < at("\"hello\""), "{text}");
        assert!(at("\"hello\"") < at("\"vogeler\""), "{text}");
    }
}
