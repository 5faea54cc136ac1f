//! What changed between two values of a plugin, structured for JSON and rendered for people:
//! package lists by package, objects by key path, other lists by entry, scalars as old → new.
//! Used by `history NODE PLUGIN` and `changes` alike, so both say a change the same way.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};
use vogeler_proto::{document::HistoryEntry, text::printable};

/// One change of a plugin's value. JSON output carries the values exactly; [`Diff::lines`]
/// escapes them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Diff {
    /// No earlier value: the first one the history holds, said briefly (a first package
    /// list would otherwise be thousands of lines).
    First {
        /// Entries of a list or keys of an object.
        #[serde(skip_serializing_if = "Option::is_none")]
        items: Option<usize>,
        /// The value itself when it is a scalar.
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<Value>,
    },
    /// Package lists (`dpkg`, `rpms`): by name, and by architecture too where entries have one.
    Packages {
        changed: Vec<PackageChange>,
        added: Vec<Package>,
        removed: Vec<Package>,
    },
    /// Objects, by key path (`os.version`, `disks[1]`).
    Object {
        changed: Vec<PathChange>,
        added: Vec<PathValue>,
        removed: Vec<PathValue>,
    },
    /// Other lists: the entries added and removed, a repeated entry counted each time.
    List {
        added: Vec<Value>,
        removed: Vec<Value>,
    },
    /// Anything else, or a change of type.
    Value { old: Value, new: Value },
}

/// A package added or removed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Package {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    pub version: Value,
    /// The name is installed for several architectures: say which one this is.
    #[serde(skip)]
    pub multi_arch: bool,
}

