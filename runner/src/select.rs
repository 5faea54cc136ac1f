//! Which nodes an expression selects, decided in CouchDB and refined here on the narrowed
//! rows only: never by downloading every document.
//!
//! Each leaf of the expression is read where the database can answer it best, then the
//! leaves are combined as sets of node names (`and` intersects, `or` joins, `not` takes the
//! rest of the registered nodes):
//!
//! | leaf                                   | read from                                      |
//! |----------------------------------------|------------------------------------------------|
//! | `all`, names, globs                    | the registry the caller already holds          |
//! | `path OP value` on a bare path         | the values view: the rows of that path (the exact keys for `=`, a key range for numbers), refined with the comparison |
//! | `dpkg has NAME …`, `rpms has name=…`   | the packages view: the rows of that package, refined in the package manager's version order |
//! | anything else (`disks[].use_percent > 90`, `has (…)` on other plugins, `.kernel`, `exists`) | `_find` with the leaf's selector and only the fields it reads, refined with [`Expr::matches_with`] |
//!
//! The views are the server's (the runner only reads, with the reader account); `_find`
//! needs no index to be exact, and scans only in the database.

use std::{collections::BTreeSet, future::Future, pin::Pin};

use serde_json::{Value, json};
use vogeler_core::{
    couch::CouchError,
    query::{Inventory, Span},
};
use vogeler_proto::{
    expr::{Catalog, Expr, Member, Op, Path, Test},
    names::NodeName,
    version::Scheme,
};

/// What one selection read, for `--verbose` and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reads {
    pub view_reads: usize,
    pub view_rows: usize,
    pub finds: usize,
    pub documents: usize,
}

/// Selects nodes for expressions against one inventory, among the registered `universe`.
#[derive(Debug)]
pub struct Selector<'a> {
    inventory: &'a Inventory,
    universe: &'a BTreeSet<NodeName>,
    reads: std::sync::Mutex<Reads>,
}

type Selected<'b> =
    Pin<Box<dyn Future<Output = Result<BTreeSet<NodeName>, CouchError>> + Send + 'b>>;

impl<'a> Selector<'a> {
    pub fn new(inventory: &'a Inventory, universe: &'a BTreeSet<NodeName>) -> Self {
        Self {
            inventory,
            universe,
            reads: std::sync::Mutex::new(Reads::default()),
        }
    }

    /// What the selections so far read.
    pub fn reads(&self) -> Reads {
        *self.reads.lock().expect("reads lock")
    }

    fn count(&self, f: impl FnOnce(&mut Reads)) {
        f(&mut self.reads.lock().expect("reads lock"));
    }

    /// The nodes `expr` selects: registered ones, and names given explicitly even when
    /// unregistered (the caller decides what those mean).
    pub fn select<'b>(&'b self, expr: &'b Expr) -> Selected<'b> {
        self.select_in(expr, None)
    }

