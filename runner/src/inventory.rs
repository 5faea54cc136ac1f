//! Questions answered from CouchDB without fan-out: which nodes have a package or a fact, and
//! how a plugin's value changed over time.

use std::{collections::BTreeSet, fmt::Write as _};

use serde_json::Value;
use vogeler_config::CouchSettings;
use vogeler_core::{
    couch::{CouchClient, CouchError},
    query::Inventory,
};
use vogeler_proto::{
    design::Pending,
    document::{HistoryEntry, NodeDocument},
    enrollment::{self, Enrollment, KeyBinding},
    names::{NodeName, PluginName},
    signing::{KeyError, PrivateKey, PublicKey},
};

use vogeler_proto::text::printable;

use crate::{
    RunnerError,
    diff::Change,
    output::{Rows, rows_of},
    target::NodeSet,
};

/// `find package` and `find fact`: the nodes found.
pub const FIND_COLUMNS: &[&str] = &["node"];
/// `nodes`: one row per registered node.
pub const NODE_COLUMNS: &[&str] = &[
    "node",
    "last_seen",
    "agent_version",
    "stale",
    "quarantined",
    "overdue",
];
/// `nodes pending`: one row per waiting key.
pub const PENDING_COLUMNS: &[&str] = &[
    "node",
    "key_id",
    "first_seen",
    "last_seen",
    "agent_version",
    "facts",
];
/// `nodes accept`: the key accepted.
pub const ACCEPT_COLUMNS: &[&str] = &["node", "key_id", "first_seen", "last_seen"];
/// `nodes forget`: the key forgotten (empty when none was pinned).
pub const FORGET_COLUMNS: &[&str] = &["node", "forgotten_key"];
/// `nodes reject`: one row per key rejected.
pub const REJECT_COLUMNS: &[&str] = &["node", "key_id"];
/// `keygen`: the files written.
pub const KEYGEN_COLUMNS: &[&str] = &["key_id", "private_key", "public_key"];
/// `history` and `changes`: one row per change. Every kind's fields, so a row of any kind
/// fits; the ones a kind does not have are empty (`first`: items, value; `packages`,
/// `object`: changed, added, removed; `list`: added, removed; `value`: old, new).
pub const CHANGE_COLUMNS: &[&str] = &[
    "at",
    "node",
    "plugin",
    "request_id",
    "unrecorded",
    "kind",
    "items",
    "value",
    "old",
    "new",
    "changed",
    "added",
    "removed",
];

/// The inventory in CouchDB, through the one query module.
pub(crate) fn open(settings: &CouchSettings) -> Result<Inventory, RunnerError> {
    let couch = CouchClient::from_settings(settings).map_err(RunnerError::Http)?;
    Ok(Inventory::new(couch, &settings.database))
}

/// A failed read of the inventory, with a hint when the server has not set it up yet.
pub(crate) fn registry_error(e: CouchError) -> RunnerError {
    if e.is_not_found() {
        RunnerError::NotReady(e)
    } else if e.is_denied() {
        RunnerError::Denied(e)
    } else {
        RunnerError::Registry(e)
    }
}

/// Clear a node's pinned key, so the next key it signs with is pinned (a reinstalled node
/// has a new key), or in approve mode waits for `nodes accept` again. The old key's binding
/// and the node's enrollment record go with it, so the old key may serve another node and
/// the node starts afresh. Returns the id of the key that was pinned, or `None` when none
/// was.
pub async fn forget(
    settings: &CouchSettings,
    node: &NodeName,
) -> Result<Option<String>, RunnerError> {
    let inventory = open(settings)?;
    let couch = inventory.client();
    let enrollment_db = inventory.enrollment_database();
    let write = |source: CouchError| write_error(node, source);
    let record = couch
        .get::<Enrollment>(enrollment_db, node.as_str())
        .await
        .map_err(registry_error)?;
    let old = match couch
        .get::<NodeDocument>(&settings.database, node.as_str())
        .await
        .map_err(registry_error)?
    {
        None if record.is_none() => return Err(RunnerError::NoSuchNode(node.to_string())),
        None => None,
        Some(_) => update_document(settings, couch, node, |doc| Ok(doc.meta.key.take())).await?,
    };
    if let Some(key) = old.as_deref().and_then(PublicKey::from_base64) {
        let id = enrollment::key_binding_id(&key);
        if let Some(binding) = couch
            .get::<KeyBinding>(enrollment_db, &id)
            .await
            .map_err(registry_error)?
            && binding.node == node.as_str()
        {
            delete(couch, enrollment_db, &id, binding.rev.as_deref())
                .await
                .map_err(write)?;
        }
    }
    if let Some(record) = record {
        delete(couch, enrollment_db, node.as_str(), record.rev.as_deref())
            .await
            .map_err(write)?;
    }
    Ok(old.map(|old| PublicKey::from_base64(&old).map_or_else(|| old.clone(), |k| k.id())))
}

/// `nodes forget`'s result: `old` is the key that was pinned.
pub fn forget_rows(node: &NodeName, old: Option<&str>) -> Rows {
    let table = match old {
        Some(old) => format!(
            "node {node}: forgot pinned key {}; the next key it signs with will be pinned\n",
            printable(old)
        ),
        None => format!("node {node}: no key was pinned\n"),
    };
    Rows::object(
        FORGET_COLUMNS,
        serde_json::json!({ "node": node, "forgotten_key": old }),
        table,
    )
}