/// A package whose entry changed: its version, and any other field that changed with it
/// (dpkg's `status` going from `installed` to `config-files`, say).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackageChange {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    pub old: Value,
    pub new: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<PathChange>,
    /// As [`Package::multi_arch`].
    #[serde(skip)]
    pub multi_arch: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathChange {
    pub path: String,
    pub old: Value,
    pub new: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathValue {
    pub path: String,
    pub value: Value,
}

/// One recorded change, as `changes` and `history` print it (`--output jsonl`: one line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub at: chrono::DateTime<chrono::Utc>,
    pub node: String,
    pub plugin: String,
    pub request_id: uuid::Uuid,
    /// Changes before this one the server did not record (see [`HistoryEntry::unrecorded`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub unrecorded: u64,
    #[serde(flatten)]
    pub diff: Diff,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Change {
    /// The entry's diff; its two values are dropped with the entry, so many changes can be
    /// held without holding every package list they came from.
    pub fn of(entry: &HistoryEntry) -> Self {
        Self {
            at: entry.at,
            node: entry.node.clone(),
            plugin: entry.plugin.clone(),
            request_id: entry.request_id,
            unrecorded: entry.unrecorded,
            diff: diff(&entry.old, &entry.new),
        }
    }
}

/// The difference from `old` to `new`.
pub fn diff(old: &Value, new: &Value) -> Diff {
    match (old, new) {
        (Value::Null, new) => Diff::First {
            items: match new {
                Value::Array(a) => Some(a.len()),
                Value::Object(o) => Some(o.len()),
                _ => None,
            },
            value: (!new.is_array() && !new.is_object()).then(|| new.clone()),
        },
        (Value::Array(o), Value::Array(n)) => match (packages(o), packages(n)) {
            (Some(o), Some(n)) if !(o.is_empty() && n.is_empty()) => package_diff(&o, &n),
            _ => list_diff(o, n),
        },
        (Value::Object(_), Value::Object(_)) => {
            let (mut changed, mut added, mut removed) = (Vec::new(), Vec::new(), Vec::new());
            walk("", old, new, &mut changed, &mut added, &mut removed);
            Diff::Object {
                changed,
                added,
                removed,
            }
        }
        (old, new) => Diff::Value {
            old: old.clone(),
            new: new.clone(),
        },
    }
}

/// A package entry's identity: its name, and its architecture when it has one (dpkg lists
/// `libc6:amd64` and `libc6:i386` as two packages).
type Key = (String, Option<String>);

/// The entries of a package list by identity, or `None` when it is not one (every entry an
/// object with a string `name` and a `version`).
fn packages(list: &[Value]) -> Option<BTreeMap<Key, Vec<&Map<String, Value>>>> {
    let mut out: BTreeMap<Key, Vec<&Map<String, Value>>> = BTreeMap::new();
    for v in list {
        let o = v.as_object()?;
        let name = o.get("name")?.as_str()?;
        o.get("version")?;
        let arch = o.get("arch").and_then(Value::as_str).map(str::to_string);
        out.entry((name.to_string(), arch)).or_default().push(o);
    }
    Some(out)
}

fn package(key: &Key, entry: &Map<String, Value>, multi_arch: bool) -> Package {
    Package {
        name: key.0.clone(),
        arch: key.1.clone(),
        version: entry.get("version").cloned().unwrap_or(Value::Null),
        multi_arch,
    }
}

/// Names listed with more than one architecture in either list.
fn multi_arch(lists: [&Packages<'_>; 2]) -> BTreeSet<String> {
    let mut arches: BTreeMap<&str, BTreeSet<Option<&str>>> = BTreeMap::new();
    for (name, arch) in lists.iter().flat_map(|l| l.keys()) {
        arches.entry(name).or_default().insert(arch.as_deref());
    }
    arches
        .into_iter()
        .filter(|(_, a)| a.len() > 1)
        .map(|(n, _)| n.to_string())
        .collect()
}

type Packages<'a> = BTreeMap<Key, Vec<&'a Map<String, Value>>>;

fn package_diff(old: &Packages<'_>, new: &Packages<'_>) -> Diff {
    let (mut changed, mut added, mut removed) = (Vec::new(), Vec::new(), Vec::new());
    let several = multi_arch([old, new]);
    let package = |key: &Key, e: &Map<String, Value>| package(key, e, several.contains(&key.0));
    for (key, was) in old {
        let Some(now) = new.get(key) else {
            removed.extend(was.iter().map(|e| package(key, e)));
            continue;
        };
        match (was.as_slice(), now.as_slice()) {
            (a, b) if a == b => {}
            ([a], [b]) => {
                let field = |e: &Map<String, Value>| e.get("version").cloned();
                let fields = a
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "name" | "arch" | "version"))
                    .map(|(k, _)| k)
                    .chain(b.keys().filter(|k| !a.contains_key(*k)))
                    .filter(|k| a.get(*k) != b.get(*k))
                    .map(|k| PathChange {
                        path: k.clone(),
                        old: a.get(k).cloned().unwrap_or(Value::Null),
                        new: b.get(k).cloned().unwrap_or(Value::Null),
                    })
                    .collect();
                changed.push(PackageChange {
                    name: key.0.clone(),
                    arch: key.1.clone(),
                    old: field(a).unwrap_or(Value::Null),
                    new: field(b).unwrap_or(Value::Null),
                    fields,
                    multi_arch: several.contains(&key.0),
                });
            }
            // Several versions installed side by side (rpm's kernels): which came and went.
            // Counted, not searched: a node could send 100,000 entries of one name.
            (a, b) => {
                let (gone, came) = multiset_diff(a, b);
                removed.extend(gone.into_iter().map(|e| package(key, e)));
                added.extend(came.into_iter().map(|e| package(key, e)));
            }
        }
    }
    for (key, now) in new {
        if !old.contains_key(key) {
            added.extend(now.iter().map(|e| package(key, e)));
        }
    }
    Diff::Packages {
        changed,
        added,
        removed,
    }
}

/// Entries added and removed, as multisets: reordering is no change, a duplicate is.
fn list_diff(old: &[Value], new: &[Value]) -> Diff {
    let mut count: BTreeMap<String, i64> = BTreeMap::new();
    for v in old {
        *count.entry(v.to_string()).or_default() -= 1;
    }
    for v in new {
        *count.entry(v.to_string()).or_default() += 1;
    }
    // Each side's surplus, in the order its entries appear.
    let surplus = |list: &[Value], sign: i64| {
        let mut left = count.clone();
        let mut out = Vec::new();
        for v in list {
            if let Some(n) = left.get_mut(&v.to_string())
                && *n * sign > 0
            {
                *n -= sign;
                out.push(v.clone());
            }
        }
        out
    };
    Diff::List {
        added: surplus(new, 1),
        removed: surplus(old, -1),
    }
}