    /// [`Selector::select`], where only nodes in `scope` (when given) can matter: `and`
    /// passes what its earlier parts left, so a `_find` reads only those documents.
    fn select_in<'b>(
        &'b self,
        expr: &'b Expr,
        scope: Option<&'b BTreeSet<NodeName>>,
    ) -> Selected<'b> {
        Box::pin(async move {
            Ok(match expr {
                Expr::All => self.universe.clone(),
                Expr::Names(names) => names.clone(),
                Expr::Glob(p) => self
                    .universe
                    .iter()
                    .filter(|n| p.matches(n.as_str()))
                    .cloned()
                    .collect(),
                // Read by the caller before; an unread source names nobody.
                Expr::NamesFrom(_) => BTreeSet::new(),
                Expr::And(items) => {
                    let mut acc: Option<BTreeSet<NodeName>> = None;
                    // Cheap parts first: a name or glob narrows before any read.
                    let mut ordered: Vec<&Expr> = items.iter().collect();
                    ordered.sort_by_key(|e| !matches!(e, Expr::Names(_) | Expr::Glob(_)));
                    for e in ordered {
                        let s = self.select_in(e, acc.as_ref().or(scope)).await?;
                        let next = match acc {
                            None => s,
                            Some(a) => a.intersection(&s).cloned().collect(),
                        };
                        if next.is_empty() {
                            return Ok(next);
                        }
                        acc = Some(next);
                    }
                    acc.unwrap_or_default()
                }
                Expr::Or(items) => {
                    let mut acc = BTreeSet::new();
                    for e in items {
                        acc.extend(self.select_in(e, scope).await?);
                    }
                    acc
                }
                Expr::Not(e) => {
                    let s = self.select_in(e, scope).await?;
                    self.universe.difference(&s).cloned().collect()
                }
                Expr::Compare { path, test } => match path.view_key() {
                    Some(key) => self.compare(expr, &key, test, scope).await?,
                    None => self.find(expr, scope).await?,
                },
                Expr::Has { path, member } => match package_leaf(path, member) {
                    Some((plugin, name)) => {
                        self.has_package(expr, plugin, name, member, scope).await?
                    }
                    None => self.find(expr, scope).await?,
                },
                Expr::Exists(_) => self.find(expr, scope).await?,
            })
        })
    }

    /// A comparison on a bare path, from the values view; nodes the view marks as holding
    /// more than it indexes, and numbers whose text the test reads (JavaScript rewrites
    /// `1.0` as `1`), are decided from their documents.
    async fn compare(
        &self,
        leaf: &Expr,
        key: &str,
        test: &Test,
        scope: Option<&BTreeSet<NodeName>>,
    ) -> Result<BTreeSet<NodeName>, CouchError> {
        let span = span(test);
        let rows = self.inventory.values(key, &span).await?;
        let mut unindexed = self.inventory.unindexed_values(key).await?;
        self.count(|r| {
            r.view_reads += span.reads() + 2;
            r.view_rows += rows.len() + unindexed.len();
        });
        let reads_text = reads_number_text(test);
        let mut out = BTreeSet::new();
        for (id, v) in rows {
            if reads_text && v.is_number() {
                unindexed.insert(id);
            } else if test.accepts(&v)
                && let Ok(n) = NodeName::new(id)
            {
                out.insert(n);
            }
        }
        out.extend(self.decide(leaf, unindexed, scope).await?);
        Ok(out)
    }

    /// `PLUGIN has NAME …` on a built-in package inventory, from the packages view; nodes
    /// whose inventory the view does not index are decided from their documents.
    async fn has_package(
        &self,
        leaf: &Expr,
        plugin: &str,
        name: &str,
        member: &Member,
        scope: Option<&BTreeSet<NodeName>>,
    ) -> Result<BTreeSet<NodeName>, CouchError> {
        let rows = self.inventory.packages(name, Some(plugin)).await?;
        let unindexed = self.inventory.unindexed_packages(plugin).await?;
        self.count(|r| {
            r.view_reads += 2;
            r.view_rows += rows.len() + unindexed.len();
        });
        let mut out: BTreeSet<NodeName> = rows
            .into_iter()
            .filter(|p| member.accepts(&p.record, scheme(&p.scheme)))
            .filter_map(|p| NodeName::new(p.node).ok())
            .collect();
        out.extend(self.decide(leaf, unindexed, scope).await?);
        Ok(out)
    }

    /// Which of the registered (and in-scope) nodes `ids` meet `leaf`, from their documents.
    async fn decide(
        &self,
        leaf: &Expr,
        ids: BTreeSet<String>,
        scope: Option<&BTreeSet<NodeName>>,
    ) -> Result<BTreeSet<NodeName>, CouchError> {
        let ids: Vec<NodeName> = ids
            .into_iter()
            .filter_map(|id| NodeName::new(id).ok())
            .filter(|n| self.universe.contains(n) && scope.is_none_or(|s| s.contains(n)))
            .collect();
        if ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        let ids: Vec<&str> = ids.iter().map(NodeName::as_str).collect();
        let docs = self
            .inventory
            .find_among(&ids, leaf.mango(), &fields_of(leaf))
            .await?;
        Ok(self.matching(leaf, docs))
    }

    /// Any other leaf: `_find` narrows (read by id when `scope` is a few nodes), and
    /// [`Expr::matches_with`] decides on the fields read.
    async fn find(
        &self,
        leaf: &Expr,
        scope: Option<&BTreeSet<NodeName>>,
    ) -> Result<BTreeSet<NodeName>, CouchError> {
        let docs = match scope {
            Some(s) => {
                let ids: Vec<&str> = s.iter().map(NodeName::as_str).collect();
                self.inventory
                    .find_among(&ids, leaf.mango(), &fields_of(leaf))
                    .await?
            }
            _ => self.inventory.find(leaf.mango(), &fields_of(leaf)).await?,
        };
        Ok(self.matching(leaf, docs))
    }

    fn matching(&self, leaf: &Expr, docs: Vec<Value>) -> BTreeSet<NodeName> {
        self.count(|r| {
            r.finds += 1;
            r.documents += docs.len();
        });
        docs.into_iter()
            .filter_map(|doc| {
                let id = doc.get("_id")?.as_str()?;
                leaf.matches_with(id, &doc, &Catalog::of_document(&doc))
                    .then(|| NodeName::new(id).ok())
                    .flatten()
            })
            .collect()
    }
}

/// The fields `_find` reads for `leaf`: those it names, and the node's declared inventories.
fn fields_of(leaf: &Expr) -> Vec<String> {
    let mut fields = leaf.fields();
    fields.push("vogeler.packages".to_string());
    fields
}

