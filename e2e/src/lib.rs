//! Test support for Vogeler's integration and end-to-end tests.
//!
//! Every test gets its own [`TestStack`]: a unique collective (so its exchanges and queues are
//! private, and expire after use) and a unique CouchDB database (deleted when the stack is
//! dropped), on the real broker and database this machine runs. A missing server fails the
//! test loudly; nothing here mocks the broker.
//!
//! - [`TestStack`]: names, settings and direct access for assertions.
//! - [`spawn_agent`], [`spawn_server`]: the real `run()` functions in-process.
//! - [`FaultProxy`]: a TCP proxy that can cut a connection, to simulate outages without
//!   stopping the shared servers.
//! - [`tls`]: a throwaway CA and a TLS-terminating proxy.
//! - [`wait_for`]: poll a condition with a deadline.

pub mod programs;
pub mod proxy;
pub mod tls;

use std::{future::Future, path::Path, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vogeler_config::{self as config, AgentSettings, RunnerSettings, ServerSettings, Sources};
use vogeler_core::{
    couch::CouchClient,
    observe::{AgentMetrics, ServerMetrics},
};
use vogeler_proto::{
    document::{Node, NodeDocument},
    names::NodeName,
    secret::{SecretUrl, SecretUrls},
    signing::{PrivateKey, Purpose},
};

pub use proxy::FaultProxy;

/// `host:port` of a server URL, for a proxy in front of it.
pub fn upstream(url: &str) -> String {
    let u = url::Url::parse(url).expect("url");
    format!(
        "{}:{}",
        u.host_str().expect("host"),
        u.port_or_known_default().expect("port")
    )
}

/// `url` pointed at another scheme, host and port (a proxy in front of the server), keeping
/// its credentials and path: Apache CouchDB refuses anonymous requests.
pub fn retarget(url: &str, scheme: &str, host: &str, port: u16) -> String {
    let u = url::Url::parse(url).expect("url");
    let auth = match (u.username(), u.password()) {
        ("", _) => String::new(),
        (user, Some(pw)) => format!("{user}:{pw}@"),
        (user, None) => format!("{user}@"),
    };
    format!("{scheme}://{auth}{host}:{port}{}", u.path())
}

/// Where the shared test servers listen; override with the usual `VOGELER_*` variables.
/// A test URL variable, one URL or a comma-separated list (`scripts/cluster.sh env`).
pub fn url_list(raw: &str) -> SecretUrls {
    let urls = vogeler_proto::secret::split_url_list(raw)
        .into_iter()
        .map(|u| SecretUrl::parse(u).unwrap_or_else(|e| panic!("test URL {u:?}: {e}")))
        .collect();
    SecretUrls::new(urls).expect("a test URL")
}

pub fn amqp_url() -> String {
    std::env::var("VOGELER_TEST_AMQP_URL")
        .unwrap_or_else(|_| config::defaults::AMQP_URL.to_string())
}

/// The test database, with the admin's credentials.
///
/// Without `VOGELER_TEST_COUCHDB_URL`, the admin password `scripts/stack.sh up` generated is
/// used (Apache CouchDB refuses anonymous requests), so a plain `cargo test` works after it.
pub fn couchdb_url() -> String {
    if let Ok(url) = std::env::var("VOGELER_TEST_COUCHDB_URL") {
        return url;
    }
    let stack_dir = std::env::var_os("VOGELER_STACK_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/vogeler-stack"))
        });
    let password = stack_dir
        .and_then(|d| std::fs::read_to_string(d.join("couchdb-admin.password")).ok())
        .map(|p| p.trim().to_string());
    match password {
        // On the stack's own port, so the password goes to no other listener.
        Some(pw) => format!(
            "http://admin:{pw}@127.0.0.1:{}",
            std::env::var("VOGELER_STACK_COUCHDB_PORT").unwrap_or_else(|_| "5984".into())
        ),
        None => config::defaults::COUCHDB_URL.to_string(),
    }
}

/// How long our test queues live after their last use: long enough for any test, short
/// enough that a crashed run leaves nothing behind for long.
pub const QUEUE_EXPIRES: &str = "120s";

