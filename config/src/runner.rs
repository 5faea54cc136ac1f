//! `[runner]`: how long `vogeler-runner` waits, how long commands live, which key signs them, and its composition with `[amqp]`, `[couchdb]` and `[log]`.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Table;

use super::{
    BrokerSettings, ConfigError, CouchSettings, Problems, ProgramSettings, RawConfig,
    defaults::RUNNER_LOG_LEVEL,
    effective::{dur, finish, insert_path, render},
    validate_level,
};
use vogeler_proto::duration;

/// `[runner]` defaults, quoted by `--help` and the example configs.
pub mod defaults {
    pub const SIGNING_KEY: &str = "/etc/vogeler/keys/runner.key";
    pub const RUNNER_TIMEOUT_SECS: u64 = 10;
    pub const RUNNER_TTL_SECS: u64 = 3600;
    pub const RUNNER_FRESHNESS_SECS: u64 = 24 * 3600;
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

impl RawConfig {
    /// Settings for `vogeler-runner`.
    pub fn runner(&self) -> Result<RunnerSettings, ConfigError> {
        let mut p = Problems::default();
        // It reads what agents publish: see BrokerSettings::take_largest_frames.
        let broker = self.broker(&mut p).map(|mut b| {
            b.take_largest_frames();
            b
        });
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
        let log_level = validate_level(&mut p, &self.log, RUNNER_LOG_LEVEL);
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
