//! The design documents the server installs: the views that answer operators' questions, in
//! the CouchDB web UI as well as from the runner. Views are plain ES5 so that every JavaScript
//! engine Apache CouchDB 3 ships with (QuickJS in 3.4, SpiderMonkey before) runs them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

/// The design document id in the node database (`_design/vogeler`).
pub const NODES_DDOC: &str = "vogeler";
/// The design document of the inventory's indexes (`_design/vogeler_inventory`), in the node
/// database beside [`NODES_DDOC`]: CouchDB updates every view of a design document together,
/// so the package and value indexes (hundreds of rows a node) live apart from the registry
/// every fan-out reads, which then waits only for its own small rows after an ingest.
pub const INVENTORY_DDOC: &str = "vogeler_inventory";
/// The design document id in the history database.
pub const HISTORY_DDOC: &str = "vogeler_history";
/// The design document id in the enrollment database.
pub const ENROLLMENT_DDOC: &str = "vogeler_enrollment";

/// Bumped whenever a view below changes: servers upgrade older design documents on start and
/// leave newer ones (from a newer server) alone.
pub const VERSION: u64 = 11;

/// A view: the design document it lives in, its name and its map function, in one place so
/// that the server installs and every reader queries the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub ddoc: &'static str,
    pub name: &'static str,
    pub map: &'static str,
    /// A built-in reduce (`_count`, `_sum`), for views read as counts.
    pub reduce: Option<&'static str>,
}

/// Last seen time → node name, from node documents (written before freshness documents)
/// and freshness documents: stale nodes and `prune`. A node has up to two rows; it is
/// stale only when both are old.
pub const NODES_BY_LAST_SEEN: View = View {
    ddoc: NODES_DDOC,
    name: "nodes_by_last_seen",
    map: "function (doc) { var f = doc.vogeler_fresh; if (f && doc._id.indexOf('fresh:') === 0) { if (f.last_seen) { emit(f.last_seen, doc._id.substring(6)); } return; } if (doc.vogeler && doc.vogeler.last_seen) { emit(doc.vogeler.last_seen, doc._id); } }",
    reduce: None,
};

/// Plugin name → its last outcome.
pub const NODES_BY_PLUGIN: View = View {
    ddoc: NODES_DDOC,
    name: "nodes_by_plugin",
    map: "function (doc) { var p = doc.vogeler && doc.vogeler.plugins; if (!p) { return; } for (var name in p) { emit(name, p[name].outcome); } }",
    reduce: None,
};

/// `[name, plugin, version]` → `{scheme, version, arch, epoch, release}` for every installed
/// record of a package inventory: `dpkg` (dpkg's order) and `rpms` (rpm's) by name, and any
/// plugin the node announced as one (`vogeler.packages`). The key's version is
/// `epoch:version-release` when the record has those fields (rpm's `(none)` epoch is none),
/// as [`crate::expr`] composes it; the value keeps the record's own fields, so `has` can be
/// decided on the row. Reduced with `_count`: `group_level=3` over `[name, plugin]` is the
/// version spread of one package (`count dpkg:openssl`).
///
/// A node decides what its lists hold, so an inventory is indexed whole or not at all: one
/// with more than [`PACKAGES_MAX_RECORDS`] records, more than [`PACKAGES_MAX_SAME_NAME`] of
/// one name, a record field over [`PACKAGES_MAX_TEXT`] characters or outside printable
/// ASCII (CouchDB's collation ignores control and format characters, so `open\u00adssl`
/// would sort as `openssl`), or a record that is not an object of text fields (a number
/// reads differently in JavaScript) gives only the marker row `[null, plugin]` → why. Readers decide marked nodes from the document
/// ([`UNINDEXED`]), so the view's bounds never change an answer.
pub const PACKAGES: View = View {
    ddoc: INVENTORY_DDOC,
    name: "packages",
    map: "function (doc) { var v = doc.vogeler; if (!v || typeof v !== 'object' || doc._id.indexOf(':') !== -1) { return; } var own = function (o, k) { return Object.prototype.hasOwnProperty.call(o, k); }; var text = function (x) { return x === undefined || x === null || (typeof x === 'string' && x.length <= 256 && !/[^\x20-\x7e]/.test(x)); }; var sources = { dpkg: 'dpkg', rpms: 'rpm' }; var d = v.packages; if (d && typeof d === 'object') { for (var k in d) { if (own(d, k) && !own(sources, k) && k !== 'vogeler' && (d[k] === 'dpkg' || d[k] === 'rpm')) { sources[k] = d[k]; } } } for (var s in sources) { if (!own(sources, s) || !own(doc, s) || !Array.isArray(doc[s])) { continue; } var list = doc[s]; var why = list.length > 20000 ? 'records' : null; var per = {}; for (var i = 0; !why && i < list.length; i++) { var p = list[i]; if (!p || typeof p !== 'object' || Array.isArray(p)) { why = 'record'; } else if (p.name === undefined) { continue; } else if (typeof p.name !== 'string' || !text(p.name) || !text(p.version) || !text(p.epoch) || !text(p.release) || !text(p.arch)) { why = 'record'; } else { var c = (per['~' + p.name] || 0) + 1; per['~' + p.name] = c; if (c > 64) { why = 'same name'; } } } if (why) { emit([null, s], why); continue; } for (var j = 0; j < list.length; j++) { var r = list[j]; if (r.name === undefined) { continue; } if (r.status !== undefined && r.status !== null && r.status !== 'installed') { continue; } var val = { scheme: sources[s] }; var ver = null; if (r.version !== undefined && r.version !== null) { val.version = r.version; ver = r.version; var e = r.epoch === undefined || r.epoch === null ? '' : r.epoch; var rel = r.release === undefined || r.release === null ? '' : r.release; if (e !== '' && e !== '(none)') { ver = e + ':' + ver; } if (rel !== '' && rel !== '(none)') { ver = ver + '-' + rel; } } ['arch', 'epoch', 'release'].forEach(function (f) { if (r[f] !== undefined && r[f] !== null) { val[f] = r[f]; } }); emit([r.name, s, ver], val); } } }",
    reduce: Some("_count"),
};

