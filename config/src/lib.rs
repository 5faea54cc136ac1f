//! Configuration: one raw shape for every program, loaded in layers, then validated into the
//! settings each program needs.
//!
//! Layers, later wins: built-in defaults < `--config FILE` (TOML) < `VOGELER_*` environment
//! (`VOGELER_AMQP__URL`, `VOGELER_COUCHDB__PASSWORD`: a double underscore separates section
//! and key) < command-line flags. All three programs read the same shape, so one file or one
//! environment can serve them all; a program ignores the sections it does not use, while a
//! misspelt key anywhere is an error.
//!
//! Each section lives in its own module with everything about it side by side: its raw
//! fields, defaults, validation, validated settings and its part of `--print-config`:
//! [`amqp`], [`couchdb`], and the programs' own [`agent`], [`server`] and [`runner`] (each
//! also composes its program's settings from the shared sections). This module loads the
//! layers and holds what every section shares.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

pub mod agent;
pub mod amqp;
pub mod couchdb;
mod effective;
pub mod runner;
pub mod server;

pub use agent::{AgentSettings, RawAgent, ScheduleOverride};
pub use amqp::{BrokerSettings, RawAmqp, TlsFiles};
pub use couchdb::{CouchSettings, Credentials, RawCouch};
pub use effective::ProgramSettings;
pub use runner::{RawRunner, RunnerSettings};
pub use server::{RawServer, ServerSettings};

use serde::Deserialize;

use vogeler_proto::{
    duration,
    secret::{SecretUrl, SecretUrls, split_url_list},
};

/// Every default, for `--help` texts and docs: the top-level ones here, each section's in its
/// module.
pub mod defaults {
    pub use super::{
        agent::defaults::*, amqp::defaults::*, couchdb::defaults::*, runner::defaults::*,
        server::defaults::*,
    };
    pub const CONNECT_TIMEOUT_SECS: u64 = 30;
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

/// `amqp.url` / `couchdb.url`: one URL, or the nodes of a cluster. In TOML a string or an
/// array of strings; in a flag or a `VOGELER_*` variable a comma-separated list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum UrlList {
    One(String),
    Many(Vec<String>),
}

impl UrlList {
    fn items(&self) -> Vec<&str> {
        match self {
            UrlList::One(s) => split_url_list(s),
            UrlList::Many(v) => v.iter().map(|s| s.trim()).collect(),
        }
    }
}

/// Validate a URL list, naming the entry of any bad one, and report every problem.
fn validate_urls(
    p: &mut Problems,
    key: &str,
    raw: Option<&UrlList>,
    default: &str,
    schemes: &[&str],
) -> Option<SecretUrls> {
    let items = raw.map_or_else(|| vec![default], UrlList::items);
    let n = items.len();
    if n == 0 {
        p.0.push(format!("{key}: the list is empty; give at least one URL"));
        return None;
    }
    let mut urls = Vec::with_capacity(n);
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let name = if n == 1 {
            key.to_string()
        } else {
            format!("{key} (entry {} of {n})", i + 1)
        };
        if item.is_empty() {
            p.0.push(format!(
                "{name}: is empty; give a URL, or several separated by commas"
            ));
            ok = false;
            continue;
        }
        match validate_url(p, &name, item, schemes) {
            Some(u) if urls.contains(&u) => {
                p.0.push(format!("{key}: {u} is listed twice"));
                ok = false;
            }
            Some(u) => urls.push(u),
            None => ok = false,
        }
    }
    if ok { SecretUrls::new(urls) } else { None }
}

