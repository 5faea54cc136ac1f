//! `[agent]`: what `vogeler-agent` runs, trusts and keeps, and its composition with `[amqp]` and `[log]`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Table;

use super::{
    BrokerSettings, ConfigError, Problems, ProgramSettings, RawConfig,
    defaults::LOG_LEVEL,
    effective::{dur, finish, insert_path, int, render},
    validate_level, validate_listen,
};
use vogeler_proto::{duration, names::NodeName};

/// `[agent]` defaults, quoted by `--help` and the example configs.
pub mod defaults {
    pub const PLUGIN_DIR: &str = "/etc/vogeler/plugins.d";
    pub const AGENT_CONCURRENCY: usize = 4;
    pub const AGENT_HEARTBEAT_SECS: u64 = 60;
    pub const AUTHORIZED_KEYS: &str = "/etc/vogeler/keys/authorized_keys";
    pub const STATE_DIR: &str = "/var/lib/vogeler";
    pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
    pub const MAX_COMMAND_TTL_SECS: u64 = 24 * 3600;
    /// 16 MiB of JSON lines is tens of thousands of commands.
    pub const AUDIT_MAX_BYTES: u64 = 16 * 1024 * 1024;
    /// With `audit.log` itself, at most 5 × `AUDIT_MAX_BYTES` (80 MiB) of disk.
    pub const AUDIT_FILES: usize = 4;
    /// A scheduled plugin's value goes out in full at least this often even when unchanged,
    /// so a server that lost it (a new database, a pruned node) has it back within a day.
    pub const FULL_EVERY_SECS: u64 = 24 * 3600;
}

/// The smallest `agent.audit_max_bytes`: room for dozens of the largest lines (a reason is
/// cut to 1 KiB), so a value meant in MiB but written in bytes is caught.
pub const MIN_AUDIT_MAX_BYTES: u64 = 64 * 1024;
/// The most rotated audit files kept.
pub const MAX_AUDIT_FILES: usize = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub node: Option<String>,
    pub plugin_dir: Option<PathBuf>,
    pub concurrency: Option<usize>,
    /// How often the agent re-announces itself, so the server sees it is alive.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub heartbeat: Option<Duration>,
    /// Facts the operator assigns (role, datacenter, ...), announced with the measured ones
    /// and usable in node sets (`-n role=web`).
    #[serde(default)]
    pub facts: serde_json::Map<String, serde_json::Value>,
    /// Runner public keys this agent obeys: a file of key lines or a directory of `*.pub`.
    pub authorized_keys: Option<PathBuf>,
    /// Where agents keep their own key, replay cache and audit log, one subdirectory per node.
    pub state_dir: Option<PathBuf>,
    /// How far a command's issue time may be ahead of this node's clock.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub max_clock_skew: Option<Duration>,
    /// Commands valid for longer than this are refused (it bounds the replay cache).
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub max_command_ttl: Option<Duration>,
    /// `host:port` for `/healthz` and `/metrics`; unset, no HTTP listener.
    pub http_listen: Option<String>,
    /// The audit log is rotated (`audit.log` to `audit.log.1`, ...) before a line would take
    /// it past this many bytes.
    pub audit_max_bytes: Option<u64>,
    /// Rotated audit logs kept (`audit.log.1` to `audit.log.N`); older ones are deleted.
    pub audit_files: Option<usize>,
    /// `[agent.schedule]`: per plugin, an interval overriding the plugin file's (`dpkg =
    /// "6h"`), or `"off"` to run it only on command.
    #[serde(default)]
    pub schedule: std::collections::BTreeMap<String, String>,
    /// A scheduled run sends its value in full at least this often, even when unchanged.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub full_every: Option<Duration>,
}

/// What `[agent.schedule]` says of one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleOverride {
    /// Run on this interval, whatever the plugin file says.
    Every(Duration),
    /// Run only on command.
    Off,
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub broker: BrokerSettings,
    pub node: NodeName,
    pub plugin_dir: PathBuf,
    /// Plugin runs allowed at once; more commands wait in the queue.
    pub concurrency: usize,
    /// Interval between announcements while connected.
    pub heartbeat: Duration,
    /// Operator-assigned facts, announced on top of the measured ones.
    pub facts: serde_json::Map<String, serde_json::Value>,
    pub authorized_keys: PathBuf,
    /// This node's own state directory (`<agent.state_dir>/<node>`).
    pub state_dir: PathBuf,
    pub max_clock_skew: Duration,
    pub max_command_ttl: Duration,
    pub http_listen: Option<SocketAddr>,
    /// The audit log's size before rotation, and the rotated files kept: together they bound
    /// its disk use to `(audit_files + 1) × audit_max_bytes`.
    pub audit_max_bytes: u64,
    pub audit_files: usize,
    /// `[agent.schedule]`, by plugin name.
    pub schedule: std::collections::BTreeMap<vogeler_proto::names::PluginName, ScheduleOverride>,
    pub full_every: Duration,
    pub log_level: String,
}

