//! `vogeler-bench ingest`: how fast the server stores realistic results, next to how fast the
//! same database takes raw `_bulk_docs` writes of documents of the same size, measured in the
//! same run. Needs the stack up (`scripts/stack.sh up`); prints a table and writes it as JSON
//! under `bench/results/`.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vogeler_core::{
    amqp,
    config::{self, Sources},
    couch::CouchClient,
    document::NodeDocument,
    names::{NodeName, PluginName},
    wire::{self, Message, Outcome, PluginResult},
};

#[derive(Debug, Parser)]
#[command(
    name = "vogeler-bench",
    about = "Ingest throughput: server versus raw _bulk_docs"
)]
struct Cli {
    /// Results to store, one per node
    #[arg(long, default_value_t = 2000)]
    results: usize,
    /// Packages in each result's list (a realistic dpkg or rpm inventory is ~500)
    #[arg(long, default_value_t = 500)]
    packages: usize,
    /// Runs; the table shows the median and the best
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = config::defaults::AMQP_URL)]
    amqp_url: String,
    #[arg(long, default_value = config::defaults::COUCHDB_URL)]
    couchdb_url: String,
}

fn packages(n: usize, seed: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"name": format!("package-{i:04}"), "version": format!("{}.{}-{}", i % 7, seed % 13, i % 3), "arch": "amd64", "status": "installed"}))
            .collect(),
    )
}

fn sources(cli: &Cli, collective: &str, db: &str) -> Sources {
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
enum Mode {
    /// Every result is queued first, then the server starts and drains the queue: the
    /// server's own storing rate (its start-up, about 0.1 s, included).
    Drain,
    /// The server is up and idle; results are published as agents would, while it stores
    /// them: the broker's persisting of each message competes for the same two cores.
    Live,
}

/// Results per second through the server, timed until the last result is stored.
async fn server_rate(cli: &Cli, mode: Mode) -> Result<f64> {
    let id = Uuid::new_v4().simple().to_string();
    let (collective, db) = (format!("bench-{}", &id[..8]), format!("bench_{}", &id[..8]));
    let settings = config::load(&sources(cli, &collective, &db))?.server()?;
    let couch = CouchClient::new(&settings.couch.url, None)?;
    let topology = settings.broker.topology.clone();
    let conn = amqp::connect(&settings.broker.url, "vogeler-bench").await?;
    topology
        .declare_server(&conn.create_channel().await?)
        .await?;
    let ch = amqp::publisher_channel(&conn).await?;
    let now = Utc::now();
    let result = |n: usize, name: String| -> Result<Message> {
        Ok(Message::Result(PluginResult {
            request_id: Uuid::new_v4(),
            node: NodeName::new(name)?,
            plugin: PluginName::new("dpkg")?,
            outcome: Outcome::Ok,
            value: Some(packages(cli.packages, n)),
            truncated: false,
            collected_at: now,
            duration_ms: 10,
            agent_version: "bench".into(),
        }))
    };
    // Results are signed as agents sign them: verifying is part of the server's work.
    let agent_key = vogeler_core::signing::PrivateKey::generate()?;
    let bodies: Vec<Vec<u8>> = (0..cli.results)
        .map(|n| result(n, format!("bench{n:05}")).map(|m| wire::encode(&m)))
        .collect::<Result<_>>()?;
    let publish_all = async {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in &bodies {
            let props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(amqp::signature_headers(
                    &agent_key,
                    vogeler_core::signing::Purpose::Agent,
                    body,
                ));
            confirms.push(
                ch.basic_publish(
                    topology.results_exchange().as_str().into(),
                    "result.bench".into(),
                    Default::default(),
                    body,
                    props,
                )
                .await?,
            );
        }
        for c in confirms {
            anyhow::ensure!(c.await?.is_ack(), "the broker refused a result");
        }
        anyhow::Ok(())
    };

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
                &agent_key,
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
    let last = format!("bench{:05}", cli.results - 1);
    // doc_count is cheap for the database: polling must not slow down what it measures.
    let want = cli.results as u64 + 1 + u64::from(mode == Mode::Live); // design doc, sentinel
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
            cli.results
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    cancel.cancel();
    server.await??;
    let _ = conn.close(200, "done".into()).await;
    couch.delete_database(&db).await?;
    couch.delete_database(&format!("{db}_history")).await?;
    Ok(cli.results as f64 / secs)
}

/// Documents per second the database takes through `_bulk_docs` in batches of the server's
/// default size: the ceiling the server is measured against.
async fn raw_rate(cli: &Cli) -> Result<f64> {
    let db = format!("bench_raw_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let couch = CouchClient::new(
        &vogeler_core::secret::SecretUrl::parse(&cli.couchdb_url)?,
        None,
    )?;
    couch.ensure_database(&db).await?;
    let docs: Vec<Value> = (0..cli.results)
        .map(|n| json!({"_id": format!("bench{n:05}"), "dpkg": packages(cli.packages, n), "vogeler": {"created_at": Utc::now()}}))
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
    Ok(cli.results as f64 / secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.results > 0 && cli.runs > 0,
        "--results and --runs must be at least 1"
    );
    let (mut drain, mut live, mut raw) = (vec![], vec![], vec![]);
    for run in 1..=cli.runs {
        let r = raw_rate(&cli).await.context("raw _bulk_docs run")?;
        let d = server_rate(&cli, Mode::Drain)
            .await
            .context("server drain run")?;
        let l = server_rate(&cli, Mode::Live)
            .await
            .context("server live run")?;
        eprintln!(
            "run {run}: server drain {d:.0}/s, server live {l:.0}/s, raw _bulk_docs {r:.0}/s"
        );
        drain.push(d);
        live.push(l);
        raw.push(r);
    }
    let (d, l, r) = (
        median(drain.clone()),
        median(live.clone()),
        median(raw.clone()),
    );
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let size = serde_json::to_vec(&packages(cli.packages, 0))?.len();
    println!(
        "ingest: {} results of {} packages (~{} KiB each), {} runs",
        cli.results,
        cli.packages,
        size / 1024,
        cli.runs
    );
    println!("{:<40} {:>10} {:>10}", "", "median/s", "best/s");
    println!(
        "{:<40} {:>10.0} {:>10.0}",
        "raw _bulk_docs (256 per request, 2 at once)",
        r,
        best(&raw)
    );
    println!(
        "{:<40} {:>10.0} {:>10.0}",
        "vogeler-server draining a full queue",
        d,
        best(&drain)
    );
    println!(
        "{:<40} {:>10.0} {:>10.0}",
        "vogeler-server while results arrive",
        l,
        best(&live)
    );
    println!("{:<40} {:>9.0}%", "drain / raw", 100.0 * d / r);
    println!("{:<40} {:>9.0}%", "live / raw", 100.0 * l / r);

    let out = json!({
        "benchmark": "ingest", "at": Utc::now(), "results": cli.results, "packages": cli.packages,
        "result_bytes": size, "runs": cli.runs, "raw_per_s": raw, "drain_per_s": drain, "live_per_s": live,
        "raw_median": r, "drain_median": d, "live_median": l, "drain_ratio": d / r, "live_ratio": l / r,
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!(
        "ingest-{}.json",
        Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::write(&file, serde_json::to_string_pretty(&out)?)?;
    eprintln!("written to {}", file.display());
    Ok(())
}
