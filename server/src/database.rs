//! The database at start-up: wait for CouchDB to answer (refusals and redirects are
//! configuration errors, not outages), then create the node and history databases if
//! missing and install their design documents.

use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vogeler_config::CouchSettings;

use vogeler_core::{
    backoff,
    couch::{CouchClient, CouchError},
};
use vogeler_proto::{
    design,
    enrollment::{self, KeyBinding},
    names::NodeName,
    signing::PublicKey,
};

use crate::{ServerError, maintenance, store::Store};

/// Connect to CouchDB, waiting up to the connect timeout for it to answer.
pub async fn connect_database(
    settings: &CouchSettings,
    cancel: &CancellationToken,
) -> Result<Option<CouchClient>, ServerError> {
    let couch = CouchClient::from_settings(settings).map_err(ServerError::Http)?;
    let started = tokio::time::Instant::now();
    let mut delays = backoff::delays();
    loop {
        match couch.ping().await {
            Ok(()) => {
                info!(url = %couch.url(), "connected to database server");
                return Ok(Some(couch));
            }
            Err(e) if e.is_transient() && started.elapsed() < settings.connect_timeout => {
                let delay = delays.next().unwrap_or(backoff::MAX_DELAY);
                warn!(url = %couch.url(), error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach database server, retrying");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(None),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            // A wrong password is refused even on GET /, and a redirect or a 404 there means
            // the URL points at something else (a proxy wanting https, a wrong path prefix):
            // waiting will not change either.
            Err(source) if source.is_client_error() => {
                return Err(ServerError::DatabaseRefused {
                    url: couch.url().to_string(),
                    source,
                });
            }
            Err(source) => {
                return Err(ServerError::DatabaseUnavailable {
                    url: couch.url().to_string(),
                    waited: started.elapsed(),
                    source,
                });
            }
        }
    }
}

/// Create the node, history and enrollment databases if missing and install their design
/// documents. A new enrollment database gets a key binding for every key already pinned, so
/// that one key keeps serving one node across the upgrade that introduced bindings.
pub async fn prepare_database(couch: &CouchClient, db: &str) -> Result<Store, ServerError> {
    let store = Store::new(couch.clone(), db);
    let mut new_enrollment = false;
    for (name, ddoc) in [
        (db, design::nodes()),
        (db, design::inventory()),
        (store.history_database(), design::history()),
        (store.enrollment_database(), design::enrollment()),
    ] {
        let fail = |source| ServerError::Database {
            db: name.to_string(),
            source,
        };
        if couch.ensure_database(name).await.map_err(fail)? {
            info!(database = %name, "created database");
            new_enrollment |= name == store.enrollment_database();
        }
        let done = maintenance::ensure_design(couch, name, ddoc)
            .await
            .map_err(fail)?;
        info!(database = %name, design_version = design::VERSION, status = done, "design document");
    }
    if new_enrollment {
        bind_pinned_keys(couch, &store)
            .await
            .map_err(|source| ServerError::Database {
                db: store.enrollment_database().to_string(),
                source,
            })?;
    }
    Ok(store)
}

/// A binding for each key pinned before bindings existed. Where one key was pinned to
/// several nodes (allowed then), the first node keeps it and the others are named, so an
/// operator can give them keys of their own: their documents keep working until then.
async fn bind_pinned_keys(couch: &CouchClient, store: &Store) -> Result<(), CouchError> {
    let inventory = vogeler_core::query::Inventory::new(couch.clone(), store.database());
    let now = chrono::Utc::now();
    let mut bound: BTreeMap<String, (PublicKey, String)> = BTreeMap::new();
    for (node, registered) in inventory.registry().await? {
        let (Some(key), Ok(name)) = (
            registered.key.as_deref().and_then(PublicKey::from_base64),
            NodeName::new(node),
        ) else {
            continue;
        };
        let id = enrollment::key_binding_id(&key);
        match bound.get(&id) {
            Some((_, first)) => {
                warn!(key = %key, node = %name, serves = %first, "one key is pinned to several nodes; it keeps serving the first, and new nodes cannot claim it: give this node its own key (vogeler-runner nodes forget NODE, then restart its agent with a new key)")
            }
            None => {
                bound.insert(id, (key, name.to_string()));
            }
        }
    }
    let bindings: Vec<KeyBinding> = bound
        .values()
        .filter_map(|(key, node)| Some(KeyBinding::new(key, &NodeName::new(node).ok()?, now)))
        .collect();
    for chunk in bindings.chunks(500) {
        couch.bulk_docs(store.enrollment_database(), chunk).await?;
    }
    if !bindings.is_empty() {
        info!(
            keys = bindings.len(),
            "recorded which node each pinned key serves"
        );
    }
    Ok(())
}
