//! `/healthz` and `/metrics` on an optional local HTTP port (`agent.http_listen`,
//! `server.http_listen`). Every metric name is defined here, so `docs/operations.md` can
//! list them from one place.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::couch::CouchClient;

/// How long `/healthz` waits for the database before calling it down.
const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

/// Whether the broker connection is up, as the program's own connection loop knows it (the
/// AMQP heartbeat notices a dead link within about twice `amqp.heartbeat`).
#[derive(Debug, Clone, Default)]
pub struct BrokerUp(Arc<AtomicBool>);

impl BrokerUp {
    pub fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The server's counters. Cheap to clone; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct ServerMetrics {
    pub broker_up: BrokerUp,
    pub consumed: Counter,
    pub stored: Counter,
    pub batches: Counter,
    pub store_retries: Counter,
    pub dead_lettered: Family<ReasonLabel, Counter>,
    /// Messages from nodes whose key waits for approval or was rejected: acked, not stored.
    pub held: Counter,
    /// Unchanged results about a value the database does not hold: acked, not stored.
    pub unconfirmed: Counter,
    /// Scheduled plugins not stored within twice their interval, over all nodes (polled).
    pub overdue: Gauge,
    /// Messages waiting in the results queue at the last poll (the ingest lag).
    pub queue_messages: Gauge,
    /// Nodes whose stored document cannot be read back, one series each (value 1).
    pub quarantined: Family<NodeLabel, Gauge>,
    pub quarantined_nodes: Gauge,
}

/// A program's counters, as `/metrics` and `/healthz` need them.
pub trait Metrics {
    /// Add every metric to `r`.
    fn register(&self, r: &mut Registry);
    /// The program's own view of its broker connection.
    fn broker_up(&self) -> &BrokerUp;
}

impl Metrics for ServerMetrics {
    fn broker_up(&self) -> &BrokerUp {
        &self.broker_up
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("vogeler_server");
        r.register(
            "messages_consumed",
            "Messages taken from the results queue",
            self.consumed.clone(),
        );
        r.register(
            "results_stored",
            "Results and announcements written to CouchDB",
            self.stored.clone(),
        );
        r.register(
            "batches",
            "_bulk_docs batches written",
            self.batches.clone(),
        );
        r.register(
            "store_retries",
            "Batch writes retried because the database was unavailable",
            self.store_retries.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages moved to the dead-letter queue, by reason (malformed, wrong_key, refused)",
            self.dead_lettered.clone(),
        );
        r.register(
            "held",
            "Messages from nodes whose key waits for approval (or was rejected): acked, not stored",
            self.held.clone(),
        );
        r.register(
            "unconfirmed",
            "Unchanged results about a value the database does not hold (a new or restored database, a pruned node): acked, not stored; the agent sends the value in full within agent.full_every",
            self.unconfirmed.clone(),
        );
        r.register(
            "overdue_plugins",
            "Scheduled plugins, over all nodes, with no run stored within twice their interval",
            self.overdue.clone(),
        );
        r.register(
            "queue_messages",
            "Messages waiting in the results queue (polled every few seconds)",
            self.queue_messages.clone(),
        );
        r.register(
            "quarantined_nodes",
            "Nodes whose stored document cannot be read back; their results are dead-lettered",
            self.quarantined_nodes.clone(),
        );
        r.register(
            "quarantined",
            "1 for each quarantined node, by node",
            self.quarantined.clone(),
        );
    }
}

impl ServerMetrics {
    /// Show exactly these nodes as quarantined.
    pub fn set_quarantined<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) {
        self.quarantined.clear();
        let mut n = 0;
        for node in nodes {
            self.quarantined
                .get_or_create(&NodeLabel { node: node.into() })
                .set(1);
            n += 1;
        }
        self.quarantined_nodes.set(n);
    }

    pub fn dead_lettered(&self, reason: &str, n: u64) {
        if n > 0 {
            self.dead_lettered
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc_by(n);
        }
    }
}

/// The agent's counters. Cheap to clone; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct AgentMetrics {
    pub broker_up: BrokerUp,
    pub commands_received: Counter,
    pub commands_rejected: Family<ReasonLabel, Counter>,
    pub plugin_runs: Family<PluginLabels, Counter>,
    pub results_published: Counter,
    pub publish_retries: Counter,
}

impl Metrics for AgentMetrics {
    fn broker_up(&self) -> &BrokerUp {
        &self.broker_up
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("vogeler_agent");
        r.register(
            "commands_received",
            "Messages taken from this agent's command queue",
            self.commands_received.clone(),
        );
        r.register(
            "commands_rejected",
            "Commands refused, by reason (the audit log's rejection class)",
            self.commands_rejected.clone(),
        );
        r.register(
            "plugin_runs",
            "Plugin runs, by plugin and outcome",
            self.plugin_runs.clone(),
        );
        r.register(
            "results_published",
            "Results published to the broker",
            self.results_published.clone(),
        );
        r.register(
            "publish_retries",
            "Result publishes retried after a broker error",
            self.publish_retries.clone(),
        );
    }
}

impl AgentMetrics {
    /// Count a refused command; returns how many of its class were refused so far.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.commands_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc()
            + 1
    }
    /// Commands refused so far with this class.
    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.commands_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .get()
    }
    pub fn plugin_run(&self, plugin: &str, outcome: &str) {
        self.plugin_runs
            .get_or_create(&PluginLabels {
                plugin: plugin.into(),
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// What `/healthz` checks and `/metrics` reports.
#[derive(Debug)]
struct Observed {
    registry: Registry,
    broker: BrokerUp,
    /// The server's database, pinged on every `/healthz` (the agent has none).
    database: Option<CouchClient>,
}

impl Observed {
    /// The `/healthz` body and whether everything is up.
    async fn health(&self) -> (bool, String) {
        let broker = self.broker.get();
        let mut body = format!("broker: {}\n", if broker { "up" } else { "down" });
        let mut ok = broker;
        if let Some(couch) = &self.database {
            let db = match tokio::time::timeout(DATABASE_PROBE_TIMEOUT, couch.ping()).await {
                Ok(Ok(())) => "up".to_string(),
                Ok(Err(e)) => format!("down ({e})"),
                Err(_) => format!("down (no answer within {DATABASE_PROBE_TIMEOUT:?})"),
            };
            ok &= db == "up";
            body.push_str(&format!("database: {db}\n"));
        }
        (ok, body)
    }

    /// The `/metrics` body, Prometheus text format (OpenMetrics flavour).
    fn metrics(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serve `metrics` (and `/healthz`, pinging `database` when given) on `addr`. Binding
/// happens before this returns, so a taken port is a start-up error; requests are then
/// served in the background until `cancel` fires.
pub async fn serve(
    addr: SocketAddr,
    metrics: &impl Metrics,
    database: Option<CouchClient>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let observed = Arc::new(Observed {
        registry,
        broker: metrics.broker_up().clone(),
        database,
    });
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "serving /healthz and /metrics");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let observed = observed.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let observed = observed.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&observed, req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn respond(observed: &Observed, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => {
            let (ok, body) = observed.health().await;
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain; charset=utf-8", body)
        }
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            observed.metrics(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /healthz or /metrics\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, v);
    }
    response
}