/// `nodes reject`'s result: the keys rejected.
pub fn reject_rows(node: &NodeName, keys: &[String]) -> Rows {
    let table = format!(
        "node {node}: rejected key {}; messages signed with it are not stored\n",
        printable(&keys.join(", "))
    );
    let rows = keys
        .iter()
        .map(|k| serde_json::json!({ "node": node, "key_id": k }))
        .collect();
    Rows::list(REJECT_COLUMNS, rows, table)
}

/// `nodes accept`'s result; `database` is where the node's document now is.
pub fn accept_rows(a: &Accepted, database: &str) -> Rows {
    let table = format!(
        "node {}: accepted key {} (first seen {}, last seen {}); its document is in database {database}\n",
        printable(&a.node),
        printable(&a.key_id),
        time(a.first_seen),
        time(a.last_seen),
    );
    Rows::object(
        ACCEPT_COLUMNS,
        serde_json::to_value(a).unwrap_or_default(),
        table,
    )
}

/// What `nodes accept` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Accepted {
    pub node: String,
    pub key_id: String,
    pub first_seen: chrono::DateTime<chrono::Utc>,
    pub last_seen: chrono::DateTime<chrono::Utc>,
}

/// Accept the key waiting for approval as `node` (the one whose id starts with `key_id`, or
/// the only one): bind the key to the node, record the decision, and write the node's
/// document with the key pinned. Asks nothing: the operator compared the key id first.
pub async fn accept(
    settings: &CouchSettings,
    node: &NodeName,
    key_id: Option<&str>,
) -> Result<Accepted, RunnerError> {
    let inventory = open(settings)?;
    let couch = inventory.client();
    let enrollment_db = inventory.enrollment_database();
    let write = |source: CouchError| write_error(node, source);
    let now = chrono::Utc::now();
    let (claim, record) = decide(couch, enrollment_db, node, |r| r.accept(key_id, now)).await?;
    let key = PublicKey::from_base64(&claim.key).ok_or_else(|| {
        RunnerError::Enrollment(format!("node {node}: the claim's key is not a valid key"))
    })?;
    // One key serves one node: the binding first, so a key bound elsewhere is never accepted.
    let binding = KeyBinding::new(&key, node, now);
    match couch.put(enrollment_db, &binding.id, &binding).await {
        Ok(_) => {}
        Err(e) if e.is_conflict() => {
            let existing = couch
                .get::<KeyBinding>(enrollment_db, &binding.id)
                .await
                .map_err(registry_error)?;
            if let Some(why) = existing.and_then(|b| enrollment::bound_elsewhere(&key, node, &b)) {
                return Err(RunnerError::Enrollment(why));
            }
        }
        Err(e) => return Err(write(e)),
    }
    // The decision next: from here on the server pins this key itself on the node's next
    // message, even if writing the document below fails.
    couch
        .put(enrollment_db, node.as_str(), &record)
        .await
        .map_err(write)?;
    let exists = couch
        .get::<NodeDocument>(&settings.database, node.as_str())
        .await
        .map_err(registry_error)?
        .is_some();
    if exists {
        update_document(settings, couch, node, |doc| {
            enrollment::admit(doc, &claim, now).map_err(RunnerError::Enrollment)
        })
        .await?;
    } else {
        let mut doc = NodeDocument::new(node, now);
        enrollment::admit(&mut doc, &claim, now).map_err(RunnerError::Enrollment)?;
        match couch.put(&settings.database, node.as_str(), &doc).await {
            Ok(_) => {}
            // The server wrote it first, from the node's next message: pin it there.
            Err(e) if e.is_conflict() => {
                update_document(settings, couch, node, |doc| {
                    enrollment::admit(doc, &claim, now).map_err(RunnerError::Enrollment)
                })
                .await?;
            }
            Err(e) => return Err(write(e)),
        }
    }
    Ok(Accepted {
        node: node.to_string(),
        key_id: claim.key_id,
        first_seen: claim.first_seen,
        last_seen: claim.last_seen,
    })
}

/// Reject the key(s) waiting for approval as `node`: their messages are never stored.
/// Returns the ids of the keys rejected.
pub async fn reject(
    settings: &CouchSettings,
    node: &NodeName,
    key_id: Option<&str>,
) -> Result<Vec<String>, RunnerError> {
    let inventory = open(settings)?;
    let couch = inventory.client();
    let enrollment_db = inventory.enrollment_database();
    let now = chrono::Utc::now();
    let (rejected, record) = decide(couch, enrollment_db, node, |r| r.reject(key_id, now)).await?;
    couch
        .put(enrollment_db, node.as_str(), &record)
        .await
        .map_err(|source| write_error(node, source))?;
    Ok(rejected)
}

/// Every key waiting for approval, by node.
pub async fn pending(settings: &CouchSettings) -> Result<Vec<(String, Pending)>, RunnerError> {
    open(settings)?.pending().await.map_err(registry_error)
}

