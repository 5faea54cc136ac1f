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

/// Results per second through the server: with the server running and idle, publish every
/// result (as agents would, confirms pipelined) and time from the first publish until the
/// last result is stored.
async fn server_rate(cli: &Cli) -> Result<f64> {
    let id = Uuid::new_v4().simple().to_string();
    let (collective, db) = (format!("bench-{}", &id[..8]), format!("bench_{}", &id[..8]));
    let settings = config::load(&sources(cli, &collective, &db))?.server()?;
    let couch = CouchClient::new(&settings.couch.url, None)?;
    let topology = settings.broker.topology.clone();
    let conn = amqp::connect(&settings.broker.url, "vogeler-bench").await?;
    let cancel = CancellationToken::new();
    let server = tokio::spawn(vogeler_server::run(settings, cancel.clone()));

    // Ready: a sentinel result went all the way into the database.
    let ch = amqp::publisher_channel(&conn).await?;
    topology.declare_shared(&conn).await?;
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
    let sentinel = result(0, "sentinel".into())?;
    amqp::publish(
        &ch,
        &topology.results_exchange(),
        "result.sentinel",
        &sentinel,
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

    let bodies: Vec<Vec<u8>> = (0..cli.results)
        .map(|n| result(n, format!("bench{n:05}")).map(|m| wire::encode(&m)))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(bodies.len());
    for body in &bodies {
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
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
    let last = format!("bench{:05}", cli.results - 1);
    // doc_count is cheap for the database: polling must not slow down what it measures.
    let want = cli.results as u64 + 2; // the sentinel and the design document too
    loop {
        if couch.doc_count(&db).await? >= want
            && couch.get::<NodeDocument>(&db, &last).await?.is_some()
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
    for chunk in docs.chunks(config::defaults::SERVER_BATCH_SIZE) {
        let results = couch.bulk_docs(&db, chunk).await?;
        anyhow::ensure!(
            results.iter().all(|r| r.error.is_none()),
            "raw write refused"
        );
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
    let (mut server, mut raw) = (vec![], vec![]);
    for run in 1..=cli.runs {
        let r = raw_rate(&cli).await.context("raw _bulk_docs run")?;
        let s = server_rate(&cli).await.context("server run")?;
        eprintln!("run {run}: server {s:.0}/s, raw _bulk_docs {r:.0}/s");
        server.push(s);
        raw.push(r);
    }
    let (s, r) = (median(server.clone()), median(raw.clone()));
    let size = serde_json::to_vec(&packages(cli.packages, 0))?.len();
    println!(
        "ingest: {} results of {} packages (~{} KiB each), {} runs",
        cli.results,
        cli.packages,
        size / 1024,
        cli.runs
    );
    println!("{:<28} {:>12} {:>12}", "", "median /s", "best /s");
    println!(
        "{:<28} {:>12.0} {:>12.0}",
        "vogeler-server",
        s,
        server.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "{:<28} {:>12.0} {:>12.0}",
        "raw _bulk_docs (same db)",
        r,
        raw.iter().copied().fold(0.0, f64::max)
    );
    println!("{:<28} {:>11.0}%", "server / raw", 100.0 * s / r);

    let out = json!({
        "benchmark": "ingest", "at": Utc::now(), "results": cli.results, "packages": cli.packages,
        "result_bytes": size, "runs": cli.runs, "server_per_s": server, "raw_per_s": raw,
        "server_median": s, "raw_median": r, "ratio": s / r,
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
