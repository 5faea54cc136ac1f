//! `vogeler-bench`: benchmarks that print numbers (not tests). Needs the stack up
//! (`scripts/stack.sh up`) and the release binaries (`bench/run.sh` builds both).
//!
//! - `fanout`: `-c hello -n all` round trips against `vogeler-agent simulate` fleets of 10 to
//!   5,000 nodes: time to every reply, and to every node's document updated in CouchDB.
//! - `targeting`: resolving a fact filter against 5,000 registered nodes.
//! - `questions`: `query`, `count` and `-n` over 5,000 stored nodes with 500-package lists,
//!   time and bytes, against downloading every document.
//! - `ingest`: results per second stored by the server versus the database's raw `_bulk_docs`.
//! - `footprint`: one real agent idle for 60 s and during a burst of 100 commands; the
//!   server's memory while ingesting.
//! - `all` (default): everything, one table, written as JSON to `bench/results/`.

mod day;
mod fleet;
mod ingest;
mod questions;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use chrono::Utc;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use vogeler_config as config;

/// The same allocator as `vogeler-server`, whose code the ingest benchmark runs in-process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "vogeler-bench",
    about = "Vogeler benchmarks: fan-out, targeting, ingest, footprint"
)]
struct Cli {
    #[command(subcommand)]
    what: Option<What>,
    /// The broker (`scripts/stack.sh env` exports VOGELER_TEST_AMQP_URL)
    #[arg(long, env = "VOGELER_TEST_AMQP_URL", default_value = config::defaults::AMQP_URL, global = true)]
    amqp_url: String,
    /// The database, with admin credentials (`scripts/stack.sh env` exports
    /// VOGELER_TEST_COUCHDB_URL)
    #[arg(long, env = "VOGELER_TEST_COUCHDB_URL", default_value = config::defaults::COUCHDB_URL, global = true, hide_env_values = true)]
    couchdb_url: String,
    /// Repetitions of each measurement; the table shows the median (p50) and the maximum
    #[arg(long, default_value_t = 5, global = true)]
    runs: usize,
}

#[derive(Debug, Clone, Subcommand)]
enum What {
    /// Everything below
    All,
    /// Fan-out round trips against simulated fleets
    Fanout {
        /// Fleet sizes
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000,5000")]
        nodes: Vec<usize>,
    },
    /// Fact-filter targeting against a simulated fleet
    Targeting {
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
    },
    /// Server ingest versus raw _bulk_docs
    Ingest {
        /// Results to store, one per node
        #[arg(long, default_value_t = 2000)]
        results: usize,
        /// Packages in each result's list (a realistic dpkg or rpm inventory is ~500)
        #[arg(long, default_value_t = 500)]
        packages: usize,
    },
    /// Server peak memory while large results arrive (issue 16: 200 results of 4 MiB, one
    /// per node), against server.max_in_flight_bytes
    ServerMemory {
        /// Results, one per node
        #[arg(long, default_value_t = 200)]
        results: usize,
        /// Packages per result (40,000 make a 4 MiB dpkg list)
        #[arg(long, default_value_t = 40_000)]
        packages: usize,
    },
    /// Scheduled collection over a simulated day (facts hourly, dpkg every 6 h), with and
    /// without change-only results: bytes on the wire, document writes, history entries,
    /// server CPU and database growth
    ScheduleDay {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Packages in each dpkg list
        #[arg(long, default_value_t = 500)]
        packages: usize,
        /// Minutes between each node's heartbeat announcements (0: none). Agents default to
        /// one a minute; an hour keeps the run to minutes (each costs the same)
        #[arg(long, default_value_t = 60)]
        heartbeat_minutes: u32,
    },
    /// Questions over the stored inventory (query, count, -n) against a fleet the server
    /// stored: time and response bytes of each, against downloading every document
    Questions {
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        /// Packages in each node's dpkg list
        #[arg(long, default_value_t = 500)]
        packages: usize,
    },
    /// Agent idle and burst footprint, server memory while ingesting
    Footprint {
        /// Seconds the idle agent is watched
        #[arg(long, default_value_t = 60)]
        idle: u64,
        #[arg(long, default_value_t = 100)]
        burst: usize,
    },
}

/// Where the stack is.
#[derive(Debug, Clone)]
pub struct Stack {
    pub amqp_url: String,
    pub couchdb_url: String,
}