/// One test's private slice of the shared broker and database.
#[derive(Debug)]
pub struct TestStack {
    pub collective: String,
    pub database: String,
    pub amqp_url: String,
    pub couchdb_url: String,
    pub couch: CouchClient,
    /// `runner.key`/`runner.pub` (the runner key every agent of this stack trusts) and
    /// `state/`, the agents' state directories.
    pub keys: tempfile::TempDir,
    /// The key this stack's runner signs with.
    pub runner_key: PrivateKey,
    /// A key for tests that publish as an agent would, when no node is named (see
    /// [`TestStack::key_for`] for a node's own key).
    pub agent_key: PrivateKey,
}

impl TestStack {
    /// Check both servers answer (panicking with how to start them if not) and pick names.
    pub async fn new() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let amqp_url = amqp_url();
        let couchdb_url = couchdb_url();
        let urls = url_list(&amqp_url);
        if let Err(e) = vogeler_core::amqp::connect_any(&urls, "vogeler-test-probe").await {
            panic!(
                "RabbitMQ is not reachable at {urls}: {e}\nstart the stack with: scripts/stack.sh up"
            );
        }
        let couch = CouchClient::with_ca(&url_list(&couchdb_url), None, None).expect("http client");
        if let Err(e) = couch.ping().await {
            panic!(
                "CouchDB is not reachable at {}: {e}\nstart the stack with: scripts/stack.sh up",
                url_list(&couchdb_url)
            );
        }
        let keys = tempfile::tempdir().expect("key directory");
        vogeler_runner::inventory::keygen(keys.path(), "test").expect("runner key");
        let runner_key = vogeler_core::keyfile::load_private(&keys.path().join("runner.key"))
            .expect("runner key");
        Self {
            collective: format!("test-{}", &id[..12]),
            database: format!("test_{}", &id[..12]),
            amqp_url,
            couchdb_url,
            couch,
            keys,
            runner_key,
            agent_key: PrivateKey::generate().expect("agent key"),
        }
    }

    /// The key a test signs results and announcements of `node` with: one per node (one
    /// key serves exactly one node name), the same every time it is asked.
    pub fn key_for(&self, node: &str) -> PrivateKey {
        use sha2::Digest;
        let seed = sha2::Sha256::digest(format!("{}/{node}", self.collective));
        PrivateKey::from_seed(seed.into())
    }

    /// The key a raw body is signed with: its node's ([`TestStack::key_for`]) when it decodes
    /// as a result or announcement, else the stack's agent key.
    fn key_for_body(&self, body: &[u8]) -> PrivateKey {
        match vogeler_proto::wire::decode(body) {
            Ok(vogeler_proto::wire::Message::Result(r)) => self.key_for(r.node.as_str()),
            Ok(vogeler_proto::wire::Message::Announce(a)) => self.key_for(a.node.as_str()),
            _ => self.agent_key.clone(),
        }
    }

    /// The public key file every agent of this stack trusts.
    pub fn authorized_keys(&self) -> std::path::PathBuf {
        self.keys.path().join("runner.pub")
    }

    /// The base state directory of this stack's agents.
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.keys.path().join("state")
    }

    /// Ids of the history database's entries (design documents left out).
    pub async fn history_ids(&self) -> Vec<String> {
        self.couch
            .all_ids(&format!("{}_history", self.database))
            .await
            .expect("history")
            .unwrap_or_default()
            .into_iter()
            .filter(|id| !id.starts_with("_design/"))
            .collect()
    }

    /// An agent queue's consumers and ready messages, if the queue exists.
    pub async fn agent_queue_state(&self, node: &str) -> Option<(u32, u32)> {
        let (conn, ch) = self.publisher("test-probe").await;
        let opts = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queue = self.topology().agent_queue(&self::node(node));
        let state = ch
            .queue_declare(queue.as_str().into(), opts, Default::default())
            .await
            .ok()
            .map(|q| (q.consumer_count(), q.message_count()));
        let _ = conn.close(200, "done".into()).await;
        state
    }

    /// Wait until an agent consumes from its queue (so its bindings exist: commands
    /// published before that are unroutable).
    pub async fn wait_consuming(&self, node: &str) {
        wait_for(
            &format!("agent {node} consuming"),
            Duration::from_secs(20),
            || async {
                self.agent_queue_state(node)
                    .await
                    .is_some_and(|(c, _)| c > 0)
            },
        )
        .await;
    }

    /// The audit lines of one of this stack's agents with this `event` (`accepted`,
    /// `rejected`, `finished`), parsed; a line still being written is not one yet.
    pub fn audit_events(&self, node: &str, event: &str) -> Vec<serde_json::Value> {
        self.audit_log(node)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// The audit log of one of this stack's agents.
    pub fn audit_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.state_dir().join(node).join(vogeler_agent::audit::FILE))
            .unwrap_or_default()
    }

    /// The first broker node's URL (tests that put a proxy in front of one node).
    pub fn amqp_first(&self) -> String {
        url_list(&self.amqp_url).first().expose().to_string()
    }

    /// The first database node's URL, with the admin's credentials.
    pub fn couch_first(&self) -> String {
        url_list(&self.couchdb_url).first().expose().to_string()
    }

    /// Config sources for this stack, exactly as flags would give them (no environment).
    pub fn sources(&self) -> Sources {
        let mut s = Sources {
            env: Some(Default::default()),
            ..Default::default()
        };
        s.set("amqp.url", Some(&self.amqp_url))
            .set("amqp.collective", Some(&self.collective))
            .set("amqp.queue_expires", Some(QUEUE_EXPIRES))
            .set("couchdb.url", Some(&self.couchdb_url))
            .set("couchdb.database", Some(&self.database))
            .set("connect_timeout", Some("10"))
            .set("log.level", Some("warn"))
            .set(
                "agent.authorized_keys",
                Some(self.authorized_keys().display()),
            )
            .set("agent.state_dir", Some(self.state_dir().display()))
            .set(
                "runner.signing_key",
                Some(self.keys.path().join("runner.key").display()),
            );
        s
    }

    pub fn agent_settings(&self, node: &str, plugin_dir: &Path) -> AgentSettings {
        let mut s = self.sources();
        s.set("agent.node", Some(node))
            .set("agent.plugin_dir", Some(plugin_dir.display()));
        config::load(&s)
            .expect("load")
            .agent(None)
            .expect("agent settings")
    }

    pub fn server_settings(&self) -> ServerSettings {
        config::load(&self.sources())
            .expect("load")
            .server()
            .expect("server settings")
    }

    pub fn runner_settings(&self, timeout: &str) -> RunnerSettings {
        let mut s = self.sources();
        s.set("runner.timeout", Some(timeout));
        config::load(&s)
            .expect("load")
            .runner()
            .expect("runner settings")
    }

    /// Server settings that reach CouchDB through a fault proxy the test can cut.
    pub async fn server_behind_proxy(&self) -> (FaultProxy, ServerSettings) {
        let proxy = FaultProxy::start(&upstream(&self.couch_first())).await;
        let addr = proxy.addr();
        let mut sources = self.sources();
        sources.set(
            "couchdb.url",
            Some(retarget(
                &self.couch_first(),
                "http",
                &addr.ip().to_string(),
                addr.port(),
            )),
        );
        let settings = config::load(&sources)
            .expect("load")
            .server()
            .expect("server settings");
        (proxy, settings)
    }

    /// A connection and a confirming channel on this stack's broker, with the shared
    /// topology declared: what a test needs to publish as an agent or a runner would.
    pub async fn publisher(&self, name: &str) -> (lapin::Connection, lapin::Channel) {
        let conn = vogeler_core::amqp::connect_any(&url_list(&self.amqp_url), name)
            .await
            .expect("connect");
        vogeler_core::amqp::declare::shared(&self.topology(), &conn)
            .await
            .expect("declare");
        let ch = vogeler_core::amqp::publisher_channel(&conn)
            .await
            .expect("channel");
        (conn, ch)
    }

    /// Publish raw bytes to `exchange` the way a broken client would, each confirmed by the
    /// broker: signed with the stack's runner key (commands exchange) or agent key (results
    /// exchange), so what is tested is what lies beyond the signature check.
    pub async fn publish_raw(&self, exchange: &str, key: &str, bodies: &[&[u8]]) {
        let commands = exchange == self.topology().commands_exchange();
        let (conn, ch) = self.publisher("test-raw").await;
        for body in bodies {
            let headers = if commands {
                vogeler_core::amqp::signature_headers(&self.runner_key, Purpose::Command, body)
            } else {
                vogeler_core::amqp::signature_headers(
                    &self.key_for_body(body),
                    Purpose::Agent,
                    body,
                )
            };
            publish_bytes(&ch, exchange, key, body, Some(headers)).await;
        }
        let _ = conn.close(200, "done".into()).await;
    }

    /// The topology every program of this stack declares.
    pub fn topology(&self) -> vogeler_proto::topology::Topology {
        self.server_settings().broker.topology
    }

    /// The node document as stored, if any.
    pub async fn document(&self, node: &str) -> Option<NodeDocument> {
        self.couch
            .get(&self.database, node)
            .await
            .expect("read node document")
    }

    /// A node as readers see it: its document with its freshness document (last seen,
    /// confirmations) folded in by [`Node::plugin`] and friends.
    pub async fn node(&self, node: &str) -> Option<Node> {
        let doc = self.document(node).await?;
        let name = vogeler_proto::names::NodeName::new(node).expect("node name");
        let fresh: Option<serde_json::Value> = self
            .couch
            .get(&self.database, &vogeler_proto::fresh::fresh_id(&name))
            .await
            .expect("read freshness document");
        Some(Node::from_parts(
            doc,
            fresh.map(|f| vogeler_proto::fresh::FreshDocument::from_value(&name, &f)),
        ))
    }

    /// Ids of every node document (and other documents of the node database, such as
    /// quarantine flags), without the nodes' freshness documents.
    pub async fn node_ids(&self) -> Vec<String> {
        self.couch
            .all_ids(&self.database)
            .await
            .expect("list documents")
            .unwrap_or_default()
            .into_iter()
            .filter(|id| vogeler_proto::fresh::node_of_id(id).is_none())
            .collect()
    }

    /// Wait until these nodes have documents (they announced themselves to the server).
    pub async fn wait_registered(&self, nodes: &[&str]) {
        wait_for(
            &format!("nodes {nodes:?} registered"),
            Duration::from_secs(20),
            || async {
                let ids = self.node_ids().await;
                nodes.iter().all(|n| ids.iter().any(|i| i == n))
            },
        )
        .await;
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        // Drop cannot await; a short-lived runtime on its own thread deletes the database. It
        // needs its own client: pooled connections belong to the test's runtime.
        let url = self.couchdb_url.clone();
        let db = self.database.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if let Ok(couch) = CouchClient::with_ca(&url_list(&url), None, None) {
                let _ = rt.block_on(couch.delete_database(&db));
                let _ = rt.block_on(couch.delete_database(&format!("{db}_history")));
                let _ = rt.block_on(couch.delete_database(&format!("{db}_enrollment")));
            }
        })
        .join();
    }
}

