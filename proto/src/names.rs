//! Validated names. A node name becomes a CouchDB `_id` and part of an AMQP queue name; a plugin
//! name becomes a top-level key of the node document. Checking them once, here, keeps every
//! other module free of ad-hoc string checks.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused; the message says which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is longer than {max} characters")]
    TooLong {
        kind: &'static str,
        name: String,
        max: usize,
    },
    #[error("{kind} name {name:?} has {ch:?}; use letters, digits, '-', '_'{extra}")]
    BadChar {
        kind: &'static str,
        name: String,
        ch: char,
        extra: &'static str,
    },
    #[error("{kind} name {name:?} must start with a letter or digit")]
    BadStart { kind: &'static str, name: String },
    #[error(
        "plugin name {0:?} is reserved for Vogeler's own metadata (so is every name starting with \"vogeler_\"); rename the plugin"
    )]
    Reserved(String),
}

fn check(
    kind: &'static str,
    name: &str,
    max: usize,
    extra_ok: &[char],
    extra: &'static str,
) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            kind,
            name: name.into(),
            max,
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || extra_ok.contains(c)))
    {
        return Err(NameError::BadChar {
            kind,
            name: name.into(),
            ch,
            extra,
        });
    }
    // CouchDB reserves ids starting with '_'; a leading '-' or '.' reads as a flag or a hidden file.
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::BadStart {
            kind,
            name: name.into(),
        });
    }
    Ok(())
}

/// A node's name: its CouchDB document id and part of its queue name.
///
/// Host names and FQDNs fit (`web01`, `db-2.example.com`); AMQP wildcards and CouchDB's
/// reserved leading `_` do not.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        check("node", &name, 253, &['.'], ", '.'")?;
        Ok(Self(name))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// For clap's `value_parser`, which wants a `&str` parser with a displayable error.
    pub fn new_checked(s: &str) -> Result<Self, String> {
        Self::new(s).map_err(|e| e.to_string())
    }
}

/// A plugin's name: the key its value is stored under in every node document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PluginName(String);

/// The node document keeps Vogeler's own metadata under this key.
pub const RESERVED_PLUGIN_NAME: &str = "vogeler";

impl PluginName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        check("plugin", &name, 64, &[], "")?;
        // `vogeler_fresh` and `vogeler_quarantine` mark Vogeler's own documents, and
        // `vogeler` holds its bookkeeping: no plugin may store a value under any of them.
        if name == RESERVED_PLUGIN_NAME || name.starts_with("vogeler_") {
            return Err(NameError::Reserved(name));
        }
        Ok(Self(name))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// For clap's `value_parser`, which wants a `&str` parser with a displayable error.
    pub fn new_checked(s: &str) -> Result<Self, String> {
        Self::new(s).map_err(|e| e.to_string())
    }
}

macro_rules! string_newtype {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
    };
}
string_newtype!(NodeName);
string_newtype!(PluginName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["web01", "db-2.example.com", "A_b"] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "_users",
            "-x",
            ".x",
            "a b",
            "a*",
            "a#b",
            "a/b",
            &"x".repeat(254),
        ] {
            assert!(NodeName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plugin_names() {
        assert!(PluginName::new("kernel_modules").is_ok());
        assert_eq!(
            PluginName::new("vogeler").unwrap_err(),
            NameError::Reserved("vogeler".into())
        );
        for reserved in ["vogeler_fresh", "vogeler_quarantine", "vogeler_x"] {
            assert!(
                matches!(PluginName::new(reserved), Err(NameError::Reserved(_))),
                "{reserved}"
            );
        }
        assert!(PluginName::new("vogeler-agent").is_ok());
        for bad in ["_rev", "a.b", "../x", ""] {
            assert!(PluginName::new(bad).is_err(), "{bad}");
        }
        let msg = PluginName::new("a.b").unwrap_err().to_string();
        assert!(msg.contains("'.'"), "{msg}");
    }
}