/// The repository root (for `plugins/` and `bench/results/`).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn p50(v: &[f64]) -> f64 {
    ingest::median(v.to_vec())
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MIN, f64::max)
}

/// The encoded size of one result of `ing`.
fn wire_size(ing: ingest::Ingest) -> usize {
    serde_json::to_vec(&ingest::packages(ing.packages, 0))
        .map(|v| v.len())
        .unwrap_or(0)
}

/// Rows of the printed table: (benchmark, measure, p50, max, unit, target).
type Row = (String, String, f64, f64, &'static str, String);

async fn fanout(
    stack: &Stack,
    sizes: &[usize],
    runs: usize,
    rows: &mut Vec<Row>,
    json: &mut Vec<Value>,
    targeting_at: Option<usize>,
) -> Result<()> {
    for &n in sizes {
        eprintln!("fanout: starting a simulated fleet of {n} nodes");
        let (fleet, registered) = fleet::simulated(stack, n).await?;
        eprintln!(
            "fanout: {n} nodes registered in {:.1} s",
            registered.as_secs_f64()
        );
        let (mut replies, mut stored) = (vec![], vec![]);
        // One unmeasured run first: connections, caches and the registry view warm up.
        let warm = fleet::round_trip(&fleet, n).await;
        if let Err(e) = &warm {
            eprintln!("fanout: warm-up run failed: {e:#}");
        }
        for run in 1..=runs {
            let rt = fleet::round_trip(&fleet, n)
                .await
                .with_context(|| format!("fan-out to {n} nodes, run {run}"))?;
            eprintln!(
                "fanout: {n} nodes, run {run}: replies {:.2} s, stored {:.2} s",
                rt.replies_s, rt.stored_s
            );
            replies.push(rt.replies_s);
            stored.push(rt.stored_s);
        }
        let target = match n {
            1000 => ("< 2 s", "< 3 s"),
            5000 => ("< 10 s", "< 10 s"),
            _ => ("", ""),
        };
        rows.push((
            format!("fan-out {n} nodes"),
            "all replies".into(),
            p50(&replies),
            max(&replies),
            "s",
            target.0.into(),
        ));
        rows.push((
            format!("fan-out {n} nodes"),
            "all documents stored".into(),
            p50(&stored),
            max(&stored),
            "s",
            target.1.into(),
        ));
        json.push(json!({"benchmark": "fanout", "nodes": n, "registered_s": registered.as_secs_f64(), "replies_s": replies, "stored_s": stored}));
        if targeting_at == Some(n) {
            targeting_rows(&fleet, n, runs, rows, json).await?;
        }
        fleet.stop().await?;
    }
    Ok(())
}

async fn targeting_rows(
    fleet: &fleet::Fleet,
    n: usize,
    runs: usize,
    rows: &mut Vec<Row>,
    json: &mut Vec<Value>,
) -> Result<()> {
    // Every simulated node has sim_group g0..g9 and the machine's real facts.
    let expr = "sim_group=g3 and os.family=Debian and cpus>=1";
    let mut times = vec![];
    let mut matched = 0;
    for _ in 0..runs {
        let (s, m) = fleet::targeting(fleet, expr).await?;
        times.push(s);
        matched = m;
    }
    anyhow::ensure!(
        matched == n / 10,
        "the filter matched {matched} nodes, expected {}",
        n / 10
    );
    eprintln!("targeting: {expr:?} matched {matched} of {n} nodes");
    rows.push((
        format!("targeting {n} nodes"),
        format!("resolve a fact filter ({matched} match)"),
        p50(&times),
        max(&times),
        "s",
        String::new(),
    ));
    json.push(json!({"benchmark": "targeting", "nodes": n, "expression": expr, "matched": matched, "seconds": times}));
    Ok(())
}

async fn ingest_rows(
    stack: &Stack,
    ing: ingest::Ingest,
    runs: usize,
    rows: &mut Vec<Row>,
    json: &mut Vec<Value>,
) -> Result<()> {
    let (mut drain, mut live, mut raw) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let r = ingest::raw_rate(stack, ing)
            .await
            .context("raw _bulk_docs run")?;
        let d = ingest::server_rate(stack, ing, ingest::Mode::Drain)
            .await
            .context("server drain run")?;
        let l = ingest::server_rate(stack, ing, ingest::Mode::Live)
            .await
            .context("server live run")?;
        eprintln!(
            "ingest: run {run}: server drain {d:.0}/s, server live {l:.0}/s, raw _bulk_docs {r:.0}/s"
        );
        drain.push(d);
        live.push(l);
        raw.push(r);
    }
    let ratio = |v: &[f64]| {
        v.iter()
            .zip(&raw)
            .map(|(s, r)| 100.0 * s / r)
            .collect::<Vec<_>>()
    };
    let what = format!("ingest {} x {} packages", ing.results, ing.packages);
    rows.push((
        what.clone(),
        "raw _bulk_docs".into(),
        p50(&raw),
        max(&raw),
        "/s",
        String::new(),
    ));
    rows.push((
        what.clone(),
        "server draining a full queue".into(),
        p50(&drain),
        max(&drain),
        "/s",
        String::new(),
    ));
    rows.push((
        what.clone(),
        "server while results arrive".into(),
        p50(&live),
        max(&live),
        "/s",
        String::new(),
    ));
    rows.push((
        what.clone(),
        "drain / raw".into(),
        p50(&ratio(&drain)),
        max(&ratio(&drain)),
        "%",
        ">= 80%".into(),
    ));
    rows.push((
        what,
        "live / raw".into(),
        p50(&ratio(&live)),
        max(&ratio(&live)),
        "%",
        String::new(),
    ));
    let size = serde_json::to_vec(&ingest::packages(ing.packages, 0))?.len();
    json.push(json!({"benchmark": "ingest", "results": ing.results, "packages": ing.packages, "result_bytes": size,
        "raw_per_s": raw, "drain_per_s": drain, "live_per_s": live, "drain_ratio_percent": ratio(&drain), "live_ratio_percent": ratio(&live)}));
    Ok(())
}