/// Read a node's enrollment record and apply a decision to it (the caller writes it back
/// with the revision it was read at, so a concurrent change is a conflict, not a loss).
async fn decide<T>(
    couch: &CouchClient,
    enrollment_db: &str,
    node: &NodeName,
    decision: impl FnOnce(&mut Enrollment) -> Result<T, String>,
) -> Result<(T, Enrollment), RunnerError> {
    let Some(mut record) = couch
        .get::<Enrollment>(enrollment_db, node.as_str())
        .await
        .map_err(registry_error)?
    else {
        return Err(RunnerError::Enrollment(format!(
            "node {node}: no key is waiting for approval (see vogeler-runner nodes pending; keys wait only when the server runs with server.enrollment = \"approve\")"
        )));
    };
    let decided = decision(&mut record).map_err(RunnerError::Enrollment)?;
    Ok((decided, record))
}

/// Change a node's document and write it back, reading it again after a conflict (a result
/// arriving in between changes the revision).
async fn update_document<T>(
    settings: &CouchSettings,
    couch: &CouchClient,
    node: &NodeName,
    mut change: impl FnMut(&mut NodeDocument) -> Result<T, RunnerError>,
) -> Result<T, RunnerError> {
    for _ in 0..5 {
        let Some(mut doc) = couch
            .get::<NodeDocument>(&settings.database, node.as_str())
            .await
            .map_err(registry_error)?
        else {
            return Err(RunnerError::NoSuchNode(node.to_string()));
        };
        let changed = change(&mut doc)?;
        match couch.put(&settings.database, node.as_str(), &doc).await {
            Ok(_) => return Ok(changed),
            Err(e) if e.is_conflict() => continue,
            Err(source) => return Err(write_error(node, source)),
        }
    }
    Err(write_error(
        node,
        CouchError::Conflict {
            db: settings.database.clone(),
            id: node.to_string(),
        },
    ))
}

/// Delete a document at the revision it was read at.
async fn delete(
    couch: &CouchClient,
    db: &str,
    id: &str,
    rev: Option<&str>,
) -> Result<(), CouchError> {
    let gone = serde_json::json!({ "_id": id, "_rev": rev, "_deleted": true });
    couch.put(db, id, &gone).await.map(|_| ())
}

fn write_error(node: &NodeName, source: CouchError) -> RunnerError {
    RunnerError::Write {
        node: node.to_string(),
        source: Box::new(source),
    }
}

/// `keygen`'s result: the two files and the key's id.
pub fn keygen_rows(private: &std::path::Path, public: &std::path::Path, id: &str) -> Rows {
    let table = format!(
        "created key {id}:\n  {}  (private: keep it on this machine, mode 0600)\n  {}  (public: install it in each agent's authorized keys)\nsign with it: --signing-key {} (or runner.signing_key in the config file)\n",
        private.display(),
        public.display(),
        private.display()
    );
    Rows::object(
        KEYGEN_COLUMNS,
        serde_json::json!({
            "key_id": id,
            "private_key": private.display().to_string(),
            "public_key": public.display().to_string(),
        }),
        table,
    )
}

/// Write a new key pair into `dir` (created 0700 if missing): `runner.key` (0600) and
/// `runner.pub`. Returns the two paths and the key id.
pub fn keygen(
    dir: &std::path::Path,
    comment: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf, String), KeyError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    let (private, public) = (dir.join("runner.key"), dir.join("runner.pub"));
    if public.exists() {
        return Err(KeyError::Exists { path: public });
    }
    let key = PrivateKey::generate()?;
    vogeler_core::keyfile::save_private(&key, &private)?;
    std::fs::write(&public, format!("{}\n", key.public().to_line(comment))).map_err(|source| {
        KeyError::Write {
            path: public.clone(),
            source,
        }
    })?;
    Ok((private, public, key.public().id()))
}

/// `NAME` or `NAME=VERSION`.
pub fn parse_package(spec: &str) -> Result<(String, Option<String>), String> {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (spec, None),
    };
    if name.is_empty() || version.as_deref() == Some("") {
        return Err(format!("{spec:?}: write NAME or NAME=VERSION"));
    }
    Ok((name.to_string(), version))
}

/// Nodes with an installed package (in any package inventory), sorted.
pub async fn find_package(
    settings: &CouchSettings,
    name: &str,
    version: Option<&str>,
) -> Result<Vec<String>, RunnerError> {
    Ok(open(settings)?
        .with_package(name, version)
        .await
        .map_err(registry_error)?
        .into_iter()
        .collect())
}

/// `KEY=VALUE`, the value read as JSON when it is a number or boolean.
pub fn parse_fact(spec: &str) -> Result<(String, Value), String> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?}: write KEY=VALUE, e.g. os.family=Debian"))?;
    if key.is_empty() {
        return Err(format!("{spec:?}: the fact name is empty"));
    }
    let value = match serde_json::from_str::<Value>(value) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) => v,
        _ => Value::String(value.to_string()),
    };
    Ok((key.to_string(), value))
}

/// `find`'s nodes, one a line in the table.
pub fn find_rows(nodes: &[String]) -> Rows {
    let table = nodes
        .iter()
        .map(|n| format!("{}\n", printable(n)))
        .collect();
    let rows = nodes
        .iter()
        .map(|n| serde_json::json!({ "node": n }))
        .collect();
    Rows::list(FIND_COLUMNS, rows, table)
}

/// Nodes whose reported fact `key` equals `value` (a number also matches its text form).
pub async fn find_fact(
    settings: &CouchSettings,
    key: &str,
    value: &Value,
) -> Result<Vec<String>, RunnerError> {
    let inventory = open(settings)?;
    let mut candidates = vec![value.clone()];
    if !value.is_string() {
        candidates.push(Value::String(value.to_string()));
    }
    let mut nodes = BTreeSet::new();
    for v in candidates {
        nodes.extend(inventory.with_fact(key, &v).await.map_err(registry_error)?);
    }
    Ok(nodes.into_iter().collect())
}

