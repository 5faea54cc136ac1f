//! `query` and `count`: questions over stored values, answered from the server's views (and
//! `_find` for what no view holds), never by downloading every document.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use serde_json::{Map, Value, json};
use vogeler_config::CouchSettings;
use vogeler_core::query::Span;
use vogeler_proto::{
    expr::{self, Expr, Path},
    names::{NodeName, PluginName},
    text::printable,
};

use crate::{
    RunnerError,
    inventory::{open, registry_error},
    output::Rows,
    target::NodeSet,
};

/// `count`'s columns.
pub const COUNT_COLUMNS: &[&str] = &["value", "nodes"];
/// `query`'s first column; each `--fields` path follows, named as written.
pub const QUERY_COLUMNS: &[&str] = &["node", "FIELD..."];

/// A value to show or count: a path (`os.version`, `disks[].use_percent`) or a package's
/// version in a package inventory (`dpkg:openssl`).
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Path { text: String, path: Path },
    Package { plugin: PluginName, name: String },
}

impl Field {
    /// How the column is named: as written.
    pub fn name(&self) -> String {
        match self {
            Field::Path { text, .. } => text.clone(),
            Field::Package { plugin, name } => format!("{plugin}:{name}"),
        }
    }
}

/// `PATH` or `PLUGIN:PACKAGE`.
pub fn parse_field(s: &str) -> Result<Field, String> {
    let s = s.trim();
    if let Some((plugin, name)) = s.split_once(':') {
        let plugin = PluginName::new(plugin)
            .map_err(|e| format!("{s:?}: {e} (write PLUGIN:PACKAGE, e.g. dpkg:openssl)"))?;
        if name.is_empty() {
            return Err(format!(
                "{s:?}: the package name is missing (write e.g. dpkg:openssl)"
            ));
        }
        return Ok(Field::Package {
            plugin,
            name: name.to_string(),
        });
    }
    match expr::parse(&format!("exists {s}")) {
        Ok(Expr::Exists(path)) => Ok(Field::Path {
            text: s.to_string(),
            path,
        }),
        Ok(_) => Err(format!(
            "{s:?} is not a path (write e.g. os.version or disks[].use_percent)"
        )),
        Err(e) => Err(format!(
            "{s:?} is not a path: {e} (write e.g. os.version or disks[].use_percent)"
        )),
    }
}

/// Nodes an expression selects, with the values asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub fields: Vec<String>,
    /// Node → one value per field (`null` where it has none; a list where it has several).
    pub nodes: BTreeMap<NodeName, Vec<Value>>,
}

/// The registered nodes `set` selects, with `fields` of each.
pub async fn query(
    settings: &CouchSettings,
    set: &NodeSet,
    fields: &[Field],
    freshness: std::time::Duration,
) -> Result<Answer, RunnerError> {
    let registry = crate::registry(settings, freshness).await?;
    let selected: BTreeSet<NodeName> = crate::select_nodes(settings, set, &registry)
        .await?
        .into_iter()
        .filter(|n| registry.contains_key(n))
        .collect();
    let mut nodes: BTreeMap<NodeName, Vec<Value>> = selected
        .iter()
        .map(|n| (n.clone(), vec![Value::Null; fields.len()]))
        .collect();
    let inventory = open(settings)?;
    for (i, field) in fields.iter().enumerate() {
        let mut found: BTreeMap<NodeName, Vec<Value>> = BTreeMap::new();
        match field {
            Field::Package { plugin, name } => {
                for p in inventory
                    .packages(name, Some(plugin.as_str()))
                    .await
                    .map_err(registry_error)?
                {
                    if let Ok(n) = NodeName::new(&p.node) {
                        found
                            .entry(n)
                            .or_default()
                            .push(p.version.map_or(Value::Null, Value::String));
                    }
                }
                // Inventories the view does not index are read from their documents.
                let in_selection =
                    |id: &str| NodeName::new(id).is_ok_and(|n| selected.contains(&n));
                let (_, marked) = package_versions(&inventory, plugin, name, in_selection).await?;
                for (n, versions) in marked {
                    if !versions.is_empty() {
                        found.insert(n, versions);
                    }
                }
            }
            Field::Path { path, .. } => {
                // The values view holds each plain value; a node without a row there may
                // still hold a list or an object at the path, so those few are read by id.
                let mut missing: Vec<&str> = selected.iter().map(NodeName::as_str).collect();
                if let Some(key) = path.view_key() {
                    for (id, v) in inventory
                        .values(&key, &Span::Ranges(vec![(None, None)]))
                        .await
                        .map_err(registry_error)?
                    {
                        if let Ok(n) = NodeName::new(&id) {
                            found.entry(n).or_default().push(v);
                        }
                    }
                    missing.retain(|id| NodeName::new(*id).is_ok_and(|n| !found.contains_key(&n)));
                }
                for (n, values) in path_values(&inventory, &missing, path).await? {
                    if !values.is_empty() {
                        found.insert(n, values);
                    }
                }
            }
        }
        for (n, mut values) in found {
            if let Some(row) = nodes.get_mut(&n) {
                row[i] = if values.len() == 1 {
                    values.remove(0)
                } else {
                    Value::Array(values)
                };
            }
        }
    }
    Ok(Answer {
        fields: fields.iter().map(Field::name).collect(),
        nodes,
    })
}

