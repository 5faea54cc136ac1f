//! `[server]`: how `vogeler-server` drains the results queue and keeps the database, and its composition with `[amqp]`, `[couchdb]` and `[log]`.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use toml::Table;

use super::{
    BrokerSettings, ConfigError, CouchSettings, Problems, ProgramSettings, RawConfig,
    defaults::LOG_LEVEL,
    effective::{dur, finish, int, render},
    validate_level, validate_listen,
};
use vogeler_proto::{duration, enrollment::Mode as Enrollment};

/// `[server]` defaults, quoted by `--help` and the example configs.
pub mod defaults {
    pub const SERVER_PREFETCH: u16 = 512;
    pub const SERVER_BATCH_SIZE: usize = 256;
    pub const SERVER_STALE_AFTER_SECS: u64 = 24 * 3600;
    pub const SERVER_HISTORY_RETENTION_SECS: u64 = 90 * 24 * 3600;
    /// CouchDB's own default `max_document_size`.
    pub const SERVER_MAX_DOCUMENT_BYTES: usize = vogeler_proto::limits::COUCHDB_MAX_DOCUMENT_BYTES;
    /// Bytes of results the server holds at once (received and not yet settled).
    pub const SERVER_MAX_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
    /// How a new node's first key is trusted: `open` (pinned on first contact) or `approve`.
    pub const SERVER_ENROLLMENT: &str = "open";
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
    /// The largest node document the server writes: keep it at or under CouchDB's
    /// `[couchdb] max_document_size`. A result that would make a document larger is refused
    /// with that reason instead of being retried for ever.
    pub max_document_bytes: Option<usize>,
    /// The most bytes of results the server holds at once, received and not yet stored:
    /// the broker's prefetch window is sized so that even results of the largest size a
    /// node may send stay within it.
    pub max_in_flight_bytes: Option<usize>,
    /// `open`: a new node's first key is pinned on first contact. `approve`: it waits until
    /// `vogeler-runner nodes accept NODE`.
    pub enrollment: Option<String>,
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
    pub max_document_bytes: usize,
    pub max_in_flight_bytes: usize,
    pub enrollment: Enrollment,
    pub log_level: String,
}

impl ServerSettings {
    /// The prefetch window the server consumes with: `prefetch`, lowered so that a window
    /// of results of the largest size a node may send fits in half of `max_in_flight_bytes`
    /// (RabbitMQ counts prefetch in messages only, and hands over the whole window at once).
    /// The other half is for decoding: see [`ServerSettings::decode_budget`].
    pub fn prefetch_window(&self) -> u16 {
        let by_bytes = self.max_in_flight_bytes / 2 / vogeler_proto::limits::MAX_MESSAGE_BYTES;
        self.prefetch
            .min(u16::try_from(by_bytes).unwrap_or(u16::MAX))
            .max(1)
    }

    /// Bytes the server may hold decoded at once (results being merged and written).
    pub fn decode_budget(&self) -> usize {
        self.max_in_flight_bytes / 2
    }

    /// Results written in one request: never more than the prefetch window holds.
    pub fn batch_window(&self) -> usize {
        self.batch_size.min(usize::from(self.prefetch_window()))
    }
}

impl RawConfig {
    /// Settings for `vogeler-server`.
    pub fn server(&self) -> Result<ServerSettings, ConfigError> {
        let mut p = Problems::default();
        // It reads what agents publish: see BrokerSettings::take_largest_frames.
        let broker = self.broker(&mut p).map(|mut b| {
            b.take_largest_frames();
            b
        });
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
        let max_document_bytes = self
            .server
            .max_document_bytes
            .unwrap_or(defaults::SERVER_MAX_DOCUMENT_BYTES);
        if max_document_bytes < 64 * 1024 {
            p.0.push(format!(
                "server.max_document_bytes: {max_document_bytes} is too small for a node document; use at least 65536 (CouchDB's default is {})",
                defaults::SERVER_MAX_DOCUMENT_BYTES
            ));
        }
        let max_in_flight_bytes = self
            .server
            .max_in_flight_bytes
            .unwrap_or(defaults::SERVER_MAX_IN_FLIGHT_BYTES);
        let least = 2 * vogeler_proto::limits::MAX_MESSAGE_BYTES;
        if max_in_flight_bytes < least {
            p.0.push(format!(
                "server.max_in_flight_bytes: {max_in_flight_bytes} is too small: it must hold twice the largest result a node may send; use at least {least}"
            ));
        }
        let enrollment = match Enrollment::parse(
            self.server
                .enrollment
                .as_deref()
                .unwrap_or(defaults::SERVER_ENROLLMENT),
        ) {
            Ok(mode) => mode,
            Err(e) => {
                p.0.push(format!("server.enrollment: {e}"));
                Enrollment::default()
            }
        };
        let log_level = validate_level(&mut p, &self.log, LOG_LEVEL);
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
                max_document_bytes,
                max_in_flight_bytes,
                enrollment,
                log_level,
            })
        })
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
        s.insert("max_document_bytes".into(), int(self.max_document_bytes));
        s.insert("max_in_flight_bytes".into(), int(self.max_in_flight_bytes));
        s.insert("enrollment".into(), self.enrollment.name().into());
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