fn child(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// One key or index of [`walk`]: on both sides, walked into; on one side, added or removed.
fn entry(
    path: String,
    old: Option<&Value>,
    new: Option<&Value>,
    changed: &mut Vec<PathChange>,
    added: &mut Vec<PathValue>,
    removed: &mut Vec<PathValue>,
) {
    match (old, new) {
        (Some(a), Some(b)) => walk(&path, a, b, changed, added, removed),
        (Some(a), None) => removed.push(PathValue {
            path,
            value: a.clone(),
        }),
        (None, Some(b)) => added.push(PathValue {
            path,
            value: b.clone(),
        }),
        (None, None) => {}
    }
}

/// Objects key by key and arrays inside them index by index, down to what differs.
fn walk(
    path: &str,
    old: &Value,
    new: &Value,
    changed: &mut Vec<PathChange>,
    added: &mut Vec<PathValue>,
    removed: &mut Vec<PathValue>,
) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for k in keys {
                let p = child(path, k);
                entry(p, o.get(k), n.get(k), changed, added, removed);
            }
        }
        (Value::Array(o), Value::Array(n)) => {
            for i in 0..o.len().max(n.len()) {
                let p = format!("{path}[{i}]");
                entry(p, o.get(i), n.get(i), changed, added, removed);
            }
        }
        _ => changed.push(PathChange {
            path: path.to_string(),
            old: old.clone(),
            new: new.clone(),
        }),
    }
}

/// How long a value may be on a line unless `--full` asks for all of it.
const SHORT: usize = 120;

/// A value on one line, with node-supplied escapes shown, not obeyed: strings as their
/// text, anything else as JSON.
pub fn show(v: &Value, full: bool) -> String {
    let text = match v {
        Value::String(s) => printable(s).into_owned(),
        other => printable(&other.to_string()).into_owned(),
    };
    if full || text.chars().count() <= SHORT {
        return text;
    }
    let cut: String = text.chars().take(SHORT).collect();
    format!("{cut}…")
}

impl Diff {
    /// The change as lines for a terminal, node text escaped.
    pub fn lines(&self, full: bool) -> Vec<String> {
        let show = |v: &Value| show(v, full);
        let path = |p: &str| printable(p).into_owned();
        let mut out = Vec::new();
        match self {
            Diff::First { items, value } => out.push(match (items, value) {
                (_, Some(v)) => format!("first value: {}", show(v)),
                (Some(n), None) => format!("first value: {n} entries"),
                (None, None) => "first value".to_string(),
            }),
            Diff::Packages {
                changed,
                added,
                removed,
            } => {
                let label = |name: &str, arch: Option<&str>, several: bool| match arch {
                    Some(a) if several => format!("{}:{}", printable(name), printable(a)),
                    _ => printable(name).into_owned(),
                };
                for c in changed {
                    let mut line = label(&c.name, c.arch.as_deref(), c.multi_arch);
                    if c.old != c.new {
                        line.push_str(&format!(" {} → {}", show(&c.old), show(&c.new)));
                    } else {
                        line.push_str(&format!(" {}", show(&c.new)));
                    }
                    for (i, f) in c.fields.iter().enumerate() {
                        let sep = if i == 0 && c.old == c.new { " " } else { ", " };
                        line.push_str(&format!(
                            "{sep}{}: {} → {}",
                            path(&f.path),
                            show(&f.old),
                            show(&f.new)
                        ));
                    }
                    out.push(line);
                }
                for p in added {
                    out.push(format!(
                        "+ {} {}",
                        label(&p.name, p.arch.as_deref(), p.multi_arch),
                        show(&p.version)
                    ));
                }
                for p in removed {
                    out.push(format!(
                        "- {} {}",
                        label(&p.name, p.arch.as_deref(), p.multi_arch),
                        show(&p.version)
                    ));
                }
            }
            Diff::Object {
                changed,
                added,
                removed,
            } => {
                for c in changed {
                    out.push(format!(
                        "{}: {} → {}",
                        path(&c.path),
                        show(&c.old),
                        show(&c.new)
                    ));
                }
                for a in added {
                    out.push(format!("+ {}: {}", path(&a.path), show(&a.value)));
                }
                for r in removed {
                    out.push(format!("- {}: {}", path(&r.path), show(&r.value)));
                }
            }
            Diff::List { added, removed } => {
                out.extend(added.iter().map(|v| format!("+ {}", show(v))));
                out.extend(removed.iter().map(|v| format!("- {}", show(v))));
                if out.is_empty() {
                    out.push("(same entries, new order)".into());
                }
            }
            Diff::Value { old, new } => out.push(format!("{} → {}", show(old), show(new))),
        }
        if out.is_empty() {
            out.push("(no difference)".into());
        }
        out
    }
}

