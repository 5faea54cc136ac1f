//! A simulated day of scheduled collection: `nodes` nodes run `facts` hourly and `dpkg` every
//! six hours (the example config's intervals), their results published as the agent's
//! schedule publishes them, into a real `vogeler-server` and Apache CouchDB, compressed into
//! minutes (each result carries its simulated collection time).
//!
//! Values change as they do on a quiet fleet: `dpkg` once in the day on 30% of the nodes (an
//! upgrade), `facts` once on 5% (a reboot into a new kernel). With change-only results, a run
//! whose value is the one last sent goes as `unchanged` and its hash, except the first run of
//! the day (`agent.full_every = 1d`); without, every run sends its value.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use uuid::Uuid;
use vogeler_core::amqp;
use vogeler_proto::{
    document::value_hash,
    names::{NodeName, PluginName},
    signing::PrivateKey,
    wire::{self, Announce, Message, Outcome, PluginInfo, PluginResult, Schedule},
};

use crate::{
    Stack,
    fleet::{Fleet, proc_stat},
    ingest,
};

/// What one simulated day cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DayCost {
    pub change_only: bool,
    pub results: usize,
    /// Message bodies published (signature headers, ~150 bytes each, left out).
    pub wire_bytes: u64,
    /// Results that carried their value.
    pub full_results: usize,
    /// Documents written (CouchDB's update sequence): node and freshness documents.
    pub document_writes: u64,
    /// Of those, revisions of node documents (the large ones, with every package).
    pub node_document_writes: u64,
    /// Of those, revisions of freshness documents (`fresh:NODE`, a few hundred bytes).
    pub freshness_writes: u64,
    /// Heartbeat announcements sent.
    pub heartbeats: usize,
    pub history_entries: u64,
    pub server_cpu_s: f64,
    /// Growth of the node and history databases' files (no compaction in between).
    pub database_growth_bytes: u64,
    /// Wall time to store the day.
    pub seconds: f64,
}

fn facts(node: usize, rebooted: bool) -> Value {
    json!({"hostname": format!("day{node:05}"), "kernel": if rebooted { "6.1.0-27-amd64" } else { "6.1.0-26-amd64" },
        "arch": "x86_64", "cpus": 4, "memory_mb": 16000, "os": {"family": "Debian", "version": "12"}})
}

fn dpkg(node: usize, packages: usize, upgraded: bool) -> Value {
    let mut list = ingest::packages(packages, 0);
    if upgraded && let Some(p) = list.as_array_mut().and_then(|l| l.get_mut(node % packages)) {
        p["version"] = json!("9.9-1");
    }
    list
}