/// `query` in every format: a row per node, its fields as columns.
pub fn query_rows(a: &Answer) -> Rows {
    let columns: Vec<String> = std::iter::once("node".to_string())
        .chain(a.fields.iter().cloned())
        .collect();
    let rows: Vec<Value> = a
        .nodes
        .iter()
        .map(|(n, values)| {
            let mut row = Map::new();
            row.insert("node".into(), n.as_str().into());
            for (f, v) in a.fields.iter().zip(values) {
                row.insert(f.clone(), v.clone());
            }
            Value::Object(row)
        })
        .collect();
    let cells: Vec<Vec<String>> = a
        .nodes
        .iter()
        .map(|(n, values)| {
            std::iter::once(n.to_string())
                .chain(values.iter().map(cell))
                .collect()
        })
        .collect();
    let mut table = render_table(&columns, &cells);
    let _ = writeln!(table, "{} node(s)", a.nodes.len());
    Rows::list(&[], rows, table).with_columns(columns)
}

/// How many nodes hold each value.
#[derive(Debug, Clone, PartialEq)]
pub struct Counted {
    pub field: String,
    /// Most common first.
    pub values: Vec<(Value, u64)>,
    /// Nodes in the set without the value (for a path; a package's count is of records).
    pub without: Option<u64>,
}