/// Every recorded change of `plugin` on `node`, oldest first.
pub async fn history(
    settings: &CouchSettings,
    node: &NodeName,
    plugin: &PluginName,
) -> Result<Vec<HistoryEntry>, RunnerError> {
    open(settings)?
        .history(node.as_str(), plugin.as_str())
        .await
        .map_err(registry_error)
}

/// A registered node, for `nodes`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeInfo {
    pub node: String,
    pub last_seen: Option<chrono::DateTime<chrono::Utc>>,
    pub agent_version: Option<String>,
    /// Not seen within the freshness window.
    pub stale: bool,
    /// Why the server cannot read the node's document back (its results are refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// Scheduled plugins not collected within twice their interval.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overdue: Vec<String>,
}

/// Registered nodes in `set`, stale ones included (and flagged).
pub async fn nodes(
    settings: &CouchSettings,
    set: &NodeSet,
    freshness: std::time::Duration,
) -> Result<Vec<NodeInfo>, RunnerError> {
    let registry = crate::registry(settings, freshness).await?;
    let mut quarantined: std::collections::BTreeMap<String, String> = open(settings)?
        .quarantined()
        .await
        .map_err(registry_error)?
        .into_iter()
        .map(|(n, q)| (n, q.reason.unwrap_or_else(|| "unreadable".into())))
        .collect();
    let selected = crate::select_nodes(settings, set, &registry).await?;
    let mut out: Vec<NodeInfo> = registry
        .iter()
        .filter(|(n, _)| selected.contains(*n))
        .map(|(n, k)| NodeInfo {
            node: n.to_string(),
            last_seen: k.last_seen,
            agent_version: k.agent_version.clone(),
            stale: !k.fresh,
            quarantined: quarantined.remove(n.as_str()),
            overdue: k.overdue.clone(),
        })
        .collect();
    // A document the registry view cannot list is still a node the operator must hear of.
    for (node, reason) in quarantined {
        if let Ok(name) = NodeName::new(&node)
            && (set.is_all() || selected.contains(&name))
        {
            out.push(NodeInfo {
                node,
                last_seen: None,
                agent_version: None,
                stale: true,
                quarantined: Some(reason),
                overdue: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// `nodes`, in every format.
pub fn nodes_rows(nodes: &[NodeInfo]) -> Rows {
    Rows::list(NODE_COLUMNS, rows_of(nodes), render_nodes(nodes))
}

pub fn render_nodes(nodes: &[NodeInfo]) -> String {
    let width = nodes.iter().map(|n| n.node.len()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:<width$}  {:<20}  {:<8}  {}\n",
        "NODE", "LAST SEEN", "VERSION", "STATE"
    );
    for n in nodes {
        let seen = n.last_seen.map_or("never".into(), |t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        });
        let mut state = match (&n.quarantined, n.stale) {
            (Some(why), _) => format!("quarantined: {why}"),
            (None, true) => "stale".into(),
            (None, false) => String::new(),
        };
        if !n.overdue.is_empty() {
            if !state.is_empty() {
                state.push_str("; ");
            }
            // A node may schedule hundreds of plugins: name a few, count the rest.
            const SHOWN: usize = 5;
            let mut names = n.overdue[..n.overdue.len().min(SHOWN)].join(",");
            if n.overdue.len() > SHOWN {
                names.push_str(&format!(" and {} more", n.overdue.len() - SHOWN));
            }
            state.push_str(&format!(
                "overdue: {}",
                vogeler_proto::text::printable(&names)
            ));
        }
        let version = n.agent_version.as_deref().unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<width$}  {:<20}  {:<8}  {}",
            n.node,
            seen,
            vogeler_proto::text::printable(version),
            vogeler_proto::text::printable(&state)
        );
    }
    let stale = nodes.iter().filter(|n| n.stale).count();
    let quarantined = nodes.iter().filter(|n| n.quarantined.is_some()).count();
    let overdue = nodes.iter().filter(|n| !n.overdue.is_empty()).count();
    let _ = write!(out, "{} node(s), {stale} stale", nodes.len());
    if overdue > 0 {
        let _ = write!(
            out,
            ", {overdue} with overdue plugins (no run stored within twice the interval: is the agent running?)"
        );
    }
    if quarantined > 0 {
        let _ = write!(
            out,
            ", {quarantined} quarantined (the server cannot read their documents: repair or delete them)"
        );
    }
    out.push('\n');
    out
}

/// A time as the tables show it.
pub fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `nodes pending`, in every format: each key's row names its node.
pub fn pending_rows(pending: &[(String, Pending)]) -> Rows {
    let rows = pending
        .iter()
        .map(|(node, p)| {
            let mut row = serde_json::to_value(p).unwrap_or_default();
            row["node"] = node.as_str().into();
            row
        })
        .collect();
    Rows::list(PENDING_COLUMNS, rows, render_pending(pending))
}

/// `nodes pending` as a table. Node-supplied text (version, facts) is escaped.
pub fn render_pending(pending: &[(String, Pending)]) -> String {
    use vogeler_proto::text::printable;
    let width = pending
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "{:<width$}  {:<16}  {:<20}  {:<20}  {:<8}  {}\n",
        "NODE", "KEY", "FIRST SEEN", "LAST SEEN", "VERSION", "FACTS"
    );
    let never = || "-".to_string();
    for (node, p) in pending {
        // The facts that tell nodes apart, not all of them.
        let facts: Vec<String> = ["hostname", "os.family", "os.version", "kernel", "arch"]
            .iter()
            .filter_map(|k| {
                let v = p.facts.get(*k)?;
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                Some(format!("{k}={v}"))
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<width$}  {:<16}  {:<20}  {:<20}  {:<8}  {}",
            printable(node),
            printable(p.key_id.as_deref().unwrap_or("-")),
            p.first_seen.map_or_else(never, time),
            p.last_seen.map_or_else(never, time),
            printable(p.agent_version.as_deref().unwrap_or("-")),
            printable(&facts.join(" "))
        );
    }
    let _ = writeln!(
        out,
        "{} key(s) waiting; compare each KEY with `vogeler-agent key` on its node, then: vogeler-runner nodes accept NODE (or nodes reject NODE)",
        pending.len()
    );
    out
}

