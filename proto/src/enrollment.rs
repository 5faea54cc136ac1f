//! Enrollment: which key may speak for which node name.
//!
//! Two rules hold in every mode:
//! - a node name is pinned to one key (the node document's `vogeler.key`);
//! - **a key serves exactly one node name**: the enrollment database holds one
//!   [`KeyBinding`] document per key (`key:<sha256 of the key>`), created once, so a second
//!   name claimed with the same key is refused even by another server at the same moment
//!   (CouchDB refuses to create the same id twice).
//!
//! `server.enrollment` decides what happens to a name no key is pinned to yet:
//! - [`Mode::Open`] (the built-in default): the first key seen is pinned (trust on first use);
//! - [`Mode::Approve`]: the key waits as a pending [`Claim`] in the node's [`Enrollment`]
//!   record until an operator runs `vogeler-runner nodes accept NODE`; the node has no
//!   document in the node database until then, and its messages are held back (acked and
//!   not stored). `nodes reject NODE` refuses the key for good.
//!
//! Everything here is pure: the server and the runner do the reading and writing.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{document::NodeDocument, names::NodeName, signing::PublicKey};

/// How a new node's first key is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Pinned on first contact.
    #[default]
    Open,
    /// Held until an operator accepts it.
    Approve,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Mode::Open),
            "approve" => Ok(Mode::Approve),
            other => Err(format!(
                "{other:?} is not an enrollment mode; use open or approve"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Approve => "approve",
        }
    }
}

/// Keys one node's record holds at most: a name claimed by many keys is under attack or
/// misconfigured, and the record must stay small.
pub const MAX_CLAIMS_PER_NODE: usize = 8;

/// A pending claim's `last_seen` is rewritten at most this often, so a pending node's
/// heartbeats do not rewrite its record every time.
pub const SEEN_EVERY: TimeDelta = TimeDelta::minutes(5);

/// The enrollment database's name for a node database.
pub fn enrollment_database(db: &str) -> String {
    format!("{db}_enrollment")
}

/// The full SHA-256 of a key, in hex: the stable name of a key in ids. (`PublicKey::id` is
/// its first 16 hex digits, for people.)
pub fn key_hash(key: &PublicKey) -> String {
    Sha256::digest(key.to_base64().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The id of a key's binding document. Node names have no `:`, so it never names a node.
pub fn key_binding_id(key: &PublicKey) -> String {
    format!("key:{}", key_hash(key))
}

/// Which node a key serves: created once, never changed (`nodes forget` deletes it with the
/// node's key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBinding {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// The key, base64.
    pub key: String,
    pub node: String,
    pub since: DateTime<Utc>,
}

impl KeyBinding {
    pub fn new(key: &PublicKey, node: &NodeName, now: DateTime<Utc>) -> Self {
        Self {
            id: key_binding_id(key),
            rev: None,
            key: key.to_base64(),
            node: node.to_string(),
            since: now,
        }
    }
}

/// Where one key's claim on a node name stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimStatus {
    Pending,
    Accepted,
    Rejected,
}

/// One key that spoke for a node name no key was pinned to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The key, base64.
    pub key: String,
    /// [`PublicKey::id`], for people comparing it with `vogeler-agent key` on the node.
    pub key_id: String,
    pub status: ClaimStatus,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    #[serde(default)]
    pub agent_version: Option<String>,
    /// The facts of the newest announcement signed with this key, so an operator can tell
    /// the node before accepting it (and the accepted node's document starts with them).
    #[serde(default)]
    pub facts: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
}

/// What one announcement or result tells the enrollment record about its signer.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub key: &'a PublicKey,
    pub at: DateTime<Utc>,
    pub agent_version: Option<&'a str>,
    pub facts: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// A node name's enrollment record in approve mode: every key that claimed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrollment {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    pub node: String,
    pub claims: Vec<Claim>,
}

/// What the server does with a message from a node no key is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pin the signer (and store the message).
    Pin,
    /// Keep it out of the node database, with why; the message is not stored.
    Hold(String),
}