fn validate_url(p: &mut Problems, key: &str, s: &str, schemes: &[&str]) -> Option<SecretUrl> {
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

/// A URL list for `--print-config`: a string for one URL (as most configs write it), an
/// array for several; passwords redacted.
fn url_list_value(urls: &SecretUrls) -> toml::Value {
    match urls.redacted().as_slice() {
        [one] => one.clone().into(),
        many => toml::Value::Array(many.iter().cloned().map(Into::into).collect()),
    }
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
        self.amqp.settings(self.connect_timeout(), p)
    }

    fn couch(&self, p: &mut Problems) -> Option<CouchSettings> {
        self.couchdb.settings(self.connect_timeout(), p)
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
        assert_eq!(s.couch.url.first().expose().host_str(), Some("file"));
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
    fn dead_letter_bounds_have_defaults_and_are_checked() {
        let s = load(&sources(None, &[], &[]))
            .expect("load")
            .server()
            .expect("valid");
        let dead = s.broker.topology.dead_letter_bounds();
        assert_eq!(dead, vogeler_proto::topology::DeadLetterQueue::default());
        let printed = s.to_toml();
        for key in [
            "dead_letters_max_length = 10000",
            "dead_letters_max_bytes = 268435456",
        ] {
            assert!(printed.contains(key), "{key} in {printed}");
        }
        let env = [
            ("VOGELER_AMQP__DEAD_LETTERS_MAX_LENGTH", "5"),
            ("VOGELER_AMQP__DEAD_LETTERS_MAX_BYTES", "1048576"),
        ];
        let s = load(&sources(None, &env, &[]))
            .expect("load")
            .server()
            .expect("valid");
        let dead = s.broker.topology.dead_letter_bounds();
        assert_eq!((dead.max_length, dead.max_bytes), (5, 1 << 20));
        let flags = [
            ("amqp.dead_letters_max_length", "0"),
            ("amqp.dead_letters_max_bytes", "1000"),
        ];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect_err("invalid");
        let text = err.to_string();
        for problem in [
            "amqp.dead_letters_max_length: must be at least 1",
            "amqp.dead_letters_max_bytes: 1000 is too small; use at least 1048576",
        ] {
            assert!(text.contains(problem), "{problem} in {text}");
        }
    }

    #[test]
    fn audit_bounds_have_defaults_and_are_checked() {
        let node = [("agent.node", "web01")];
        let s = load(&sources(None, &[], &node))
            .expect("load")
            .agent(None)
            .expect("valid");
        assert_eq!(s.audit_max_bytes, defaults::AUDIT_MAX_BYTES);
        assert_eq!(s.audit_files, defaults::AUDIT_FILES);
        let printed = s.to_toml();
        for key in ["audit_max_bytes = 16777216", "audit_files = 4"] {
            assert!(printed.contains(key), "{key} in {printed}");
        }
        let env = [
            ("VOGELER_AGENT__AUDIT_MAX_BYTES", "65536"),
            ("VOGELER_AGENT__AUDIT_FILES", "9"),
        ];
        let s = load(&sources(None, &env, &node))
            .expect("load")
            .agent(None)
            .expect("valid");
        assert_eq!((s.audit_max_bytes, s.audit_files), (65536, 9));
        let flags = [
            ("agent.node", "web01"),
            ("agent.audit_max_bytes", "16"),
            ("agent.audit_files", "0"),
        ];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .agent(None)
            .expect_err("invalid");
        let text = err.to_string();
        for problem in [
            "agent.audit_max_bytes: 16 is too small; use at least 65536",
            "agent.audit_files: 0 must be between 1 and 100",
        ] {
            assert!(text.contains(problem), "{problem} in {text}");
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
        assert_eq!(s.broker.url.first().expose().password(), Some("s3cret"));
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
    fn broker_username_replaces_the_one_in_the_url() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").expect("write");
        let flags = [
            // Every node of a list gets the user and the password.
            (
                "amqp.url",
                "amqp://broker:5672/vogeler,amqp://broker2:5672/vogeler",
            ),
            ("amqp.username", "vogeler-agent-db-2.example.com"),
            ("amqp.password_file", file.to_str().expect("path")),
        ];
        let s = load(&sources(None, &[], &flags))
            .expect("load")
            .agent(Some("db-2.example.com".into()))
            .expect("valid")
            .read_secrets()
            .expect("readable");
        assert_eq!(s.broker.url.len(), 2);
        for url in s.broker.url.iter().map(SecretUrl::expose) {
            assert_eq!(url.username(), "vogeler-agent-db-2.example.com");
            assert_eq!(url.password(), Some("s3cret"));
        }
        // --print-config shows the user in the URL, so its output loads back the same.
        assert!(
            s.to_toml()
                .contains("amqp://vogeler-agent-db-2.example.com:***@broker:5672/vogeler"),
            "{}",
            s.to_toml()
        );
        let flags = [
            ("amqp.url", "amqp://guest:guest@broker/v"),
            ("amqp.username", "web01 user"),
        ];
        let s = load(&sources(None, &[], &flags))
            .expect("load")
            .agent(Some("web01".into()))
            .expect("valid");
        assert_eq!(s.broker.url.first().expose().username(), "web01%20user");
        assert_eq!(s.broker.url.first().expose().password(), Some("guest"));
        let flags = [("amqp.username", "")];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .agent(Some("web01".into()))
            .expect_err("empty user name");
        assert!(err.to_string().contains("amqp.username"), "{err}");
    }

    #[test]
    fn urls_take_a_list_in_toml_the_environment_and_flags() {
        let hosts = |u: &SecretUrls| {
            u.iter()
                .map(|u| u.expose().port().unwrap_or_default())
                .collect::<Vec<_>>()
        };
        let file = "[amqp]\nurl = [\"amqp://guest:guest@127.0.0.1:5681/%2f\", \"amqp://guest:guest@127.0.0.1:5682/%2f\"]\n\
                    [couchdb]\nurl = [\"http://127.0.0.1:25984\", \"http://127.0.0.1:25985\"]\n";
        let s = load(&sources(Some(file), &[], &[]))
            .expect("load")
            .server()
            .expect("valid");
        assert_eq!(hosts(&s.broker.url), [5681, 5682]);
        assert_eq!(hosts(&s.couch.url), [25984, 25985]);
        // Every node gets the heartbeat and frame size.
        assert!(
            s.broker
                .url
                .iter()
                .all(|u| u.expose().query() == Some("heartbeat=10&frame_max=0"))
        );
        // --print-config writes an array back, which loads the same.
        let printed = s.to_toml();
        assert!(
            printed.contains("url = [\"amqp://guest:***@127.0.0.1:5681/%2f?heartbeat=10&frame_max=0\", \"amqp://guest:***@127.0.0.1:5682/%2f?heartbeat=10&frame_max=0\"]"),
            "{printed}"
        );
        assert!(
            printed.contains("url = [\"http://127.0.0.1:25984/\", \"http://127.0.0.1:25985/\"]"),
            "{printed}"
        );
        let env = [(
            "VOGELER_AMQP__URL",
            "amqp://a:5681, amqp://b:5682,amqp://c:5683",
        )];
        let flags = [("couchdb.url", "http://a:1,http://b:2")];
        let s = load(&sources(None, &env, &flags))
            .expect("load")
            .server()
            .expect("valid");
        assert_eq!(hosts(&s.broker.url), [5681, 5682, 5683]);
        assert_eq!(hosts(&s.couch.url), [1, 2]);
        // One URL still prints as a string.
        let one = load(&sources(None, &[], &[("couchdb.url", "http://a:1")]))
            .expect("load")
            .server()
            .expect("valid");
        assert!(
            one.to_toml().contains("url = \"http://a:1/\""),
            "{}",
            one.to_toml()
        );

        // Every problem at once, naming the entry.
        let flags = [
            ("amqp.url", "amqp://a:5681,,http://b:5682"),
            ("couchdb.url", "http://a:1,http://a:1"),
        ];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect_err("invalid");
        let text = err.to_string();
        for problem in [
            "amqp.url (entry 2 of 3): is empty",
            "amqp.url (entry 3 of 3): http://b:5682/ must start with amqp:// or amqps://",
            "couchdb.url: http://a:1/ is listed twice",
        ] {
            assert!(text.contains(problem), "{problem} in {text}");
        }
        let err = load(&sources(Some("[couchdb]\nurl = []\n"), &[], &[]))
            .expect("load")
            .server()
            .expect_err("empty list");
        assert!(err.to_string().contains("couchdb.url"), "{err}");
    }

    #[test]
    fn heartbeat_and_frame_max_go_into_the_broker_url_unless_it_sets_them() {
        let query = |s: &BrokerSettings| {
            s.url
                .first()
                .expose()
                .query()
                .unwrap_or_default()
                .to_string()
        };
        let s = load(&sources(None, &[], &[]))
            .expect("load")
            .agent(Some("web01".into()))
            .expect("valid");
        let q = query(&s.broker);
        assert!(
            q.contains("heartbeat=10") && q.contains("frame_max=16384"),
            "{q}"
        );
        let flags = [
            ("amqp.url", "amqp://h/v?frame_max=131072"),
            ("amqp.frame_max", "8192"),
        ];
        let s = load(&sources(None, &[], &flags))
            .expect("load")
            .agent(Some("web01".into()))
            .expect("valid");
        assert!(query(&s.broker).contains("frame_max=131072"));
        let flags = [("amqp.frame_max", "1024")];
        let err = load(&sources(None, &[], &flags))
            .expect("load")
            .server()
            .expect_err("too small");
        assert!(err.to_string().contains("amqp.frame_max"), "{err}");
        // What agents publish is read with the broker's largest frames, whatever is set.
        let flags = [("amqp.url", "amqp://h/v?frame_max=8192&heartbeat=5")];
        let raw = load(&sources(None, &[], &flags)).expect("load");
        for broker in [
            raw.server().expect("valid").broker,
            raw.runner().expect("valid").broker,
        ] {
            let q = query(&broker);
            assert!(q.contains("frame_max=0") && !q.contains("8192"), "{q}");
            assert!(q.contains("heartbeat=5"), "{q}");
        }
    }

    #[test]
    fn unparsable_url_is_redacted() {
        assert_eq!(redact("amqp://u:pw@@host"), "amqp://***@host");
    }
}