/// A node's stored document (with its freshness document's record under `vogeler_fresh`:
/// last seen, and runs that confirmed a value since it was stored), or one plugin's value.
pub async fn show(
    settings: &CouchSettings,
    node: &NodeName,
    plugin: Option<&PluginName>,
) -> Result<Option<Value>, RunnerError> {
    let inventory = open(settings)?;
    let couch = inventory.client();
    let doc: Option<Value> = couch
        .get(&settings.database, node.as_str())
        .await
        .map_err(registry_error)?;
    Ok(match (doc, plugin) {
        (None, _) => None,
        (Some(mut d), None) => {
            let fresh: Option<Value> = couch
                .get(&settings.database, &vogeler_proto::fresh::fresh_id(node))
                .await
                .map_err(registry_error)?;
            if let (Some(f), Some(obj)) = (
                fresh.and_then(|f| f.get("vogeler_fresh").cloned()),
                d.as_object_mut(),
            ) {
                obj.insert("vogeler_fresh".into(), f);
            }
            Some(d)
        }
        (Some(d), Some(p)) => d.get(p.as_str()).cloned(),
    })
}

/// `show`: json and yaml print the stored document or value exactly; the table prints it as
/// indented JSON with node-supplied text escaped; jsonl and csv print it as rows (see
/// [`crate::output::value_rows`]).
pub fn show_rows(v: &Value) -> Rows {
    let (columns, rows) = crate::output::value_rows(v);
    let pretty = serde_json::to_string_pretty(v).unwrap_or_default();
    // JSON escapes C0 controls itself; C1 controls, DEL and bidi overrides it keeps raw.
    let table = format!("{}\n", vogeler_proto::text::printable_lines(&pretty));
    Rows::list(&[], rows, table)
        .with_columns(columns)
        .with_document(v.clone())
}

/// `history`'s changes, oldest first, in every format.
pub fn history_rows(changes: &[Change], full: bool) -> Rows {
    Rows::list(
        CHANGE_COLUMNS,
        rows_of(changes),
        render_history(changes, full),
    )
}

/// Every recorded change of `plugin` on `node` as [`Change`]s, oldest first.
pub fn history_changes(entries: &[HistoryEntry]) -> Vec<Change> {
    entries.iter().map(Change::of).collect()
}

/// One block per change of one node's plugin: its time and request, then what changed
/// (see [`crate::diff`]).
pub fn render_history(changes: &[Change], full: bool) -> String {
    let mut out = String::new();
    for c in changes {
        let _ = writeln!(out, "{}  request {}", time(c.at), c.request_id);
        render_diff(&mut out, c, full);
    }
    if changes.is_empty() {
        let _ = writeln!(out, "no recorded changes");
    }
    out
}

/// Lines a change shows in a table before `--full` is needed: a distribution upgrade
/// changes hundreds of packages, and one node should not push the rest off the screen.
const LINES_PER_CHANGE: usize = 20;

fn render_diff(out: &mut String, c: &Change, full: bool) {
    if c.unrecorded > 0 {
        let _ = writeln!(
            out,
            "  ({} earlier change(s) not recorded: the value changed faster than the server's history budget)",
            c.unrecorded
        );
    }
    let lines = c.diff.lines(full);
    let shown = if full { lines.len() } else { LINES_PER_CHANGE };
    for line in lines.iter().take(shown) {
        let _ = writeln!(out, "  {line}");
    }
    if lines.len() > shown {
        let _ = writeln!(
            out,
            "  … {} more (--full shows them all)",
            lines.len() - shown
        );
    }
}

/// What `changes` asks the history for.
#[derive(Debug, Clone)]
pub struct ChangesQuery {
    /// Changes recorded within this long before now.
    pub since: std::time::Duration,
    /// Only these plugins (all when empty).
    pub plugins: Vec<PluginName>,
    /// At most this many changes, the newest.
    pub limit: usize,
}

/// Changes across the fleet, newest first.
#[derive(Debug, Clone)]
pub struct Changes {
    pub changes: Vec<Change>,
    /// The start of the window asked for.
    pub since: chrono::DateTime<chrono::Utc>,
    /// More changes match than the limit let through.
    pub more: bool,
}

/// Entries fetched per request: each holds two whole values (a package list can be
/// megabytes), and only their diffs are kept.
const ENTRIES_PER_REQUEST: usize = 50;

