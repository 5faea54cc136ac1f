//! Configuration: one raw shape for every program, loaded in layers, then validated into the
//! settings each program needs.
//!
//! Layers, later wins: built-in defaults < `--config FILE` (TOML) < `VOGELER_*` environment
//! (`VOGELER_AMQP__URL`, `VOGELER_COUCHDB__PASSWORD`: a double underscore separates section
//! and key) < command-line flags. All three programs read the same shape, so one file or one
//! environment can serve them all; a program ignores the sections it does not use, while a
//! misspelt key anywhere is an error.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

mod effective;
pub use effective::ProgramSettings;

use serde::Deserialize;

use crate::{
    couch::Credentials,
    duration,
    names::NodeName,
    secret::{Secret, SecretUrl},
    topology::{AgentQueue, QueueKind, ResultsQueue, Topology},
};

/// Defaults, in one place so docs and `--help` can quote them.
pub mod defaults {
    pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    pub const COLLECTIVE: &str = "vogeler";
    pub const COUCHDB_URL: &str = "http://127.0.0.1:5984";
    pub const DATABASE: &str = "system_records";
    pub const CONNECT_TIMEOUT_SECS: u64 = 30;
    pub const AMQP_HEARTBEAT_SECS: u64 = 10;
    pub const AMQP_FRAME_MAX: u32 = 16 * 1024;
    pub const PLUGIN_DIR: &str = "/etc/vogeler/plugins.d";
    pub const AGENT_CONCURRENCY: usize = 4;
    pub const AGENT_HEARTBEAT_SECS: u64 = 60;
    pub const AUTHORIZED_KEYS: &str = "/etc/vogeler/keys/authorized_keys";
    pub const STATE_DIR: &str = "/var/lib/vogeler";
    pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
    pub const MAX_COMMAND_TTL_SECS: u64 = 24 * 3600;
    pub const SIGNING_KEY: &str = "/etc/vogeler/keys/runner.key";
    pub const SERVER_PREFETCH: u16 = 512;
    pub const SERVER_BATCH_SIZE: usize = 256;
    pub const SERVER_STALE_AFTER_SECS: u64 = 24 * 3600;
    pub const SERVER_HISTORY_RETENTION_SECS: u64 = 90 * 24 * 3600;
    pub const RUNNER_TIMEOUT_SECS: u64 = 10;
    pub const RUNNER_TTL_SECS: u64 = 3600;
    pub const RUNNER_FRESHNESS_SECS: u64 = 24 * 3600;
    /// Daemons log their work; the runner is interactive and keeps stderr for problems.
    pub const LOG_LEVEL: &str = "info";
    pub const RUNNER_LOG_LEVEL: &str = "warn";
}

