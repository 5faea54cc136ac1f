//! The freshness document: a small companion of each node document (`fresh:NODE`, in the
//! same database) holding what moves on every heartbeat and every unchanged scheduled run:
//! when the node was last seen, when it last announced itself, and which stored values its
//! scheduled runs confirmed since they were stored.
//!
//! ```json
//! { "_id": "fresh:web01", "_rev": "...",
//!   "vogeler_fresh": { "node": "web01", "last_seen": "...", "agent_version": "0.1.0",
//!                      "announced_at": "...",
//!                      "plugins": { "dpkg": { "confirmed_at": "...", "request_id": "...",
//!                                             "interval_s": 21600, "next_due": "..." } } } }
//! ```
//! Keeping these here means the node document (with every package of every plugin in it) is
//! written only when a value, a run's status, the facts or the plugins change: a fleet whose
//! inventory does not change writes a few hundred bytes per node per interval instead of a
//! new revision of every document (and CouchDB re-indexing each). Readers take, per node and
//! plugin, whichever of the two documents says the newer thing; the views emit from both.
//! It is derived data: an unreadable or missing one is rebuilt, never quarantined.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::names::NodeName;

/// Ids of freshness documents start with this; node names cannot contain `:`.
pub const PREFIX: &str = "fresh:";

/// The id of `node`'s freshness document.
pub fn fresh_id(node: &NodeName) -> String {
    format!("{PREFIX}{node}")
}

/// The node a freshness document id is about, if it is one.
pub fn node_of_id(id: &str) -> Option<&str> {
    id.strip_prefix(PREFIX)
}

/// One node's freshness document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreshDocument {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    #[serde(rename = "vogeler_fresh")]
    pub fresh: Fresh,
}

/// What a freshness document records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fresh {
    pub node: String,
    /// The newest time the node itself reported (announcement or result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// When the agent last announced itself (start, plugin change or heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced_at: Option<DateTime<Utc>>,
    /// The newest scheduled run of each plugin that found its stored value unchanged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugins: BTreeMap<String, Confirmation>,
}

/// A scheduled run that found the stored value unchanged (and so sent none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confirmation {
    pub confirmed_at: DateTime<Utc>,
    pub request_id: Uuid,
    pub interval_s: u64,
    /// When the next scheduled run is due: `confirmed_at` plus the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<DateTime<Utc>>,
}

impl FreshDocument {
    /// An empty one for a node that has none yet.
    pub fn new(node: &NodeName) -> Self {
        Self {
            id: fresh_id(node),
            rev: None,
            fresh: Fresh {
                node: node.to_string(),
                ..Fresh::default()
            },
        }
    }

    /// Read leniently: a document edited by hand keeps its revision (so it can be written
    /// over) and whatever parts still read; the rest starts empty.
    pub fn from_value(node: &NodeName, v: &Value) -> Self {
        let mut doc = Self::new(node);
        doc.rev = v.get("_rev").and_then(Value::as_str).map(str::to_string);
        let Some(f) = v.get("vogeler_fresh") else {
            return doc;
        };
        let field = |k: &str| f.get(k).cloned().unwrap_or(Value::Null);
        doc.fresh.last_seen = serde_json::from_value(field("last_seen")).unwrap_or_default();
        doc.fresh.agent_version =
            serde_json::from_value(field("agent_version")).unwrap_or_default();
        doc.fresh.announced_at = serde_json::from_value(field("announced_at")).unwrap_or_default();
        if let Some(plugins) = f.get("plugins").and_then(Value::as_object) {
            doc.fresh.plugins = plugins
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), serde_json::from_value(v.clone()).ok()?)))
                .collect();
        }
        doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_name_their_node() {
        let node = NodeName::new("web01").expect("node");
        assert_eq!(fresh_id(&node), "fresh:web01");
        assert_eq!(node_of_id("fresh:web01"), Some("web01"));
        assert_eq!(node_of_id("web01"), None);
    }

    #[test]
    fn a_hand_edited_document_keeps_its_revision_and_what_still_reads() {
        let node = NodeName::new("web01").expect("node");
        let v = json!({"_id": "fresh:web01", "_rev": "3-x", "vogeler_fresh": {
            "last_seen": "not a time", "agent_version": "0.1.0",
            "plugins": {"dpkg": {"confirmed_at": "2026-11-22T05:00:00Z",
                                 "request_id": "00000000-0000-0000-0000-000000000001",
                                 "interval_s": 60},
                        "bad": 7}}});
        let doc = FreshDocument::from_value(&node, &v);
        assert_eq!(doc.rev.as_deref(), Some("3-x"));
        assert_eq!(doc.fresh.last_seen, None);
        assert_eq!(doc.fresh.agent_version.as_deref(), Some("0.1.0"));
        assert_eq!(doc.fresh.plugins.len(), 1);
        let back = FreshDocument::from_value(&node, &serde_json::to_value(&doc).expect("json"));
        assert_eq!(back, doc);
        let garbage = FreshDocument::from_value(&node, &json!([1, 2]));
        assert_eq!(garbage, FreshDocument::new(&node));
    }
}