/// The records one package inventory may have and still be indexed ([`PACKAGES`]).
pub const PACKAGES_MAX_RECORDS: usize = 20_000;
/// Records of one name one inventory may have and still be indexed (kernels, multi-arch
/// libraries and `gpg-pubkey` repeat a name a few times).
pub const PACKAGES_MAX_SAME_NAME: usize = 64;
/// The longest record field (name, version, epoch, release, arch) the packages view indexes.
pub const PACKAGES_MAX_TEXT: usize = 256;

/// `[plugin, node]` → [`Collected`], for answering from stored values (`--cached`): one row
/// from the node document's stored run, and one from its freshness document when a
/// scheduled run confirmed the value since. The newer of the two is the plugin's last run.
pub const COLLECTED: View = View {
    ddoc: NODES_DDOC,
    name: "collected",
    map: "function (doc) { var f = doc.vogeler_fresh; if (f && doc._id.indexOf('fresh:') === 0) { var c = f.plugins || {}; for (var n in c) { emit([n, doc._id.substring(6)], { collected_at: c[n].confirmed_at, outcome: 'ok', interval_s: c[n].interval_s || null }); } return; } var v = doc.vogeler; var p = v && v.plugins; if (!p) { return; } var ap = v.agent_plugins || {}; for (var name in p) { var own = function (o, k) { return Object.prototype.hasOwnProperty.call(o, k); }; var i = v.schedules ? (own(v.schedules, name) ? v.schedules[name] : null) : (v.announced_at && !own(ap, name) ? null : p[name].interval_s); emit([name, doc._id], { collected_at: p[name].collected_at, outcome: p[name].outcome, interval_s: i || null }); } }",
    reduce: None,
};

/// Node name → [`Registered`], what the runner resolves node sets against without reading
/// whole documents: a row from the node document, and one from its freshness document
/// (last seen, confirmed schedules) that [`Registered::merge`] folds in.
pub const REGISTRY: View = View {
    ddoc: NODES_DDOC,
    name: "registry",
    map: "function (doc) { var f = doc.vogeler_fresh; if (f && doc._id.indexOf('fresh:') === 0) { var c = f.plugins || {}; var t = {}; for (var n in c) { if (c[n].interval_s) { t[n] = [c[n].confirmed_at, c[n].interval_s]; } } emit(doc._id.substring(6), { fresh: true, last_seen: f.last_seen || null, agent_version: f.agent_version || null, schedules: t }); return; } if (doc.vogeler) { var v = doc.vogeler; var s = {}; var p = v.plugins || {}; var ap = v.agent_plugins || {}; for (var name in p) { var own = function (o, k) { return Object.prototype.hasOwnProperty.call(o, k); }; var i = v.schedules ? (own(v.schedules, name) ? v.schedules[name] : null) : (v.announced_at && !own(ap, name) ? null : p[name].interval_s); if (i) { s[name] = [p[name].collected_at, i]; } } emit(doc._id, { last_seen: doc.vogeler.last_seen || null, agent_version: doc.vogeler.agent_version || null, facts: doc.vogeler.facts || {}, key: doc.vogeler.key || null, schedules: s }); } }",
    reduce: None,
};