/// Value → number of nodes for `field`, over every node (the view's reduce) or over `set`.
/// Nodes the views mark as holding more than they index are counted from their documents.
pub async fn count(
    settings: &CouchSettings,
    field: &Field,
    set: &NodeSet,
    freshness: std::time::Duration,
) -> Result<Counted, RunnerError> {
    let inventory = open(settings)?;
    if let Field::Path { text, path } = field
        && path.view_key().is_none()
    {
        return Err(RunnerError::Usage(format!(
            "count {text}: count reads one plain value per node at a path (os.version, facts.memory_mb) or a package's versions (dpkg:openssl); a path through a list ([]), starting with '.' or '_', deeper than {} keys or into vogeler is not counted: list its values with `vogeler-runner query all --fields {text}`",
            vogeler_proto::design::VALUES_MAX_DEPTH
        )));
    }
    let registry = crate::registry(settings, freshness).await?;
    let selected = if set.is_all() {
        None
    } else {
        Some(crate::select_nodes(settings, set, &registry).await?)
    };
    let in_set = |id: &str| {
        NodeName::new(id).is_ok_and(|n| {
            registry.contains_key(&n) && selected.as_ref().is_none_or(|s| s.contains(&n))
        })
    };
    let (values, unindexed, extra) = match field {
        Field::Package { plugin, name } => {
            let values = match &selected {
                None => inventory.package_counts(plugin.as_str(), name).await,
                Some(_) => inventory
                    .packages(name, Some(plugin.as_str()))
                    .await
                    .map(|rows| {
                        tally(
                            rows.into_iter()
                                .filter(|p| in_set(&p.node))
                                .map(|p| p.version.map_or(Value::Null, Value::String)),
                        )
                    }),
            }
            .map_err(registry_error)?;
            let (unindexed, marked) = package_versions(&inventory, plugin, name, in_set).await?;
            let extra: Vec<Value> = marked.into_iter().flat_map(|(_, v)| v).collect();
            (values, unindexed, extra)
        }
        Field::Path { path, .. } => {
            let key = path.view_key().unwrap_or_default();
            let values = match &selected {
                None => inventory.value_counts(&key).await,
                Some(_) => inventory
                    .values(&key, &Span::Ranges(vec![(None, None)]))
                    .await
                    .map(|rows| {
                        tally(
                            rows.into_iter()
                                .filter(|(id, _)| in_set(id))
                                .map(|(_, v)| v),
                        )
                    }),
            }
            .map_err(registry_error)?;
            let unindexed = inventory
                .unindexed_values(&key)
                .await
                .map_err(registry_error)?;
            let ids: Vec<&str> = unindexed
                .iter()
                .map(String::as_str)
                .filter(|id| in_set(id))
                .collect();
            // The view counts one plain value a node; so do these.
            let extra: Vec<Value> = path_values(&inventory, &ids, path)
                .await?
                .into_iter()
                .filter_map(|(_, mut v)| match v.len() {
                    1 if !v[0].is_array() && !v[0].is_object() => v.pop(),
                    _ => None,
                })
                .collect();
            (values, unindexed.len(), extra)
        }
    };
    let values = if unindexed == 0 {
        values
    } else {
        merge(values, tally(extra.into_iter()))
    };
    let without = match field {
        Field::Path { .. } => {
            let nodes = selected.as_ref().map_or(registry.len(), |s| {
                s.iter().filter(|n| registry.contains_key(*n)).count()
            }) as u64;
            let with: u64 = values.iter().map(|(_, c)| c).sum();
            Some(nodes.saturating_sub(with))
        }
        Field::Package { .. } => None,
    };
    Ok(Counted {
        field: field.name(),
        values,
        without,
    })
}

/// The values at `path` of the node documents `ids`, read with only the fields it needs.
async fn path_values(
    inventory: &vogeler_core::query::Inventory,
    ids: &[&str],
    path: &Path,
) -> Result<Vec<(NodeName, Vec<Value>)>, RunnerError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let docs = inventory
        .find_among(ids, json!({}), &Expr::Exists(path.clone()).fields())
        .await
        .map_err(registry_error)?;
    Ok(docs
        .iter()
        .filter_map(|doc| {
            let n = NodeName::new(doc.get("_id")?.as_str()?).ok()?;
            Some((n, path.read(doc).into_iter().cloned().collect()))
        })
        .collect())
}

