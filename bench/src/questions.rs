//! Questions over the stored inventory (issue 18): `query`, `count` and `-n` resolution
//! against a fleet stored by the real server (each node announced with facts and a
//! 500-package dpkg list), timed and metered on the wire, next to the alternative the
//! views replace: downloading every document and deciding in the runner.
//!
//! Bytes are counted by a TCP relay between the runner code and CouchDB ([`Meter`]):
//! response bytes, headers included, as the runner's host would see them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use uuid::Uuid;
use vogeler_config::RunnerSettings;
use vogeler_core::amqp;
use vogeler_proto::{
    design,
    names::{NodeName, PluginName},
    signing::PrivateKey,
    wire::{self, Announce, Message, Outcome, PluginInfo, PluginResult},
};
use vogeler_runner::{ask, target};

use crate::{Stack, day, fleet::Fleet, ingest};

/// The package question every measurement asks: a version bound in dpkg's order.
pub const PACKAGE_QUESTION: &str = "dpkg has openssl < 3.0.13";
/// A question about a list's elements, which only `_find` answers.
pub const LIST_QUESTION: &str = "disks[].use_percent > 95";

/// openssl versions across the fleet, one per node in turn: the first two are older than
/// 3.0.13 in dpkg's order (`~` sorts before the release), the others not.
const OPENSSL: &[&str] = &[
    "3.0.11-1~deb12u2",
    "3.0.13~rc1-1",
    "3.0.13-1~deb12u1",
    "3.0.15-1~deb12u1",
];

/// One measured question.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Asked {
    pub question: String,
    pub seconds: Vec<f64>,
    /// Response bytes of one run (the same every run).
    pub bytes: u64,
    /// Nodes (or count rows) in the answer.
    pub answer: usize,
}

/// Everything one run of the benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Questions {
    pub nodes: usize,
    pub packages: usize,
    /// Publishing and storing the fleet.
    pub load_s: f64,
    /// From the load's end until the registry and inventory indexes answered (CouchDB builds
    /// them; the server starts that within 10 s of the writes).
    pub index_s: f64,
    pub database_bytes: u64,
    pub asked: Vec<Asked>,
}

fn facts(n: usize) -> Value {
    json!({"hostname": format!("q{n:05}"), "kernel": format!("6.1.0-{}-amd64", 25 + n % 3),
        "arch": "x86_64", "cpus": 2 + 2 * (n % 4), "memory_mb": 4096 * (1 + n % 8),
        "os": {"family": "Debian", "version": if n.is_multiple_of(5) { "11" } else { "12" }}})
}

fn dpkg(n: usize, packages: usize) -> Value {
    let mut list = ingest::packages(packages.saturating_sub(1), n);
    if let Some(l) = list.as_array_mut() {
        l.push(json!({"name": "openssl", "version": OPENSSL[n % OPENSSL.len()], "arch": "amd64", "status": "installed"}));
    }
    list
}

fn disks(n: usize) -> Value {
    json!([{"target": "/", "use_percent": n % 100}, {"target": "/var", "use_percent": (n * 7) % 100}])
}