async fn footprint_rows(
    stack: &Stack,
    idle: u64,
    burst: usize,
    rows: &mut Vec<Row>,
    json: &mut Vec<Value>,
) -> Result<()> {
    eprintln!("footprint: one agent idle for {idle} s, then {burst} commands");
    let a = fleet::agent_footprint(stack, Duration::from_secs(idle), burst).await?;
    let mib = |k: u64| k as f64 / 1024.0;
    rows.push((
        format!("agent idle {idle} s"),
        "RSS".into(),
        mib(a.idle_rss_kib),
        mib(a.idle_rss_kib),
        "MiB",
        "< 10 MiB".into(),
    ));
    rows.push((
        format!("agent idle {idle} s"),
        "CPU".into(),
        a.idle_cpu_percent,
        a.idle_cpu_percent,
        "%",
        "< 0.1%".into(),
    ));
    rows.push((
        format!("agent burst {burst} commands"),
        "all finished".into(),
        a.burst_s,
        a.burst_s,
        "s",
        String::new(),
    ));
    rows.push((
        format!("agent burst {burst} commands"),
        "peak RSS".into(),
        mib(a.burst_peak_rss_kib),
        mib(a.burst_peak_rss_kib),
        "MiB",
        String::new(),
    ));
    rows.push((
        format!("agent burst {burst} commands"),
        "CPU (with plugins)".into(),
        a.burst_cpu_s,
        a.burst_cpu_s,
        "s",
        String::new(),
    ));
    let ing = ingest::Ingest {
        results: 2000,
        packages: 500,
    };
    eprintln!("footprint: server storing {} results", ing.results);
    let s = fleet::server_footprint(stack, ing).await?;
    rows.push((
        "server ingesting 2000 x 500 packages".into(),
        "RSS idle".into(),
        mib(s.idle_rss_kib),
        mib(s.idle_rss_kib),
        "MiB",
        String::new(),
    ));
    rows.push((
        "server ingesting 2000 x 500 packages".into(),
        "peak RSS".into(),
        mib(s.peak_rss_kib),
        mib(s.peak_rss_kib),
        "MiB",
        String::new(),
    ));
    json.push(json!({"benchmark": "footprint", "idle_s": idle, "agent_idle_rss_kib": a.idle_rss_kib, "agent_idle_cpu_s": a.idle_cpu_s,
        "agent_idle_cpu_percent": a.idle_cpu_percent, "burst": burst, "agent_burst_s": a.burst_s, "agent_burst_peak_rss_kib": a.burst_peak_rss_kib,
        "agent_burst_cpu_s": a.burst_cpu_s, "server_idle_rss_kib": s.idle_rss_kib, "server_peak_rss_kib": s.peak_rss_kib, "server_ingest_s": s.seconds}));
    Ok(())
}