/// The file/environment shape, before validation. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// How long to keep trying the broker and database at start-up.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub connect_timeout: Option<Duration>,
    #[serde(default)]
    pub amqp: RawAmqp,
    #[serde(default)]
    pub couchdb: RawCouch,
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub runner: RawRunner,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmqp {
    pub url: Option<String>,
    pub collective: Option<String>,
    /// Delete our queues after they have been unused this long (test runs, short-lived fleets).
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub queue_expires: Option<Duration>,
    /// `classic` (default) or `quorum` (replicated; for RabbitMQ clusters).
    pub results_queue_type: Option<String>,
    /// Results the queue holds at most before it refuses publishes.
    pub results_max_length: Option<u64>,
    /// AMQP heartbeat: a silent broker link is detected within about twice this.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub heartbeat: Option<Duration>,
    /// Largest AMQP frame, in bytes. The client keeps 32 frames of buffer each way per
    /// connection, so this sets its memory: 16 KiB gives 1 MiB (the broker's default of
    /// 128 KiB would give 8 MiB, most of an idle agent). Bigger messages span frames.
    pub frame_max: Option<u32>,
    /// Commands an offline agent's queue holds at most (more are refused, and the runner
    /// says so).
    pub agent_queue_max_length: Option<u64>,
    /// Commands older than this are dropped from an offline agent's queue.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub agent_queue_max_age: Option<Duration>,
    /// A file holding the broker password, used instead of the one in `amqp.url` (so the
    /// URL can live in a shared config and the password in a root-only file).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for `amqps://` (added to the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its PEM private key, for brokers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCouch {
    pub url: Option<String>,
    pub database: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (for systemd credentials or secret managers).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for `https://` (added to the system's).
    pub ca_file: Option<PathBuf>,
}

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub prefetch: Option<u16>,
    /// Results written to CouchDB in one `_bulk_docs` request at most.
    pub batch_size: Option<usize>,
    /// A node not seen for this long is reported as stale (never deleted automatically).
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub stale_after: Option<Duration>,
    /// History entries older than this are deleted.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub history_retention: Option<Duration>,
    /// `host:port` for `/healthz` and `/metrics`; unset, no HTTP listener.
    pub http_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRunner {
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub timeout: Option<Duration>,
    /// Commands not delivered within this are dropped, and agents do not run them late.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub ttl: Option<Duration>,
    /// Registered nodes seen within this are expected to answer.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub freshness: Option<Duration>,
    /// The Ed25519 private key commands are signed with (`vogeler-runner keygen`).
    pub signing_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Load(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// Where configuration comes from. `env: None` reads the process environment.
#[derive(Debug, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub env: Option<HashMap<String, String>>,
    /// Flags, as `section.key` → value.
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// Record a flag's value if it was given.
    pub fn set(&mut self, key: &str, value: Option<impl ToString>) -> &mut Self {
        if let Some(v) = value {
            self.overrides.push((key.to_string(), v.to_string()));
        }
        self
    }
}

/// Read every layer into one raw config.
pub fn load(sources: &Sources) -> Result<RawConfig, ConfigError> {
    let mut b = config::Config::builder();
    if let Some(file) = &sources.file {
        if !file.is_file() {
            return Err(ConfigError::Load(format!(
                "config file {} does not exist",
                file.display()
            )));
        }
        b = b.add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml));
    }
    let env = config::Environment::with_prefix("VOGELER")
        .prefix_separator("_")
        .separator("__")
        .source(Some(setting_variables(
            sources
                .env
                .clone()
                .unwrap_or_else(|| std::env::vars().collect()),
        )));
    b = b.add_source(env);
    for (k, v) in &sources.overrides {
        b = b
            .set_override(k.as_str(), v.as_str())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
    }
    let loaded = b.build().map_err(|e| ConfigError::Load(e.to_string()))?;
    loaded
        .try_deserialize()
        .map_err(|e| ConfigError::Load(e.to_string()))
}

/// The `VOGELER_*` variables that name a setting: `VOGELER_<SECTION>__<KEY>` for a section of
/// [`RawConfig`], or one of its top-level keys (`VOGELER_CONNECT_TIMEOUT`). The rest
/// (`VOGELER_TEST_AMQP_URL`, `VOGELER_STACK_DIR`, ...) belong to scripts and test runners and
/// are left alone; a misspelt key inside a known section (`VOGELER_AMQP__URLL`) still reaches
/// deserialization and is reported there.
fn setting_variables(env: HashMap<String, String>) -> HashMap<String, String> {
    let known = serde_aux::serde_introspection::serde_introspect::<RawConfig>();
    env.into_iter()
        .filter(|(name, _)| {
            let Some(rest) = name.strip_prefix("VOGELER_") else {
                return false;
            };
            let head = rest.split("__").next().unwrap_or_default();
            known.iter().any(|k| k.eq_ignore_ascii_case(head))
        })
        .collect()
}

/// What every program needs to reach the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub url: SecretUrl,
    pub topology: Topology,
    pub connect_timeout: Duration,
    pub tls: TlsFiles,
    /// `amqp.password_file`, read into `url` by [`ProgramSettings::read_secrets`] at start-up.
    pub password_file: Option<PathBuf>,
}