/// Announce and store `nodes` nodes through the real server, then wait until it settled.
async fn load(fleet: &mut Fleet, nodes: usize, packages: usize) -> Result<f64> {
    fleet.spawn("vogeler-server", &[])?;
    let settings = fleet.runner_settings()?;
    let topology = settings.broker.topology.clone();
    let couch = fleet.couch()?;
    let conn = amqp::connect_any(&settings.broker.url, "vogeler-bench-questions").await?;
    day::wait_declared(&conn, &topology, &couch, &fleet.database).await?;
    let ch = amqp::publisher_channel(&conn).await?;
    let started = Instant::now();
    let plugins: Vec<PluginInfo> = ["dpkg", "disks"]
        .into_iter()
        .map(|p| {
            Ok(PluginInfo {
                name: PluginName::new(p)?,
                hash: format!("sha256:{p}"),
            })
        })
        .collect::<Result<_>>()?;
    for chunk in (0..nodes).collect::<Vec<_>>().chunks(500) {
        let mut confirms = Vec::new();
        for &n in chunk {
            let key = PrivateKey::generate()?;
            let node = NodeName::new(format!("q{n:05}"))?;
            let now = Utc::now();
            let announce = Message::Announce(Announce {
                node: node.clone(),
                agent_version: "bench".into(),
                plugins: plugins.clone(),
                started_at: now,
                sent_at: now,
                facts: facts(n).as_object().cloned().unwrap_or_default(),
                schedules: Some(Default::default()),
                packages: Some(Default::default()),
            });
            let body = wire::encode(&announce);
            confirms.push(ingest::publish_signed(&ch, &topology, &key, "announce.q", &body).await?);
            for (plugin, value) in [("dpkg", dpkg(n, packages)), ("disks", disks(n))] {
                let result = Message::Result(PluginResult {
                    request_id: Uuid::new_v4(),
                    node: node.clone(),
                    plugin: PluginName::new(plugin)?,
                    outcome: Outcome::Ok,
                    value: Some(value),
                    truncated: false,
                    collected_at: now,
                    duration_ms: 10,
                    agent_version: "bench".into(),
                    scheduled: None,
                });
                let body = wire::encode(&result);
                confirms
                    .push(ingest::publish_signed(&ch, &topology, &key, "result.q", &body).await?);
            }
        }
        for c in confirms {
            ensure!(c.await?.is_ack(), "the broker refused a message");
        }
    }
    day::wait_settled(&conn, &topology, &couch, &fleet.database, started).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(started.elapsed().as_secs_f64())
}

/// A TCP relay that counts the bytes CouchDB sends back.
pub struct Meter {
    addr: std::net::SocketAddr,
    down: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Meter {
    pub async fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicU64::new(0));
        let counter = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, counter) = (upstream.clone(), counter.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        relay(client, server, counter).await;
                    }
                });
            }
        });
        Ok(Self { addr, down, task })
    }

    /// Response bytes since the last call.
    pub fn take(&self) -> u64 {
        self.down.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, down: Arc<AtomicU64>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                down.fetch_add(n as u64, Ordering::Relaxed);
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = cw.shutdown().await;
    up.abort();
}

/// Runner settings whose CouchDB URL goes through the meter.
fn metered(fleet: &Fleet, meter: &Meter) -> Result<RunnerSettings> {
    let mut url = reqwest::Url::parse(&fleet.stack.couchdb_url)?;
    url.set_host(Some("127.0.0.1"))?;
    url.set_port(Some(meter.addr.port()))
        .map_err(|_| anyhow::anyhow!("cannot set the meter's port"))?;
    fleet.runner_settings_with(&[("VOGELER_COUCHDB__URL", url.as_str())])
}

/// What the views replace: every node document downloaded, a page at a time, and the
/// question decided here.
async fn download_everything(settings: &RunnerSettings, expr: &str) -> Result<usize> {
    let set = target::parse(expr, &target::Files).map_err(anyhow::Error::msg)?;
    let couch = vogeler_core::couch::CouchClient::from_settings(&settings.couch)
        .map_err(anyhow::Error::msg)?;
    let ids = couch
        .all_ids(&settings.couch.database)
        .await?
        .context("no database")?;
    let mut matched = 0;
    for chunk in ids.chunks(200) {
        let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for (id, doc) in couch
            .get_many::<Value>(&settings.couch.database, &ids)
            .await?
        {
            if let Some(doc) = doc.found()
                && doc.get("vogeler").is_some()
                && set.expr().matches(&id, &doc)
            {
                matched += 1;
            }
        }
    }
    Ok(matched)
}

