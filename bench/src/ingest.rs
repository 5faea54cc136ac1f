//! Ingest: how fast the server stores realistic results, next to how fast the same database
//! takes raw `_bulk_docs` writes of documents of the same size, measured in the same run.

use std::time::Instant;

use anyhow::Result;
use chrono::Utc;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vogeler_config::{self as config, BrokerSettings, Sources};
use vogeler_core::{amqp, couch::CouchClient};
use vogeler_proto::{
    document::NodeDocument,
    names::{NodeName, PluginName},
    signing::{PrivateKey, Purpose},
    topology::Topology,
    wire::{self, Message, Outcome, PluginResult},
};

use crate::Stack;

/// What the ingest benchmark stores.
#[derive(Debug, Clone, Copy)]
pub struct Ingest {
    pub results: usize,
    pub packages: usize,
}

pub fn packages(n: usize, seed: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"name": format!("package-{i:04}"), "version": format!("{}.{}-{}", i % 7, seed % 13, i % 3), "arch": "amd64", "status": "installed"}))
            .collect(),
    )
}

fn sources(cli: &Stack, collective: &str, db: &str) -> Sources {
    let mut s = Sources {
        env: Some(Default::default()),
        ..Default::default()
    };
    s.set("amqp.url", Some(&cli.amqp_url))
        .set("amqp.collective", Some(collective))
        .set("amqp.queue_expires", Some("120s"))
        .set("couchdb.url", Some(&cli.couchdb_url))
        .set("couchdb.database", Some(db))
        .set("log.level", Some("warn"));
    s
}

/// How results meet the server in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every result is queued first, then the server starts and drains the queue: the
    /// server's own storing rate (its start-up, about 0.1 s, included).
    Drain,
    /// The server is up and idle; results are published as agents would, while it stores
    /// them: the broker's persisting of each message competes for the same two cores.
    Live,
}

/// One realistic `dpkg` result for node `name`.
fn result_message(
    ing: Ingest,
    n: usize,
    name: String,
    now: chrono::DateTime<Utc>,
) -> Result<Message> {
    Ok(Message::Result(PluginResult {
        request_id: Uuid::new_v4(),
        node: NodeName::new(name)?,
        plugin: PluginName::new("dpkg")?,
        outcome: Outcome::Ok,
        value: Some(packages(ing.packages, n)),
        truncated: false,
        collected_at: now,
        duration_ms: 10,
        agent_version: "bench".into(),
        scheduled: None,
    }))
}

/// `ing.results` encoded results for nodes `bench00000`..., each with the key of its node
/// that signs it (results are signed as agents sign them: verifying is part of the server's
/// work, and one key serves one node).
fn result_bodies(ing: Ingest) -> Result<Vec<(PrivateKey, Vec<u8>)>> {
    let now = Utc::now();
    (0..ing.results)
        .map(|n| {
            let body = wire::encode(&result_message(ing, n, format!("bench{n:05}"), now)?);
            Ok((PrivateKey::generate()?, body))
        })
        .collect()
}

/// Publish signed bodies back to back, then wait for every confirm.
/// Publish one message body to the results exchange, persistent and signed by `key` as an
/// agent signs it; the caller awaits the broker's confirm.
pub async fn publish_signed(
    ch: &lapin::Channel,
    topology: &Topology,
    key: &PrivateKey,
    routing_key: &str,
    body: &[u8],
) -> Result<lapin::PublisherConfirm> {
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(amqp::signature_headers(key, Purpose::Agent, body));
    Ok(ch
        .basic_publish(
            topology.results_exchange().as_str().into(),
            routing_key.into(),
            Default::default(),
            body,
            props,
        )
        .await?)
}

async fn publish_bodies(
    ch: &lapin::Channel,
    topology: &Topology,
    bodies: &[(PrivateKey, Vec<u8>)],
) -> Result<()> {
    let mut confirms = Vec::with_capacity(bodies.len());
    for (key, body) in bodies {
        confirms.push(publish_signed(ch, topology, key, "result.bench", body).await?);
    }
    for c in confirms {
        anyhow::ensure!(c.await?.is_ack(), "the broker refused a result");
    }
    Ok(())
}

