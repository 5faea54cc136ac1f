//! `[amqp]`: the broker connection and the collective's queues. Every program reads it.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Table;

use super::{
    Problems, UrlList,
    effective::{dur, insert_path, int, read_password},
    url_list_value, validate_urls,
};
use vogeler_proto::{
    duration,
    secret::SecretUrls,
    topology::{AgentQueue, DeadLetterQueue, QueueKind, ResultsQueue, Topology},
};

/// `[amqp]` defaults, quoted by `--help` and the example configs.
pub mod defaults {
    pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    pub const COLLECTIVE: &str = "vogeler";
    pub const AMQP_HEARTBEAT_SECS: u64 = 10;
    pub const AMQP_FRAME_MAX: u32 = 16 * 1024;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmqp {
    /// The broker, or the nodes of a RabbitMQ cluster (tried in order, the next on loss).
    pub url: Option<UrlList>,
    pub collective: Option<String>,
    /// Delete our queues after they have been unused this long (test runs, short-lived fleets).
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub queue_expires: Option<Duration>,
    /// `classic` (default) or `quorum` (replicated; for RabbitMQ clusters).
    pub results_queue_type: Option<String>,
    /// Results the queue holds at most before it refuses publishes.
    pub results_max_length: Option<u64>,
    /// Dead letters kept at most, in messages and in bytes of their bodies; beyond either
    /// the oldest are dropped.
    pub dead_letters_max_length: Option<u64>,
    pub dead_letters_max_bytes: Option<u64>,
    /// AMQP heartbeat: a silent broker link is detected within about twice this.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub heartbeat: Option<Duration>,
    /// Largest AMQP frame, in bytes. The client keeps 32 frames of buffer each way per
    /// connection, so this sets its memory: 16 KiB gives 1 MiB (the broker's default of
    /// 128 KiB would give 8 MiB, most of an idle agent). Bigger messages span frames.
    pub frame_max: Option<u32>,
    /// `classic` (default) or `quorum`: agents' command queues. On a RabbitMQ cluster a
    /// quorum queue survives the loss of its node, so its agent keeps answering.
    pub agent_queue_type: Option<String>,
    /// Commands an offline agent's queue holds at most (more are refused, and the runner
    /// says so).
    pub agent_queue_max_length: Option<u64>,
    /// Commands older than this are dropped from an offline agent's queue.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub agent_queue_max_age: Option<Duration>,
    /// The broker user, used instead of the one in `amqp.url`: each agent has a user of its
    /// own (`<prefix>-agent-<node>`, see `deploy/rabbitmq/setup.sh`), so config management
    /// can share the URL and set the user per node.
    pub username: Option<String>,
    /// A file holding the broker password, used instead of the one in `amqp.url` (so the
    /// URL can live in a shared config and the password in a root-only file).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for `amqps://` (added to the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its PEM private key, for brokers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// What every program needs to reach the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Never empty: programs connect to the first node that answers.
    pub url: SecretUrls,
    pub topology: Topology,
    pub connect_timeout: Duration,
    pub tls: TlsFiles,
    /// `amqp.password_file`, read into `url` by [`ProgramSettings::read_secrets`] at start-up.
    pub password_file: Option<PathBuf>,
}

impl BrokerSettings {
    /// For programs that consume what agents publish (the server, the runner's replies):
    /// take the broker's largest frame whatever `amqp.frame_max` says. RabbitMQ never splits
    /// a message's headers across frames, and anyone holding the agent credential may
    /// publish with the broker's largest frames; headers bigger than the consumer's frame
    /// would cost it its connection, on every redelivery.
    pub fn take_largest_frames(&mut self) {
        // 0 in the tune reply means "whatever the broker offers".
        for u in self.url.iter_mut() {
            u.set_query("frame_max", "0");
        }
    }
}

/// TLS material for `amqps://`, read when connecting (so renewed certificates are picked up
/// at the next reconnect).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, both or neither.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl RawAmqp {
    /// Validate into the broker settings, with the top-level connect timeout.
    pub(super) fn settings(
        &self,
        connect_timeout: Duration,
        p: &mut Problems,
    ) -> Option<BrokerSettings> {
        let mut url = validate_urls(
            p,
            "amqp.url",
            self.url.as_ref(),
            defaults::AMQP_URL,
            &["amqp", "amqps"],
        );
        let heartbeat = self
            .heartbeat
            .unwrap_or(Duration::from_secs(defaults::AMQP_HEARTBEAT_SECS));
        if heartbeat.as_secs() == 0 || heartbeat.as_secs() > 600 {
            p.0.push("amqp.heartbeat: must be between 1s and 10m".into());
        } else if let Some(urls) = url.as_mut() {
            for u in urls.iter_mut() {
                u.set_query_default("heartbeat", &heartbeat.as_secs().to_string());
            }
        }
        let frame_max = self.frame_max.unwrap_or(defaults::AMQP_FRAME_MAX);
        // RabbitMQ refuses frames under 4 KiB; over 1 MiB only costs memory.
        if !(4096..=1024 * 1024).contains(&frame_max) {
            p.0.push(format!(
                "amqp.frame_max: {frame_max} must be between 4096 and 1048576 bytes"
            ));
        } else if let Some(urls) = url.as_mut() {
            for u in urls.iter_mut() {
                u.set_query_default("frame_max", &frame_max.to_string());
            }
        }
        let mut agent_queue = AgentQueue::default();
        if let Some(kind) = &self.agent_queue_type {
            match QueueKind::parse(kind) {
                Ok(k) => agent_queue.kind = k,
                Err(e) => p.0.push(format!("amqp.agent_queue_type: {e}")),
            }
        }
        match self.agent_queue_max_length {
            Some(0) => {
                p.0.push("amqp.agent_queue_max_length: must be at least 1".into())
            }
            Some(n) => agent_queue.max_length = n,
            None => {}
        }
        match self.agent_queue_max_age {
            Some(d) if d < Duration::from_secs(1) => {
                p.0.push("amqp.agent_queue_max_age: must be at least 1s".into())
            }
            Some(d) => agent_queue.max_age = d,
            None => {}
        }
        if self.password_file.is_some()
            && let Some(urls) = &url
            && urls
                .iter()
                .any(|u| u.expose().cannot_be_a_base() || u.expose().host().is_none())
        {
            p.0.push("amqp.password_file: amqp.url cannot carry a password".into());
        }
        if let Some(name) = &self.username {
            if name.is_empty() || name.chars().any(char::is_control) {
                p.0.push(format!(
                    "amqp.username: {name:?} must be a non-empty user name without control characters"
                ));
            } else if let Some(urls) = url.as_mut()
                && !urls.iter_mut().all(|u| u.set_username(name))
            {
                p.0.push("amqp.username: amqp.url cannot carry a user name".into());
            }
        }
        let collective = validate_collective(p, self.collective.as_deref());
        let mut results = ResultsQueue::default();
        if let Some(kind) = &self.results_queue_type {
            match QueueKind::parse(kind) {
                Ok(k) => results.kind = k,
                Err(e) => p.0.push(format!("amqp.results_queue_type: {e}")),
            }
        }
        match self.results_max_length {
            Some(0) => {
                p.0.push("amqp.results_max_length: must be at least 1".into())
            }
            Some(n) => results.max_length = n,
            None => {}
        }
        let mut dead_letters = DeadLetterQueue::default();
        match self.dead_letters_max_length {
            Some(0) => {
                p.0.push("amqp.dead_letters_max_length: must be at least 1".into())
            }
            Some(n) => dead_letters.max_length = n,
            None => {}
        }
        match self.dead_letters_max_bytes {
            Some(n) if n < 1024 * 1024 => p.0.push(format!(
                "amqp.dead_letters_max_bytes: {n} is too small; use at least 1048576 (1 MiB)"
            )),
            Some(n) => dead_letters.max_bytes = n,
            None => {}
        }
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                p.0.push("amqp.cert_file and amqp.key_file: give both (a client certificate and its key) or neither".into());
                None
            }
        };
        let tls = TlsFiles {
            ca_file: self.ca_file.clone(),
            client,
        };
        if let Some(u) = url.iter().flatten().find(|u| u.expose().scheme() == "amqp")
            && tls != TlsFiles::default()
        {
            p.0.push(format!(
                "amqp.ca_file/cert_file/key_file are set but amqp.url {u} is not TLS: use amqps://"
            ));
        }
        Some(BrokerSettings {
            tls,
            password_file: self.password_file.clone(),
            url: url?,
            topology: Topology::new(collective?, self.queue_expires)
                .with_results_queue(results)
                .with_agent_queue(agent_queue)
                .with_dead_letters(dead_letters),
            connect_timeout,
        })
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

impl BrokerSettings {
    pub(super) fn read_secrets(&mut self, problems: &mut Vec<String>) {
        if let Some(file) = &self.password_file
            && let Some(pw) = read_password(problems, "amqp.password_file", file)
            && !self.url.iter_mut().all(|u| u.set_password(pw.expose()))
        {
            problems.push("amqp.password_file: amqp.url cannot carry a password".into());
        }
    }

    pub(super) fn to_table(&self) -> Table {
        let t = &self.topology;
        let mut amqp = Table::new();
        amqp.insert("url".into(), url_list_value(&self.url));
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
            "dead_letters_max_length".into(),
            int(t.dead_letter_bounds().max_length),
        );
        amqp.insert(
            "dead_letters_max_bytes".into(),
            int(t.dead_letter_bounds().max_bytes),
        );
        amqp.insert(
            "agent_queue_type".into(),
            t.agent_queue_bounds().kind.name().into(),
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