pub async fn run(stack: &Stack, nodes: usize, packages: usize, runs: usize) -> Result<Questions> {
    let mut fleet = Fleet::new(stack, "q")?;
    let load_s = load(&mut fleet, nodes, packages).await?;
    // The indexes' build after the load (the server starts it within 10 s; this read waits
    // for it without the runner's 30 s request timeout).
    let started = Instant::now();
    let base = stack.couchdb_url.trim_end_matches('/').to_string();
    for (ddoc, view) in [
        (design::NODES_DDOC, design::REGISTRY.name),
        (design::INVENTORY_DDOC, design::VALUES.name),
    ] {
        let url = format!(
            "{base}/{}/_design/{ddoc}/_view/{view}?limit=0&reduce=false",
            fleet.database
        );
        // CouchDB answers 500 (timeout) after a minute while it goes on building: ask again.
        loop {
            let status = reqwest::Client::new().get(&url).send().await?.status();
            if status.is_success() {
                break;
            }
            ensure!(
                status.is_server_error() && started.elapsed() < Duration::from_secs(3600),
                "view {ddoc}/{view}: {status}"
            );
        }
    }
    let index_s = started.elapsed().as_secs_f64();
    let all = target::parse("all", &target::Files).map_err(anyhow::Error::msg)?;
    let os = ask::parse_field("os.version").map_err(anyhow::Error::msg)?;
    let openssl = ask::parse_field("dpkg:openssl").map_err(anyhow::Error::msg)?;
    let database_bytes = fleet.couch()?.database_info(&fleet.database).await?["sizes"]["file"]
        .as_u64()
        .unwrap_or(0);

    let upstream = {
        let u = reqwest::Url::parse(&stack.couchdb_url)?;
        format!(
            "{}:{}",
            u.host_str().context("couchdb host")?,
            u.port_or_known_default().context("couchdb port")?
        )
    };
    let meter = Meter::start(upstream).await?;
    let settings = metered(&fleet, &meter)?;
    let couch = &settings.couch;
    let fresh = Duration::from_secs(24 * 3600);
    let parse = |e: &str| target::parse(e, &target::Files).map_err(anyhow::Error::msg);
    let package_set = parse(PACKAGE_QUESTION)?;
    let list_set = parse(LIST_QUESTION)?;
    let fields: Vec<ask::Field> = ["os.version", "dpkg:openssl"]
        .into_iter()
        .map(ask::parse_field)
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let kernel = ask::parse_field("kernel").map_err(anyhow::Error::msg)?;
    let twelve = parse("os.version = 12")?;

    let mut asked = Vec::new();
    let questions: Vec<&str> = vec![
        "query 'dpkg has openssl < 3.0.13' --fields os.version,dpkg:openssl",
        "count os.version",
        "count dpkg:openssl",
        "count kernel -n 'os.version = 12'",
        "-n 'dpkg has openssl < 3.0.13' (registry + selection)",
        "query 'disks[].use_percent > 95' (_find)",
        "download every document, decide in the runner",
    ];
    for (i, question) in questions.iter().enumerate() {
        let (mut seconds, mut bytes, mut answer) = (Vec::new(), 0, 0);
        for _ in 0..runs {
            meter.take();
            let t = Instant::now();
            answer = match i {
                0 => ask::query(couch, &package_set, &fields, fresh)
                    .await?
                    .nodes
                    .len(),
                1 => ask::count(couch, &os, &all, fresh).await?.values.len(),
                2 => ask::count(couch, &openssl, &all, fresh).await?.values.len(),
                3 => ask::count(couch, &kernel, &twelve, fresh)
                    .await?
                    .values
                    .len(),
                4 => {
                    let known = vogeler_runner::registry(couch, fresh).await?;
                    let selected =
                        vogeler_runner::select_nodes(couch, &package_set, &known).await?;
                    package_set.resolve(&selected, &known).len()
                }
                5 => ask::query(couch, &list_set, &[], fresh).await?.nodes.len(),
                _ => download_everything(&settings, PACKAGE_QUESTION).await?,
            };
            seconds.push(t.elapsed().as_secs_f64());
            bytes = meter.take();
        }
        eprintln!("{question}: {answer} ({bytes} bytes)");
        asked.push(Asked {
            question: question.to_string(),
            seconds,
            bytes,
            answer,
        });
    }
    // The views and the download agree, and both agree with how the fleet was made.
    let older = (0..nodes).filter(|n| n % OPENSSL.len() < 2).count();
    ensure!(
        asked[0].answer == older && asked[4].answer == older && asked[6].answer == older,
        "the package question matched {} (query), {} (-n), {} (download); {older} nodes have openssl < 3.0.13",
        asked[0].answer,
        asked[4].answer,
        asked[6].answer
    );
    let full = (0..nodes)
        .filter(|n| n % 100 > 95 || (n * 7) % 100 > 95)
        .count();
    ensure!(
        asked[5].answer == full,
        "the list question matched {}, expected {full}",
        asked[5].answer
    );
    fleet.stop().await?;
    Ok(Questions {
        nodes,
        packages,
        load_s,
        index_s,
        database_bytes,
        asked,
    })
}