/// TLS material for `amqps://`, read when connecting (so renewed certificates are picked up
/// at the next reconnect).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, both or neither.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// What the server and runner need to reach CouchDB.
#[derive(Debug, Clone)]
pub struct CouchSettings {
    pub url: SecretUrl,
    pub database: String,
    pub credentials: Option<Credentials>,
    /// `couchdb.username` with `couchdb.password_file`: `credentials` once read at start-up.
    pub password_file: Option<(String, PathBuf)>,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
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
    pub log_level: String,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub broker: BrokerSettings,
    pub couch: CouchSettings,
    /// Unacked results the broker may hand the server at once.
    pub prefetch: u16,
    pub batch_size: usize,
    pub stale_after: Duration,
    pub history_retention: Duration,
    pub http_listen: Option<SocketAddr>,
    pub log_level: String,
}

#[derive(Debug, Clone)]
pub struct RunnerSettings {
    pub broker: BrokerSettings,
    pub couch: CouchSettings,
    pub timeout: Duration,
    pub ttl: Duration,
    pub freshness: Duration,
    pub signing_key: PathBuf,
    pub log_level: String,
}

/// Collects every problem before reporting, so an operator fixes them in one go.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check<T, E: std::fmt::Display>(&mut self, key: &str, r: Result<T, E>) -> Option<T> {
        r.map_err(|e| self.0.push(format!("{key}: {e}"))).ok()
    }
    fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            build()
                .ok_or_else(|| ConfigError::Invalid(vec!["internal: incomplete settings".into()]))
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

fn validate_url(
    p: &mut Problems,
    key: &str,
    raw: Option<&str>,
    default: &str,
    schemes: &[&str],
) -> Option<SecretUrl> {
    let s = raw.unwrap_or(default);
    let url = p.check(
        key,
        SecretUrl::parse(s).map_err(|e| format!("{:?} is not a URL ({e})", redact(s))),
    )?;
    if !schemes.contains(&url.expose().scheme()) {
        p.0.push(format!(
            "{key}: {url} must start with {}",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
        return None;
    }
    Some(url)
}

/// `host:port` for the health and metrics listener.
fn validate_listen(p: &mut Problems, key: &str, raw: Option<&str>) -> Option<SocketAddr> {
    let raw = raw?;
    p.check(
        key,
        raw.parse::<SocketAddr>().map_err(|_| {
            format!("{raw:?} is not an address to listen on; write host:port, e.g. 127.0.0.1:9187")
        }),
    )
}

/// Best-effort redaction for a string that failed to parse as a URL.
fn redact(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(j)) if j > i => format!("{}://***{}", &s[..i], &s[j..]),
        _ => s.to_string(),
    }
}

fn validate_collective(p: &mut Problems, raw: Option<&str>) -> Option<String> {
    let c = raw.unwrap_or(defaults::COLLECTIVE);
    let ok = !c.is_empty()
        && c.len() <= 64
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_'));
    if ok {
        Some(c.to_string())
    } else {
        p.0.push(format!(
            "amqp.collective: {c:?} must be 1-64 letters, digits, '-' or '_'"
        ));
        None
    }
}

/// CouchDB's rule for database names.
fn validate_database(p: &mut Problems, raw: Option<&str>) -> Option<String> {
    let d = raw.unwrap_or(defaults::DATABASE);
    let mut chars = d.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_$()+-/".contains(c))
        && d.len() <= 238;
    if ok {
        Some(d.to_string())
    } else {
        p.0.push(format!(
            "couchdb.database: {d:?} is not a valid CouchDB database name (lowercase letter first, then a-z 0-9 _$()+-/)"
        ));
        None
    }
}