impl Enrollment {
    pub fn new(node: &NodeName) -> Self {
        Self {
            id: node.to_string(),
            rev: None,
            node: node.to_string(),
            claims: Vec::new(),
        }
    }

    fn claim(&self, key: &PublicKey) -> Option<&Claim> {
        let b64 = key.to_base64();
        self.claims.iter().find(|c| c.key == b64)
    }

    /// The claims still waiting for an operator.
    pub fn pending(&self) -> impl Iterator<Item = &Claim> {
        self.claims
            .iter()
            .filter(|c| c.status == ClaimStatus::Pending)
    }

    /// Approve mode, for a message signed by `seen.key` for this record's node, which has no
    /// pinned key: pin an accepted key, hold anything else (recording a new claim, or
    /// refreshing a pending one). Returns the verdict and whether the record changed (and
    /// must be written).
    pub fn judge(&mut self, seen: Seen<'_>) -> (Verdict, bool) {
        let node = self.node.clone();
        let b64 = seen.key.to_base64();
        if let Some(claim) = self.claims.iter_mut().find(|c| c.key == b64) {
            return match claim.status {
                ClaimStatus::Accepted => (Verdict::Pin, false),
                ClaimStatus::Rejected => (
                    Verdict::Hold(format!(
                        "node {node}: key {} was rejected (vogeler-runner nodes reject); its messages are not stored",
                        claim.key_id
                    )),
                    false,
                ),
                ClaimStatus::Pending => {
                    let mut changed = false;
                    if seen.facts.is_some() && seen.at > claim.last_seen {
                        claim.facts = seen.facts.cloned().unwrap_or_default();
                        claim.agent_version = seen.agent_version.map(str::to_string);
                        changed = true;
                    }
                    if seen.at - claim.last_seen >= SEEN_EVERY {
                        claim.last_seen = seen.at;
                        changed = true;
                    }
                    (Verdict::Hold(awaiting(&node, &claim.key_id)), changed)
                }
            };
        }
        let key_id = seen.key.id();
        if self.claims.len() >= MAX_CLAIMS_PER_NODE {
            return (
                Verdict::Hold(format!(
                    "node {node}: {MAX_CLAIMS_PER_NODE} keys already claim this name; key {key_id} is not recorded (reject the others with vogeler-runner nodes reject {node})"
                )),
                false,
            );
        }
        self.claims.push(Claim {
            key: b64,
            key_id: key_id.clone(),
            status: ClaimStatus::Pending,
            first_seen: seen.at,
            last_seen: seen.at,
            agent_version: seen.agent_version.map(str::to_string),
            facts: seen.facts.cloned().unwrap_or_default(),
            decided_at: None,
        });
        (Verdict::Hold(awaiting(&node, &key_id)), true)
    }

    /// Accept one pending key: the one whose [`Claim::key_id`] starts with `key_id`, or the
    /// only one when `key_id` is `None`. Every other pending key of the node is rejected
    /// (one key serves a node). Returns the accepted claim.
    pub fn accept(&mut self, key_id: Option<&str>, now: DateTime<Utc>) -> Result<Claim, String> {
        let chosen = self.choose(key_id)?;
        for (i, claim) in self.claims.iter_mut().enumerate() {
            if i == chosen {
                claim.status = ClaimStatus::Accepted;
                claim.decided_at = Some(now);
            } else if claim.status != ClaimStatus::Rejected {
                claim.status = ClaimStatus::Rejected;
                claim.decided_at = Some(now);
            }
        }
        Ok(self.claims[chosen].clone())
    }

