//! The database at start-up: wait for CouchDB to answer (refusals and redirects are
//! configuration errors, not outages), then create the node and history databases if
//! missing and install their design documents.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vogeler_config::CouchSettings;
use vogeler_core::{backoff, couch::CouchClient};
use vogeler_proto::design;

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

/// Create the node and history databases if missing and install their design documents.
pub async fn prepare_database(couch: &CouchClient, db: &str) -> Result<Store, ServerError> {
    let store = Store::new(couch.clone(), db);
    for (name, ddoc) in [
        (db, design::nodes()),
        (store.history_database(), design::history()),
    ] {
        let fail = |source| ServerError::Database {
            db: name.to_string(),
            source,
        };
        if couch.ensure_database(name).await.map_err(fail)? {
            info!(database = %name, "created database");
        }
        let done = maintenance::ensure_design(couch, name, ddoc)
            .await
            .map_err(fail)?;
        info!(database = %name, design_version = design::VERSION, status = done, "design document");
    }
    Ok(store)
}