fn validate_level(p: &mut Problems, raw: &RawLog, default: &str) -> String {
    let level = raw.level.clone().unwrap_or_else(|| default.into());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        p.0.push(format!(
            "log.level: {level:?} is not a log filter ({e}); try info or debug"
        ));
    }
    level
}

impl RawConfig {
    fn connect_timeout(&self) -> Duration {
        self.connect_timeout
            .unwrap_or(Duration::from_secs(defaults::CONNECT_TIMEOUT_SECS))
    }

    fn broker(&self, p: &mut Problems) -> Option<BrokerSettings> {
        let url = validate_url(
            p,
            "amqp.url",
            self.amqp.url.as_deref(),
            defaults::AMQP_URL,
            &["amqp", "amqps"],
        );
        let mut url = url;
        let heartbeat = self
            .amqp
            .heartbeat
            .unwrap_or(Duration::from_secs(defaults::AMQP_HEARTBEAT_SECS));
        if heartbeat.as_secs() == 0 || heartbeat.as_secs() > 600 {
            p.0.push("amqp.heartbeat: must be between 1s and 10m".into());
        } else if let Some(u) = url.as_mut() {
            u.set_query_default("heartbeat", &heartbeat.as_secs().to_string());
        }
        let frame_max = self.amqp.frame_max.unwrap_or(defaults::AMQP_FRAME_MAX);
        // RabbitMQ refuses frames under 4 KiB; over 1 MiB only costs memory.
        if !(4096..=1024 * 1024).contains(&frame_max) {
            p.0.push(format!(
                "amqp.frame_max: {frame_max} must be between 4096 and 1048576 bytes"
            ));
        } else if let Some(u) = url.as_mut() {
            u.set_query_default("frame_max", &frame_max.to_string());
        }
        let mut agent_queue = AgentQueue::default();
        match self.amqp.agent_queue_max_length {
            Some(0) => {
                p.0.push("amqp.agent_queue_max_length: must be at least 1".into())
            }
            Some(n) => agent_queue.max_length = n,
            None => {}
        }
        match self.amqp.agent_queue_max_age {
            Some(d) if d < Duration::from_secs(1) => {
                p.0.push("amqp.agent_queue_max_age: must be at least 1s".into())
            }
            Some(d) => agent_queue.max_age = d,
            None => {}
        }
        if self.amqp.password_file.is_some()
            && let Some(u) = &url
            && (u.expose().cannot_be_a_base() || u.expose().host().is_none())
        {
            p.0.push("amqp.password_file: amqp.url cannot carry a password".into());
        }
        let collective = validate_collective(p, self.amqp.collective.as_deref());
        let mut results = ResultsQueue::default();
        if let Some(kind) = &self.amqp.results_queue_type {
            match QueueKind::parse(kind) {
                Ok(k) => results.kind = k,
                Err(e) => p.0.push(format!("amqp.results_queue_type: {e}")),
            }
        }
        match self.amqp.results_max_length {
            Some(0) => {
                p.0.push("amqp.results_max_length: must be at least 1".into())
            }
            Some(n) => results.max_length = n,
            None => {}
        }
        let client = match (&self.amqp.cert_file, &self.amqp.key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                p.0.push("amqp.cert_file and amqp.key_file: give both (a client certificate and its key) or neither".into());
                None
            }
        };
        let tls = TlsFiles {
            ca_file: self.amqp.ca_file.clone(),
            client,
        };
        if let Some(u) = &url
            && u.expose().scheme() == "amqp"
            && tls != TlsFiles::default()
        {
            p.0.push(format!(
                "amqp.ca_file/cert_file/key_file are set but amqp.url {u} is not TLS: use amqps://"
            ));
        }
        Some(BrokerSettings {
            tls,
            password_file: self.amqp.password_file.clone(),
            url: url?,
            topology: Topology::new(collective?, self.amqp.queue_expires)
                .with_results_queue(results)
                .with_agent_queue(agent_queue),
            connect_timeout: self.connect_timeout(),
        })
    }

    fn couch(&self, p: &mut Problems) -> Option<CouchSettings> {
        let c = &self.couchdb;
        let url = validate_url(
            p,
            "couchdb.url",
            c.url.as_deref(),
            defaults::COUCHDB_URL,
            &["http", "https"],
        );
        let database = validate_database(p, c.database.as_deref());
        let mut credentials = None;
        let mut password_file = None;
        match (&c.username, &c.password, &c.password_file) {
            (_, Some(_), Some(_)) => {
                p.0.push("couchdb.password and couchdb.password_file: give one, not both".into())
            }
            (Some(u), Some(pw), None) => {
                credentials = Some(Credentials {
                    username: u.clone(),
                    password: pw.clone(),
                })
            }
            (Some(u), None, Some(file)) => password_file = Some((u.clone(), file.clone())),
            (None, None, None) => {}
            (Some(_), None, None) => p.0.push("couchdb.username is set but no password: set couchdb.password or couchdb.password_file (or VOGELER_COUCHDB__PASSWORD)".into()),
            (None, _, _) => {
                p.0.push("couchdb.password is set but no username: set couchdb.username".into())
            }
        }
        if let (Some(u), Some(_)) = (&url, &c.ca_file)
            && u.expose().scheme() == "http"
        {
            p.0.push(format!(
                "couchdb.ca_file is set but couchdb.url {u} is not TLS: use https://"
            ));
        }
        Some(CouchSettings {
            ca_file: c.ca_file.clone(),
            url: url?,
            database: database?,
            credentials,
            password_file,
            connect_timeout: self.connect_timeout(),
        })
    }

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
        let log_level = validate_level(&mut p, &self.log, defaults::LOG_LEVEL);
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
                log_level,
            })
        })
    }

    /// Settings for `vogeler-server`.
    pub fn server(&self) -> Result<ServerSettings, ConfigError> {
        let mut p = Problems::default();
        let broker = self.broker(&mut p);
        let couch = self.couch(&mut p);
        let prefetch = self.server.prefetch.unwrap_or(defaults::SERVER_PREFETCH);
        if prefetch == 0 {
            p.0.push("server.prefetch: must be at least 1".into());
        }
        let batch_size = self
            .server
            .batch_size
            .unwrap_or(defaults::SERVER_BATCH_SIZE);
        if batch_size == 0 || batch_size > usize::from(prefetch.max(1)) {
            p.0.push(format!(
                "server.batch_size: {batch_size} must be between 1 and server.prefetch ({prefetch})"
            ));
        }
        let stale_after = self
            .server
            .stale_after
            .unwrap_or(Duration::from_secs(defaults::SERVER_STALE_AFTER_SECS));
        let history_retention = self
            .server
            .history_retention
            .unwrap_or(Duration::from_secs(defaults::SERVER_HISTORY_RETENTION_SECS));
        let log_level = validate_level(&mut p, &self.log, defaults::LOG_LEVEL);
        let http_listen = validate_listen(
            &mut p,
            "server.http_listen",
            self.server.http_listen.as_deref(),
        );
        p.finish(|| {
            Some(ServerSettings {
                http_listen,
                broker: broker?,
                couch: couch?,
                prefetch,
                batch_size,
                stale_after,
                history_retention,
                log_level,
            })
        })
    }

    /// Settings for `vogeler-runner`.
    pub fn runner(&self) -> Result<RunnerSettings, ConfigError> {
        let mut p = Problems::default();
        let broker = self.broker(&mut p);
        let couch = self.couch(&mut p);
        let timeout = self
            .runner
            .timeout
            .unwrap_or(Duration::from_secs(defaults::RUNNER_TIMEOUT_SECS));
        if timeout.is_zero() {
            p.0.push("runner.timeout: must be longer than zero".into());
        }
        let ttl = self
            .runner
            .ttl
            .unwrap_or(Duration::from_secs(defaults::RUNNER_TTL_SECS));
        if ttl < Duration::from_secs(1) {
            p.0.push("runner.ttl: must be at least 1s".into());
        }
        let freshness = self
            .runner
            .freshness
            .unwrap_or(Duration::from_secs(defaults::RUNNER_FRESHNESS_SECS));
        let log_level = validate_level(&mut p, &self.log, defaults::RUNNER_LOG_LEVEL);
        p.finish(|| {
            Some(RunnerSettings {
                broker: broker?,
                couch: couch?,
                timeout,
                ttl,
                freshness,
                signing_key: self
                    .runner
                    .signing_key
                    .clone()
                    .unwrap_or_else(|| defaults::SIGNING_KEY.into()),
                log_level,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(file: Option<&str>, env: &[(&str, &str)], flags: &[(&str, &str)]) -> Sources {
        let file = file.map(|body| {
            let path =
                std::env::temp_dir().join(format!("vogeler-cfg-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&path, body).expect("write config");
            path
        });
        Sources {
            file,
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            overrides: flags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn defaults_apply() {
        let s = load(&sources(None, &[], &[]))
            .expect("load")
            .server()
            .expect("valid");
        assert_eq!(s.couch.database, "system_records");
        assert_eq!(s.broker.topology.collective(), "vogeler");
        assert_eq!(s.broker.connect_timeout, Duration::from_secs(30));
        assert!(s.couch.credentials.is_none());
    }

    #[test]
    fn layers_override_in_order() {
        let file = "connect_timeout = 5\n[couchdb]\ndatabase = \"from_file\"\nurl = \"http://file:5984\"\n[runner]\ntimeout = \"2s\"\n";
        let env = [
            ("VOGELER_COUCHDB__DATABASE", "from_env"),
            ("VOGELER_RUNNER__TIMEOUT", "750ms"),
        ];
        let flags = [("runner.timeout", "3")];
        let s = load(&sources(Some(file), &env, &flags))
            .expect("load")
            .runner()
            .expect("valid");
        assert_eq!(s.couch.url.expose().host_str(), Some("file"));
        assert_eq!(s.couch.database, "from_env");
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert_eq!(s.couch.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn other_vogeler_variables_are_not_settings() {
        let env = [
            ("VOGELER_TEST_AMQP_URL", "amqp://elsewhere"),
            ("VOGELER_STACK_DIR", "/tmp/stack"),
            ("VOGELER_CONNECT_TIMEOUT", "7"),
            ("VOGELER_COUCHDB__DATABASE", "from_env"),
        ];
        let s = load(&sources(None, &env, &[]))
            .expect("load")
            .server()
            .expect("valid");
        assert_eq!(s.couch.database, "from_env");
        assert_eq!(s.couch.connect_timeout, Duration::from_secs(7));
        let misspelt = [("VOGELER_AMQP__URLL", "amqp://x")];
        let err = load(&sources(None, &misspelt, &[])).expect_err("misspelt key");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn credentials_from_environment_only() {
        let env = [
            ("VOGELER_COUCHDB__USERNAME", "admin"),
            ("VOGELER_COUCHDB__PASSWORD", "s3cret"),
        ];
        let s = load(&sources(None, &env, &[]))
            .expect("load")
            .server()
            .expect("valid");
        let c = s.couch.credentials.expect("credentials");
        assert_eq!(c.password.expose(), "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let flags = [
            ("amqp.url", "http://nope"),
            ("amqp.collective", "a b"),
            ("couchdb.database", "Bad"),
            ("couchdb.username", "admin"),
            ("log.level", "loud=???"),
        ];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect_err("invalid");
        let ConfigError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 5, "{problems:#?}");
        let text = err.to_string();
        for key in [
            "amqp.url",
            "amqp.collective",
            "couchdb.database",
            "couchdb.username",
            "log.level",
        ] {
            assert!(text.contains(key), "{text}");
        }
    }

    #[test]
    fn unknown_keys_name_the_key() {
        let err = load(&sources(Some("[amqp]\nulr = \"x\"\n"), &[], &[])).expect_err("unknown key");
        assert!(err.to_string().contains("ulr"), "{err}");
        let err =
            load(&sources(None, &[("VOGELER_AMQP__PASWORD", "x")], &[])).expect_err("unknown env");
        assert!(err.to_string().contains("pasword"), "{err}");
    }

    #[test]
    fn agent_node_defaults_to_hostname_and_is_validated() {
        let raw = load(&sources(None, &[], &[])).expect("load");
        assert_eq!(
            raw.agent(Some("host1".into()))
                .expect("valid")
                .node
                .as_str(),
            "host1"
        );
        let raw = load(&sources(None, &[], &[("agent.node", "_bad")])).expect("load");
        assert!(
            raw.agent(Some("host1".into()))
                .expect_err("bad node")
                .to_string()
                .contains("agent.node")
        );
    }

    #[test]
    fn tls_files_need_a_tls_url_and_come_in_pairs() {
        let flags = [
            ("amqp.ca_file", "/etc/vogeler/ca.pem"),
            ("amqp.cert_file", "/etc/vogeler/agent.pem"),
            ("couchdb.ca_file", "/etc/vogeler/ca.pem"),
        ];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect_err("invalid");
        let ConfigError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 3, "{problems:#?}");
        let text = err.to_string();
        assert!(text.contains("give both"), "{text}");
        assert!(text.contains("use amqps://"), "{text}");
        assert!(text.contains("use https://"), "{text}");
        let flags = [
            ("amqp.url", "amqps://u:p@broker:5671/%2f"),
            ("amqp.ca_file", "/etc/vogeler/ca.pem"),
            ("amqp.cert_file", "/etc/vogeler/agent.pem"),
            ("amqp.key_file", "/etc/vogeler/agent.key"),
            ("couchdb.url", "https://couch:6984"),
            ("couchdb.ca_file", "/etc/vogeler/ca.pem"),
        ];
        let s = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect("valid without the files existing");
        assert!(s.broker.tls.client.is_some());
        assert!(s.couch.ca_file.is_some());
    }

    #[test]
    fn broker_password_from_a_file() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").expect("write");
        let flags = [
            ("amqp.url", "amqp://agent@broker:5672/vogeler"),
            ("amqp.password_file", file.to_str().expect("path")),
        ];
        let s = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect("valid")
            .read_secrets()
            .expect("readable");
        assert_eq!(s.broker.url.expose().password(), Some("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(!s.to_toml().contains("s3cret"));
        let flags = [("amqp.password_file", "/nonexistent/pw")];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect("valid: the file is read at start-up")
            .read_secrets()
            .expect_err("missing file");
        assert!(err.to_string().contains("amqp.password_file"), "{err}");
    }

    #[test]
    fn heartbeat_and_frame_max_go_into_the_broker_url_unless_it_sets_them() {
        let s = load(&sources(None, &[], &[]))
            .expect("load")
            .server()
            .expect("valid");
        let query = s
            .broker
            .url
            .expose()
            .query()
            .unwrap_or_default()
            .to_string();
        assert!(
            query.contains("heartbeat=10") && query.contains("frame_max=16384"),
            "{query}"
        );
        let flags = [
            ("amqp.url", "amqp://h/v?frame_max=131072"),
            ("amqp.frame_max", "8192"),
        ];
        let s = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect("valid");
        assert!(
            s.broker
                .url
                .expose()
                .query()
                .unwrap_or_default()
                .contains("frame_max=131072")
        );
        let flags = [("amqp.frame_max", "1024")];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect_err("too small");
        assert!(err.to_string().contains("amqp.frame_max"), "{err}");
    }

    #[test]
    fn unparsable_url_is_redacted() {
        assert_eq!(redact("amqp://u:pw@@host"), "amqp://***@host");
    }
}