/// Node name → `{reason, since}` for nodes whose document the server cannot read back: the
/// flag documents (`quarantine:NODE`, see [`quarantine_id`]) the server writes instead of
/// writing over what it cannot read.
pub const QUARANTINE: View = View {
    ddoc: NODES_DDOC,
    name: "quarantine",
    map: "function (doc) { var q = doc.vogeler_quarantine; if (q && q.node && doc._id === 'quarantine:' + q.node) { emit(q.node, { reason: q.reason || null, since: q.since || null }); } }",
    reduce: None,
};

/// The id of a node's quarantine flag. Node names have no `:`, so it never names a node.
pub fn quarantine_id(node: &crate::names::NodeName) -> String {
    format!("quarantine:{node}")
}

/// `[path, value]` → null for every plain value a node document holds, by the path the
/// expression language reads it with ([`crate::expr`]): announced facts first (`os.family`,
/// `kernel`), then the objects and values of plugins whose name is not an announced fact
/// (`os_release.VERSION_ID`, `facts.memory_mb`). Lists are left to `_find` (`disks[]…`,
/// `has`); keys with a `.` cannot be named by a path and are left out. Reduced with `_count`:
/// `group_level=2` over `[path]` is how many nodes have each value (`count os.version`),
/// also in Fauxton.
///
/// Bounded, since a node decides what its values hold, and never silently: a string over
/// [`VALUES_MAX_TEXT`] characters or outside printable ASCII gives the marker row `[path]`
/// (the node has a value there the view does not hold; CouchDB's collation would count
/// `Debian\u0000` as `Debian`), a node with more than [`VALUES_MAX_PER_NODE`] values or a
/// key outside printable ASCII (which would sort into another path's range) gives only
/// `[null, "values"]` → why, and paths are indexed [`VALUES_MAX_DEPTH`] keys deep (a
/// longer path is never read from the view: [`crate::expr::Path::view_key`]). Readers
/// decide marked nodes from the document ([`UNINDEXED`]).
pub const VALUES: View = View {
    ddoc: INVENTORY_DDOC,
    name: "values",
    map: "function (doc) { var v = doc.vogeler; if (!v || typeof v !== 'object' || doc._id.indexOf(':') !== -1) { return; } var own = function (o, k) { return Object.prototype.hasOwnProperty.call(o, k); }; var plain = function (x) { return x !== null && typeof x === 'object'; }; var facts = plain(v.facts) && !Array.isArray(v.facts) ? v.facts : {}; var odd = /[^\x20-\x7e]/; var why = null; var walk = function (visit) { var put = function (key, x, depth) { if (!plain(x)) { if (odd.test(key)) { why = 'a key outside printable ASCII'; return false; } return visit(key, x); } if (!Array.isArray(x) && depth < 8) { for (var k in x) { if (own(x, k) && k.indexOf('.') === -1 && k !== '' && !put(key + '.' + k, x[k], depth + 1)) { return false; } } } return true; }; for (var f in facts) { if (own(facts, f) && f.indexOf('.') === -1 && f !== '' && !put(f, facts[f], 1)) { return false; } } for (var p in doc) { if (own(doc, p) && p.charAt(0) !== '_' && p !== 'vogeler' && p.indexOf('.') === -1 && p !== '' && !own(facts, p) && !put(p, doc[p], 1)) { return false; } } return true; }; var n = 0; if (!walk(function () { n++; if (n > 2000) { why = 'over 2000 values'; } return n <= 2000; })) { emit([null, 'values'], why); return; } walk(function (key, x) { if (typeof x === 'string' && (x.length > 512 || odd.test(x))) { emit([key], null); } else { emit([key, x], null); } return true; }); }",
    reduce: Some("_count"),
};