impl RawConfig {
    /// Settings for `vogeler-agent`. `hostname` is the node name used when none is configured.
    pub fn agent(&self, hostname: Option<String>) -> Result<AgentSettings, ConfigError> {
        let mut p = Problems::default();
        let broker = self.broker(&mut p);
        let node = match self.agent.node.clone().or(hostname) {
            Some(n) => p.check("agent.node", NodeName::new(n)),
            None => {
                p.0.push(
                    "agent.node: no node name given and the host name is unknown; pass --node"
                        .into(),
                );
                None
            }
        };
        let concurrency = self
            .agent
            .concurrency
            .unwrap_or(defaults::AGENT_CONCURRENCY);
        let heartbeat = self
            .agent
            .heartbeat
            .unwrap_or(Duration::from_secs(defaults::AGENT_HEARTBEAT_SECS));
        if heartbeat < Duration::from_secs(1) {
            p.0.push("agent.heartbeat: must be at least 1s".into());
        }
        if concurrency == 0 {
            p.0.push("agent.concurrency: must be at least 1".into());
        }
        let max_clock_skew = self
            .agent
            .max_clock_skew
            .unwrap_or(Duration::from_secs(defaults::MAX_CLOCK_SKEW_SECS));
        let max_command_ttl = self
            .agent
            .max_command_ttl
            .unwrap_or(Duration::from_secs(defaults::MAX_COMMAND_TTL_SECS));
        if max_command_ttl < Duration::from_secs(1) {
            p.0.push("agent.max_command_ttl: must be at least 1s".into());
        }
        let audit_max_bytes = self
            .agent
            .audit_max_bytes
            .unwrap_or(defaults::AUDIT_MAX_BYTES);
        if audit_max_bytes < MIN_AUDIT_MAX_BYTES {
            p.0.push(format!(
                "agent.audit_max_bytes: {audit_max_bytes} is too small; use at least {MIN_AUDIT_MAX_BYTES} (the default is {}, 16 MiB)",
                defaults::AUDIT_MAX_BYTES
            ));
        }
        let audit_files = self.agent.audit_files.unwrap_or(defaults::AUDIT_FILES);
        if !(1..=MAX_AUDIT_FILES).contains(&audit_files) {
            p.0.push(format!(
                "agent.audit_files: {audit_files} must be between 1 and {MAX_AUDIT_FILES}"
            ));
        }
        let mut schedule = std::collections::BTreeMap::new();
        for (name, when) in &self.agent.schedule {
            let key = format!("agent.schedule.{name}");
            let Some(plugin) = p.check(&key, vogeler_proto::names::PluginName::new(name.clone()))
            else {
                continue;
            };
            let parsed = if when == "off" {
                Ok(ScheduleOverride::Off)
            } else {
                duration::parse(when).and_then(|d| {
                    vogeler_proto::limits::check_interval(d).map(ScheduleOverride::Every)
                })
            };
            match parsed {
                Ok(o) => {
                    schedule.insert(plugin, o);
                }
                Err(e) => p.0.push(format!(
                    "{key}: {e}; write an interval such as \"1h\" or \"off\""
                )),
            }
        }
        let full_every = self
            .agent
            .full_every
            .unwrap_or(Duration::from_secs(defaults::FULL_EVERY_SECS));
        if let Err(e) = vogeler_proto::limits::check_interval(full_every) {
            p.0.push(format!(
                "agent.full_every: {e}; the value must go out in full at least monthly so a server that lost it gets it back"
            ));
        }
        let log_level = validate_level(&mut p, &self.log, LOG_LEVEL);
        let http_listen = validate_listen(
            &mut p,
            "agent.http_listen",
            self.agent.http_listen.as_deref(),
        );
        let state_base = self
            .agent
            .state_dir
            .clone()
            .unwrap_or_else(|| defaults::STATE_DIR.into());
        p.finish(|| {
            let node = node?;
            Some(AgentSettings {
                state_dir: state_base.join(node.as_str()),
                authorized_keys: self
                    .agent
                    .authorized_keys
                    .clone()
                    .unwrap_or_else(|| defaults::AUTHORIZED_KEYS.into()),
                max_clock_skew,
                max_command_ttl,
                broker: broker?,
                node,
                plugin_dir: self
                    .agent
                    .plugin_dir
                    .clone()
                    .unwrap_or_else(|| defaults::PLUGIN_DIR.into()),
                concurrency,
                heartbeat,
                facts: self.agent.facts.clone(),
                http_listen,
                audit_max_bytes,
                audit_files,
                schedule,
                full_every,
                log_level,
            })
        })
    }
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
        a.insert("audit_max_bytes".into(), int(self.audit_max_bytes));
        a.insert("audit_files".into(), int(self.audit_files));
        a.insert("full_every".into(), dur(self.full_every));
        if !self.schedule.is_empty() {
            let schedule: Table = self
                .schedule
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        ScheduleOverride::Off => "off".to_string(),
                        ScheduleOverride::Every(d) => duration::format(*d),
                    };
                    (k.to_string(), v.into())
                })
                .collect();
            a.insert("schedule".into(), schedule.into());
        }
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