    /// Reject the pending key `key_id` (a prefix of its id), or every pending key when
    /// `None`. Returns the ids of the keys rejected.
    pub fn reject(
        &mut self,
        key_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, String> {
        let chosen: Vec<usize> = match key_id {
            Some(_) => vec![self.choose(key_id)?],
            None => (0..self.claims.len())
                .filter(|&i| self.claims[i].status == ClaimStatus::Pending)
                .collect(),
        };
        if chosen.is_empty() {
            return Err(format!(
                "node {}: no key is waiting for approval",
                self.node
            ));
        }
        Ok(chosen
            .into_iter()
            .map(|i| {
                let c = &mut self.claims[i];
                c.status = ClaimStatus::Rejected;
                c.decided_at = Some(now);
                c.key_id.clone()
            })
            .collect())
    }

    fn choose(&self, key_id: Option<&str>) -> Result<usize, String> {
        let node = &self.node;
        let pending: Vec<usize> = (0..self.claims.len())
            .filter(|&i| self.claims[i].status == ClaimStatus::Pending)
            .collect();
        match key_id {
            Some(prefix) => {
                let matching: Vec<usize> = pending
                    .into_iter()
                    .filter(|&i| self.claims[i].key_id.starts_with(prefix))
                    .collect();
                match matching.as_slice() {
                    [one] => Ok(*one),
                    [] => Err(format!(
                        "node {node}: no pending key has an id starting with {prefix:?} (see vogeler-runner nodes pending)"
                    )),
                    _ => Err(format!(
                        "node {node}: several pending keys have ids starting with {prefix:?}; give more of the id"
                    )),
                }
            }
            None => match pending.as_slice() {
                [one] => Ok(*one),
                [] => Err(format!("node {node}: no key is waiting for approval")),
                many => Err(format!(
                    "node {node}: {} keys claim this name ({}); choose one with --key ID after checking it on the node with `vogeler-agent key`",
                    many.len(),
                    many.iter()
                        .map(|&i| self.claims[i].key_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
        }
    }

    /// Whether a key was accepted for this node.
    pub fn accepted(&self, key: &PublicKey) -> bool {
        self.claim(key)
            .is_some_and(|c| c.status == ClaimStatus::Accepted)
    }
}

/// Make `doc` the document of a node whose `claim` was accepted: its key pinned, and what
/// the node announced while it waited, so the node shows in `vogeler-runner nodes` at once
/// (its next announcement brings the rest).
pub fn admit(doc: &mut NodeDocument, claim: &Claim, now: DateTime<Utc>) -> Result<(), String> {
    let key = PublicKey::from_base64(&claim.key)
        .ok_or_else(|| format!("node {}: the accepted key is not a valid key", doc.id))?;
    doc.pin_key(&key)?;
    let meta = &mut doc.meta;
    if meta.facts.is_empty() {
        meta.facts = claim.facts.clone();
    }
    if meta.agent_version.is_none() {
        meta.agent_version = claim.agent_version.clone();
    }
    if meta.last_seen.is_none_or(|t| t < claim.last_seen) {
        meta.last_seen = Some(claim.last_seen);
    }
    meta.updated_at = now;
    Ok(())
}

fn awaiting(node: &str, key_id: &str) -> String {
    format!(
        "node {node} is waiting for approval of key {key_id}; its messages are not stored until an operator runs: vogeler-runner nodes accept {node}"
    )
}

/// Why `key` may not serve `node`, when its binding names another node.
pub fn bound_elsewhere(key: &PublicKey, node: &NodeName, binding: &KeyBinding) -> Option<String> {
    (binding.node != node.as_str()).then(|| {
        format!(
            "key {} already serves node {}, so it cannot also serve node {node}: one key serves exactly one node name (give each node its own key; vogeler-agent creates one in its state directory)",
            key.id(),
            binding.node
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().expect("key").public()
    }

    fn seen(key: &PublicKey, at: DateTime<Utc>) -> Seen<'_> {
        Seen {
            key,
            at,
            agent_version: Some("0.1.0"),
            facts: None,
        }
    }

    #[test]
    fn a_new_key_waits_until_accepted_then_is_pinned() {
        let node = NodeName::new("web04").expect("node");
        let (k, now) = (key(), Utc::now());
        let mut e = Enrollment::new(&node);
        let (v, changed) = e.judge(seen(&k, now));
        assert!(matches!(v, Verdict::Hold(ref why) if why.contains("nodes accept web04")));
        assert!(changed, "a new claim is recorded");
        // A heartbeat a minute later does not rewrite the record; one after SEEN_EVERY does.
        let (_, changed) = e.judge(seen(&k, now + TimeDelta::minutes(1)));
        assert!(!changed);
        let (_, changed) = e.judge(seen(&k, now + SEEN_EVERY));
        assert!(changed);
        assert_eq!(e.pending().count(), 1);
        let claim = e.accept(None, now).expect("accept");
        assert_eq!(claim.key, k.to_base64());
        assert_eq!(e.judge(seen(&k, now)).0, Verdict::Pin);
        assert!(e.accepted(&k));
    }

    #[test]
    fn rejected_keys_stay_out_and_a_squatter_does_not_get_the_name() {
        let node = NodeName::new("web04").expect("node");
        let (real, squatter, now) = (key(), key(), Utc::now());
        let mut e = Enrollment::new(&node);
        e.judge(seen(&squatter, now));
        e.judge(seen(&real, now));
        // Two keys claim it: accepting needs a choice.
        let err = e.accept(None, now).expect_err("ambiguous");
        assert!(err.contains("2 keys claim this name"), "{err}");
        let real_id = real.id();
        let claim = e.accept(Some(&real_id[..6]), now).expect("accept by id");
        assert_eq!(claim.key_id, real_id);
        // The other claim was rejected with it.
        assert!(
            matches!(e.judge(seen(&squatter, now)).0, Verdict::Hold(ref w) if w.contains("was rejected"))
        );
        assert_eq!(e.pending().count(), 0);
        assert!(e.reject(None, now).is_err(), "nothing left to reject");
    }

    #[test]
    fn claims_per_node_are_bounded() {
        let node = NodeName::new("web04").expect("node");
        let now = Utc::now();
        let mut e = Enrollment::new(&node);
        for _ in 0..MAX_CLAIMS_PER_NODE {
            assert!(e.judge(seen(&key(), now)).1);
        }
        let (v, changed) = e.judge(seen(&key(), now));
        assert!(!changed);
        assert!(matches!(v, Verdict::Hold(ref w) if w.contains("already claim this name")));
        assert_eq!(e.claims.len(), MAX_CLAIMS_PER_NODE);
    }

    #[test]
    fn one_key_serves_one_name() {
        let (k, now) = (key(), Utc::now());
        let web01 = NodeName::new("web01").expect("node");
        let web02 = NodeName::new("web02").expect("node");
        let binding = KeyBinding::new(&k, &web01, now);
        assert_eq!(binding.id, key_binding_id(&k));
        assert!(binding.id.starts_with("key:") && binding.id.len() == 4 + 64);
        assert_eq!(bound_elsewhere(&k, &web01, &binding), None);
        let why = bound_elsewhere(&k, &web02, &binding).expect("refused");
        assert!(why.contains("already serves node web01"), "{why}");
    }

    #[test]
    fn an_accepted_node_starts_with_what_it_announced() {
        let node = NodeName::new("web04").expect("node");
        let (k, now) = (key(), Utc::now());
        let mut facts = serde_json::Map::new();
        facts.insert("os.family".into(), "Debian".into());
        let mut e = Enrollment::new(&node);
        e.judge(Seen {
            key: &k,
            at: now,
            agent_version: Some("0.1.0"),
            facts: Some(&facts),
        });
        let claim = e.accept(None, now).expect("accept");
        let mut doc = NodeDocument::new(&node, now);
        admit(&mut doc, &claim, now).expect("admit");
        assert_eq!(doc.meta.key, Some(k.to_base64()));
        assert_eq!(doc.meta.facts, facts);
        assert_eq!(doc.meta.agent_version.as_deref(), Some("0.1.0"));
        // A document pinned to another key is not taken over.
        let mut other = NodeDocument::new(&node, now);
        other.pin_key(&key()).expect("pin");
        assert!(admit(&mut other, &claim, now).is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse("open"), Ok(Mode::Open));
        assert_eq!(Mode::parse("approve"), Ok(Mode::Approve));
        assert!(Mode::parse("tofu").is_err());
        assert_eq!(Mode::default(), Mode::Open);
    }
}
