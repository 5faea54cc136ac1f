//! Keeping the database useful: design documents installed and upgraded, stale nodes
//! reported, old history removed, and `prune` for nodes that are gone for good.

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use tracing::{debug, info, warn};
use vogeler_core::{
    couch::{CouchClient, CouchError},
    query::Inventory,
};
use vogeler_proto::{design, document::NodeDocument, enrollment, signing::PublicKey};

/// Install `ddoc` in `db` unless the stored one has the same or a newer version.
/// Returns what was done, for the log.
pub async fn ensure_design(
    couch: &CouchClient,
    db: &str,
    ddoc: Value,
) -> Result<&'static str, CouchError> {
    let id = ddoc["_id"].as_str().unwrap_or_default().to_string();
    let stored: Option<Value> = couch.get(db, &id).await?;
    let mut doc = ddoc;
    match &stored {
        None => {}
        Some(old) if design::version_of(old) == design::VERSION => return Ok("current"),
        Some(old) if design::version_of(old) > design::VERSION => {
            warn!(database = db, design = %id, stored = design::version_of(old), ours = design::VERSION, "design document is newer than this server; leaving it");
            return Ok("newer");
        }
        Some(old) => doc["_rev"] = old["_rev"].clone(),
    }
    match couch.put(db, &id, &doc).await {
        Ok(_) => Ok(if stored.is_some() {
            "upgraded"
        } else {
            "installed"
        }),
        // Another server upgraded it at the same moment: fine.
        Err(CouchError::Conflict { .. }) => Ok("current"),
        Err(e) => Err(e),
    }
}

/// Nodes whose last sign of life is older than `age`.
pub async fn stale_nodes(inventory: &Inventory, age: Duration) -> Result<Vec<String>, CouchError> {
    inventory.last_seen_before(&cutoff(age)).await
}

fn cutoff(age: Duration) -> String {
    vogeler_proto::duration::before(Utc::now(), age)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Delete these documents (with their current revisions). Returns how many went.
async fn delete_ids(couch: &CouchClient, db: &str, ids: &[String]) -> Result<usize, CouchError> {
    delete_where(couch, db, ids, |_| true).await
}

/// Delete those of these documents `doomed` says yes to. Returns how many went.
async fn delete_where(
    couch: &CouchClient,
    db: &str,
    ids: &[String],
    doomed: impl Fn(&Value) -> bool,
) -> Result<usize, CouchError> {
    let mut deleted = 0;
    for chunk in ids.chunks(500) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let docs: Vec<Value> = couch
            .get_many::<Value>(db, &refs)
            .await?
            .into_iter()
            .filter_map(|(id, doc)| {
                let doc = doc.found().filter(|d| doomed(d))?;
                Some(json!({ "_id": id, "_rev": doc.get("_rev")?.clone(), "_deleted": true }))
            })
            .collect();
        deleted += couch
            .bulk_docs(db, &docs)
            .await?
            .iter()
            .filter(|r| r.error.is_none())
            .count();
    }
    Ok(deleted)
}

/// `vogeler-server prune`: delete nodes not seen for `age`, with their keys' bindings and
/// their enrollment records (a pruned node is forgotten: its name and key are free again).
/// Returns their names.
pub async fn prune(inventory: &Inventory, age: Duration) -> Result<Vec<String>, CouchError> {
    let couch = inventory.client();
    let ids = stale_nodes(inventory, age).await?;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut bindings = Vec::new();
    for chunk in refs.chunks(500) {
        for (_, doc) in couch
            .get_many::<NodeDocument>(inventory.database(), chunk)
            .await?
        {
            if let Some(key) = doc
                .found()
                .and_then(|d| d.meta.key)
                .and_then(|k| PublicKey::from_base64(&k))
            {
                bindings.push(enrollment::key_binding_id(&key));
            }
        }
    }
    delete_ids(couch, inventory.database(), &ids).await?;
    let fresh_ids: Vec<String> = ids
        .iter()
        .map(|n| format!("{}{n}", vogeler_proto::fresh::PREFIX))
        .collect();
    delete_ids(couch, inventory.database(), &fresh_ids).await?;
    let enrollment_db = inventory.enrollment_database();
    // Only a binding that names a pruned node: a key pinned to several nodes before
    // bindings existed may serve another one still.
    delete_where(couch, enrollment_db, &bindings, |b| {
        b.get("node")
            .and_then(Value::as_str)
            .is_some_and(|n| ids.iter().any(|i| i == n))
    })
    .await?;
    delete_ids(couch, enrollment_db, &ids).await?;
    Ok(ids)
}

