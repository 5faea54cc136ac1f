//! The design documents the server installs: the views that answer operators' questions, in
//! the CouchDB web UI as well as from the runner. Views are plain ES5 so that every JavaScript
//! engine Apache CouchDB 3 ships with (QuickJS in 3.4, SpiderMonkey before) runs them.

use serde_json::{Value, json};

/// The design document id in the node database (`_design/vogeler`).
pub const NODES_DDOC: &str = "vogeler";
/// The design document id in the history database.
pub const HISTORY_DDOC: &str = "vogeler_history";

/// Bumped whenever a view below changes: servers upgrade older design documents on start and
/// leave newer ones (from a newer server) alone.
pub const VERSION: u64 = 3;

/// Views of the node database. Keys:
/// - `nodes_by_last_seen`: last seen time → null
/// - `nodes_by_plugin`: plugin name → last outcome
/// - `packages`: `[name, version]` → source plugin, for installed `dpkg` and `rpms` entries
/// - `facts`: `[fact path, value]` → null, from the facts agents report (`os.family`,
///   `kernel`, `arch`, ...)
/// - `collected`: `[plugin, node]` → `{collected_at, outcome}`, for answering from stored
///   values (`--cached`)
/// - `registry`: node name → `{last_seen, agent_version, facts}`, what the runner resolves
///   node sets against without reading whole documents
pub fn nodes() -> Value {
    json!({
        "_id": format!("_design/{NODES_DDOC}"),
        "language": "javascript",
        "vogeler_version": VERSION,
        "views": {
            "nodes_by_last_seen": { "map": "function (doc) { if (doc.vogeler && doc.vogeler.last_seen) { emit(doc.vogeler.last_seen, null); } }" },
            "nodes_by_plugin": { "map": "function (doc) { var p = doc.vogeler && doc.vogeler.plugins; if (!p) { return; } for (var name in p) { emit(name, p[name].outcome); } }" },
            "packages": { "map": "function (doc) { ['dpkg', 'rpms'].forEach(function (source) { var list = doc[source]; if (!Array.isArray(list)) { return; } list.forEach(function (pkg) { if (!pkg || typeof pkg.name !== 'string') { return; } if (pkg.status && pkg.status !== 'installed') { return; } emit([pkg.name, pkg.version || null], source); }); }); }" },
            "collected": { "map": "function (doc) { var p = doc.vogeler && doc.vogeler.plugins; if (!p) { return; } for (var name in p) { emit([name, doc._id], { collected_at: p[name].collected_at, outcome: p[name].outcome }); } }" },
            "registry": { "map": "function (doc) { if (doc.vogeler) { emit(doc._id, { last_seen: doc.vogeler.last_seen || null, agent_version: doc.vogeler.agent_version || null, facts: doc.vogeler.facts || {} }); } }" },
            "facts": { "map": "function (doc) { var f = doc.vogeler && doc.vogeler.facts; if (!f) { return; } function walk(prefix, o) { for (var k in o) { var v = o[k]; var key = prefix ? prefix + '.' + k : k; if (v !== null && typeof v === 'object' && !Array.isArray(v)) { walk(key, v); } else if (v === null || typeof v !== 'object') { emit([key, v], null); } } } walk('', f); }" }
        }
    })
}

/// Views of the history database: `by_time` (time → null, for retention) and
/// `by_node_plugin` (`[node, plugin, time]` → null).
pub fn history() -> Value {
    json!({
        "_id": format!("_design/{HISTORY_DDOC}"),
        "language": "javascript",
        "vogeler_version": VERSION,
        "views": {
            "by_time": { "map": "function (doc) { if (doc.at) { emit(doc.at, null); } }" },
            "by_node_plugin": { "map": "function (doc) { if (doc.node && doc.plugin && doc.at) { emit([doc.node, doc.plugin, doc.at], null); } }" }
        }
    })
}

/// The version a stored design document declares (0 when it declares none).
pub fn version_of(doc: &Value) -> u64 {
    doc.get("vogeler_version")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_documents_are_versioned() {
        for d in [nodes(), history()] {
            assert_eq!(version_of(&d), VERSION);
            assert!(
                d["_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("_design/"))
            );
            assert!(d["views"].as_object().is_some_and(|v| !v.is_empty()));
        }
        assert_eq!(version_of(&json!({})), 0);
    }
}
