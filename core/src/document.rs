//! The node document: one CouchDB document per node, shared by server (writes) and runner
//! (reads).
//!
//! ```json
//! { "_id": "web01",
//!   "hello": ["alpha", "beta"],
//!   "vogeler": { "created_at": "...", "updated_at": "...", "last_seen": "...",
//!                "agent_version": "0.1.0",
//!                "plugins": { "hello": { "collected_at": "...", "request_id": "...",
//!                                        "outcome": "ok", "exit_code": 0,
//!                                        "duration_ms": 12, "hash": "sha256:..." } } } }
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

use crate::{
    names::{NodeName, RESERVED_PLUGIN_NAME},
    wire::{Announce, Outcome, PluginResult},
};

/// One node's document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDocument {
    #[serde(rename = "_id")]
    pub id: String,
    /// Present on documents read from CouchDB; a write must carry it back.
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Missing on documents someone created by hand; adopted with fresh metadata.
    #[serde(rename = "vogeler", default = "NodeMeta::adopted")]
    pub meta: NodeMeta,
    /// Plugin values by plugin name (and any other top-level fields, kept as they are).
    #[serde(flatten)]
    pub values: BTreeMap<String, Value>,
}

/// Vogeler's own bookkeeping, under the reserved `vogeler` key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Set when the document is first written, never changed.
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The newest time the node itself reported (announcement or result).
    #[serde(default)]
    pub last_seen: Option<DateTime<Utc>>,
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginMeta>,
}

impl NodeMeta {
    fn adopted() -> Self {
        let now = Utc::now();
        Self {
            created_at: now,
            updated_at: now,
            last_seen: None,
            agent_version: None,
            plugins: BTreeMap::new(),
        }
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
}

/// Whether applying a message changed the document (and so needs a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Updated,
    Unchanged,
}

/// `sha256:<hex>` of a value's canonical JSON (object keys sorted).
pub fn value_hash(v: &Value) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl NodeDocument {
    /// A fresh document for a node seen for the first time.
    pub fn new(node: &NodeName, now: DateTime<Utc>) -> Self {
        Self {
            id: node.to_string(),
            rev: None,
            meta: NodeMeta {
                created_at: now,
                updated_at: now,
                last_seen: None,
                agent_version: None,
                plugins: BTreeMap::new(),
            },
            values: BTreeMap::new(),
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

    fn saw(&mut self, at: DateTime<Utc>, agent_version: &str) {
        if self.meta.last_seen.is_none_or(|seen| seen < at) {
            self.meta.last_seen = Some(at);
            self.meta.agent_version = Some(agent_version.to_string());
        }
    }

    /// Merge one plugin result. A result already applied, or older than the stored one,
    /// changes nothing; a failed run keeps the last good value and records why it failed.
    pub fn apply_result(&mut self, r: &PluginResult, now: DateTime<Utc>) -> Change {
        if r.outcome == Outcome::UnknownPlugin {
            // Nothing was collected, and a typo in a runner command must not leave a key for
            // a plugin that does not exist in every document it reached.
            self.saw(r.collected_at, &r.agent_version);
            return Change::Unchanged;
        }
        let key = r.plugin.as_str();
        let previous = self.meta.plugins.get(key);
        if previous.is_some_and(|p| p.request_id == r.request_id || p.collected_at > r.collected_at)
        {
            return Change::Unchanged;
        }
        let previous_hash = previous.and_then(|p| p.hash.clone());
        let hash = if r.outcome.is_ok() {
            let value = r.value.clone().unwrap_or(Value::Null);
            let hash = value_hash(&value);
            self.values.insert(key.to_string(), value);
            Some(hash)
        } else {
            previous_hash
        };
        self.meta.plugins.insert(
            key.to_string(),
            PluginMeta {
                collected_at: r.collected_at,
                request_id: r.request_id,
                outcome: r.outcome.status().to_string(),
                error: r.outcome.error_text(),
                exit_code: r.outcome.exit_code(),
                duration_ms: r.duration_ms,
                hash,
                truncated: r.truncated,
            },
        );
        self.saw(r.collected_at, &r.agent_version);
        self.meta.updated_at = now;
        Change::Updated
    }

    /// Record an agent's announcement; a repeated or older one changes nothing.
    pub fn apply_announce(&mut self, a: &Announce, now: DateTime<Utc>) -> Change {
        if self.meta.last_seen.is_some_and(|seen| seen >= a.sent_at) {
            return Change::Unchanged;
        }
        self.saw(a.sent_at, &a.agent_version);
        self.meta.updated_at = now;
        Change::Updated
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
        }
    }

    fn doc() -> NodeDocument {
        NodeDocument::new(&NodeName::new("web01").expect("node"), t("00"))
    }

    #[test]
    fn result_lands_under_plugin_key_with_metadata() {
        let mut d = doc();
        let r = result(1, "01", Outcome::Ok, Some(json!(["a", "b"])));
        assert_eq!(d.apply_result(&r, t("02")), Change::Updated);
        let v = serde_json::to_value(&d).expect("json");
        assert_eq!(v["_id"], "web01");
        assert_eq!(v["hello"], json!(["a", "b"]));
        assert_eq!(v["vogeler"]["plugins"]["hello"]["outcome"], "ok");
        assert_eq!(v["vogeler"]["plugins"]["hello"]["exit_code"], 0);
        assert_eq!(v["vogeler"]["created_at"], "2026-11-22T05:00:00Z");
        assert_eq!(v["vogeler"]["last_seen"], "2026-11-22T05:00:01Z");
        assert!(v.get("_rev").is_none());
        let back: NodeDocument = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, d);
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
        assert_eq!(d1.value("hello"), Some(&json!("new")));
    }

    #[test]
    fn failure_keeps_last_good_value() {
        let mut d = doc();
        d.apply_result(&result(1, "01", Outcome::Ok, Some(json!(["a"]))), t("01"));
        let good_hash = d.meta.plugins["hello"].hash.clone();
        let failed = Outcome::Failed {
            exit_code: Some(2),
            signal: None,
            stderr_tail: "nope".into(),
        };
        assert_eq!(
            d.apply_result(&result(2, "02", failed, None), t("02")),
            Change::Updated
        );
        assert_eq!(d.value("hello"), Some(&json!(["a"])));
        let meta = &d.meta.plugins["hello"];
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
        };
        assert_eq!(d.apply_announce(&a, t("04")), Change::Updated);
        assert_eq!(d.apply_announce(&a, t("05")), Change::Unchanged);
        assert_eq!(d.meta.last_seen, Some(t("03")));
        assert_eq!(d.meta.agent_version.as_deref(), Some("0.2.0"));
    }

    #[test]
    fn unknown_plugin_adds_no_key() {
        let mut d = doc();
        assert_eq!(
            d.apply_result(&result(1, "01", Outcome::UnknownPlugin, None), t("02")),
            Change::Unchanged
        );
        assert!(d.meta.plugins.is_empty());
        assert!(d.values.is_empty());
    }

    #[test]
    fn hash_is_canonical() {
        assert_eq!(
            value_hash(&json!({"b": 1, "a": 2})),
            value_hash(&json!({"a": 2, "b": 1}))
        );
        assert!(value_hash(&json!(null)).starts_with("sha256:"));
    }
}