/// Delete history entries older than `retention`.
pub async fn expire_history(
    inventory: &Inventory,
    retention: Duration,
) -> Result<usize, CouchError> {
    let ids = inventory.history_before(&cutoff(retention)).await?;
    delete_ids(inventory.client(), inventory.history_database(), &ids).await
}

/// How often `/metrics` counts overdue plugins.
pub const OVERDUE_EVERY: Duration = Duration::from_secs(60);

/// Keep a gauge (through `set`) at the number of scheduled plugins, over all nodes, with no run stored
/// within twice their interval (from the registry view, which carries each node's
/// schedules), every [`OVERDUE_EVERY`].
pub async fn count_overdue(
    inventory: Inventory,
    set: impl Fn(i64),
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let counted = tokio::select! {
            () = cancel.cancelled() => return,
            r = inventory.registry() => r,
        };
        match counted {
            Ok(rows) => {
                let now = Utc::now();
                let n: usize = rows.iter().map(|(_, r)| r.overdue(now).len()).sum();
                set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            Err(e) => warn!(error = %e, "cannot count overdue plugins"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(OVERDUE_EVERY) => {}
        }
    }
}

/// How often the inventory's indexes are brought up to date when documents changed.
pub const REFRESH_VIEWS_EVERY: Duration = Duration::from_secs(10);

/// Keep the inventory's indexes (values, packages) current while documents change, every
/// [`REFRESH_VIEWS_EVERY`], so `query`, `count` and `-n` never wait for an index build on
/// their read (with 5,000 nodes of 500 packages a first build takes minutes). A read that
/// times out leaves CouchDB building; the next round waits for it again.
pub async fn refresh_views(inventory: Inventory, cancel: tokio_util::sync::CancellationToken) {
    let mut refreshed: Option<Value> = None;
    loop {
        let seq = tokio::select! {
            () = cancel.cancelled() => return,
            info = inventory.client().database_info(inventory.database()) => {
                info.ok().map(|i| i["update_seq"].clone())
            }
        };
        if seq.is_some() && seq != refreshed {
            let done = tokio::select! {
                () = cancel.cancelled() => return,
                r = inventory.refresh_inventory_views() => r,
            };
            match done {
                Ok(()) => refreshed = seq,
                Err(e) => {
                    debug!(error = %e, "inventory views not refreshed yet (CouchDB keeps building them)")
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(REFRESH_VIEWS_EVERY) => {}
        }
    }
}

/// Log stale nodes and expire history: at start, then every `every`.
pub async fn periodic(
    inventory: Inventory,
    stale_after: Duration,
    retention: Duration,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        // A first view build on a large database can take a minute: shutdown does not wait
        // for it (both steps only read or delete, so stopping halfway is harmless).
        tokio::select! {
            () = cancel.cancelled() => return,
            () = maintain(&inventory, stale_after, retention) => {}
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// One round of [`periodic`]: report stale nodes, expire old history.
async fn maintain(inventory: &Inventory, stale_after: Duration, retention: Duration) {
    match stale_nodes(inventory, stale_after).await {
        Ok(stale) if !stale.is_empty() => {
            let shown: Vec<&str> = stale.iter().take(20).map(String::as_str).collect();
            let more = if stale.len() > shown.len() {
                ", ..."
            } else {
                ""
            };
            info!(count = stale.len(), stale_after = %vogeler_proto::duration::format(stale_after), "stale nodes (not deleted; see `vogeler-server prune`): {}{more}", shown.join(", "));
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot list stale nodes"),
    }
    match expire_history(inventory, retention).await {
        Ok(0) => {}
        Ok(n) => info!(deleted = n, "expired old history entries"),
        Err(e) => warn!(error = %e, "cannot expire history"),
    }
}