/// The update sequence's number (CouchDB 3 gives "N-opaque").
fn seq(info: &Value) -> u64 {
    match &info["update_seq"] {
        Value::String(s) => s
            .split('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        v => v.as_u64().unwrap_or(0),
    }
}

/// Revisions written to node documents and to freshness documents: each document's
/// generation (the number before `-` in its `_rev`), summed over a database that started
/// empty.
async fn revisions(fleet: &Fleet, db: &str) -> Result<(u64, u64)> {
    let base = fleet.stack.couchdb_url.trim_end_matches('/').to_string();
    let all: Value = reqwest::Client::new()
        .get(format!("{base}/{db}/_all_docs"))
        .send()
        .await?
        .json()
        .await?;
    let (mut nodes, mut fresh) = (0, 0);
    for row in all["rows"].as_array().into_iter().flatten() {
        let id = row["id"].as_str().unwrap_or_default();
        let generation: u64 = row["value"]["rev"]
            .as_str()
            .and_then(|r| r.split('-').next()?.parse().ok())
            .unwrap_or(0);
        if id.starts_with("_design/") {
            continue;
        } else if vogeler_proto::fresh::node_of_id(id).is_some() {
            fresh += generation;
        } else {
            nodes += generation;
        }
    }
    Ok((nodes, fresh))
}

fn file_size(info: &Value) -> u64 {
    info["sizes"]["file"].as_u64().unwrap_or(0)
}

/// Wait until a just-started server created `db` and declared its queues (it creates the
/// database first), so nothing published before is lost.
pub async fn wait_declared(
    conn: &lapin::Connection,
    topology: &vogeler_proto::topology::Topology,
    couch: &vogeler_core::couch::CouchClient,
    db: &str,
) -> Result<()> {
    let declared = Instant::now();
    while couch.doc_count(db).await.is_err()
        || amqp::consume::QueueLength::open(conn, &topology.results_queue())
            .await?
            .get()
            .await
            .is_err()
    {
        ensure!(
            declared.elapsed() < Duration::from_secs(60),
            "the server did not create its database and queues"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Wait until the results queue is empty and `db` stopped moving for 2 s; returns when it
/// last moved (the time everything was stored).
pub async fn wait_settled(
    conn: &lapin::Connection,
    topology: &vogeler_proto::topology::Topology,
    couch: &vogeler_core::couch::CouchClient,
    db: &str,
    started: Instant,
) -> Result<Instant> {
    let queue = amqp::consume::QueueLength::open(conn, &topology.results_queue()).await?;
    let mut last = (u64::MAX, Instant::now());
    loop {
        let s = seq(&couch.database_info(db).await?);
        if s != last.0 {
            last = (s, Instant::now());
        }
        if queue.get().await? == 0 && last.1.elapsed() > Duration::from_secs(2) {
            return Ok(last.1);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the messages were not stored within 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn simulate(
    stack: &Stack,
    nodes: usize,
    packages: usize,
    change_only: bool,
    heartbeat_minutes: u32,
) -> Result<DayCost> {
    let mut fleet = Fleet::new(stack, if change_only { "dayco" } else { "dayfull" })?;
    let pid = fleet.spawn("vogeler-server", &[])?;
    let couch = fleet.couch()?;
    let db = fleet.database.clone();
    let history = format!("{db}_history");
    let ready = Instant::now();
    while couch.doc_count(&db).await.unwrap_or(0) < 1 || couch.doc_count(&history).await.is_err() {
        ensure!(
            ready.elapsed() < Duration::from_secs(60),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (db0, h0) = (
        couch.database_info(&db).await?,
        couch.database_info(&history).await?,
    );
    let cpu0 = proc_stat(pid)?.cpu_s;
    let settings = fleet.runner_settings()?;
    let topology = settings.broker.topology.clone();
    let conn = amqp::connect_any(&settings.broker.url, "vogeler-bench-day").await?;
    wait_declared(&conn, &topology, &couch, &db).await?;
    let ch = amqp::publisher_channel(&conn).await?;

    let keys: Vec<PrivateKey> = (0..nodes)
        .map(|_| PrivateKey::generate())
        .collect::<Result<_, _>>()?;
    let day_start = Utc::now() - TimeDelta::hours(24);
    let facts_plugin = PluginName::new("facts")?;
    let dpkg_plugin = PluginName::new("dpkg")?;
    // What each node last sent in full, per plugin (the agent's memory).
    let mut sent: Vec<[Option<String>; 2]> = vec![[None, None]; nodes];
    let (mut results, mut full_results, mut wire_bytes) = (0usize, 0usize, 0u64);
    let mut heartbeats = 0usize;
    let plugin_infos = vec![
        PluginInfo {
            name: facts_plugin.clone(),
            hash: "sha256:facts".into(),
        },
        PluginInfo {
            name: dpkg_plugin.clone(),
            hash: "sha256:dpkg".into(),
        },
    ];
    let schedules: std::collections::BTreeMap<String, u64> =
        [("facts".to_string(), 3600), ("dpkg".to_string(), 6 * 3600)].into();
    let started = Instant::now();
    for hour in 0..24i64 {
        let mut confirms = Vec::new();
        for n in 0..nodes {
            let spread = TimeDelta::seconds((n % 3600) as i64);
            let at = day_start + TimeDelta::hours(hour) + spread;
            let mut runs = vec![(
                0usize,
                &facts_plugin,
                3600u64,
                facts(n, n % 20 == 0 && hour >= 12),
            )];
            // Every six hours, each node at its own phase.
            if (hour + (n % 6) as i64) % 6 == 0 {
                let upgraded = n % 10 < 3 && hour >= 12;
                runs.push((1, &dpkg_plugin, 6 * 3600, dpkg(n, packages, upgraded)));
            }
            // Heartbeats within the hour: the same plugins and facts each time.
            let beats = 60u32.checked_div(heartbeat_minutes).unwrap_or(0);
            for b in 0..beats {
                let sent_at = at + TimeDelta::minutes(i64::from(b * heartbeat_minutes));
                let message = Message::Announce(Announce {
                    node: NodeName::new(format!("day{n:05}"))?,
                    agent_version: "bench".into(),
                    plugins: plugin_infos.clone(),
                    started_at: day_start,
                    sent_at,
                    facts: facts(n, n % 20 == 0 && hour >= 12)
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    schedules: Some(schedules.clone()),
                    packages: Some(Default::default()),
                });
                let body = wire::encode(&message);
                wire_bytes += body.len() as u64;
                heartbeats += 1;
                confirms.push(
                    ingest::publish_signed(&ch, &topology, &keys[n], "announce.day", &body).await?,
                );
            }
            for (slot, plugin, interval_s, value) in runs {
                let hash = value_hash(&value);
                let unchanged = change_only && sent[n][slot].as_deref() == Some(hash.as_str());
                let (outcome, value) = if unchanged {
                    (Outcome::Unchanged { hash: hash.clone() }, None)
                } else {
                    full_results += 1;
                    sent[n][slot] = Some(hash);
                    (Outcome::Ok, Some(value))
                };
                let message = Message::Result(PluginResult {
                    request_id: Uuid::new_v4(),
                    node: NodeName::new(format!("day{n:05}"))?,
                    plugin: plugin.clone(),
                    outcome,
                    value,
                    truncated: false,
                    collected_at: at,
                    duration_ms: 10,
                    agent_version: "bench".into(),
                    scheduled: Some(Schedule { interval_s }),
                });
                let body = wire::encode(&message);
                wire_bytes += body.len() as u64;
                results += 1;
                confirms.push(
                    ingest::publish_signed(&ch, &topology, &keys[n], "result.day", &body).await?,
                );
            }
        }
        for c in confirms {
            ensure!(c.await?.is_ack(), "the broker refused a result");
        }
    }
    let settled = wait_settled(&conn, &topology, &couch, &db, started).await?;
    let seconds = settled.duration_since(started).as_secs_f64();
    let cpu = proc_stat(pid)?.cpu_s - cpu0;
    let (db1, h1) = (
        couch.database_info(&db).await?,
        couch.database_info(&history).await?,
    );
    let _ = conn.close(200, "done".into()).await;
    let (node_document_writes, freshness_writes) = revisions(&fleet, &db).await?;
    fleet.stop().await?;
    let cost = DayCost {
        change_only,
        results,
        wire_bytes,
        full_results,
        document_writes: seq(&db1) - seq(&db0),
        node_document_writes,
        freshness_writes,
        heartbeats,
        history_entries: h1["doc_count"].as_u64().unwrap_or(0)
            - h0["doc_count"].as_u64().unwrap_or(0),
        server_cpu_s: cpu,
        database_growth_bytes: (file_size(&db1) + file_size(&h1))
            .saturating_sub(file_size(&db0) + file_size(&h0)),
        seconds,
    };
    let _ = couch.delete_database(&db).await;
    let _ = couch.delete_database(&history).await;
    Ok(cost)
}