/// The installed versions of package `name` in the `plugin` inventories the packages view
/// marks as unindexed, read from the documents of those nodes `keep` accepts, as the view
/// would key them; and how many nodes the view marks.
async fn package_versions(
    inventory: &vogeler_core::query::Inventory,
    plugin: &PluginName,
    name: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<(usize, Vec<(NodeName, Vec<Value>)>), RunnerError> {
    let unindexed = inventory
        .unindexed_packages(plugin.as_str())
        .await
        .map_err(registry_error)?;
    let ids: Vec<&str> = unindexed
        .iter()
        .map(String::as_str)
        .filter(|id| keep(id))
        .collect();
    if ids.is_empty() {
        return Ok((unindexed.len(), vec![]));
    }
    let docs = inventory
        .find_among(&ids, json!({}), &[plugin.to_string()])
        .await
        .map_err(registry_error)?;
    let found = docs
        .iter()
        .filter_map(|doc| {
            let n = NodeName::new(doc.get("_id")?.as_str()?).ok()?;
            let list = doc.get(plugin.as_str()).unwrap_or(&Value::Null);
            let versions = expr::installed_versions(list, name)
                .into_iter()
                .map(|v| v.map_or(Value::Null, Value::String))
                .collect();
            Some((n, versions))
        })
        .collect();
    Ok((unindexed.len(), found))
}

/// Two sets of counts as one, most common first. Values are one when CouchDB keys them as
/// one: numbers by value (`4096` and `4096.0`; beyond 2^53 as the view's doubles).
fn merge(a: Vec<(Value, u64)>, b: Vec<(Value, u64)>) -> Vec<(Value, u64)> {
    let mut by: BTreeMap<String, (Value, u64)> = BTreeMap::new();
    for (v, n) in a.into_iter().chain(b) {
        let key = match &v {
            Value::Number(x) => format!("#{:?}", x.as_f64()),
            other => other.to_string(),
        };
        by.entry(key).or_insert((v, 0)).1 += n;
    }
    let mut out: Vec<(Value, u64)> = by.into_values().collect();
    out.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    out
}

/// Counts of values, most common first (ties in value order).
fn tally(values: impl Iterator<Item = Value>) -> Vec<(Value, u64)> {
    merge(values.map(|v| (v, 1)).collect(), vec![])
}

/// `count` in every format: a row per value; the table adds the nodes without one.
pub fn count_rows(c: &Counted) -> Rows {
    let rows: Vec<Value> = c
        .values
        .iter()
        .map(|(v, n)| json!({"value": v, "nodes": n}))
        .collect();
    let mut cells: Vec<Vec<String>> = c
        .values
        .iter()
        .map(|(v, n)| vec![cell(v), n.to_string()])
        .collect();
    if let Some(w) = c.without.filter(|w| *w > 0) {
        cells.push(vec!["(none)".into(), w.to_string()]);
    }
    let header = [c.field.clone(), "NODES".to_string()];
    let mut table = render_table(&header, &cells);
    let total: u64 = c.values.iter().map(|(_, n)| n).sum();
    let _ = write!(table, "{} value(s) over {total} ", c.values.len());
    table.push_str(if c.field.contains(':') {
        "installed record(s)"
    } else {
        "node(s)"
    });
    if let Some(w) = c.without.filter(|w| *w > 0) {
        let _ = write!(table, "; {w} node(s) without {}", printable(&c.field));
    }
    table.push('\n');
    Rows::list(COUNT_COLUMNS, rows, table)
}

/// A value as a table cell: text as it is, anything else as JSON, terminal-safe.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => printable(s).into_owned(),
        other => printable(&other.to_string()).into_owned(),
    }
}

/// Aligned columns under an upper-case header (the last column unpadded).
fn render_table(header: &[String], cells: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |row: &[String]| {
        let last = row.len().saturating_sub(1);
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(
        &header
            .iter()
            .map(|h| printable(h).to_uppercase())
            .collect::<Vec<_>>(),
    );
    for row in cells {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_paths_or_packages() {
        assert!(matches!(parse_field("os.version"), Ok(Field::Path { .. })));
        assert!(matches!(
            parse_field("disks[].use_percent"),
            Ok(Field::Path { .. })
        ));
        assert_eq!(
            parse_field("dpkg:openssl").expect("package"),
            Field::Package {
                plugin: PluginName::new("dpkg").expect("name"),
                name: "openssl".into()
            }
        );
        for (bad, needle) in [
            ("dpkg:", "package name is missing"),
            ("Bad Plugin:x", "PLUGIN:PACKAGE"),
            ("a b", "not a path"),
            ("", "not a path"),
        ] {
            let e = parse_field(bad).expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn counts_show_the_nodes_without_a_value() {
        let c = Counted {
            field: "os.version".into(),
            values: vec![(json!("12"), 3), (json!(11), 1)],
            without: Some(2),
        };
        let rows = count_rows(&c);
        let table = rows.render(crate::cli::Output::Table).stdout;
        assert!(
            table.starts_with("OS.VERSION  NODES\n12          3\n11          1\n(none)      2\n"),
            "{table}"
        );
        assert!(
            table.contains("2 value(s) over 4 node(s); 2 node(s) without os.version"),
            "{table}"
        );
        let jsonl = rows.render(crate::cli::Output::Jsonl).stdout;
        assert_eq!(
            jsonl,
            "{\"nodes\":3,\"value\":\"12\"}\n{\"nodes\":1,\"value\":11}\n"
        );
    }

    #[test]
    fn tally_orders_by_count() {
        let t = tally([json!("a"), json!("b"), json!("b"), json!(1)].into_iter());
        assert_eq!(t[0], (json!("b"), 2));
        assert_eq!(t.len(), 3);
    }
}