/// Publish one body with optional headers and wait for the broker's confirm.
pub async fn publish_bytes(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    headers: Option<lapin::types::FieldTable>,
) {
    let mut props = lapin::BasicProperties::default();
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    let confirm = ch
        .basic_publish(exchange.into(), key.into(), Default::default(), body, props)
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker refused a message");
}

/// A program running in-process; cancelled when dropped.
#[derive(Debug)]
pub struct Running<E> {
    pub cancel: CancellationToken,
    pub task: Option<JoinHandle<Result<(), E>>>,
}

impl<E> Running<E> {
    /// Ask it to stop and wait until it did.
    pub async fn stop(mut self) -> Result<(), E> {
        self.cancel.cancel();
        let task = self.task.take().expect("task");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("program did not stop within 20 s of cancellation")
            .expect("program task panicked")
    }
}

impl<E> Drop for Running<E> {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn spawn_agent(settings: AgentSettings) -> Running<vogeler_agent::AgentError> {
    spawn_agent_with(settings, AgentMetrics::default())
}

/// An agent counting into `metrics`.
pub fn spawn_agent_with(
    settings: AgentSettings,
    metrics: AgentMetrics,
) -> Running<vogeler_agent::AgentError> {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(vogeler_agent::run_with(settings, cancel.clone(), metrics));
    Running {
        cancel,
        task: Some(task),
    }
}

pub fn spawn_server(settings: ServerSettings) -> Running<vogeler_server::ServerError> {
    spawn_server_with(settings, ServerMetrics::default())
}

/// A server counting into `metrics`.
pub fn spawn_server_with(
    settings: ServerSettings,
    metrics: ServerMetrics,
) -> Running<vogeler_server::ServerError> {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(vogeler_server::run_with(settings, cancel.clone(), metrics));
    Running {
        cancel,
        task: Some(task),
    }
}

/// Run `plugin` on the `nodes` expression (as `-n` takes it) through the real runner code.
pub async fn ask(
    stack: &TestStack,
    plugin: &str,
    nodes: &str,
    timeout: &str,
) -> vogeler_runner::Report {
    ask_with(stack, plugin, nodes, timeout, |_| {}).await
}

/// [`ask`], with the query adjusted first (batches, `--cached`, TTL).
pub async fn ask_with(
    stack: &TestStack,
    plugin: &str,
    nodes: &str,
    timeout: &str,
    adjust: impl FnOnce(&mut vogeler_runner::Query),
) -> vogeler_runner::Report {
    ask_using(&stack.runner_settings(timeout), plugin, nodes, adjust).await
}

/// Run `plugin` on `nodes` with these runner settings (another signing key, TLS, ...).
pub async fn ask_using(
    settings: &RunnerSettings,
    plugin: &str,
    nodes: &str,
    adjust: impl FnOnce(&mut vogeler_runner::Query),
) -> vogeler_runner::Report {
    let mut q = vogeler_runner::Query {
        plugin: vogeler_proto::names::PluginName::new(plugin).expect("plugin"),
        nodes: vogeler_runner::target::parse(nodes, &vogeler_runner::target::Files)
            .expect("node set"),
        nodes_text: nodes.to_string(),
        timeout: settings.timeout,
        ttl: settings.ttl,
        batch: None,
        cached: None,
    };
    adjust(&mut q);
    vogeler_runner::query(settings, &q, &CancellationToken::new(), &mut |_| {})
        .await
        .expect("query")
}

/// A plugin named `canary` that appends the request id of each run to `marker`, so that
/// "it ran" is observed, not inferred.
pub fn canary_plugin(marker: &Path) -> String {
    format!(
        "name = \"canary\"\ncommand = [\"sh\", \"-c\", \"echo $VOGELER_REQUEST_ID >> {}\"]\nformat = \"lines\"\n",
        marker.display()
    )
}

/// A plugin that logs `start <ns>` and `end <ns>` lines around a 0.3 s sleep, to measure
/// how many runs overlap.
pub fn busy_plugin(log: &Path) -> String {
    format!(
        "name = \"busy\"\ncommand = [\"sh\", \"-c\", \"echo start $(date +%s%N) >> {0}; sleep 0.3; echo end $(date +%s%N) >> {0}\"]\nformat = \"lines\"\n",
        log.display()
    )
}

/// The most runs in progress at once in a [`busy_plugin`] log, and how many runs it holds.
pub fn peak_overlap(log: &str) -> (usize, usize) {
    let mut events: Vec<(u128, i32)> = log
        .lines()
        .map(|l| {
            let (kind, t) = l.split_once(' ').expect("event");
            (
                t.parse().expect("time"),
                if kind == "start" { 1 } else { -1 },
            )
        })
        .collect();
    // Ends sort before starts at the same instant.
    events.sort();
    let (mut running, mut peak) = (0i32, 0i32);
    for (_, d) in &events {
        running += d;
        peak = peak.max(running);
    }
    (usize::try_from(peak).unwrap_or(0), events.len() / 2)
}

/// A plugin directory with the given files (name, TOML body).
pub fn plugin_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("plugin dir");
    for (name, body) in files {
        std::fs::write(dir.path().join(name), body).expect("write plugin file");
    }
    dir
}

/// The `hello` plugin the README uses.
pub const HELLO: &str =
    "name = \"hello\"\ncommand = [\"printf\", \"alpha\\nbeta\\n\"]\nformat = \"lines\"\n";

/// Poll `check` every 50 ms until it holds; panic naming `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A valid node name, for tests.
pub fn node(name: &str) -> NodeName {
    NodeName::new(name).expect("node name")
}
