//! Node sets (`-n`): names, lists, globs, files, fact filters, and their combinations.
//!
//! ```text
//! all                      every registered node
//! web01                    one node (targeted even when the registry does not know it)
//! web01,web02              a list
//! 'web*'  'db-[0-9]*'      globs over registered names
//! @nodes.txt   -           names from a file / from stdin, one per line
//! os.family=Debian         fact filters: = != =~ (regex) > < >= <=
//! kernel=~^6\.   memory_mb>16000
//! web* and not os.family=RedHat     and, or, not, parentheses
//! ```
//! A set resolves against the node registry (registered nodes with their facts) into the
//! nodes to command and expect.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde_json::{Map, Value};
use vogeler_proto::names::NodeName;

/// A parsed node-set expression.
#[derive(Debug, Clone)]
pub enum NodeSet {
    All,
    /// Names given explicitly (a name, a list, a file): commanded even if unregistered.
    Names(BTreeSet<NodeName>),
    Glob(glob::Pattern),
    Fact {
        path: String,
        op: Op,
        value: String,
        regex: Option<regex::Regex>,
    },
    And(Box<NodeSet>, Box<NodeSet>),
    Or(Box<NodeSet>, Box<NodeSet>),
    Not(Box<NodeSet>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Match,
    Gt,
    Lt,
    Ge,
    Le,
}

/// What the registry knows of a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegisteredNode {
    pub facts: Map<String, Value>,
    /// Seen within the freshness window.
    pub fresh: bool,
    pub last_seen: Option<chrono::DateTime<chrono::Utc>>,
    pub agent_version: Option<String>,
    /// The pinned public key (base64) its replies must be signed with.
    pub key: Option<String>,
    /// Scheduled plugins not collected within twice their interval.
    pub overdue: Vec<String>,
}

/// Where `@file` and `-` read names from; injected so parsing is testable.
pub trait NameSource {
    fn read(&self, what: &str) -> Result<String, String>;
}

/// Reads `@file` from disk and `-` from stdin.
#[derive(Debug)]
pub struct Files;

impl NameSource for Files {
    fn read(&self, what: &str) -> Result<String, String> {
        if what == "-" {
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| format!("cannot read node names from stdin: {e}"))
        } else {
            std::fs::read_to_string(what)
                .map_err(|e| format!("cannot read node names from {what}: {e}"))
        }
    }
}

/// Split on whitespace and grouping parentheses. A parenthesis inside a term (a regex group
/// such as `kernel=~^(5|6)\.`) stays part of it.
fn tokenize(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut depth = 0usize; // parentheses opened inside the current term
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        if !cur.is_empty() {
            out.push(std::mem::take(cur));
        }
    };
    for c in s.chars() {
        match c {
            '(' if cur.is_empty() => out.push("(".into()),
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' if depth > 0 => {
                depth -= 1;
                cur.push(c);
            }
            ')' => {
                flush(&mut cur, &mut out);
                out.push(")".into());
            }
            c if c.is_whitespace() => {
                flush(&mut cur, &mut out);
                depth = 0;
            }
            c => cur.push(c),
        }
    }
    flush(&mut cur, &mut out);
    out
}