/// Changes of every node in `set` (or of `plugins`) recorded within `query.since`, newest
/// first, at most `query.limit` of them.
pub async fn changes(
    settings: &CouchSettings,
    set: &NodeSet,
    freshness: std::time::Duration,
    query: &ChangesQuery,
) -> Result<Changes, RunnerError> {
    let inventory = open(settings)?;
    // `all` is every node with history, registered still or not; other sets need facts.
    let selected = if set.is_all() {
        None
    } else {
        let registry = crate::registry(settings, freshness).await?;
        Some(crate::select_nodes(settings, set, &registry).await?)
    };
    let node_wanted = |node: &str| match &selected {
        None => true,
        Some(selected) => NodeName::new(node).is_ok_and(|n| selected.contains(&n)),
    };
    let plugin_wanted = |plugin: &str| {
        query.plugins.is_empty() || query.plugins.iter().any(|p| p.as_str() == plugin)
    };
    let since = vogeler_proto::duration::before(chrono::Utc::now(), query.since);
    let cutoff = since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    // Rows from a design document older than version 6 name no node or plugin: kept here,
    // judged below once their entry is read.
    let (ids, more) = inventory
        .changes_since(&cutoff, query.limit, |row| {
            row.node.as_deref().is_none_or(node_wanted)
                && row.plugin.as_deref().is_none_or(plugin_wanted)
        })
        .await
        .map_err(registry_error)?;
    let mut changes = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ENTRIES_PER_REQUEST) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let entries = inventory
            .history_entries(&chunk)
            .await
            .map_err(registry_error)?;
        changes.extend(
            entries
                .iter()
                .filter(|e| node_wanted(&e.node) && plugin_wanted(&e.plugin))
                .map(Change::of),
        );
    }
    Ok(Changes {
        changes,
        since,
        more,
    })
}

/// `changes` in every format; when the limit cut the list, the data formats say so on stderr.
pub fn changes_rows(c: &Changes, full: bool) -> Rows {
    let rows = Rows::list(CHANGE_COLUMNS, rows_of(&c.changes), render_changes(c, full));
    match c.more {
        true => rows.with_note(more_note(c.changes.len())),
        false => rows,
    }
}

/// `changes` as a table: one block per change, newest first, and what was left out.
pub fn render_changes(c: &Changes, full: bool) -> String {
    let mut out = String::new();
    let width = |f: fn(&Change) -> &str| {
        c.changes
            .iter()
            .map(|c| printable(f(c)).chars().count())
            .max()
            .unwrap_or(0)
    };
    let (nodes, plugins) = (width(|c| &c.node), width(|c| &c.plugin));
    for change in &c.changes {
        let _ = writeln!(
            out,
            "{}  {:<nodes$}  {:<plugins$}",
            time(change.at),
            printable(&change.node),
            printable(&change.plugin)
        );
        render_diff(&mut out, change, full);
    }
    let since = time(c.since);
    match c.changes.len() {
        0 => {
            let _ = writeln!(out, "no changes since {since}");
        }
        n => {
            let _ = writeln!(out, "{n} change(s) since {since}, newest first");
        }
    }
    if c.more {
        let _ = writeln!(out, "{}", more_note(c.changes.len()));
    }
    out
}

