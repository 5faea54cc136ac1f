//! The steps after validation every section shares: reading secret files at start-up, and
//! rendering the effective settings back into the config file's shape for `--print-config`.

use std::{path::Path, time::Duration};

use toml::{Table, Value};

use super::{BrokerSettings, ConfigError, CouchSettings};
use vogeler_proto::{duration, secret::Secret};

/// What every program does with its validated settings.
pub trait ProgramSettings: Sized {
    /// Read the password files the settings name. Kept out of validation so that
    /// `--check-config` works on a machine where those files do not exist yet (a config
    /// management run that writes the config before the secrets, a CI check).
    fn read_secrets(self) -> Result<Self, ConfigError>;

    /// The effective settings, defaults included, as a TOML config file with every secret
    /// replaced by `***`.
    fn to_toml(&self) -> String;
}

/// A password kept in a file (the trailing newline an editor adds is not part of it).
pub(super) fn read_password(problems: &mut Vec<String>, key: &str, file: &Path) -> Option<Secret> {
    std::fs::read_to_string(file)
        .map(|s| Secret::new(s.trim_end_matches(['\r', '\n'])))
        .map_err(|e| problems.push(format!("{key}: cannot read {}: {e}", file.display())))
        .ok()
}

pub(super) fn finish<T>(problems: Vec<String>, value: T) -> Result<T, ConfigError> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

pub(super) fn insert_path(t: &mut Table, key: &str, p: Option<&Path>) {
    if let Some(p) = p {
        t.insert(key.into(), p.display().to_string().into());
    }
}

pub(super) fn dur(d: Duration) -> Value {
    duration::format(d).into()
}

pub(super) fn int(n: impl TryInto<i64>) -> Value {
    Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

/// The sections every program shares, then the program's own.
pub(super) fn render(
    broker: &BrokerSettings,
    couch: Option<&CouchSettings>,
    own: Option<(&str, Table)>,
    log_level: &str,
) -> String {
    let mut root = Table::new();
    root.insert("connect_timeout".into(), dur(broker.connect_timeout));
    root.insert("amqp".into(), broker.to_table().into());
    if let Some(c) = couch {
        root.insert("couchdb".into(), c.to_table().into());
    }
    if let Some((name, table)) = own {
        root.insert(name.into(), table.into());
    }
    let mut log = Table::new();
    log.insert("level".into(), log_level.into());
    root.insert("log".into(), log.into());
    toml::to_string(&root).unwrap_or_else(|e| format!("# cannot render the settings: {e}\n"))
}