/// Publish `ing.results` realistic results to a running server's collective.
pub async fn publish_results(broker: &BrokerSettings, ing: Ingest) -> Result<()> {
    let conn = amqp::connect_any(&broker.url, "vogeler-bench").await?;
    let ch = amqp::publisher_channel(&conn).await?;
    let bodies = result_bodies(ing)?;
    publish_bodies(&ch, &broker.topology, &bodies).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Results per second through the server, timed until the last result is stored.
pub async fn server_rate(cli: &Stack, ing: Ingest, mode: Mode) -> Result<f64> {
    let id = Uuid::new_v4().simple().to_string();
    let (collective, db) = (format!("bench-{}", &id[..8]), format!("bench_{}", &id[..8]));
    let settings = config::load(&sources(cli, &collective, &db))?.server()?;
    let couch = CouchClient::with_ca(&settings.couch.url, None, None)?;
    let topology = settings.broker.topology.clone();
    let conn = amqp::connect_any(&settings.broker.url, "vogeler-bench").await?;
    amqp::declare::server(&topology, &conn).await?;
    let ch = amqp::publisher_channel(&conn).await?;
    let bodies = result_bodies(ing)?;
    let sentinel_key = PrivateKey::generate()?;
    let result = |n: usize, name: String| result_message(ing, n, name, Utc::now());
    let publish_all = publish_bodies(&ch, &topology, &bodies);

    let cancel = CancellationToken::new();
    let (server, started) = match mode {
        Mode::Drain => {
            publish_all.await?;
            let started = Instant::now();
            (
                tokio::spawn(vogeler_server::run(settings, cancel.clone())),
                started,
            )
        }
        Mode::Live => {
            let server = tokio::spawn(vogeler_server::run(settings, cancel.clone()));
            // Ready: a sentinel result went all the way into the database.
            let sentinel = result(0, "sentinel".into())?;
            amqp::publish(
                &ch,
                &topology.results_exchange(),
                "result.sentinel",
                &sentinel,
                &sentinel_key,
            )
            .await?;
            let ready = Instant::now();
            while couch
                .get::<NodeDocument>(&db, "sentinel")
                .await
                .ok()
                .flatten()
                .is_none()
            {
                anyhow::ensure!(
                    ready.elapsed().as_secs() < 60,
                    "the server did not start within 60 s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let started = Instant::now();
            publish_all.await?;
            (server, started)
        }
    };
    let last = format!("bench{:05}", ing.results - 1);
    // doc_count is cheap for the database: polling must not slow down what it measures.
    let want = ing.results as u64 + 1 + u64::from(mode == Mode::Live); // design doc, sentinel
    loop {
        if couch.doc_count(&db).await.unwrap_or(0) >= want
            && couch
                .get::<NodeDocument>(&db, &last)
                .await
                .ok()
                .flatten()
                .is_some()
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed().as_secs() < 600,
            "the server did not store {} results within 10 minutes",
            ing.results
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    cancel.cancel();
    server.await??;
    let _ = conn.close(200, "done".into()).await;
    couch.delete_database(&db).await?;
    couch.delete_database(&format!("{db}_history")).await?;
    Ok(ing.results as f64 / secs)
}

/// Documents per second the database takes through `_bulk_docs` in batches of the server's
/// default size: the ceiling the server is measured against.
pub async fn raw_rate(cli: &Stack, ing: Ingest) -> Result<f64> {
    let db = format!("bench_raw_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let couch = CouchClient::new(
        &vogeler_proto::secret::SecretUrl::parse(&cli.couchdb_url)?,
        None,
    )?;
    couch.ensure_database(&db).await?;
    let docs: Vec<Value> = (0..ing.results)
        .map(|n| json!({"_id": format!("bench{n:05}"), "dpkg": packages(ing.packages, n), "vogeler": {"created_at": Utc::now()}}))
        .collect();
    let started = Instant::now();
    // Two requests in flight, as the server has: the ceiling, not a handicapped baseline.
    let mut chunks = docs.chunks(config::defaults::SERVER_BATCH_SIZE).peekable();
    while chunks.peek().is_some() {
        let pair: Vec<&[Value]> = chunks.by_ref().take(2).collect();
        let writes = pair.iter().map(|c| couch.bulk_docs(&db, c));
        for results in futures_util::future::join_all(writes).await {
            anyhow::ensure!(
                results?.iter().all(|r| r.error.is_none()),
                "raw write refused"
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    couch.delete_database(&db).await?;
    Ok(ing.results as f64 / secs)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
