//! Writing node documents in batches: one read (`_all_docs` with the ids) and one write
//! (`_bulk_docs`) per batch, every per-document status checked, conflicts re-read and merged
//! again. Value changes go to the history database first, under ids that never conflict.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use tracing::warn;
use vogeler_core::couch::{CouchClient, CouchError};
use vogeler_proto::{
    document::{Change, HistoryEntry, NodeDocument},
    names::NodeName,
    wire::Message,
};

/// Conflicts mean another writer (another server process) got there first; re-reading and
/// merging again is always right, but give the caller back control eventually.
const CONFLICT_RETRIES: usize = 10;

/// What happened to one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Written (or already there: a duplicate or an older result changes nothing).
    Done,
    /// The database refused this node's document; retrying will not help.
    Refused(String),
    /// Signed by another key than the one pinned for its node.
    WrongKey(String),
}

/// A message whose signature checked out, with its signer (checked by the consumer).
pub use vogeler_proto::trust::Signed;

/// The node database and its history database.
#[derive(Debug, Clone)]
pub struct Store {
    couch: CouchClient,
    db: String,
    history_db: String,
}

impl Store {
    pub fn new(couch: CouchClient, db: impl Into<String>) -> Self {
        let db = db.into();
        Self {
            history_db: vogeler_proto::design::history_database(&db),
            couch,
            db,
        }
    }

    pub fn database(&self) -> &str {
        &self.db
    }
    pub fn history_database(&self) -> &str {
        &self.history_db
    }

    /// Apply results and announcements (any order, any duplication) to their nodes'
    /// documents, each only if its signer is the node's pinned key (pinned on first
    /// contact). Returns one [`Stored`] per message, in order. An `Err` is transient (the
    /// database is down, or conflicts persisted): nothing may be acked, try again later.
    pub async fn apply(&self, messages: &[&Signed]) -> Result<Vec<Stored>, CouchError> {
        let mut by_node: BTreeMap<&NodeName, Vec<usize>> = BTreeMap::new();
        for (i, m) in messages.iter().enumerate() {
            if let Some(node) = node_of(&m.message) {
                by_node.entry(node).or_default().push(i);
            }
        }
        // Oldest first, so every change between them lands in the history.
        for idx in by_node.values_mut() {
            idx.sort_by_key(|i| time_of(&messages[*i].message));
        }
        let mut outcome = vec![Stored::Done; messages.len()];
        let mut pending: Vec<&NodeName> = by_node.keys().copied().collect();
        for _ in 0..CONFLICT_RETRIES {
            if pending.is_empty() {
                return Ok(outcome);
            }
            let ids: Vec<&str> = pending.iter().map(|n| n.as_str()).collect();
            let current = self.couch.get_many::<NodeDocument>(&self.db, &ids).await?;
            let mut writes = Vec::new();
            let mut history = Vec::new();
            for (node, (_, doc)) in pending.iter().zip(current) {
                let now = Utc::now();
                let mut doc = doc.unwrap_or_else(|| NodeDocument::new(node, now));
                let mut changed = false;
                for &i in &by_node[node] {
                    match doc.pin_key(&messages[i].signer) {
                        Ok(pinned) => changed |= pinned,
                        Err(reason) => {
                            outcome[i] = Stored::WrongKey(reason);
                            continue;
                        }
                    }
                    let change = match &messages[i].message {
                        Message::Result(r) => doc.apply_result_recording(r, now, &mut history),
                        Message::Announce(a) => doc.apply_announce(a, now),
                        Message::Command(_) => Change::Unchanged,
                    };
                    changed |= change == Change::Updated;
                }
                if changed {
                    writes.push(doc);
                }
            }
            let written = self.write_history(&history).await?;
            if writes.is_empty() {
                return Ok(outcome);
            }
            let results = self.couch.bulk_docs(&self.db, &writes).await?;
            let mut conflicts = Vec::new();
            for r in results {
                let Some(node) = pending.iter().find(|n| n.as_str() == r.id).copied() else {
                    continue;
                };
                match r.error.as_deref() {
                    None => {}
                    Some("conflict") => conflicts.push(node),
                    Some(error) => {
                        let reason = format!(
                            "database refused document {:?}: {error}: {}",
                            r.id,
                            r.reason.unwrap_or_default()
                        );
                        for &i in &by_node[node] {
                            outcome[i] = Stored::Refused(reason.clone());
                        }
                    }
                }
            }
            // Entries computed against a revision that lost the race describe a transition
            // that did not happen: take them back before merging again.
            if !conflicts.is_empty() {
                let retract: Vec<serde_json::Value> = history
                    .iter()
                    .filter(|e| conflicts.iter().any(|n| n.as_str() == e.node))
                    .filter_map(|e| {
                        written.get(&e.id).map(
                            |rev| serde_json::json!({"_id": e.id, "_rev": rev, "_deleted": true}),
                        )
                    })
                    .collect();
                if !retract.is_empty() {
                    self.couch.bulk_docs(&self.history_db, &retract).await?;
                }
            }
            pending = conflicts;
        }
        if pending.is_empty() {
            return Ok(outcome);
        }
        Err(CouchError::Conflict {
            db: self.db.clone(),
            id: pending[0].to_string(),
        })
    }

    /// History entries are written before the node documents, so a crash between the two
    /// writes loses nothing: the redelivered result recomputes the same entry (same id, a
    /// harmless conflict). Returns the revisions of the entries this call created.
    async fn write_history(
        &self,
        entries: &[HistoryEntry],
    ) -> Result<HashMap<String, String>, CouchError> {
        let mut written = HashMap::new();
        if entries.is_empty() {
            return Ok(written);
        }
        for r in self.couch.bulk_docs(&self.history_db, entries).await? {
            match (r.error.as_deref(), r.rev) {
                (None, Some(rev)) => {
                    written.insert(r.id, rev);
                }
                (Some("conflict"), _) | (None, None) => {}
                (Some(error), _) => {
                    warn!(id = %r.id, error, reason = r.reason.as_deref().unwrap_or(""), "history entry refused")
                }
            }
        }
        Ok(written)
    }
}

/// The node a result or announcement is about.
pub(crate) fn node_of(m: &Message) -> Option<&NodeName> {
    match m {
        Message::Result(r) => Some(&r.node),
        Message::Announce(a) => Some(&a.node),
        Message::Command(_) => None,
    }
}

fn time_of(m: &Message) -> chrono::DateTime<Utc> {
    match m {
        Message::Result(r) => r.collected_at,
        Message::Announce(a) => a.sent_at,
        Message::Command(c) => c.issued_at,
    }
}
