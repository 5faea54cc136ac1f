//! Writing node documents in batches: one read (`_all_docs` with the ids) and one write
//! (`_bulk_docs`) per batch, every per-document status checked, conflicts re-read and merged
//! again. Value changes go to the history database first, under ids that never conflict.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use std::sync::{Arc, Mutex};
use tracing::warn;

use vogeler_core::couch::{CouchClient, CouchError, Fetched};

use crate::budget::{self, HistoryBudget};
use vogeler_proto::{
    design::{self, quarantine_id},
    document::{Change, HistoryEntry, Node, NodeDocument},
    enrollment::{self, Enrollment, KeyBinding, Mode, Seen, Verdict},
    fresh::{self, FreshDocument},
    names::NodeName,
    signing::PublicKey,
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
    /// Signed by another key than the one pinned for its node (or by a key that already
    /// serves another node).
    WrongKey(String),
    /// From a node whose key waits for approval, or was rejected: acked, not stored, and not
    /// dead-lettered (a pending node's heartbeats would fill the dead letters).
    Held(String),
    /// A scheduled run said "unchanged" about a value this database does not hold: acked and
    /// counted, and stored once the agent sends the value in full (`agent.full_every`).
    Unconfirmed(String),
}

/// Nodes waiting for approval at most: beyond it new claims are not recorded (each new key
/// is free to make, so an open door must not let one node fill the database).
pub const MAX_PENDING_NODES: u64 = 10_000;

/// A message whose signature checked out, with its signer (checked by the consumer).
pub use vogeler_proto::trust::Signed;

/// The node database and its history database.
#[derive(Debug, Clone)]
pub struct Store {
    couch: CouchClient,
    db: String,
    history_db: String,
    /// Key bindings (one key, one node) and, in approve mode, the claims waiting for an
    /// operator.
    enrollment_db: String,
    mode: Mode,
    max_document_bytes: usize,
    quarantine: Quarantine,
    /// History entries a flapping value may still write (shared by the writers).
    budget: Arc<Mutex<HistoryBudget>>,
}

impl Store {
    pub fn new(couch: CouchClient, db: impl Into<String>) -> Self {
        let db = db.into();
        Self {
            history_db: design::history_database(&db),
            enrollment_db: enrollment::enrollment_database(&db),
            couch,
            db,
            mode: Mode::Open,
            max_document_bytes: vogeler_proto::limits::COUCHDB_MAX_DOCUMENT_BYTES,
            quarantine: Quarantine::default(),
            budget: Arc::default(),
        }
    }