/// The plain values one node may have and still be indexed ([`VALUES`]).
pub const VALUES_MAX_PER_NODE: usize = 2_000;
/// The longest string the values view holds as a key.
pub const VALUES_MAX_TEXT: usize = 512;
/// The most keys of a path the values view indexes.
pub const VALUES_MAX_DEPTH: usize = 8;

/// The first key part of the marker rows of [`VALUES`] and [`PACKAGES`] (`[null, …]`):
/// `null` sorts before every path and package name, so no range of a path or a package
/// reads one by accident, and Fauxton shows them as one group.
pub const UNINDEXED: Value = Value::Null;

/// History entry time → [`HistoryRow`] (`{node, plugin}`): retention, and `changes`
/// across the fleet, which filters rows by node and plugin before it reads any (large)
/// entry.
pub const HISTORY_BY_TIME: View = View {
    ddoc: HISTORY_DDOC,
    name: "by_time",
    map: "function (doc) { if (doc.at) { emit(doc.at, { node: doc.node || null, plugin: doc.plugin || null }); } }",
    reduce: None,
};

/// `[node, plugin, time]` → null: one plugin's changes on one node, in order.
pub const HISTORY_BY_NODE_PLUGIN: View = View {
    ddoc: HISTORY_DDOC,
    name: "by_node_plugin",
    map: "function (doc) { if (doc.node && doc.plugin && doc.at) { emit([doc.node, doc.plugin, doc.at], null); } }",
    reduce: None,
};

/// The views of the node database.
pub const NODE_VIEWS: [View; 5] = [
    NODES_BY_LAST_SEEN,
    NODES_BY_PLUGIN,
    COLLECTED,
    REGISTRY,
    QUARANTINE,
];

/// The views of the inventory's own design document, in the node database: what `query`,
/// `count`, `find` and `-n` expressions read.
pub const INVENTORY_VIEWS: [View; 2] = [VALUES, PACKAGES];

/// Node name → the [`Pending`] claim of each key waiting for approval (reduced: how many
/// keys wait), from the enrollment records (see [`crate::enrollment`]).
pub const PENDING: View = View {
    ddoc: ENROLLMENT_DDOC,
    name: "pending",
    map: "function (doc) { if (!doc.node || !Array.isArray(doc.claims)) { return; } doc.claims.forEach(function (c) { if (c && c.status === 'pending') { emit(doc.node, { key_id: c.key_id || null, first_seen: c.first_seen || null, last_seen: c.last_seen || null, agent_version: c.agent_version || null, facts: c.facts || {} }); } }); }",
    reduce: Some("_count"),
};

/// The views of the enrollment database.
pub const ENROLLMENT_VIEWS: [View; 1] = [PENDING];

/// The views of the history database.
pub const HISTORY_VIEWS: [View; 2] = [HISTORY_BY_TIME, HISTORY_BY_NODE_PLUGIN];

/// The history database's name for a node database: one place, every program agrees.
pub fn history_database(db: &str) -> String {
    format!("{db}_history")
}

fn design_document(id: &str, views: &[View]) -> Value {
    let views: serde_json::Map<String, Value> = views
        .iter()
        .map(|v| {
            let mut view = json!({ "map": v.map });
            if let Some(reduce) = v.reduce {
                view["reduce"] = reduce.into();
            }
            (v.name.to_string(), view)
        })
        .collect();
    json!({
        "_id": format!("_design/{id}"),
        "language": "javascript",
        "vogeler_version": VERSION,
        "views": views,
    })
}

/// The node database's design document.
pub fn nodes() -> Value {
    design_document(NODES_DDOC, &NODE_VIEWS)
}

/// `_design/vogeler_inventory`, in the node database.
pub fn inventory() -> Value {
    design_document(INVENTORY_DDOC, &INVENTORY_VIEWS)
}

/// The history database's design document.
pub fn history() -> Value {
    design_document(HISTORY_DDOC, &HISTORY_VIEWS)
}

/// The enrollment database's design document.
pub fn enrollment() -> Value {
    design_document(ENROLLMENT_DDOC, &ENROLLMENT_VIEWS)
}

/// A [`PENDING`] row: a key waiting for approval as a node, read as leniently as
/// [`Registered`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Pending {
    pub key_id: Option<String>,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub agent_version: Option<String>,
    pub facts: serde_json::Map<String, Value>,
}

