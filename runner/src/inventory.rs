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

use crate::{RunnerError, target::NodeSet};

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

/// Nodes with an installed package (from the `dpkg` and `rpms` plugins), sorted.
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
    let mut out: Vec<NodeInfo> = registry
        .iter()
        .filter(|(n, k)| set.matches(n, Some(k)))
        .map(|(n, k)| NodeInfo {
            node: n.to_string(),
            last_seen: k.last_seen,
            agent_version: k.agent_version.clone(),
            stale: !k.fresh,
            quarantined: quarantined.remove(n.as_str()),
        })
        .collect();
    // A document the registry view cannot list is still a node the operator must hear of.
    for (node, reason) in quarantined {
        if let Ok(name) = NodeName::new(&node)
            && set.matches(&name, Some(&crate::target::RegisteredNode::default()))
        {
            out.push(NodeInfo {
                node,
                last_seen: None,
                agent_version: None,
                stale: true,
                quarantined: Some(reason),
            });
        }
    }
    Ok(out)
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
        let state = match (&n.quarantined, n.stale) {
            (Some(why), _) => format!("quarantined: {why}"),
            (None, true) => "stale".into(),
            (None, false) => String::new(),
        };
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
    let _ = write!(out, "{} node(s), {stale} stale", nodes.len());
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

/// A node's stored document, or one plugin's value (with its collection metadata).
pub async fn show(
    settings: &CouchSettings,
    node: &NodeName,
    plugin: Option<&PluginName>,
) -> Result<Option<Value>, RunnerError> {
    let doc: Option<Value> = open(settings)?
        .client()
        .get(&settings.database, node.as_str())
        .await
        .map_err(registry_error)?;
    Ok(match (doc, plugin) {
        (None, _) => None,
        (Some(d), None) => Some(d),
        (Some(d), Some(p)) => d.get(p.as_str()).cloned(),
    })
}

/// One block per change: its time, and for lists the added and removed entries, otherwise
/// the old and new values.
pub fn render_history(entries: &[HistoryEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        let _ = writeln!(
            out,
            "{}  request {}",
            e.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            e.request_id
        );
        match (&e.old, &e.new) {
            (Value::Array(old), Value::Array(new)) => {
                let added: Vec<&Value> = new.iter().filter(|v| !old.contains(v)).collect();
                let removed: Vec<&Value> = old.iter().filter(|v| !new.contains(v)).collect();
                for v in &added {
                    let _ = writeln!(out, "  + {}", short(v));
                }
                for v in &removed {
                    let _ = writeln!(out, "  - {}", short(v));
                }
                if added.is_empty() && removed.is_empty() {
                    let _ = writeln!(out, "  (same entries, new order)");
                }
            }
            (Value::Null, new) => {
                let _ = writeln!(out, "  first value: {}", short(new));
            }
            (old, new) => {
                let _ = writeln!(out, "  old: {}\n  new: {}", short(old), short(new));
            }
        }
    }
    if entries.is_empty() {
        let _ = writeln!(out, "no recorded changes");
    }
    out
}

/// A value on one line, with node-supplied escapes shown, not obeyed.
fn short(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("{} items", a.len()),
        other => other.to_string(),
    };
    vogeler_proto::text::printable(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
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

    #[test]
    fn history_shows_added_and_removed() {
        let entry = |old: Value, new: Value| HistoryEntry {
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
        };
        let text = render_history(&[
            entry(Value::Null, json!(["a"])),
            entry(json!(["a", "b"]), json!(["a", "c"])),
            entry(json!("6.1"), json!("6.2")),
        ]);
        assert!(text.contains("first value: 1 items"), "{text}");
        assert!(text.contains("  + c\n  - b\n"), "{text}");
        assert!(text.contains("  old: 6.1\n  new: 6.2\n"), "{text}");
        assert_eq!(render_history(&[]), "no recorded changes\n");
    }
}