/// Whether `test` reads a stored number's text (a regex, or ordering against text), which
/// the values view cannot give back as stored: a number passes through JavaScript there.
fn reads_number_text(test: &Test) -> bool {
    match test.op() {
        Op::Match | Op::NotMatch => true,
        Op::Lt | Op::Le | Op::Gt | Op::Ge => test.number().is_none(),
        Op::Eq | Op::Ne => false,
    }
}

/// The plugin and package name of a `has` the packages view answers exactly: a built-in
/// package inventory, a pinned name, and conditions on the fields the view keeps.
fn package_leaf<'e>(path: &'e Path, member: &'e Member) -> Option<(&'e str, &'e str)> {
    // Declared inventories are per node (`vogeler.packages`): those go through `_find`.
    let plugin = path.plugin().filter(|p| Scheme::by_name(p).is_some())?;
    let name = member.pinned_name()?;
    member.reads_record_fields_only().then_some((plugin, name))
}

/// The view keys that can hold a value meeting `test`: the exact keys for `=`, a key range
/// for numeric bounds (strings sort after numbers in CouchDB and may read as numbers), the
/// whole path otherwise.
fn span(test: &Test) -> Span {
    match (test.op(), test.number()) {
        (Op::Eq, n) => {
            let mut keys = vec![Value::String(test.value().to_string())];
            if let Some(n) = n {
                keys.push(json_number(n));
            }
            match test.value() {
                "true" => keys.push(Value::Bool(true)),
                "false" => keys.push(Value::Bool(false)),
                "null" => keys.push(Value::Null),
                _ => {}
            }
            Span::Keys(keys)
        }
        (Op::Gt | Op::Ge, Some(n)) => Span::Ranges(vec![(Some(json_number(n)), None)]),
        (Op::Lt | Op::Le, Some(n)) => Span::Ranges(vec![
            (None, Some(json_number(n))),
            (Some(Value::String(String::new())), None),
        ]),
        _ => Span::Ranges(vec![(None, None)]),
    }
}

/// A number as a view key: CouchDB collates numbers by value, so an integer is written as one
/// while it is exact and as a double beyond (where JavaScript has only doubles anyway).
fn json_number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        json!(n as i64)
    } else {
        json!(n)
    }
}

/// `dpkg` or `rpm`, as views and documents spell a version order.
fn scheme(s: &str) -> Option<Scheme> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_of(s: &str) -> Test {
        match vogeler_proto::expr::parse(s).expect(s) {
            Expr::Compare { test, .. } => test,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn equality_reads_the_exact_keys_a_match_can_have() {
        assert_eq!(
            span(&test_of("memory_mb = 16000")),
            Span::Keys(vec![json!("16000"), json!(16000)])
        );
        assert_eq!(
            span(&test_of("os.family = Debian")),
            Span::Keys(vec![json!("Debian")])
        );
        assert_eq!(
            span(&test_of("virtual = true")),
            Span::Keys(vec![json!("true"), json!(true)])
        );
    }

    #[test]
    fn numeric_bounds_read_a_range_and_the_strings() {
        assert_eq!(
            span(&test_of("memory_mb > 4096")),
            Span::Ranges(vec![(Some(json!(4096)), None)])
        );
        assert_eq!(
            span(&test_of("load < 0.5")),
            Span::Ranges(vec![(None, Some(json!(0.5))), (Some(json!("")), None)])
        );
        assert_eq!(
            span(&test_of("os.family =~ ^Deb")),
            Span::Ranges(vec![(None, None)])
        );
    }

    #[test]
    fn only_built_in_inventories_with_a_pinned_name_use_the_packages_view() {
        let leaf = |s: &str| match vogeler_proto::expr::parse(s).expect(s) {
            Expr::Has { path, member } => {
                package_leaf(&path, &member).map(|(p, n)| (p.to_string(), n.to_string()))
            }
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(
            leaf("dpkg has openssl < 3.0.13"),
            Some(("dpkg".into(), "openssl".into()))
        );
        assert_eq!(
            leaf(r"dpkg has name=nginx and version=~^1\.22"),
            Some(("dpkg".into(), "nginx".into()))
        );
        assert_eq!(leaf("dpkg has (version < 1)"), None, "no name: _find");
        assert_eq!(leaf("dpkg has (name = x and status = config-files)"), None);
        assert_eq!(leaf("pip has requests"), None, "declared per node: _find");
    }

    #[test]
    fn declared_inventories_join_the_catalog_but_cannot_reorder_the_built_ins() {
        let c = Catalog::of_document(
            &json!({"vogeler": {"packages": {"pip": "rpm", "dpkg": "rpm", "apk": "bogus"}}}),
        );
        assert_eq!(c.scheme("pip"), Some(Scheme::Rpm));
        assert_eq!(c.scheme("dpkg"), Some(Scheme::Dpkg));
        assert_eq!(c.scheme("apk"), None);
    }
}
