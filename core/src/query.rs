//! The one place the inventory is queried: every view read goes through [`Inventory`], with
//! the view (name and JavaScript) from [`vogeler_proto::design`] and typed rows out, so no
//! caller spells a view name, probes a row by key, or builds the history database's name.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use vogeler_proto::{
    design::{self, Collected, HistoryRow, Pending, Quarantined, Registered, View},
    document::HistoryEntry,
    enrollment,
};

use crate::couch::{CouchClient, CouchError, ViewRow};

/// A node database, its history database and its enrollment database.
#[derive(Debug, Clone)]
pub struct Inventory {
    couch: CouchClient,
    db: String,
    history_db: String,
    enrollment_db: String,
}

impl Inventory {
    pub fn new(couch: CouchClient, db: impl Into<String>) -> Self {
        let db = db.into();
        Self {
            history_db: design::history_database(&db),
            enrollment_db: enrollment::enrollment_database(&db),
            couch,
            db,
        }
    }

    pub fn client(&self) -> &CouchClient {
        &self.couch
    }
    pub fn database(&self) -> &str {
        &self.db
    }
    pub fn history_database(&self) -> &str {
        &self.history_db
    }
    pub fn enrollment_database(&self) -> &str {
        &self.enrollment_db
    }

    async fn rows(
        &self,
        view: View,
        params: &[(&str, String)],
    ) -> Result<Vec<ViewRow>, CouchError> {
        let db = match view.ddoc {
            design::HISTORY_DDOC => &self.history_db,
            design::ENROLLMENT_DDOC => &self.enrollment_db,
            _ => &self.db,
        };
        self.couch.view(db, view.ddoc, view.name, params).await
    }

    /// Every registered node (document id) with what the registry view knows of it.
    /// A node is registered by its document; the row of its freshness document (same key)
    /// only folds in, so a freshness document left without a node adds no node.
    pub async fn registry(&self) -> Result<Vec<(String, Registered)>, CouchError> {
        Ok(fold_registry(self.rows(design::REGISTRY, &[]).await?))
    }

    /// Every key waiting for approval as a node, by node name.
    pub async fn pending(&self) -> Result<Vec<(String, Pending)>, CouchError> {
        Ok(self
            .rows(design::PENDING, &[("reduce", "false".to_string())])
            .await?
            .into_iter()
            .filter_map(|r| Some((r.key.as_str()?.to_string(), Pending::from_value(&r.value))))
            .collect())
    }

    /// The nodes whose document the server cannot read back (and so does not write).
    pub async fn quarantined(&self) -> Result<Vec<(String, Quarantined)>, CouchError> {
        Ok(self
            .rows(design::QUARANTINE, &[])
            .await?
            .into_iter()
            .filter_map(|r| {
                Some((
                    r.key.as_str()?.to_string(),
                    Quarantined::from_value(&r.value),
                ))
            })
            .collect())
    }

    /// When and how `plugin` was last collected on each node that has it.
    pub async fn collected(&self, plugin: &str) -> Result<Vec<(String, Collected)>, CouchError> {
        let params = [
            ("startkey", json!([plugin]).to_string()),
            ("endkey", json!([plugin, {}]).to_string()),
        ];
        // Up to two rows a node: its document's, and its freshness document's folded in.
        let mut by_node: BTreeMap<String, Collected> = BTreeMap::new();
        let mut fresh = Vec::new();
        for r in self.rows(design::COLLECTED, &params).await? {
            let (Some(id), Some(node)) = (r.id, r.key.get(1).and_then(Value::as_str)) else {
                continue;
            };
            let c = Collected::from_value(&r.value);
            if id == node {
                by_node.insert(id, c);
            } else {
                fresh.push((node.to_string(), c));
            }
        }
        for (node, c) in fresh {
            if let Some(mine) = by_node.get_mut(&node) {
                mine.merge(c);
            }
        }
        Ok(by_node.into_iter().collect())
    }

