//! Writing node documents: read, merge, write back, and re-read on conflict.

use chrono::Utc;
use vogeler_core::{
    couch::{CouchClient, CouchError},
    document::{Change, NodeDocument},
    names::NodeName,
};

/// Conflicts mean another writer (another server process) got there first; re-reading and
/// merging again is always right, but give the caller back control eventually.
const CONFLICT_RETRIES: usize = 10;

/// The node database.
#[derive(Debug, Clone)]
pub struct Store {
    couch: CouchClient,
    db: String,
}

impl Store {
    pub fn new(couch: CouchClient, db: impl Into<String>) -> Self {
        Self {
            couch,
            db: db.into(),
        }
    }

    pub fn database(&self) -> &str {
        &self.db
    }

    /// Apply `merge` to the node's document (created if missing) and write it when it changed.
    pub async fn update(
        &self,
        node: &NodeName,
        merge: impl Fn(&mut NodeDocument) -> Change,
    ) -> Result<Change, CouchError> {
        let mut last = None;
        for _ in 0..CONFLICT_RETRIES {
            let mut doc = match self
                .couch
                .get::<NodeDocument>(&self.db, node.as_str())
                .await?
            {
                Some(d) => d,
                None => NodeDocument::new(node, Utc::now()),
            };
            if merge(&mut doc) == Change::Unchanged {
                return Ok(Change::Unchanged);
            }
            match self.couch.put(&self.db, node.as_str(), &doc).await {
                Ok(_) => return Ok(Change::Updated),
                Err(e @ CouchError::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(CouchError::Conflict {
            db: self.db.clone(),
            id: node.to_string(),
        }))
    }
}