impl Pending {
    pub fn from_value(v: &Value) -> Self {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Self {
            key_id: text("key_id"),
            first_seen: time(v.get("first_seen")),
            last_seen: time(v.get("last_seen")),
            agent_version: text("agent_version"),
            facts: v
                .get("facts")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// A [`REGISTRY`] row's value. Read leniently: a document written by hand (or by a broken
/// release) gives `None`s and no facts rather than hiding every other node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registered {
    pub last_seen: Option<DateTime<Utc>>,
    pub agent_version: Option<String>,
    pub facts: serde_json::Map<String, Value>,
    /// The node's pinned public key (base64), which its replies must be signed with.
    pub key: Option<String>,
    /// Scheduled plugins: when each last ran, and its interval in seconds.
    pub schedules: BTreeMap<String, (DateTime<Utc>, u64)>,
}

impl Registered {
    pub fn from_value(v: &Value) -> Self {
        Self {
            last_seen: time(v.get("last_seen")),
            agent_version: v
                .get("agent_version")
                .and_then(Value::as_str)
                .map(str::to_string),
            facts: v
                .get("facts")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            key: v.get("key").and_then(Value::as_str).map(str::to_string),
            schedules: v
                .get("schedules")
                .and_then(Value::as_object)
                .map(|s| {
                    s.iter()
                        .filter_map(|(k, v)| {
                            Some((k.clone(), (time(v.get(0))?, v.get(1)?.as_u64()?)))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Whether a row came from a freshness document ([`crate::fresh`]).
    pub fn is_fresh_row(v: &Value) -> bool {
        v.get("fresh").and_then(Value::as_bool) == Some(true)
    }

    /// Fold in the row of the node's freshness document: the newer last seen (with its
    /// agent version), and each schedule's newer run.
    /// Only the schedules the node document expects count: what a plugin runs on is the
    /// agent's announcement's, and a confirmation left over for a plugin no longer
    /// scheduled (or removed by hand) must not make it overdue.
    pub fn merge(&mut self, fresh: Registered) {
        // Ties go to the freshness document, as in `Node::agent_version`.
        if fresh.last_seen.is_some() && fresh.last_seen >= self.last_seen {
            self.last_seen = fresh.last_seen;
            self.agent_version = fresh.agent_version;
        }
        for (name, (at, _)) in fresh.schedules {
            if let Some((mine, _)) = self.schedules.get_mut(&name)
                && at > *mine
            {
                *mine = at;
            }
        }
    }

    /// The scheduled plugins not collected within twice their interval at `now`.
    pub fn overdue(&self, now: DateTime<Utc>) -> Vec<&str> {
        self.schedules
            .iter()
            .filter(|(_, (at, interval))| overdue(*at, Some(*interval), now))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// Whether a plugin last collected `at` on `interval_s` is overdue at `now`: the rule of
/// [`crate::document::PluginMeta::overdue`], for view rows.
pub fn overdue(at: DateTime<Utc>, interval_s: Option<u64>, now: DateTime<Utc>) -> bool {
    let meta_like = interval_s
        .and_then(|i| i64::try_from(i).ok())
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|i| i.checked_mul(crate::document::OVERDUE_INTERVALS))
        .and_then(|d| at.checked_add_signed(d));
    meta_like.is_some_and(|due| now > due)
}

/// A [`QUARANTINE`] row's value, read as leniently as [`Registered`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Quarantined {
    pub reason: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

impl Quarantined {
    pub fn from_value(v: &Value) -> Self {
        Self {
            reason: v.get("reason").and_then(Value::as_str).map(str::to_string),
            since: time(v.get("since")),
        }
    }
}

/// A [`HISTORY_BY_TIME`] row's value, read as leniently as [`Registered`]: `None`s from a
/// design document older than version 6, whose rows carried no value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryRow {
    pub node: Option<String>,
    pub plugin: Option<String>,
}

impl HistoryRow {
    pub fn from_value(v: &Value) -> Self {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Self {
            node: text("node"),
            plugin: text("plugin"),
        }
    }
}

/// A [`COLLECTED`] row's value, read as leniently as [`Registered`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Collected {
    pub collected_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    /// The plugin's interval, when it is scheduled on the node.
    pub interval_s: Option<u64>,
}

impl Collected {
    pub fn from_value(v: &Value) -> Self {
        Self {
            collected_at: time(v.get("collected_at")),
            outcome: v.get("outcome").and_then(Value::as_str).map(str::to_string),
            interval_s: v.get("interval_s").and_then(Value::as_u64),
        }
    }

    /// Fold in the row of the node's freshness document: a newer confirmation is the
    /// plugin's last run (an `ok` one); the interval stays the node document's.
    pub fn merge(&mut self, fresh: Collected) {
        if fresh.collected_at > self.collected_at {
            self.collected_at = fresh.collected_at;
            self.outcome = fresh.outcome;
        }
    }

    /// Scheduled, and not collected within twice its interval at `now`.
    pub fn overdue(&self, now: DateTime<Utc>) -> bool {
        self.collected_at
            .is_some_and(|at| overdue(at, self.interval_s, now))
    }

    /// `--cached fresh`: scheduled, last run `ok`, and not overdue.
    pub fn fresh(&self, now: DateTime<Utc>) -> bool {
        self.outcome.as_deref() == Some("ok") && self.interval_s.is_some() && !self.overdue(now)
    }

    /// Collected successfully at or after `cutoff`.
    pub fn ok_since(&self, cutoff: DateTime<Utc>) -> bool {
        self.outcome.as_deref() == Some("ok") && self.collected_at.is_some_and(|t| t >= cutoff)
    }
}

fn time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    v.and_then(Value::as_str).and_then(|t| t.parse().ok())
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
        for d in [nodes(), inventory(), history(), enrollment()] {
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

    #[test]
    fn every_view_is_installed_under_its_own_name() {
        let nodes = nodes();
        for v in NODE_VIEWS {
            assert_eq!(nodes["views"][v.name]["map"], v.map, "{}", v.name);
            assert_eq!(v.ddoc, NODES_DDOC);
        }
        let inventory = inventory();
        for v in INVENTORY_VIEWS {
            assert_eq!(inventory["views"][v.name]["map"], v.map, "{}", v.name);
            assert_eq!(inventory["views"][v.name]["reduce"], "_count");
            assert_eq!(v.ddoc, INVENTORY_DDOC);
        }
        let history = history();
        for v in HISTORY_VIEWS {
            assert_eq!(history["views"][v.name]["map"], v.map, "{}", v.name);
            assert_eq!(v.ddoc, HISTORY_DDOC);
        }
        assert_eq!(history_database("inv"), "inv_history");
        let enrollment = enrollment();
        for v in ENROLLMENT_VIEWS {
            assert_eq!(enrollment["views"][v.name]["map"], v.map, "{}", v.name);
            assert_eq!(enrollment["views"][v.name]["reduce"], "_count");
            assert_eq!(v.ddoc, ENROLLMENT_DDOC);
        }
    }

    #[test]
    fn the_views_bounds_are_the_constants_readers_know() {
        // The map functions are JavaScript literals: the numbers in them must be these.
        for (view, bounds) in [
            (
                VALUES,
                vec![
                    format!("n <= {VALUES_MAX_PER_NODE}"),
                    format!("x.length > {VALUES_MAX_TEXT}"),
                    format!("depth < {VALUES_MAX_DEPTH}"),
                ],
            ),
            (
                PACKAGES,
                vec![
                    format!("list.length > {PACKAGES_MAX_RECORDS}"),
                    format!("c > {PACKAGES_MAX_SAME_NAME}"),
                    format!("x.length <= {PACKAGES_MAX_TEXT}"),
                ],
            ),
        ] {
            for b in bounds {
                assert!(view.map.contains(&b), "{}: {b}", view.name);
            }
        }
    }

    #[test]
    fn rows_are_read_leniently() {
        let r = Registered::from_value(&json!({
            "last_seen": "2026-01-02T03:04:05Z", "agent_version": "0.1.0", "facts": {"os": "x"}
        }));
        assert_eq!(r.agent_version.as_deref(), Some("0.1.0"));
        assert!(r.last_seen.is_some());
        assert_eq!(r.facts["os"], "x");
        let junk =
            Registered::from_value(&json!({"last_seen": 5, "facts": [1], "agent_version": {}}));
        assert_eq!(junk, Registered::default());
        let c = Collected::from_value(
            &json!({"collected_at": "2026-01-02T03:04:05Z", "outcome": "ok"}),
        );
        let at: DateTime<Utc> = "2026-01-02T03:04:05Z".parse().expect("time");
        assert!(c.ok_since(at));
        assert!(!c.ok_since(at + chrono::Duration::seconds(1)));
        assert!(
            !Collected::from_value(
                &json!({"collected_at": "2026-01-02T03:04:05Z", "outcome": "failed"})
            )
            .ok_since(at)
        );
    }
}