    /// Nodes with an installed package (any version when `version` is `None`, else that
    /// version as stored), in any package inventory.
    pub async fn with_package(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<BTreeSet<String>, CouchError> {
        Ok(self
            .packages(name, None)
            .await?
            .into_iter()
            .filter(|p| version.is_none_or(|v| p.version.as_deref() == Some(v)))
            .map(|p| p.node)
            .collect())
    }

    /// Every installed record of package `name` (in `plugin`'s inventory only, when given),
    /// one row per node and record.
    pub async fn packages(
        &self,
        name: &str,
        plugin: Option<&str>,
    ) -> Result<Vec<PackageRow>, CouchError> {
        let (start, end) = match plugin {
            Some(p) => (json!([name, p]), json!([name, p, {}])),
            None => (json!([name]), json!([name, {}])),
        };
        let params = [
            ("reduce", "false".to_string()),
            ("startkey", start.to_string()),
            ("endkey", end.to_string()),
        ];
        Ok(self
            .rows(design::PACKAGES, &params)
            .await?
            .into_iter()
            .filter_map(PackageRow::from_row)
            .filter(|p| p.name == name && plugin.is_none_or(|want| p.plugin == want))
            .collect())
    }

    /// How many nodes have each version of package `name` in `plugin`'s inventory (the
    /// view's reduce, so one row per version whatever the fleet's size).
    pub async fn package_counts(
        &self,
        plugin: &str,
        name: &str,
    ) -> Result<Vec<(Value, u64)>, CouchError> {
        let params = [
            ("group_level", "3".to_string()),
            ("startkey", json!([name, plugin]).to_string()),
            ("endkey", json!([name, plugin, {}]).to_string()),
        ];
        let rows = self.rows(design::PACKAGES, &params).await?;
        Ok(counts(keyed(rows, &[json!(name), json!(plugin)]), 2))
    }

    /// Nodes whose fact (or plugin value) at `path` is exactly `value`.
    pub async fn with_fact(
        &self,
        path: &str,
        value: &Value,
    ) -> Result<BTreeSet<String>, CouchError> {
        let params = [
            ("reduce", "false".to_string()),
            ("key", json!([path, value]).to_string()),
        ];
        let rows = self.rows(design::VALUES, &params).await?;
        Ok(ids(keyed(rows, &[json!(path)])))
    }

    /// `(node, value)` for the plain values at `path` (a [`Path::view_key`]) within `span`,
    /// as the values view holds them.
    ///
    /// [`Path::view_key`]: vogeler_proto::expr::Path::view_key
    pub async fn values(
        &self,
        path: &str,
        span: &Span,
    ) -> Result<Vec<(String, Value)>, CouchError> {
        let mut out = Vec::new();
        let reads: Vec<Vec<(&str, String)>> = match span {
            Span::Keys(keys) => keys
                .iter()
                .map(|k| vec![("key", json!([path, k]).to_string())])
                .collect(),
            Span::Ranges(ranges) => ranges
                .iter()
                .map(|(lo, hi)| {
                    let bound = |b: &Option<Value>, open: Value| match b {
                        Some(v) => json!([path, v]),
                        None => open,
                    };
                    vec![
                        ("startkey", bound(lo, json!([path])).to_string()),
                        ("endkey", bound(hi, json!([path, {}])).to_string()),
                    ]
                })
                .collect(),
        };
        for mut params in reads {
            params.push(("reduce", "false".to_string()));
            for r in keyed(self.rows(design::VALUES, &params).await?, &[json!(path)]) {
                if let (Some(id), Some(v)) = (r.id, r.key.get(1)) {
                    out.push((id, v.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Nodes whose value at `path` the values view does not hold: a marker row `[path]`
    /// (a string over the view's bound) or `[null, "values"]` (more values than it indexes
    /// of one node). Decide these from their documents ([`Inventory::find_among`]).
    pub async fn unindexed_values(&self, path: &str) -> Result<BTreeSet<String>, CouchError> {
        let mut out = BTreeSet::new();
        for key in [json!([path]), json!([design::UNINDEXED, "values"])] {
            let params = [("reduce", "false".to_string()), ("key", key.to_string())];
            let rows = self.rows(design::VALUES, &params).await?;
            out.extend(ids(keyed(rows, key.as_array().expect("a key"))));
        }
        Ok(out)
    }

    /// Nodes whose `plugin` inventory the packages view does not index (the marker row
    /// `[null, plugin]`: too many records, or records it cannot key exactly).
    pub async fn unindexed_packages(&self, plugin: &str) -> Result<BTreeSet<String>, CouchError> {
        let params = [
            ("reduce", "false".to_string()),
            ("key", json!([design::UNINDEXED, plugin]).to_string()),
        ];
        let rows = self.rows(design::PACKAGES, &params).await?;
        Ok(ids(keyed(rows, &[design::UNINDEXED, json!(plugin)])))
    }

    /// How many nodes hold each plain value at `path` (the view's reduce).
    pub async fn value_counts(&self, path: &str) -> Result<Vec<(Value, u64)>, CouchError> {
        let params = [
            ("group_level", "2".to_string()),
            ("startkey", json!([path]).to_string()),
            ("endkey", json!([path, {}]).to_string()),
        ];
        Ok(counts(
            keyed(self.rows(design::VALUES, &params).await?, &[json!(path)]),
            1,
        ))
    }

    /// Bring the inventory's indexes (values, packages) up to date: CouchDB updates every
    /// view of a design document on a read of any, so one empty read does it. The server
    /// calls this after writes, so a question waits for no index build.
    pub async fn refresh_inventory_views(&self) -> Result<(), CouchError> {
        let params = [("reduce", "false".to_string()), ("limit", "0".to_string())];
        self.rows(design::VALUES, &params).await.map(|_| ())
    }

    /// Node documents matching a Mango `selector`, with only `fields` of each (`_id` always),
    /// a page at a time: for what no view answers (lists, `has` with conditions, paths into a
    /// document). Never `fresh:`/`quarantine:` documents: only node documents have `vogeler`
    /// and an id without `:`.
    pub async fn find(&self, selector: Value, fields: &[String]) -> Result<Vec<Value>, CouchError> {
        const PAGE: usize = 500;
        let mut fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        fields.push("_id");
        let selector = all_of([
            selector,
            json!({"vogeler": {"$type": "object"}}),
            json!({"_id": {"$regex": "^[^:]+$"}}),
        ]);
        let mut docs = Vec::new();
        let mut bookmark: Option<String> = None;
        loop {
            let mut body = json!({"selector": selector, "fields": fields, "limit": PAGE});
            if let Some(b) = &bookmark {
                body["bookmark"] = b.clone().into();
            }
            let page = self.couch.find(&self.db, &body).await?;
            let n = page.docs.len();
            docs.extend(page.docs);
            if n < PAGE || page.bookmark.is_none() {
                return Ok(docs);
            }
            // A bookmark that does not move would page forever.
            if page.bookmark == bookmark {
                return Err(CouchError::Protocol {
                    path: format!("/{}/_find", self.db),
                    url: self.couch.url().to_string(),
                    reason: "the same bookmark came back with a full page".into(),
                });
            }
            bookmark = page.bookmark;
        }
    }

    /// Node documents among `ids` that may match `selector`, with at least `fields`: the
    /// caller decides each with [`Expr::matches`]. CouchDB's `_find` turns `{"_id": {"$in":
    /// …}}` into a scan of every document, so a few ids are read by id (`_all_docs`, whole
    /// documents, a few at a time), and more with one `_find` over the database.
    ///
    /// [`Expr::matches`]: vogeler_proto::expr::Expr::matches
    pub async fn find_among(
        &self,
        ids: &[&str],
        selector: Value,
        fields: &[String],
    ) -> Result<Vec<Value>, CouchError> {
        /// Up to this many ids are read by id; a whole document is at most 8 MB.
        const BY_ID: usize = 20;
        const PER_READ: usize = 4;
        if ids.len() > BY_ID {
            let wanted: BTreeSet<&str> = ids.iter().copied().collect();
            let mut docs = self.find(selector, fields).await?;
            docs.retain(|d| {
                d.get("_id")
                    .and_then(Value::as_str)
                    .is_some_and(|id| wanted.contains(id))
            });
            return Ok(docs);
        }
        let mut docs = Vec::new();
        for chunk in ids.chunks(PER_READ) {
            for (_, fetched) in self.couch.get_many::<Value>(&self.db, chunk).await? {
                // Only node documents, as `find` reads them.
                if let Some(d) = fetched.found().filter(|d| {
                    d.get("vogeler").is_some_and(Value::is_object)
                        && d.get("_id")
                            .and_then(Value::as_str)
                            .is_some_and(|id| !id.contains(':'))
                }) {
                    docs.push(d);
                }
            }
        }
        Ok(docs)
    }

    /// Every recorded change of `plugin` on `node`, oldest first.
    pub async fn history(&self, node: &str, plugin: &str) -> Result<Vec<HistoryEntry>, CouchError> {
        let params = [
            ("startkey", json!([node, plugin]).to_string()),
            ("endkey", json!([node, plugin, {}]).to_string()),
            ("include_docs", "true".to_string()),
        ];
        Ok(self
            .rows(design::HISTORY_BY_NODE_PLUGIN, &params)
            .await?
            .into_iter()
            .filter_map(|r| serde_json::from_value(r.doc?).ok())
            .collect())
    }

    /// Ids of the history entries recorded at or after `cutoff` (RFC 3339) that `wanted`
    /// keeps, newest first: at most `limit`, and whether more exist. Reads the time view's
    /// small rows a page at a time and no entry, so a busy window costs rows, not values.
    pub async fn changes_since(
        &self,
        cutoff: &str,
        limit: usize,
        mut wanted: impl FnMut(&HistoryRow) -> bool,
    ) -> Result<(Vec<String>, bool), CouchError> {
        const PAGE: usize = 2000;
        let mut ids = Vec::new();
        let mut after: Option<(Value, String)> = None;
        loop {
            let mut params = vec![
                ("descending", "true".to_string()),
                ("endkey", json!(cutoff).to_string()),
                ("limit", PAGE.to_string()),
            ];
            // Keys repeat (two entries in one millisecond): resume after the last row read.
            if let Some((key, id)) = &after {
                params.push(("startkey", key.to_string()));
                params.push(("startkey_docid", id.clone()));
                params.push(("skip", "1".to_string()));
            }
            let rows = self.rows(design::HISTORY_BY_TIME, &params).await?;
            let full = rows.len() == PAGE;
            for r in rows {
                let Some(id) = r.id else { continue };
                if id.starts_with("_design/") || !wanted(&HistoryRow::from_value(&r.value)) {
                    after = Some((r.key, id));
                    continue;
                }
                if ids.len() == limit {
                    return Ok((ids, true));
                }
                ids.push(id.clone());
                after = Some((r.key, id));
            }
            if !full {
                return Ok((ids, false));
            }
        }
    }

    /// History entries by id, in the order asked; missing or unreadable ones left out.
    pub async fn history_entries(&self, ids: &[&str]) -> Result<Vec<HistoryEntry>, CouchError> {
        Ok(self
            .couch
            .get_many::<HistoryEntry>(&self.history_db, ids)
            .await?
            .into_iter()
            .filter_map(|(_, e)| e.found())
            .collect())
    }

    /// Nodes last seen before `cutoff` (RFC 3339): a node's two documents may each say
    /// when, and it is stale only if neither says later. Two range reads of the view's small
    /// rows (older, and not older), never the documents.
    pub async fn last_seen_before(&self, cutoff: &str) -> Result<Vec<String>, CouchError> {
        let node = |r: ViewRow| r.value.as_str().map(str::to_string).or(r.id);
        // Oldest first, each node once.
        let mut seen = BTreeSet::new();
        let old: Vec<String> = self
            .rows(
                design::NODES_BY_LAST_SEEN,
                &[
                    ("endkey", json!(cutoff).to_string()),
                    ("inclusive_end", "false".to_string()),
                ],
            )
            .await?
            .into_iter()
            .filter_map(node)
            .filter(|n| seen.insert(n.clone()))
            .collect();
        if old.is_empty() {
            return Ok(Vec::new());
        }
        let recent: BTreeSet<String> = self
            .rows(
                design::NODES_BY_LAST_SEEN,
                &[("startkey", json!(cutoff).to_string())],
            )
            .await?
            .into_iter()
            .filter_map(node)
            .collect();
        Ok(old.into_iter().filter(|n| !recent.contains(n)).collect())
    }

    /// History entries recorded before `cutoff` (RFC 3339).
    pub async fn history_before(&self, cutoff: &str) -> Result<Vec<String>, CouchError> {
        let params = [("endkey", json!(cutoff).to_string())];
        Ok(self
            .rows(design::HISTORY_BY_TIME, &params)
            .await?
            .into_iter()
            .filter_map(|r| r.id)
            .collect())
    }
}

/// Registry rows by node: each node document's row, with its freshness document's row
/// folded in.
fn fold_registry(rows: Vec<ViewRow>) -> Vec<(String, Registered)> {
    let mut nodes: BTreeMap<String, Registered> = BTreeMap::new();
    let mut fresh: Vec<(String, Registered)> = Vec::new();
    for r in rows {
        let (Some(id), Some(node)) = (r.id, r.key.as_str()) else {
            continue;
        };
        if Registered::is_fresh_row(&r.value) {
            fresh.push((node.to_string(), Registered::from_value(&r.value)));
        } else if id == node {
            nodes.insert(id, Registered::from_value(&r.value));
        }
    }
    for (node, f) in fresh {
        if let Some(n) = nodes.get_mut(&node) {
            n.merge(f);
        }
    }
    nodes.into_iter().collect()
}

/// Mango's `$and` of `parts`, leaving out `{}` (every document), which CouchDB matches
/// with nothing inside an `$and`.
fn all_of<const N: usize>(parts: [Value; N]) -> Value {
    let parts: Vec<Value> = parts
        .into_iter()
        .filter(|p| p.as_object().is_none_or(|m| !m.is_empty()))
        .collect();
    json!({ "$and": parts })
}

/// Which keys of a view to read: exact keys, or `(low, high)` ranges of the second key part
/// (`None`: open at that end).
#[derive(Debug, Clone, PartialEq)]
pub enum Span {
    Keys(Vec<Value>),
    Ranges(Vec<(Option<Value>, Option<Value>)>),
}

impl Span {
    /// How many view reads it takes.
    pub fn reads(&self) -> usize {
        match self {
            Span::Keys(k) => k.len(),
            Span::Ranges(r) => r.len(),
        }
    }
}

/// One installed record of a package, as the packages view holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageRow {
    pub node: String,
    pub name: String,
    pub plugin: String,
    /// `epoch:version-release` as composed from the record.
    pub version: Option<String>,
    /// `dpkg` or `rpm`.
    pub scheme: String,
    /// The record as the node stored it (`name`, `version`, `arch`, `epoch`, `release`).
    pub record: Value,
}

impl PackageRow {
    fn from_row(r: ViewRow) -> Option<Self> {
        let name = r.key.get(0)?.as_str()?;
        let plugin = r.key.get(1)?.as_str()?.to_string();
        let version = r.key.get(2).and_then(Value::as_str).map(str::to_string);
        let scheme = r.value.get("scheme")?.as_str()?.to_string();
        let mut record = serde_json::Map::new();
        record.insert("name".into(), name.into());
        for f in ["version", "arch", "epoch", "release"] {
            if let Some(v) = r.value.get(f) {
                record.insert(f.into(), v.clone());
            }
        }
        Some(Self {
            node: r.id?,
            name: name.to_string(),
            plugin,
            version,
            scheme,
            record: Value::Object(record),
        })
    }
}

/// The rows whose key starts with exactly `prefix`. CouchDB collates keys with ICU, which
/// ignores control and format characters: a range or key read of `os.family` also returns
/// `os.fam\u{ad}ily`, which names another path. The views mark nodes with such keys, and
/// readers keep only what they asked for.
fn keyed(rows: Vec<ViewRow>, prefix: &[Value]) -> Vec<ViewRow> {
    rows.into_iter()
        .filter(|r| r.key.as_array().is_some_and(|k| k.starts_with(prefix)))
        .collect()
}

/// `(key part at, count)` of grouped `_count` rows, most common first.
fn counts(rows: Vec<ViewRow>, at: usize) -> Vec<(Value, u64)> {
    let mut out: Vec<(Value, u64)> = rows
        .into_iter()
        .filter_map(|r| Some((r.key.get(at)?.clone(), r.value.as_u64()?)))
        .collect();
    out.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    out
}

fn ids(rows: Vec<ViewRow>) -> BTreeSet<String> {
    rows.into_iter().filter_map(|r| r.id).collect()
}
