//! Node sets (`-n`): the expression language of [`vogeler_proto::expr`] (names, lists, globs,
//! files, announced facts, any stored plugin value, packages in their manager's version
//! order, combined with and/or/not and parentheses), resolved against the inventory by
//! [`crate::select`].
//!
//! ```text
//! all                      every registered node
//! web01                    one node (targeted even when the registry does not know it)
//! web01,web02              a list
//! 'web*'  'db-[0-9]*'      globs over registered names
//! @nodes.txt   -           names from a file / from stdin, one per line
//! os.family=Debian         announced facts: = != =~ !~ > < >= <=
//! kernel=~^6\.   memory_mb>16000
//! os_release.VERSION_ID = 12        a plugin's value, by path
//! dpkg has openssl < 3.0.13         a package, in dpkg's own version order
//! web* and not os.family=RedHat     and, or, not, parentheses
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde_json::{Map, Value};
use vogeler_proto::{
    expr::{self, Expr, Source},
    names::NodeName,
};

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

/// A parsed `-n` expression, with `@file` and `-` already read.
#[derive(Debug, Clone)]
pub struct NodeSet {
    expr: Expr,
}

/// Parse a `-n` expression and read the names it takes from files or stdin.
pub fn parse(s: &str, files: &dyn NameSource) -> Result<NodeSet, String> {
    let expr = expr::parse(s).map_err(|e| format!("{e}; see --help for node sets"))?;
    let expr = expr
        .resolve_sources(&mut |source| match source {
            Source::File(f) => files.read(f),
            Source::Stdin => files.read("-"),
        })
        .map_err(|e| e.to_string())?;
    Ok(NodeSet { expr })
}

impl NodeSet {
    /// The set as an expression over stored documents.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// `all` alone: broadcast instead of one command per node.
    pub fn is_all(&self) -> bool {
        self.expr.is_all()
    }

    /// Names alone (a name, a list, a file): commanded whatever the registry says.
    pub fn names(&self) -> Option<&BTreeSet<NodeName>> {
        match &self.expr {
            Expr::Names(n) => Some(n),
            _ => None,
        }
    }

    /// The nodes to command and expect, from the nodes the expression selects: those
    /// registered and fresh, and those named explicitly whatever the registry says.
    pub fn resolve(
        &self,
        selected: &BTreeSet<NodeName>,
        registry: &BTreeMap<NodeName, RegisteredNode>,
    ) -> BTreeSet<NodeName> {
        let explicit = self.expr.explicit_names();
        selected
            .iter()
            .filter(|n| registry.get(*n).is_some_and(|k| k.fresh) || explicit.contains(*n))
            .cloned()
            .collect()
    }
}

impl fmt::Display for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.expr.fmt(f)
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

    /// The nodes `expr` selects among `registry`'s, as the inventory would from documents
    /// holding only the announced facts (the whole evaluation against CouchDB is tested in
    /// e2e/tests/query.rs), then resolved for a fan-out.
    fn resolve(expr: &str) -> Vec<String> {
        let set = parse(expr, &Fake).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let registry = registry();
        let candidates: BTreeSet<NodeName> = registry
            .keys()
            .cloned()
            .chain(set.expr().explicit_names())
            .collect();
        let selected: BTreeSet<NodeName> = candidates
            .into_iter()
            .filter(|n| {
                let facts = registry.get(n).map(|k| k.facts.clone()).unwrap_or_default();
                set.expr()
                    .matches(n.as_str(), &json!({"vogeler": {"facts": facts}}))
            })
            .collect();
        set.resolve(&selected, &registry)
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
            ("web01 web02", "and"),
            ("and web01", "column 1"),
            ("kernel=~[", "regex"),
            ("=Debian", "column 1"),
            ("_bad", "node name"),
            ("@missing.txt", "cannot read"),
            ("", "column 1"),
        ] {
            let err = parse(expr, &Fake).expect_err(expr);
            assert!(err.contains(needle), "{expr}: {err}");
        }
    }

    #[test]
    fn explicit_names_outside_the_registry_survive_only_where_named() {
        assert_eq!(resolve("ghost or os.family=RedHat"), ["ghost", "web02"]);
        assert!(
            resolve("ghost and os.family=Debian").is_empty(),
            "an unknown node has no facts to meet"
        );
        assert_eq!(resolve("not web*"), ["db-1", "db01"]);
    }
}