/// The entries of `a` not in `b` and of `b` not in `a`, each as often as it is missing, in
/// O(n log n) (entries compared by their JSON text).
type Entries<'v> = Vec<&'v Map<String, Value>>;

fn multiset_diff<'v>(
    a: &'v [&'v Map<String, Value>],
    b: &'v [&'v Map<String, Value>],
) -> (Entries<'v>, Entries<'v>) {
    (missing(a, b), missing(b, a))
}

/// The entries of `from` not in `other`, each as often as it is missing.
fn missing<'v>(from: &'v [&'v Map<String, Value>], other: &[&Map<String, Value>]) -> Entries<'v> {
    let text = |e: &Map<String, Value>| serde_json::to_string(e).unwrap_or_default();
    let mut counts: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    for e in other {
        *counts.entry(text(e)).or_default() += 1;
    }
    let mut gone = Vec::new();
    for e in from {
        match counts.get_mut(&text(e)) {
            Some(n) if *n > 0 => *n -= 1,
            _ => gone.push(*e),
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pkg(name: &str, version: &str) -> Value {
        json!({"name": name, "version": version, "arch": "amd64", "status": "installed"})
    }

    #[test]
    fn packages_diff_by_name() {
        let old = json!([
            pkg("openssl", "3.0.11-1"),
            pkg("telnet", "0.17-44"),
            pkg("bash", "5.2-1")
        ]);
        let new = json!([
            pkg("bash", "5.2-1"),
            pkg("nginx", "1.22.1-9"),
            pkg("openssl", "3.0.13-1")
        ]);
        let d = diff(&old, &new);
        assert_eq!(
            d.lines(false),
            [
                "openssl 3.0.11-1 → 3.0.13-1",
                "+ nginx 1.22.1-9",
                "- telnet 0.17-44"
            ]
        );
        assert_eq!(
            serde_json::to_value(&d).expect("json"),
            json!({
                "kind": "packages",
                "changed": [{"name": "openssl", "arch": "amd64", "old": "3.0.11-1", "new": "3.0.13-1"}],
                "added": [{"name": "nginx", "arch": "amd64", "version": "1.22.1-9"}],
                "removed": [{"name": "telnet", "arch": "amd64", "version": "0.17-44"}],
            })
        );
    }

    #[test]
    fn packages_renamed_and_status_changes() {
        // A rename is a removal and an addition; dpkg keeping a removed package's
        // configuration is a change of its status.
        let old = json!([pkg("libssl1.1", "1.1.1w-0"), pkg("telnet", "0.17-44")]);
        let mut gone = pkg("telnet", "0.17-44");
        gone["status"] = json!("config-files");
        let new = json!([pkg("libssl3", "3.0.13-1"), gone]);
        assert_eq!(
            diff(&old, &new).lines(false),
            [
                "telnet 0.17-44 status: installed → config-files",
                "+ libssl3 3.0.13-1",
                "- libssl1.1 1.1.1w-0"
            ]
        );
    }

    #[test]
    fn multi_arch_and_side_by_side_versions() {
        let entry = |name: &str, version: &str, arch: &str| json!({"name": name, "version": version, "arch": arch});
        let old = json!([
            entry("libc6", "2.36-9", "amd64"),
            entry("libc6", "2.36-9", "i386"),
            entry("kernel", "5.14.0-362", "x86_64"),
            entry("kernel", "5.14.0-427", "x86_64"),
        ]);
        let new = json!([
            entry("libc6", "2.36-9+deb12u4", "amd64"),
            entry("libc6", "2.36-9", "i386"),
            entry("kernel", "5.14.0-427", "x86_64"),
            entry("kernel", "5.14.0-503", "x86_64"),
        ]);
        assert_eq!(
            diff(&old, &new).lines(false),
            [
                "libc6:amd64 2.36-9 → 2.36-9+deb12u4",
                "+ kernel 5.14.0-503",
                "- kernel 5.14.0-362"
            ]
        );
        // Without an architecture, by name alone.
        let d = diff(
            &json!([{"name": "a", "version": "1"}]),
            &json!([{"name": "a", "version": "2"}]),
        );
        assert_eq!(d.lines(false), ["a 1 → 2"]);
    }

    #[test]
    fn objects_diff_by_key_path() {
        let old = json!({"memory_mb": 2048, "os": {"version": "11", "family": "Debian"},
            "disks": [{"dev": "sda"}], "swap": 1024});
        let new = json!({"memory_mb": 4096, "os": {"version": "12", "family": "Debian"},
            "disks": [{"dev": "sda"}, {"dev": "sdb"}], "cpus": 4});
        assert_eq!(
            diff(&old, &new).lines(false),
            [
                "memory_mb: 2048 → 4096",
                "os.version: 11 → 12",
                "+ cpus: 4",
                "+ disks[1]: {\"dev\":\"sdb\"}",
                "- swap: 1024"
            ]
        );
        let d = serde_json::to_value(diff(&json!({"a": {"b": 1}}), &json!({"a": {"b": 2}})))
            .expect("json");
        assert_eq!(
            d,
            json!({"kind": "object", "changed": [{"path": "a.b", "old": 1, "new": 2}],
                "added": [], "removed": []})
        );
    }

    #[test]
    fn lists_scalars_and_first_values() {
        assert_eq!(
            diff(&json!(["a", "b", "b"]), &json!(["a", "c", "b"])).lines(false),
            ["+ c", "- b"]
        );
        assert_eq!(
            diff(&json!(["a", "b"]), &json!(["b", "a"])).lines(false),
            ["(same entries, new order)"]
        );
        assert_eq!(
            diff(&json!("6.1"), &json!("6.2")).lines(false),
            ["6.1 → 6.2"]
        );
        assert_eq!(diff(&json!(1), &json!([1])).lines(false), ["1 → [1]"]);
        assert_eq!(
            diff(&Value::Null, &json!([pkg("a", "1"), pkg("b", "2")])).lines(false),
            ["first value: 2 entries"]
        );
        assert_eq!(
            diff(&Value::Null, &json!("6.1")).lines(false),
            ["first value: 6.1"]
        );
        // An empty list becoming a package list is still read by package.
        assert_eq!(
            diff(&json!([]), &json!([pkg("a", "1")])).lines(false),
            ["+ a 1"]
        );
    }

    #[test]
    fn node_text_is_escaped_and_long_values_cut() {
        let old = json!([{"name": "evil\u{1b}[2J", "version": "1\u{7}"}]);
        let new = json!([{"name": "evil\u{1b}[2J", "version": "2\u{202e}"}]);
        let lines = diff(&old, &new).lines(false);
        assert_eq!(lines, ["evil\\u{1b}[2J 1\\u{7} → 2\\u{202e}"]);
        let lines = diff(
            &json!({"k\u{1b}]0;x": 1}),
            &json!({"k\u{1b}]0;x": "a\r\nb"}),
        )
        .lines(false);
        assert_eq!(lines, ["k\\u{1b}]0;x: 1 → a\\u{d}\\u{a}b"]);
        let long = "x".repeat(500);
        let line = &diff(&json!("a"), &json!(long)).lines(false)[0];
        assert!(line.ends_with('…') && line.chars().count() < 200, "{line}");
        assert!(diff(&json!("a"), &json!(long)).lines(true)[0].ends_with("xxx"));
    }

    #[test]
    fn many_entries_of_one_name_diff_in_n_log_n() {
        let entry = |v: usize| {
            serde_json::json!({"name": "kernel", "version": format!("{v}")})
                .as_object()
                .cloned()
                .expect("object")
        };
        let old: Vec<_> = (0..50_000).map(entry).collect();
        let new: Vec<_> = (1..50_001).map(entry).collect();
        let (a, b): (Vec<_>, Vec<_>) = (old.iter().collect(), new.iter().collect());
        let (gone, came) = super::multiset_diff(&a, &b);
        assert_eq!(gone.len(), 1);
        assert_eq!(came.len(), 1);
        assert_eq!(gone[0]["version"], "0");
        assert_eq!(came[0]["version"], "50000");
    }
}