struct Parser<'a> {
    tokens: Vec<String>,
    at: usize,
    files: &'a dyn NameSource,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.at).map(String::as_str)
    }
    fn next(&mut self) -> Option<String> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }
    fn or(&mut self) -> Result<NodeSet, String> {
        let mut left = self.and()?;
        while self.peek() == Some("or") {
            self.next();
            left = NodeSet::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<NodeSet, String> {
        let mut left = self.not()?;
        while self.peek() == Some("and") {
            self.next();
            left = NodeSet::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }
    fn not(&mut self) -> Result<NodeSet, String> {
        if self.peek() == Some("not") {
            self.next();
            return Ok(NodeSet::Not(Box::new(self.not()?)));
        }
        self.atom()
    }
    fn atom(&mut self) -> Result<NodeSet, String> {
        match self.next().as_deref() {
            None => Err("the node set ends too early".into()),
            Some("(") => {
                let inner = self.or()?;
                match self.next().as_deref() {
                    Some(")") => Ok(inner),
                    _ => Err("a '(' is not closed".into()),
                }
            }
            Some(t @ (")" | "and" | "or")) => Err(format!("unexpected {t:?}")),
            Some(t) => term(t, self.files),
        }
    }
}

const OPS: &[(&str, Op)] = &[
    ("=~", Op::Match),
    ("!=", Op::Ne),
    (">=", Op::Ge),
    ("<=", Op::Le),
    ("=", Op::Eq),
    (">", Op::Gt),
    ("<", Op::Lt),
];

fn names_from(text: &str, origin: &str) -> Result<NodeSet, String> {
    let mut names = BTreeSet::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        names.insert(NodeName::new(line).map_err(|e| format!("{origin}: {e}"))?);
    }
    Ok(NodeSet::Names(names))
}

fn term(t: &str, files: &dyn NameSource) -> Result<NodeSet, String> {
    if t == "all" {
        return Ok(NodeSet::All);
    }
    if t == "-" {
        return names_from(&files.read("-")?, "stdin");
    }
    if let Some(file) = t.strip_prefix('@') {
        return names_from(&files.read(file)?, file);
    }
    // The earliest operator wins, longest first at the same place (`>=` before `>`).
    if let Some((at, op_str, op)) = OPS
        .iter()
        .filter_map(|(s, op)| t.find(s).map(|at| (at, *s, *op)))
        .min_by_key(|(at, s, _)| (*at, usize::MAX - s.len()))
    {
        let path = &t[..at];
        let value = &t[at + op_str.len()..];
        if path.is_empty() {
            return Err(format!(
                "{t:?}: the fact name is missing (write e.g. os.family=Debian)"
            ));
        }
        let regex = match op {
            Op::Match => Some(regex::Regex::new(value).map_err(|e| format!("{t:?}: {e}"))?),
            Op::Gt | Op::Lt | Op::Ge | Op::Le if value.parse::<f64>().is_err() => {
                return Err(format!("{t:?}: {value:?} is not a number"));
            }
            _ => None,
        };
        return Ok(NodeSet::Fact {
            path: path.to_string(),
            op,
            value: value.to_string(),
            regex,
        });
    }
    if t.contains(',') {
        return names_from(&t.replace(',', "\n"), t);
    }
    if t.contains(['*', '?', '[']) {
        return glob::Pattern::new(t)
            .map(NodeSet::Glob)
            .map_err(|e| format!("{t:?} is not a glob: {e}"));
    }
    NodeName::new(t)
        .map(|n| NodeSet::Names([n].into()))
        .map_err(|e| format!("{e}; see --help for node sets"))
}

/// Parse a `-n` expression.
pub fn parse(s: &str, files: &dyn NameSource) -> Result<NodeSet, String> {
    let mut p = Parser {
        tokens: tokenize(s),
        at: 0,
        files,
    };
    let set = p.or()?;
    match p.next() {
        None => Ok(set),
        Some(t) => Err(format!("unexpected {t:?}; join terms with and/or")),
    }
}

fn lookup<'a>(facts: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = facts.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl NodeSet {
    /// Does this node belong to the set?
    pub fn matches(&self, name: &NodeName, known: Option<&RegisteredNode>) -> bool {
        match self {
            NodeSet::All => known.is_some(),
            NodeSet::Names(n) => n.contains(name),
            NodeSet::Glob(p) => p.matches(name.as_str()),
            NodeSet::Fact {
                path,
                op,
                value,
                regex,
            } => {
                let Some(v) = known.and_then(|k| lookup(&k.facts, path)) else {
                    return false;
                };
                match op {
                    Op::Eq => text(v) == *value,
                    Op::Ne => text(v) != *value,
                    Op::Match => regex.as_ref().is_some_and(|r| r.is_match(&text(v))),
                    Op::Gt | Op::Lt | Op::Ge | Op::Le => {
                        let (Some(have), Ok(want)) =
                            (text(v).parse::<f64>().ok(), value.parse::<f64>())
                        else {
                            return false;
                        };
                        match op {
                            Op::Gt => have > want,
                            Op::Lt => have < want,
                            Op::Ge => have >= want,
                            _ => have <= want,
                        }
                    }
                }
            }
            NodeSet::And(a, b) => a.matches(name, known) && b.matches(name, known),
            NodeSet::Or(a, b) => a.matches(name, known) || b.matches(name, known),
            NodeSet::Not(a) => !a.matches(name, known),
        }
    }

    /// Names mentioned explicitly in a positive position: commanded even when unregistered.
    fn explicit(&self) -> BTreeSet<NodeName> {
        match self {
            NodeSet::Names(n) => n.clone(),
            NodeSet::Or(a, b) => a.explicit().union(&b.explicit()).cloned().collect(),
            NodeSet::And(a, b) => a.explicit().intersection(&b.explicit()).cloned().collect(),
            _ => BTreeSet::new(),
        }
    }

    /// The nodes to command and expect: registered nodes in the set that are fresh, plus
    /// explicitly named ones whatever the registry says.
    pub fn resolve(&self, registry: &BTreeMap<NodeName, RegisteredNode>) -> BTreeSet<NodeName> {
        let mut out: BTreeSet<NodeName> = registry
            .iter()
            .filter(|(n, k)| k.fresh && self.matches(n, Some(k)))
            .map(|(n, _)| n.clone())
            .collect();
        for n in self.explicit() {
            if self.matches(&n, registry.get(&n)) || !registry.contains_key(&n) {
                out.insert(n);
            }
        }
        out
    }

    /// `all` alone: broadcast instead of one command per node.
    pub fn is_all(&self) -> bool {
        matches!(self, NodeSet::All)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = OPS.iter().find(|(_, o)| o == self).map_or("?", |(s, _)| s);
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fake;
    impl NameSource for Fake {
        fn read(&self, what: &str) -> Result<String, String> {
            match what {
                "-" => Ok("db01\n\n# comment\nweb02\n".into()),
                "nodes.txt" => Ok("web01\nghost\n".into()),
                other => Err(format!("cannot read {other}")),
            }
        }
    }

    fn registry() -> BTreeMap<NodeName, RegisteredNode> {
        let mut r = BTreeMap::new();
        for (name, facts, fresh) in [
            (
                "web01",
                json!({"os": {"family": "Debian"}, "kernel": "6.1.0-18-amd64", "memory_mb": 32000}),
                true,
            ),
            (
                "web02",
                json!({"os": {"family": "RedHat"}, "kernel": "5.14.0", "memory_mb": 8000}),
                true,
            ),
            (
                "db-1",
                json!({"os": {"family": "Debian"}, "kernel": "6.8.0", "memory_mb": 64000}),
                true,
            ),
            (
                "db01",
                json!({"os": {"family": "Debian"}, "kernel": "6.1.0", "memory_mb": 16000}),
                true,
            ),
            ("old01", json!({"os": {"family": "Debian"}}), false),
        ] {
            r.insert(
                NodeName::new(name).expect("name"),
                RegisteredNode {
                    facts: facts.as_object().cloned().expect("obj"),
                    fresh,
                    ..Default::default()
                },
            );
        }
        r
    }

    fn resolve(expr: &str) -> Vec<String> {
        parse(expr, &Fake)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .resolve(&registry())
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn every_form_selects_the_right_nodes() {
        assert_eq!(
            resolve("all"),
            ["db-1", "db01", "web01", "web02"],
            "stale nodes are not expected"
        );
        assert_eq!(resolve("web01"), ["web01"]);
        assert_eq!(
            resolve("ghost"),
            ["ghost"],
            "named but unknown: still commanded"
        );
        assert_eq!(resolve("web01,web02,ghost"), ["ghost", "web01", "web02"]);
        assert_eq!(resolve("web*"), ["web01", "web02"]);
        assert_eq!(resolve("db-[0-9]*"), ["db-1"]);
        assert_eq!(resolve("@nodes.txt"), ["ghost", "web01"]);
        assert_eq!(resolve("-"), ["db01", "web02"]);
        assert_eq!(resolve("os.family=Debian"), ["db-1", "db01", "web01"]);
        assert_eq!(resolve("os.family!=Debian"), ["web02"]);
        assert_eq!(resolve("kernel=~^6\\."), ["db-1", "db01", "web01"]);
        assert_eq!(
            resolve("(kernel=~^(5|6\\.8))"),
            ["db-1", "web02"],
            "regex groups inside grouping"
        );
        assert_eq!(resolve("memory_mb>16000"), ["db-1", "web01"]);
        assert_eq!(resolve("memory_mb>=16000"), ["db-1", "db01", "web01"]);
        assert_eq!(resolve("memory_mb<16000"), ["web02"]);
        assert_eq!(resolve("web* and os.family=Debian"), ["web01"]);
        assert_eq!(
            resolve("web02 or os.family=Debian and memory_mb>32000"),
            ["db-1", "web02"],
            "and binds tighter"
        );
        assert_eq!(
            resolve("(web02 or os.family=Debian) and memory_mb>32000"),
            ["db-1"]
        );
        assert_eq!(resolve("not os.family=Debian"), ["web02"]);
        assert_eq!(resolve("all and not db*"), ["web01", "web02"]);
        assert_eq!(
            resolve("old01"),
            ["old01"],
            "a stale node named explicitly is still commanded"
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        for (expr, needle) in [
            ("(web01", "not closed"),
            ("web01 web02", "join terms"),
            ("and web01", "unexpected"),
            ("memory_mb>lots", "not a number"),
            ("kernel=~[", "regex"),
            ("=Debian", "fact name is missing"),
            ("_bad", "node name"),
            ("@missing.txt", "cannot read"),
            ("", "ends too early"),
        ] {
            let err = parse(expr, &Fake).expect_err(expr);
            assert!(err.contains(needle), "{expr}: {err}");
        }
    }
}