    /// How a new node's first key is trusted.
    pub fn with_enrollment(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    pub fn enrollment_database(&self) -> &str {
        &self.enrollment_db
    }

    /// Refuse results that would make a node document larger than this.
    pub fn with_max_document_bytes(mut self, max: usize) -> Self {
        self.max_document_bytes = max;
        self
    }

    pub fn database(&self) -> &str {
        &self.db
    }
    pub fn history_database(&self) -> &str {
        &self.history_db
    }

    /// The nodes whose stored document cannot be read back, with why.
    pub fn quarantine(&self) -> &Quarantine {
        &self.quarantine
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
            let current = self.read(&pending).await?;
            let mut freshness = self.read_fresh(&pending).await?;
            // Every attempt judges its nodes' messages afresh, from what it just read.
            for node in &pending {
                for &i in &by_node[*node] {
                    outcome[i] = Stored::Done;
                }
            }
            let unpinned: Vec<&NodeName> = pending
                .iter()
                .zip(&current)
                .filter(|(_, (_, fetched))| match fetched {
                    Fetched::Missing => true,
                    Fetched::Found(doc) => doc.meta.key.is_none(),
                    Fetched::Unreadable(_) => false,
                })
                .map(|(node, _)| *node)
                .collect();
            if !unpinned.is_empty() {
                self.enroll(&unpinned, &by_node, messages, &mut outcome)
                    .await?;
            }
            let mut writes = Vec::new();
            let mut history = Vec::new();
            let mut flags = Vec::new();
            for (node, (_, fetched)) in pending.iter().zip(current) {
                let now = Utc::now();
                let readable = !matches!(fetched, Fetched::Unreadable(_));
                // Repaired or deleted: the node is stored again.
                if readable && self.quarantine.release(node) {
                    self.unflag(node).await?;
                }
                let stored_fresh = freshness.remove(node.as_str());
                let doc = match fetched {
                    Fetched::Found(doc) => doc,
                    Fetched::Missing => NodeDocument::new(node, now),
                    Fetched::Unreadable(why) => {
                        // Writing over it would lose whatever it holds, and reading it fails
                        // the same way every time: refuse this node's messages with the
                        // reason (they go to the dead letters) and flag the node.
                        let reason = format!(
                            "the stored document of node {node} cannot be read back ({why}); its results are refused until the document is repaired or deleted in database {} (Fauxton, or DELETE /{}/{node}?rev=...)",
                            self.db, self.db
                        );
                        for &i in &by_node[node] {
                            outcome[i] = Stored::Refused(reason.clone());
                        }
                        if self.quarantine.add(node, &why) {
                            tracing::error!(node = %node, reason = %why, "the node's stored document cannot be read back; quarantined: its results go to the dead letters until the document is repaired or deleted");
                            flags.push(quarantine_flag(node, &why, now));
                        }
                        continue;
                    }
                };
                // Held back or refused by enrollment: not merged.
                let mine: Vec<(usize, &Signed)> = by_node[node]
                    .iter()
                    .filter(|&&i| {
                        // Judged again against the winning revision after a conflict.
                        if matches!(outcome[i], Stored::Unconfirmed(_)) {
                            outcome[i] = Stored::Done;
                        }
                        outcome[i] == Stored::Done
                    })
                    .map(|&i| (i, messages[i]))
                    .collect();
                let mut merged = Node::from_parts(doc, stored_fresh.clone());
                merge_node(&mut merged, &mine, now, None, &mut history, &mut outcome);
                if merged.written().document && merged.doc.encoded_len() > self.max_document_bytes {
                    // Rare: merge again from the stored document, one message at a time, so
                    // only the results that make it too large are refused.
                    history.retain(|e| e.node != node.as_str());
                    for &(i, _) in &mine {
                        outcome[i] = Stored::Done;
                    }
                    let doc = self
                        .couch
                        .fetch::<NodeDocument>(&self.db, node.as_str())
                        .await?
                        .found()
                        .unwrap_or_else(|| NodeDocument::new(node, now));
                    merged = Node::from_parts(doc, stored_fresh);
                    merge_node(
                        &mut merged,
                        &mine,
                        now,
                        Some(self.max_document_bytes),
                        &mut history,
                        &mut outcome,
                    );
                }
                writes.extend(merged.into_writes());
            }
            if !flags.is_empty() {
                // A flag already there is a conflict, and that is fine.
                self.couch.bulk_docs(&self.db, &flags).await?;
            }
            self.spend_budget(&mut history);
            let written = self.write_history(&history).await?;
            if writes.is_empty() {
                return Ok(outcome);
            }
            let results = self.couch.bulk_docs(&self.db, &writes).await?;
            let mut conflicts = Vec::new();
            // Nodes whose document (not only freshness) lost a race: their entries go back.
            let mut lost = Vec::new();
            for r in results {
                let (id, is_fresh) = match fresh::node_of_id(&r.id) {
                    Some(node) => (node, true),
                    None => (r.id.as_str(), false),
                };
                let Some(node) = pending.iter().find(|n| n.as_str() == id).copied() else {
                    continue;
                };
                match r.error.as_deref() {
                    None => {}
                    Some("conflict") => {
                        if !conflicts.contains(&node) {
                            conflicts.push(node);
                        }
                        if !is_fresh {
                            lost.push(node);
                        }
                    }
                    // Derived data: the node's results are stored, and the next message
                    // rebuilds it.
                    Some(error) if is_fresh => {
                        warn!(node = %node, error, reason = r.reason.as_deref().unwrap_or(""), "the database refused the node's freshness document; its last seen time and confirmations are not recorded");
                    }
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
                    .filter(|e| lost.iter().any(|n| n.as_str() == e.node))
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

    /// Decide who may speak for nodes no key is pinned to: in open mode the signer of each
    /// node's oldest message, in approve mode only a key an operator accepted (every other
    /// message is [`Stored::Held`], and new keys are recorded as claims). Then make sure
    /// each such key serves no other node: its [`KeyBinding`] is created, or, when it exists
    /// already, must name this node; if not, the node's messages signed with it are
    /// [`Stored::WrongKey`].
    async fn enroll(
        &self,
        nodes: &[&NodeName],
        by_node: &BTreeMap<&NodeName, Vec<usize>>,
        messages: &[&Signed],
        outcome: &mut [Stored],
    ) -> Result<(), CouchError> {
        let now = Utc::now();
        let allowed: Vec<(&NodeName, PublicKey)> = match self.mode {
            Mode::Open => nodes
                .iter()
                .map(|node| (*node, messages[by_node[*node][0]].signer))
                .collect(),
            Mode::Approve => self.judge_claims(nodes, by_node, messages, outcome).await?,
        };
        if allowed.is_empty() {
            return Ok(());
        }
        let bindings: Vec<KeyBinding> = allowed
            .iter()
            .map(|(node, key)| KeyBinding::new(key, node, now))
            .collect();
        let results = self.couch.bulk_docs(&self.enrollment_db, &bindings).await?;
        let mut taken: Vec<&str> = Vec::new();
        for r in &results {
            match r.error.as_deref() {
                None => {}
                Some("conflict") => taken.push(r.id.as_str()),
                // Fail closed: a key whose binding cannot be recorded is not pinned.
                Some(error) => {
                    let why = format!(
                        "cannot record which node key binding {} serves in database {}: {error}: {}; check that the server's CouchDB account may write it (deploy/couchdb/setup.sh)",
                        r.id,
                        self.enrollment_db,
                        r.reason.as_deref().unwrap_or("")
                    );
                    for (node, key) in &allowed {
                        if enrollment::key_binding_id(key) == r.id {
                            refuse_signed_by(
                                node,
                                key,
                                by_node,
                                messages,
                                outcome,
                                Stored::Refused,
                                &why,
                            );
                        }
                    }
                }
            }
        }
        if taken.is_empty() {
            return Ok(());
        }
        taken.sort_unstable();
        taken.dedup();
        let existing = self
            .couch
            .get_many::<KeyBinding>(&self.enrollment_db, &taken)
            .await?;
        for (id, fetched) in existing {
            let Some(binding) = fetched.found() else {
                continue;
            };
            for (node, key) in &allowed {
                if enrollment::key_binding_id(key) != id {
                    continue;
                }
                if let Some(why) = enrollment::bound_elsewhere(key, node, &binding) {
                    warn!(node = %node, key = %key, serves = %binding.node, "refused a key that already serves another node");
                    refuse_signed_by(
                        node,
                        key,
                        by_node,
                        messages,
                        outcome,
                        Stored::WrongKey,
                        &why,
                    );
                }
            }
        }
        Ok(())
    }

    /// Approve mode: judge each unpinned node's messages by its enrollment record, write the
    /// records that changed (new claims, refreshed ones), and return the accepted keys.
    async fn judge_claims<'n>(
        &self,
        nodes: &[&'n NodeName],
        by_node: &BTreeMap<&NodeName, Vec<usize>>,
        messages: &[&Signed],
        outcome: &mut [Stored],
    ) -> Result<Vec<(&'n NodeName, PublicKey)>, CouchError> {
        let ids: Vec<&str> = nodes.iter().map(|n| n.as_str()).collect();
        let records = self
            .couch
            .get_many::<Enrollment>(&self.enrollment_db, &ids)
            .await?;
        let mut room: Option<bool> = None;
        let mut writes = Vec::new();
        let mut allowed = Vec::new();
        for (node, (_, fetched)) in nodes.iter().zip(records) {
            let mut record = match fetched {
                Fetched::Found(record) => record,
                Fetched::Missing => {
                    // Checked once per batch, and only when a new node asks.
                    if room.is_none() {
                        room = Some(self.pending_nodes().await? < MAX_PENDING_NODES);
                    }
                    if room == Some(false) {
                        let why = format!(
                            "node {node} is not recorded for approval: {MAX_PENDING_NODES} nodes wait already; accept or reject some (vogeler-runner nodes pending)"
                        );
                        warn!(node = %node, "{why}");
                        for &i in &by_node[*node] {
                            outcome[i] = Stored::Held(why.clone());
                        }
                        continue;
                    }
                    Enrollment::new(node)
                }
                Fetched::Unreadable(why) => {
                    let why = format!(
                        "the enrollment record of node {node} in database {} cannot be read ({why}); delete it and the node asks again",
                        self.enrollment_db
                    );
                    for &i in &by_node[*node] {
                        outcome[i] = Stored::Held(why.clone());
                    }
                    continue;
                }
            };
            let claims = record.claims.len();
            let mut changed = false;
            let mut pin = None;
            for &i in &by_node[*node] {
                let m = messages[i];
                let (verdict, c) = record.judge(seen(m));
                changed |= c;
                match verdict {
                    Verdict::Pin => {
                        pin.get_or_insert(m.signer);
                    }
                    Verdict::Hold(why) => outcome[i] = Stored::Held(why),
                }
            }
            for claim in &record.claims[claims..] {
                tracing::info!(node = %node, key = %claim.key_id, "a new key waits for approval: vogeler-runner nodes pending, then nodes accept {node} (or nodes reject {node})");
            }
            if changed {
                writes.push(record);
            }
            if let Some(key) = pin {
                allowed.push((*node, key));
            }
        }
        if !writes.is_empty() {
            // A conflict means another server recorded the same node: the next message
            // records this claim again.
            self.couch.bulk_docs(&self.enrollment_db, &writes).await?;
        }
        Ok(allowed)
    }

    /// How many keys wait for approval (the pending view, reduced).
    async fn pending_nodes(&self) -> Result<u64, CouchError> {
        let rows = self
            .couch
            .view(
                &self.enrollment_db,
                design::PENDING.ddoc,
                design::PENDING.name,
                &[],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.value.as_u64()).unwrap_or(0))
    }

    /// The current documents of `nodes`, in order. Quarantined nodes are read one by one,
    /// so their documents do not send every batch they share down the slow path of
    /// [`CouchClient::get_many`] (and a repaired one is noticed).
    async fn read(
        &self,
        nodes: &[&NodeName],
    ) -> Result<Vec<(String, Fetched<NodeDocument>)>, CouchError> {
        let held: Vec<bool> = nodes.iter().map(|n| self.quarantine.holds(n)).collect();
        let ids: Vec<&str> = nodes
            .iter()
            .zip(&held)
            .filter(|(_, h)| !**h)
            .map(|(n, _)| n.as_str())
            .collect();
        let mut many = self
            .couch
            .get_many::<NodeDocument>(&self.db, &ids)
            .await?
            .into_iter();
        let mut out = Vec::with_capacity(nodes.len());
        for (node, held) in nodes.iter().zip(held) {
            if held {
                let doc = self.couch.fetch(&self.db, node.as_str()).await?;
                out.push((node.to_string(), doc));
            } else if let Some(row) = many.next() {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// The freshness documents of `nodes` that exist, by node name, read leniently (they are
    /// derived data: one that does not read starts over, keeping its revision).
    async fn read_fresh(
        &self,
        nodes: &[&NodeName],
    ) -> Result<HashMap<String, FreshDocument>, CouchError> {
        let ids: Vec<String> = nodes.iter().map(|n| fresh::fresh_id(n)).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut out = HashMap::new();
        for ((_, doc), node) in self
            .couch
            .get_many::<serde_json::Value>(&self.db, &refs)
            .await?
            .into_iter()
            .zip(nodes)
        {
            if let Some(doc) = doc.found() {
                out.insert(node.to_string(), FreshDocument::from_value(node, &doc));
            }
        }
        Ok(out)
    }

    /// Read the flags left by earlier runs, so a node repaired while this server was down
    /// is released (and counted) too.
    pub async fn load_quarantine(&self) -> Result<(), CouchError> {
        let inventory = vogeler_core::query::Inventory::new(self.couch.clone(), &self.db);
        for (node, q) in inventory.quarantined().await? {
            if let Ok(node) = NodeName::new(node) {
                self.quarantine
                    .add(&node, q.reason.as_deref().unwrap_or("unknown"));
            }
        }
        Ok(())
    }

    /// Delete a node's quarantine flag (its document reads again).
    async fn unflag(&self, node: &NodeName) -> Result<(), CouchError> {
        let id = quarantine_id(node);
        if let Some(flag) = self.couch.get::<serde_json::Value>(&self.db, &id).await?
            && let Some(rev) = flag.get("_rev")
        {
            let gone = serde_json::json!({"_id": id, "_rev": rev, "_deleted": true});
            self.couch.bulk_docs(&self.db, &[gone]).await?;
        }
        tracing::info!(node = %node, "the node's document reads again; released from quarantine");
        Ok(())
    }

    /// Drop the history entries over their value's budget, saying once per node and plugin
    /// when a value starts to flap.
    fn spend_budget(&self, history: &mut Vec<HistoryEntry>) {
        if history.is_empty() {
            return;
        }
        let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = budget.admit(history);
        dropped.dedup();
        for (node, plugin) in dropped {
            tracing::debug!(node = %node, plugin = %plugin, per_hour = budget::PER_WINDOW, "value changes faster than its history budget; the change is stored but gets no history entry of its own");
        }
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

/// The nodes whose document cannot be read back, shared by the writers and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Quarantine(Arc<Mutex<BTreeMap<String, String>>>);

impl Quarantine {
    /// Returns whether the node is newly quarantined.
    fn add(&self, node: &NodeName, why: &str) -> bool {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.insert(node.to_string(), why.to_string()).is_none()
    }

    fn holds(&self, node: &NodeName) -> bool {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.contains_key(node.as_str())
    }

    /// Returns whether the node was quarantined.
    fn release(&self, node: &NodeName) -> bool {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.remove(node.as_str()).is_some()
    }

    /// The quarantined nodes, with why.
    pub fn nodes(&self) -> Vec<(String, String)> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().map(|(n, w)| (n.clone(), w.clone())).collect()
    }
}

/// The flag document of a quarantined node, which views and the runner read.
fn quarantine_flag(node: &NodeName, why: &str, now: chrono::DateTime<Utc>) -> serde_json::Value {
    serde_json::json!({
        "_id": quarantine_id(node),
        "vogeler_quarantine": { "node": node, "reason": why, "since": now },
    })
}

/// Merge one node's messages into its documents, oldest first, each only if signed by the
/// pinned key and within the plugin-key cap, and with `max_bytes`, each only while the
/// document stays that small. Sets `outcome` for the messages it refuses; which documents
/// changed is [`Node::written`]. Pure, so the refusals are unit-tested.
pub fn merge_node(
    doc: &mut Node,
    messages: &[(usize, &Signed)],
    now: chrono::DateTime<Utc>,
    max_bytes: Option<usize>,
    history: &mut Vec<HistoryEntry>,
    outcome: &mut [Stored],
) {
    for &(i, m) in messages {
        match doc.pin_key(&m.signer) {
            Ok(_) => {}
            Err(reason) => {
                outcome[i] = Stored::WrongKey(reason);
                continue;
            }
        }
        let change = match &m.message {
            Message::Result(r) => match doc.doc.admits_plugin(r.plugin.as_str()) {
                Ok(()) => {
                    // Kept only while a value is being replaced, to take it back when the
                    // document would outgrow the database's limit.
                    let before = max_bytes
                        .filter(|_| r.value.is_some())
                        .map(|m| (m, doc.clone()));
                    let entries = history.len();
                    let change = doc.apply_result_recording(r, now, history);
                    if let Some((max_bytes, before)) = before
                        && doc.written().document
                        && doc.doc.encoded_len() > max_bytes
                    {
                        let size = doc.doc.encoded_len();
                        *doc = before;
                        history.truncate(entries);
                        outcome[i] = Stored::Refused(format!(
                            "storing plugin {} would make the document of node {} {size} bytes, over server.max_document_bytes ({max_bytes}, which must not exceed CouchDB's max_document_size); narrow the plugin's output",
                            r.plugin, r.node
                        ));
                        continue;
                    }
                    change
                }
                Err(reason) => {
                    outcome[i] = Stored::Refused(reason);
                    continue;
                }
            },
            Message::Announce(a) => doc.apply_announce(a, now),
            Message::Command(_) => Change::Unchanged,
        };
        if change == Change::Unconfirmed
            && let Message::Result(r) = &m.message
        {
            outcome[i] = Stored::Unconfirmed(format!(
                "node {} says plugin {}'s value is unchanged, but its stored value differs or is missing; it is stored when the agent next sends it in full (or run: vogeler-runner -c {} -n {})",
                r.node, r.plugin, r.plugin, r.node
            ));
        }
    }
}

/// What a message tells an enrollment record about its signer.
fn seen(m: &Signed) -> Seen<'_> {
    match &m.message {
        Message::Announce(a) => Seen {
            key: &m.signer,
            at: a.sent_at,
            agent_version: Some(a.agent_version.as_str()),
            facts: Some(&a.facts),
        },
        other => Seen {
            key: &m.signer,
            at: time_of(other),
            agent_version: match other {
                Message::Result(r) => Some(r.agent_version.as_str()),
                _ => None,
            },
            facts: None,
        },
    }
}

/// Set the outcome of `node`'s messages signed by `key`.
fn refuse_signed_by(
    node: &NodeName,
    key: &PublicKey,
    by_node: &BTreeMap<&NodeName, Vec<usize>>,
    messages: &[&Signed],
    outcome: &mut [Stored],
    as_outcome: impl Fn(String) -> Stored,
    why: &str,
) {
    for &i in &by_node[node] {
        if messages[i].signer == *key {
            outcome[i] = as_outcome(why.to_string());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vogeler_proto::{
        names::PluginName,
        signing::PrivateKey,
        wire::{Outcome, PluginResult},
    };

    fn result(plugin: &str, n: u128, value: serde_json::Value) -> Message {
        Message::Result(PluginResult {
            request_id: uuid::Uuid::from_u128(n),
            node: NodeName::new("web01").expect("node"),
            plugin: PluginName::new(plugin).expect("plugin"),
            outcome: Outcome::Ok,
            value: Some(value),
            truncated: false,
            collected_at: Utc::now() - chrono::Duration::seconds(1000 - n as i64),
            duration_ms: 1,
            agent_version: "0.1.0".into(),
            scheduled: None,
        })
    }

    #[test]
    fn only_the_results_that_outgrow_the_document_are_refused() {
        let key = PrivateKey::generate().expect("key").public();
        let signed = |m| Signed {
            message: m,
            signer: key,
        };
        let small = signed(result("small", 1, json!("x")));
        let huge = signed(result("huge", 2, json!("y".repeat(100_000))));
        let later = signed(result("small", 3, json!("z")));
        let messages = [(0, &small), (1, &huge), (2, &later)];
        let now = Utc::now();
        let mut doc = Node::new(&NodeName::new("web01").expect("node"), now);
        let mut outcome = vec![Stored::Done; 3];
        let mut history = Vec::new();
        merge_node(
            &mut doc,
            &messages,
            now,
            Some(65_536),
            &mut history,
            &mut outcome,
        );
        assert!(doc.written().document);
        assert_eq!(outcome[0], Stored::Done);
        let Stored::Refused(why) = &outcome[1] else {
            panic!("{:?}", outcome[1])
        };
        assert!(
            why.contains("over server.max_document_bytes (65536"),
            "{why}"
        );
        assert_eq!(outcome[2], Stored::Done);
        assert!(
            doc.doc.value("huge").is_none(),
            "the refused value was taken back"
        );
        assert_eq!(doc.doc.value("small"), Some(&json!("z")));
        assert!(doc.doc.encoded_len() <= 65_536);
        assert_eq!(history.len(), 1, "x -> z only");
    }

    #[test]
    fn a_wrong_key_and_a_full_document_are_refused_with_their_reason() {
        let key = PrivateKey::generate().expect("key").public();
        let other = PrivateKey::generate().expect("key").public();
        let now = Utc::now();
        let mut doc = Node::new(&NodeName::new("web01").expect("node"), now);
        let filler: Vec<Signed> = (0..vogeler_proto::limits::MAX_PLUGINS_PER_DOCUMENT)
            .map(|i| Signed {
                message: result(&format!("p{i}"), i as u128, json!(i)),
                signer: key,
            })
            .collect();
        let indexed: Vec<(usize, &Signed)> = filler.iter().enumerate().collect();
        let mut outcome = vec![Stored::Done; filler.len()];
        merge_node(&mut doc, &indexed, now, None, &mut Vec::new(), &mut outcome);
        assert!(outcome.iter().all(|o| *o == Stored::Done));
        // As read back for the next batch.
        let mut doc = Node::from_parts(doc.doc, Some(doc.fresh));

        let one_more = Signed {
            message: result("one-more", 999, json!(1)),
            signer: key,
        };
        let squatter = Signed {
            message: result("p0", 998, json!("mine")),
            signer: other,
        };
        let mut outcome = vec![Stored::Done; 2];
        merge_node(
            &mut doc,
            &[(0, &one_more), (1, &squatter)],
            now,
            None,
            &mut Vec::new(),
            &mut outcome,
        );
        assert!(!doc.written().document);
        assert!(
            matches!(&outcome[0], Stored::Refused(r) if r.contains("already stores 256 plugins"))
        );
        assert!(matches!(&outcome[1], Stored::WrongKey(r) if r.contains("is pinned to key")));
        assert_eq!(doc.doc.value("p0"), Some(&json!(0)));
    }
}
