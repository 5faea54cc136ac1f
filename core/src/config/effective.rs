//! The steps after validation: reading secret files at start-up, and rendering the effective
//! settings back into the config file's shape for `--print-config`.

use std::{path::Path, time::Duration};

use toml::{Table, Value};

use super::{
    AgentSettings, BrokerSettings, ConfigError, CouchSettings, RunnerSettings, ServerSettings,
};
use crate::{couch::Credentials, duration, secret::Secret};

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
fn read_password(problems: &mut Vec<String>, key: &str, file: &Path) -> Option<Secret> {
    std::fs::read_to_string(file)
        .map(|s| Secret::new(s.trim_end_matches(['\r', '\n'])))
        .map_err(|e| problems.push(format!("{key}: cannot read {}: {e}", file.display())))
        .ok()
}

fn finish<T>(problems: Vec<String>, value: T) -> Result<T, ConfigError> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

impl BrokerSettings {
    fn read_secrets(&mut self, problems: &mut Vec<String>) {
        if let Some(file) = &self.password_file
            && let Some(pw) = read_password(problems, "amqp.password_file", file)
            && !self.url.set_password(pw.expose())
        {
            problems.push("amqp.password_file: amqp.url cannot carry a password".into());
        }
    }

    fn to_table(&self) -> Table {
        let t = &self.topology;
        let mut amqp = Table::new();
        amqp.insert("url".into(), self.url.redacted().into());
        amqp.insert("collective".into(), t.collective().into());
        // heartbeat and frame_max are in the URL's query (`?heartbeat=10&frame_max=16384`).
        insert_path(&mut amqp, "password_file", self.password_file.as_deref());
        insert_path(&mut amqp, "ca_file", self.tls.ca_file.as_deref());
        if let Some((cert, key)) = &self.tls.client {
            insert_path(&mut amqp, "cert_file", Some(cert));
            insert_path(&mut amqp, "key_file", Some(key));
        }
        if let Some(d) = t.queue_expires() {
            amqp.insert("queue_expires".into(), dur(d));
        }
        amqp.insert(
            "results_queue_type".into(),
            t.results_queue_settings().kind.name().into(),
        );
        amqp.insert(
            "results_max_length".into(),
            int(t.results_queue_settings().max_length),
        );
        amqp.insert(
            "agent_queue_max_length".into(),
            int(t.agent_queue_bounds().max_length),
        );
        amqp.insert(
            "agent_queue_max_age".into(),
            dur(t.agent_queue_bounds().max_age),
        );
        amqp
    }
}

impl CouchSettings {
    fn read_secrets(&mut self, problems: &mut Vec<String>) {
        if let Some((username, file)) = &self.password_file
            && let Some(password) = read_password(problems, "couchdb.password_file", file)
        {
            self.credentials = Some(Credentials {
                username: username.clone(),
                password,
            });
        }
    }

    fn to_table(&self) -> Table {
        let mut c = Table::new();
        c.insert("url".into(), self.url.redacted().into());
        c.insert("database".into(), self.database.clone().into());
        match (&self.credentials, &self.password_file) {
            (_, Some((user, file))) => {
                c.insert("username".into(), user.clone().into());
                insert_path(&mut c, "password_file", Some(file));
            }
            (Some(cred), None) => {
                c.insert("username".into(), cred.username.clone().into());
                c.insert("password".into(), "***".into());
            }
            (None, None) => {}
        }
        insert_path(&mut c, "ca_file", self.ca_file.as_deref());
        c
    }
}

fn insert_path(t: &mut Table, key: &str, p: Option<&Path>) {
    if let Some(p) = p {
        t.insert(key.into(), p.display().to_string().into());
    }
}

fn dur(d: Duration) -> Value {
    duration::format(d).into()
}

fn int(n: impl TryInto<i64>) -> Value {
    Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

/// The sections every program shares, then the program's own.
fn render(
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

impl ProgramSettings for AgentSettings {
    fn read_secrets(mut self) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        self.broker.read_secrets(&mut problems);
        finish(problems, self)
    }

    fn to_toml(&self) -> String {
        let mut a = Table::new();
        a.insert("node".into(), self.node.as_str().into());
        insert_path(&mut a, "plugin_dir", Some(&self.plugin_dir));
        a.insert("concurrency".into(), int(self.concurrency));
        a.insert("heartbeat".into(), dur(self.heartbeat));
        insert_path(&mut a, "authorized_keys", Some(&self.authorized_keys));
        // The base directory, as configured (the node's own is <state_dir>/<node>).
        insert_path(&mut a, "state_dir", self.state_dir.parent());
        a.insert("max_clock_skew".into(), dur(self.max_clock_skew));
        a.insert("max_command_ttl".into(), dur(self.max_command_ttl));
        if let Some(listen) = &self.http_listen {
            a.insert("http_listen".into(), listen.to_string().into());
        }
        if !self.facts.is_empty() {
            let facts: Table = self
                .facts
                .iter()
                .filter_map(|(k, v)| toml::Value::try_from(v).ok().map(|v| (k.clone(), v)))
                .collect();
            a.insert("facts".into(), facts.into());
        }
        render(&self.broker, None, Some(("agent", a)), &self.log_level)
    }
}

impl ProgramSettings for ServerSettings {
    fn read_secrets(mut self) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        self.broker.read_secrets(&mut problems);
        self.couch.read_secrets(&mut problems);
        finish(problems, self)
    }

    fn to_toml(&self) -> String {
        let mut s = Table::new();
        s.insert("prefetch".into(), int(self.prefetch));
        s.insert("batch_size".into(), int(self.batch_size));
        s.insert("stale_after".into(), dur(self.stale_after));
        s.insert("history_retention".into(), dur(self.history_retention));
        if let Some(listen) = &self.http_listen {
            s.insert("http_listen".into(), listen.to_string().into());
        }
        render(
            &self.broker,
            Some(&self.couch),
            Some(("server", s)),
            &self.log_level,
        )
    }
}

impl ProgramSettings for RunnerSettings {
    fn read_secrets(mut self) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        self.broker.read_secrets(&mut problems);
        self.couch.read_secrets(&mut problems);
        finish(problems, self)
    }

    fn to_toml(&self) -> String {
        let mut r = Table::new();
        r.insert("timeout".into(), dur(self.timeout));
        r.insert("ttl".into(), dur(self.ttl));
        r.insert("freshness".into(), dur(self.freshness));
        insert_path(&mut r, "signing_key", Some(&self.signing_key));
        render(
            &self.broker,
            Some(&self.couch),
            Some(("runner", r)),
            &self.log_level,
        )
    }
}