/// What to say when the limit cut the list short.
pub fn more_note(shown: usize) -> String {
    format!(
        "more changes exist: these are the newest {shown}; raise --limit, shorten --since, or narrow with -n or --plugin"
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cli::Output;
    use chrono::Utc;
    use uuid::Uuid;

    #[test]
    fn specs_parse() {
        assert_eq!(parse_package("bash"), Ok(("bash".into(), None)));
        assert_eq!(
            parse_package("bash=5.2-1"),
            Ok(("bash".into(), Some("5.2-1".into())))
        );
        assert!(parse_package("=1").is_err() && parse_package("bash=").is_err());
        assert_eq!(
            parse_fact("os.family=Debian"),
            Ok(("os.family".into(), json!("Debian")))
        );
        assert_eq!(parse_fact("cpus=2"), Ok(("cpus".into(), json!(2))));
        assert!(parse_fact("nonsense").is_err());
    }

    fn entry(old: Value, new: Value) -> HistoryEntry {
        HistoryEntry {
            id: "x".into(),
            node: "web01".into(),
            plugin: "p".into(),
            at: Utc::now(),
            request_id: Uuid::nil(),
            old_hash: None,
            new_hash: String::new(),
            old,
            new,
            unrecorded: 0,
        }
    }

    #[test]
    fn history_shows_what_changed() {
        let pkg = |v: &str| json!({"name": "openssl", "version": v, "arch": "amd64"});
        let mut flapping = entry(json!({"a": 1}), json!({"a": 2}));
        flapping.unrecorded = 3;
        let text = render_history(
            &history_changes(&[
                entry(Value::Null, json!(["a"])),
                entry(json!(["a", "b"]), json!(["a", "c"])),
                entry(json!("6.1"), json!("6.2")),
                entry(json!([pkg("3.0.11-1")]), json!([pkg("3.0.13-1")])),
                flapping,
            ]),
            false,
        );
        assert!(text.contains("  first value: 1 entries\n"), "{text}");
        assert!(text.contains("  + c\n  - b\n"), "{text}");
        assert!(text.contains("  6.1 → 6.2\n"), "{text}");
        assert!(text.contains("  openssl 3.0.11-1 → 3.0.13-1\n"), "{text}");
        assert!(
            text.contains("  (3 earlier change(s) not recorded") && text.contains("  a: 1 → 2\n"),
            "{text}"
        );
        assert_eq!(render_history(&[], false), "no recorded changes\n");
    }

    #[test]
    fn changes_render_newest_first_and_cut_long_blocks() {
        let mut big = entry(
            json!([]),
            json!((0..30).map(|i| format!("l{i}")).collect::<Vec<_>>()),
        );
        big.node = "db\u{1b}[2J01".into();
        let changes = Changes {
            changes: history_changes(&[big, entry(json!(1), json!(2))]),
            since: Utc::now(),
            more: true,
        };
        let text = render_changes(&changes, false);
        assert!(text.contains("db\\u{1b}[2J01  p\n  + l0\n"), "{text}");
        assert!(
            text.contains("  … 10 more (--full shows them all)\n"),
            "{text}"
        );
        assert!(text.contains("web01          p\n  1 → 2\n"), "{text}");
        assert!(
            text.contains("2 change(s) since ") && text.contains("raise --limit"),
            "{text}"
        );
        assert!(!render_changes(&changes, true).contains("more (--full"));
        // One JSON line per change: where, when, and the structured diff beside it.
        let line = serde_json::to_value(&changes.changes[1]).expect("json");
        assert_eq!(line["node"], "web01");
        assert_eq!(line["plugin"], "p");
        assert_eq!(line["request_id"], Uuid::nil().to_string());
        assert_eq!(line["kind"], "value");
        assert_eq!((&line["old"], &line["new"]), (&json!(1), &json!(2)));
        assert!(line.get("unrecorded").is_none() && line["at"].is_string());
    }

    /// Every field a row of `rows` has is one of `columns`: csv leaves nothing out.
    fn covered(columns: &[&str], rows: &[Value]) {
        for row in rows {
            for key in row.as_object().expect("an object row").keys() {
                assert!(columns.contains(&key.as_str()), "{key} is not a column");
            }
        }
    }

    #[test]
    fn change_rows_of_every_kind_fit_the_columns() {
        let pkg = |v: &str| json!({"name": "openssl", "version": v});
        let mut flapping = entry(json!({"a": 1, "b": 2}), json!({"a": 2, "c": 3}));
        flapping.unrecorded = 2;
        let changes = history_changes(&[
            entry(Value::Null, json!(["a"])),
            entry(Value::Null, json!("6.1")),
            entry(json!([pkg("1"), pkg("0")]), json!([pkg("2")])),
            flapping,
            entry(json!(["a", "b"]), json!(["a", "c"])),
            entry(json!("6.1"), json!(6.2)),
        ]);
        let rows = rows_of(&changes);
        covered(CHANGE_COLUMNS, &rows);
        let kinds: BTreeSet<&str> = rows.iter().filter_map(|r| r["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["first", "list", "object", "packages", "value"].into()
        );
        let csv = history_rows(&changes, false).render(Output::Csv).stdout;
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some(CHANGE_COLUMNS.join(",").as_str()));
        let first = lines.next().expect("a first value");
        assert!(
            first.ends_with(",p,00000000-0000-0000-0000-000000000000,,first,1,,,,,,"),
            "{first}"
        );
        assert!(
            csv.contains(
                ",2,object,,,,,\"[{\"\"new\"\":2,\"\"old\"\":1,\"\"path\"\":\"\"a\"\"}]\","
            ),
            "{csv}"
        );
        // A cell is text: the string "6.1" and the number 6.2 look alike (json keeps them apart).
        assert!(csv.ends_with(",value,,,6.1,6.2,,,\n"), "{csv}");
    }

    #[test]
    fn changes_cut_by_the_limit_say_so_on_stderr_in_data_formats() {
        let c = Changes {
            changes: history_changes(&[entry(json!(1), json!(2))]),
            since: Utc::now(),
            more: true,
        };
        let rows = changes_rows(&c, false);
        let table = rows.render(Output::Table);
        assert!(table.stdout.contains("raise --limit") && table.stderr.is_empty());
        for data in [Output::Json, Output::Jsonl, Output::Yaml, Output::Csv] {
            let p = rows.render(data);
            assert!(
                !p.stdout.contains("raise --limit"),
                "{data:?}: {}",
                p.stdout
            );
            assert!(p.stderr.contains("raise --limit"), "{data:?}");
        }
        assert_eq!(
            serde_json::from_str::<Value>(&rows.render(Output::Json).stdout).expect("json")[0]["kind"],
            "value"
        );
    }

    #[test]
    fn nodes_and_pending_keys_print_one_row_each() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .expect("time")
            .to_utc();
        let nodes = [
            NodeInfo {
                node: "web01".into(),
                last_seen: Some(t),
                agent_version: Some("0.1.0, \"beta\"\u{1b}[2J".into()),
                stale: false,
                quarantined: None,
                overdue: vec!["dpkg".into(), "facts".into()],
            },
            NodeInfo {
                node: "db01".into(),
                last_seen: None,
                agent_version: None,
                stale: true,
                quarantined: Some("unreadable".into()),
                overdue: vec![],
            },
        ];
        let rows = nodes_rows(&nodes);
        covered(NODE_COLUMNS, &rows_of(&nodes));
        assert_eq!(
            rows.render(Output::Csv).stdout,
            concat!(
                "node,last_seen,agent_version,stale,quarantined,overdue\n",
                "web01,2026-01-02T03:04:05Z,\"0.1.0, \"\"beta\"\"\u{1b}[2J\",false,,\"[\"\"dpkg\"\",\"\"facts\"\"]\"\n",
                "db01,,,true,unreadable,\n",
            )
        );
        let jsonl = rows.render(Output::Jsonl).stdout;
        assert_eq!(jsonl.lines().count(), 2, "{jsonl}");
        assert!(
            jsonl.contains("\"agent_version\":\"0.1.0, \\\"beta\\\"\\u001b[2J\""),
            "{jsonl}"
        );
        let table = rows.render(Output::Table).stdout;
        assert!(
            !table.contains('\u{1b}') && table.contains("\\u{1b}[2J"),
            "{table}"
        );

        let mut facts = serde_json::Map::new();
        facts.insert("os.family".into(), json!("Debian"));
        let pending = [(
            "web04".to_string(),
            Pending {
                key_id: Some("abc".into()),
                first_seen: Some(t),
                last_seen: Some(t),
                agent_version: None,
                facts,
            },
        )];
        let rows = pending_rows(&pending);
        assert_eq!(
            rows.render(Output::Csv).stdout,
            concat!(
                "node,key_id,first_seen,last_seen,agent_version,facts\n",
                "web04,abc,2026-01-02T03:04:05Z,2026-01-02T03:04:05Z,,\"{\"\"os.family\"\":\"\"Debian\"\"}\"\n",
            )
        );
        let jsonl: Value =
            serde_json::from_str(&rows.render(Output::Jsonl).stdout).expect("one line");
        assert_eq!(
            (&jsonl["node"], &jsonl["key_id"]),
            (&json!("web04"), &json!("abc"))
        );
    }

    #[test]
    fn find_prints_names_escaped_in_the_table_and_exact_as_data() {
        let nodes = ["web01".to_string(), "odd\u{1b}]0;x\u{7}".to_string()];
        let rows = find_rows(&nodes);
        assert_eq!(
            rows.render(Output::Table).stdout,
            "web01\nodd\\u{1b}]0;x\\u{7}\n"
        );
        assert_eq!(
            rows.render(Output::Csv).stdout,
            "node\nweb01\nodd\u{1b}]0;x\u{7}\n"
        );
        assert_eq!(
            rows.render(Output::Json).stdout,
            "[\n  {\n    \"node\": \"web01\"\n  },\n  {\n    \"node\": \"odd\\u001b]0;x\\u0007\"\n  }\n]\n"
        );
    }

    #[test]
    fn show_prints_the_value_whole_or_as_rows() {
        let v =
            json!([{"name": "bash", "version": "5.2"}, {"name": "x\u{202e}y", "version": "1,2"}]);
        let rows = show_rows(&v);
        let table = rows.render(Output::Table).stdout;
        assert!(
            table.contains("x\\u{202e}y") && !table.contains('\u{202e}'),
            "{table}"
        );
        let json: Value = serde_json::from_str(&rows.render(Output::Json).stdout).expect("json");
        assert_eq!(json, v, "json is the value exactly");
        assert_eq!(
            rows.render(Output::Csv).stdout,
            "name,version\nbash,5.2\nx\u{202e}y,\"1,2\"\n"
        );
        assert_eq!(rows.render(Output::Jsonl).stdout.lines().count(), 2);
        let facts = show_rows(&json!({"cpus": 2, "os": {"family": "Debian"}}));
        assert_eq!(
            facts.render(Output::Csv).stdout,
            "key,value\ncpus,2\nos,\"{\"\"family\"\":\"\"Debian\"\"}\"\n"
        );
    }

    #[test]
    fn key_decisions_print_as_objects_or_rows() {
        let node = NodeName::new("web01").expect("node");
        let forgot = forget_rows(&node, Some("k1"));
        assert_eq!(
            forgot.render(Output::Jsonl).stdout,
            "{\"forgotten_key\":\"k1\",\"node\":\"web01\"}\n"
        );
        assert_eq!(
            forget_rows(&node, None).render(Output::Csv).stdout,
            "node,forgotten_key\nweb01,\n"
        );
        let rejected = reject_rows(&node, &["k1".into(), "k2".into()]);
        assert_eq!(
            rejected.render(Output::Csv).stdout,
            "node,key_id\nweb01,k1\nweb01,k2\n"
        );
        assert!(
            rejected
                .render(Output::Table)
                .stdout
                .contains("rejected key k1, k2")
        );
        let t = Utc::now();
        let accepted = accept_rows(
            &Accepted {
                node: "web01".into(),
                key_id: "k1".into(),
                first_seen: t,
                last_seen: t,
            },
            "vogeler",
        );
        let json: Value =
            serde_json::from_str(&accepted.render(Output::Json).stdout).expect("json");
        assert_eq!(json["key_id"], "k1", "one object, not an array");
        let keys = keygen_rows(
            std::path::Path::new("/k/runner.key"),
            std::path::Path::new("/k/runner.pub"),
            "id1",
        );
        assert_eq!(
            keys.render(Output::Csv).stdout,
            "key_id,private_key,public_key\nid1,/k/runner.key,/k/runner.pub\n"
        );
    }
}