/// The database's `GET /` answer, recorded with every result.
async fn database_welcome(stack: &Stack) -> Result<Value> {
    let couch = vogeler_core::couch::CouchClient::new(
        &vogeler_proto::secret::SecretUrl::parse(&stack.couchdb_url)?,
        None,
    )?;
    couch.welcome().await.with_context(|| {
        format!(
            "no database at {} (scripts/stack.sh up)",
            redacted(&stack.couchdb_url)
        )
    })
}

/// A URL without its password, for messages.
fn redacted(url: &str) -> String {
    vogeler_proto::secret::SecretUrl::parse(url)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| "(unparsable URL)".into())
}

fn print_table(rows: &[Row]) {
    let header = ("benchmark", "measure", "p50", "max", "unit", "target");
    println!(
        "{:<38} {:<36} {:>9} {:>9} {:<4} {}",
        header.0, header.1, header.2, header.3, header.4, header.5
    );
    for (b, m, p, x, unit, target) in rows {
        println!("{b:<38} {m:<36} {p:>9.2} {x:>9.2} {unit:<4} {target}");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.runs > 0, "--runs must be at least 1");
    let stack = Stack {
        amqp_url: cli.amqp_url.clone(),
        couchdb_url: cli.couchdb_url.clone(),
    };
    let couchdb = database_welcome(&stack).await?;
    let measured_on = format!(
        "{} {}",
        if couchdb["couchdb"] == "Welcome" {
            "Apache CouchDB"
        } else {
            "a CouchDB-compatible server (not Apache CouchDB)"
        },
        couchdb["version"].as_str().unwrap_or("of unknown version")
    );
    eprintln!(
        "measuring on {measured_on} at {}",
        redacted(&stack.couchdb_url)
    );
    let what = cli.what.clone().unwrap_or(What::All);
    let (mut rows, mut json) = (Vec::new(), Vec::new());
    let name = match &what {
        What::All => {
            fanout(
                &stack,
                &[10, 100, 1000, 5000],
                cli.runs,
                &mut rows,
                &mut json,
                Some(5000),
            )
            .await?;
            ingest_rows(
                &stack,
                ingest::Ingest {
                    results: 2000,
                    packages: 500,
                },
                3.min(cli.runs),
                &mut rows,
                &mut json,
            )
            .await?;
            footprint_rows(&stack, 60, 100, &mut rows, &mut json).await?;
            "all"
        }
        What::Fanout { nodes } => {
            fanout(&stack, nodes, cli.runs, &mut rows, &mut json, None).await?;
            "fanout"
        }
        What::Targeting { nodes } => {
            let (fleet, _) = fleet::simulated(&stack, *nodes).await?;
            targeting_rows(&fleet, *nodes, cli.runs, &mut rows, &mut json).await?;
            fleet.stop().await?;
            "targeting"
        }
        What::Ingest { results, packages } => {
            anyhow::ensure!(*results > 0, "--results must be at least 1");
            ingest_rows(
                &stack,
                ingest::Ingest {
                    results: *results,
                    packages: *packages,
                },
                cli.runs,
                &mut rows,
                &mut json,
            )
            .await?;
            "ingest"
        }
        What::ServerMemory { results, packages } => {
            let ing = ingest::Ingest {
                results: *results,
                packages: *packages,
            };
            let bytes = wire_size(ing);
            eprintln!(
                "server-memory: {results} results of {:.1} MiB each",
                bytes as f64 / 1048576.0
            );
            let s = fleet::server_footprint(&stack, ing).await?;
            let mib = |k: u64| k as f64 / 1024.0;
            let what = format!(
                "server storing {results} x {:.1} MiB",
                bytes as f64 / 1048576.0
            );
            rows.push((
                what.clone(),
                "RSS idle".into(),
                mib(s.idle_rss_kib),
                mib(s.idle_rss_kib),
                "MiB",
                String::new(),
            ));
            rows.push((
                what.clone(),
                "RSS peak".into(),
                mib(s.peak_rss_kib),
                mib(s.peak_rss_kib),
                "MiB",
                "bounded by server.max_in_flight_bytes".into(),
            ));
            rows.push((
                what,
                "all stored".into(),
                s.seconds,
                s.seconds,
                "s",
                String::new(),
            ));
            json.push(json!({"benchmark": "server-memory", "results": results, "packages": packages, "result_bytes": bytes,
                "server_idle_rss_kib": s.idle_rss_kib, "server_peak_rss_kib": s.peak_rss_kib, "seconds": s.seconds}));
            "server-memory"
        }
        What::ScheduleDay {
            nodes,
            packages,
            heartbeat_minutes,
        } => {
            anyhow::ensure!(*nodes > 0, "--nodes must be at least 1");
            anyhow::ensure!(
                *heartbeat_minutes <= 60,
                "--heartbeat-minutes must be 0 (none) to 60"
            );
            for change_only in [false, true] {
                let c = day::simulate(&stack, *nodes, *packages, change_only, *heartbeat_minutes)
                    .await?;
                let what = format!(
                    "{nodes} nodes, 1 day, {}",
                    if change_only {
                        "change-only"
                    } else {
                        "every value sent"
                    }
                );
                let mut row = |m: &str, v: f64, unit: &'static str| {
                    rows.push((what.clone(), m.to_string(), v, v, unit, String::new()));
                };
                row("results", c.results as f64, "");
                row("results with their value", c.full_results as f64, "");
                row("bytes on the wire", c.wire_bytes as f64 / 1048576.0, "MiB");
                row("heartbeats", c.heartbeats as f64, "");
                row("document writes", c.document_writes as f64, "");
                row("  node documents", c.node_document_writes as f64, "");
                row("  freshness documents", c.freshness_writes as f64, "");
                row("history entries", c.history_entries as f64, "");
                row("server CPU", c.server_cpu_s, "s");
                row(
                    "database growth",
                    c.database_growth_bytes as f64 / 1048576.0,
                    "MiB",
                );
                row("stored in", c.seconds, "s");
                json.push(json!({"benchmark": "schedule-day", "nodes": nodes, "packages": packages, "cost": c}));
            }
            "schedule-day"
        }
        What::Questions { nodes, packages } => {
            anyhow::ensure!(*nodes > 0, "--nodes must be at least 1");
            let q = questions::run(&stack, *nodes, *packages, cli.runs).await?;
            let what = format!("questions, {nodes} nodes x {packages} packages");
            let mut row = |m: String, p: f64, x: f64, unit: &'static str| {
                rows.push((what.clone(), m, p, x, unit, String::new()));
            };
            row("load through the server".into(), q.load_s, q.load_s, "s");
            row("views built (first read)".into(), q.index_s, q.index_s, "s");
            row(
                "database size".into(),
                q.database_bytes as f64 / 1048576.0,
                q.database_bytes as f64 / 1048576.0,
                "MiB",
            );
            for a in &q.asked {
                row(a.question.clone(), p50(&a.seconds), max(&a.seconds), "s");
                let mib = a.bytes as f64 / 1048576.0;
                row(
                    format!("  received ({} in the answer)", a.answer),
                    mib,
                    mib,
                    "MiB",
                );
            }
            json.push(json!({"benchmark": "questions", "result": q}));
            "questions"
        }
        What::Footprint { idle, burst } => {
            footprint_rows(&stack, *idle, *burst, &mut rows, &mut json).await?;
            "footprint"
        }
    };
    println!();
    println!("database: {measured_on}");
    print_table(&rows);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let out = json!({
        "at": Utc::now(), "benchmark": name, "runs": cli.runs, "cpus": cpus,
        "version": env!("CARGO_PKG_VERSION"),
        "couchdb": couchdb,
        "table": rows.iter().map(|(b, m, p, x, u, t)| json!({"benchmark": b, "measure": m, "p50": p, "max": x, "unit": u, "target": t})).collect::<Vec<_>>(),
        "details": json,
    });
    let dir = repo().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!(
        "{name}-{}.json",
        Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::write(&file, serde_json::to_string_pretty(&out)?)?;
    eprintln!("written to {}", file.display());
    Ok(())
}
