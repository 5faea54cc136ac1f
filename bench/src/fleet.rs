//! Benchmarks with the real programs as separate processes: fan-out round trips against
//! `vogeler-agent simulate` fleets, fact-filter targeting over the registered nodes, and the
//! footprint of one real agent and of the server.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chrono::Utc;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vogeler_config::{self as config, RunnerSettings, Sources};
use vogeler_core::{amqp, couch::CouchClient};
use vogeler_proto::{
    names::{NodeName, PluginName},
    secret::SecretUrl,
    topology::Topology,
    wire::{Command as WireCommand, Message, Target},
};

use crate::{Stack, ingest};

/// A private collective and database with keys, and the programs started in it.
pub struct Fleet {
    pub stack: Stack,
    pub collective: String,
    pub database: String,
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

/// The release binaries next to this one (`bench/run.sh` builds them).
fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("bin dir")?.join(name);
    ensure!(
        path.is_file(),
        "{} is missing: cargo build --release",
        path.display()
    );
    Ok(path)
}

/// How much of its time a process spent on a CPU, and its memory, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    /// User + system CPU seconds of the process and its reaped children.
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

pub fn proc_stat(pid: u32) -> Result<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat format")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime, stime, cutime, cstime are fields 14-17 of stat, 11-14 after the name.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu_s = (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStat {
        cpu_s,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

impl Fleet {
    pub fn new(stack: &Stack, tag: &str) -> Result<Self> {
        let id = &Uuid::new_v4().simple().to_string()[..8];
        let dir = tempfile::tempdir()?;
        vogeler_runner::inventory::keygen(&dir.path().join("keys"), "bench")?;
        Ok(Self {
            stack: stack.clone(),
            collective: format!("bench-{tag}-{id}"),
            database: format!("bench_{tag}_{id}"),
            dir,
            children: Vec::new(),
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        let keys = self.dir.path().join("keys");
        [
            ("VOGELER_AMQP__URL", self.stack.amqp_url.clone()),
            ("VOGELER_AMQP__COLLECTIVE", self.collective.clone()),
            ("VOGELER_AMQP__QUEUE_EXPIRES", "120s".into()),
            ("VOGELER_COUCHDB__URL", self.stack.couchdb_url.clone()),
            ("VOGELER_COUCHDB__DATABASE", self.database.clone()),
            ("VOGELER_LOG__LEVEL", "warn".into()),
            (
                "VOGELER_AGENT__AUTHORIZED_KEYS",
                keys.join("runner.pub").display().to_string(),
            ),
            (
                "VOGELER_AGENT__STATE_DIR",
                self.dir.path().join("state").display().to_string(),
            ),
            (
                "VOGELER_AGENT__PLUGIN_DIR",
                crate::repo().join("plugins").display().to_string(),
            ),
            // No announcements during measurements: only results change documents.
            ("VOGELER_AGENT__HEARTBEAT", "1h".into()),
            (
                "VOGELER_RUNNER__SIGNING_KEY",
                keys.join("runner.key").display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Start a program of this fleet; its stderr goes to a log file in the fleet's directory.
    pub fn spawn(&mut self, program: &str, args: &[&str]) -> Result<u32> {
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("{program}-{}.log", self.children.len())),
        )?;
        let child = Command::new(bin(program)?)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {program}"))?;
        let pid = child.id().context("pid")?;
        self.children.push(child);
        Ok(pid)
    }

    pub fn couch(&self) -> Result<CouchClient> {
        Ok(CouchClient::new(
            &SecretUrl::parse(&self.stack.couchdb_url)?,
            None,
        )?)
    }

    pub fn runner_settings(&self) -> Result<RunnerSettings> {
        self.runner_settings_with(&[])
    }

    /// Runner settings with some of the fleet's variables replaced.
    pub fn runner_settings_with(&self, overrides: &[(&str, &str)]) -> Result<RunnerSettings> {
        let mut env: std::collections::BTreeMap<String, String> = self.env().into_iter().collect();
        for (k, v) in overrides {
            env.insert(k.to_string(), v.to_string());
        }
        let sources = Sources {
            env: Some(env.into_iter().collect()),
            ..Default::default()
        };
        Ok(config::load(&sources)?.runner()?)
    }

    /// Wait until `n` node documents exist (the design document is the +1).
    pub async fn wait_registered(&self, n: usize, limit: Duration) -> Result<Duration> {
        let couch = self.couch()?;
        let started = Instant::now();
        loop {
            if couch.doc_count(&self.database).await.unwrap_or(0) > n as u64 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!(
                    "{n} nodes did not register within {limit:?}; logs in {}",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop the programs (SIGTERM, then wait) and delete the databases.
    pub async fn stop(mut self) -> Result<()> {
        for c in &self.children {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for c in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
        }
        let couch = self.couch()?;
        let _ = couch.delete_database(&self.database).await;
        let _ = couch
            .delete_database(&format!("{}_history", self.database))
            .await;
        Ok(())
    }
}

/// One fan-out: the time until the runner had every reply, and until every node's document
/// held the new result.
#[derive(Debug, Clone, Copy)]
pub struct RoundTrip {
    pub replies_s: f64,
    pub stored_s: f64,
}

/// `GET /{db}` and `_changes` through plain HTTP: the documented API, nothing Vogeler-specific.
async fn update_seq(http: &reqwest::Client, base: &str, db: &str) -> Result<Value> {
    let info: Value = http
        .get(format!("{base}/{db}"))
        .send()
        .await?
        .json()
        .await?;
    Ok(info["update_seq"].clone())
}

/// Follow `_changes` from `since` until `n` distinct node documents changed.
async fn wait_changed(
    http: &reqwest::Client,
    base: &str,
    db: &str,
    since: Value,
    n: usize,
    limit: Duration,
) -> Result<()> {
    let started = Instant::now();
    let mut seen = HashSet::new();
    let mut since = since;
    while seen.len() < n {
        ensure!(
            started.elapsed() < limit,
            "only {} of {n} documents updated within {limit:?}",
            seen.len()
        );
        let since_param = match &since {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let page: Value = http
            .get(format!("{base}/{db}/_changes"))
            .query(&[("since", since_param.as_str()), ("limit", "10000")])
            .send()
            .await?
            .json()
            .await?;
        let rows = page["results"].as_array().cloned().unwrap_or_default();
        for r in &rows {
            if let Some(id) = r["id"].as_str()
                && !id.starts_with("_design/")
            {
                seen.insert(id.to_string());
            }
        }
        since = page["last_seq"].clone();
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Run `-c hello -n all` through the runner library and time replies and storage.
pub async fn round_trip(fleet: &Fleet, n: usize) -> Result<RoundTrip> {
    let settings = fleet.runner_settings()?;
    let http = reqwest::Client::new();
    let base = fleet.stack.couchdb_url.trim_end_matches('/').to_string();
    let since = update_seq(&http, &base, &fleet.database).await?;
    let query = vogeler_runner::Query {
        plugin: PluginName::new("hello")?,
        nodes: vogeler_runner::target::parse("all", &vogeler_runner::target::Files)
            .map_err(anyhow::Error::msg)?,
        nodes_text: "all".into(),
        timeout: Duration::from_secs(60),
        ttl: Duration::from_secs(60),
        batch: None,
        cached: None,
    };
    let started = Instant::now();
    let limit = Duration::from_secs(120);
    let stored = {
        let (http, base, db) = (http.clone(), base.clone(), fleet.database.clone());
        tokio::spawn(async move {
            wait_changed(&http, &base, &db, since, n, limit).await?;
            anyhow::Ok(started.elapsed())
        })
    };
    let mut last_reply = Duration::ZERO;
    let mut on_reply = |p: vogeler_runner::Progress<'_>| {
        if let vogeler_runner::Progress::Reply(_) = p {
            last_reply = started.elapsed();
        }
    };
    let report =
        vogeler_runner::query(&settings, &query, &CancellationToken::new(), &mut on_reply).await?;
    let answered = report.replies.len();
    ensure!(
        answered == n,
        "{answered} of {n} nodes answered; logs in {}",
        fleet.dir.path().display()
    );
    let stored = stored.await??;
    Ok(RoundTrip {
        replies_s: last_reply.as_secs_f64(),
        stored_s: stored.as_secs_f64(),
    })
}

/// Resolve a node set the way the runner does (read the registry view, select in the
/// inventory); returns seconds and how many nodes matched.
pub async fn targeting(fleet: &Fleet, expr: &str) -> Result<(f64, usize)> {
    let settings = fleet.runner_settings()?;
    let set = vogeler_runner::target::parse(expr, &vogeler_runner::target::Files)
        .map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let registry = vogeler_runner::registry(&settings.couch, settings.freshness).await?;
    let selected = vogeler_runner::select_nodes(&settings.couch, &set, &registry).await?;
    let matched = set.resolve(&selected, &registry).len();
    Ok((started.elapsed().as_secs_f64(), matched))
}

/// A simulated fleet of `n` nodes, registered.
pub async fn simulated(stack: &Stack, n: usize) -> Result<(Fleet, Duration)> {
    let mut fleet = Fleet::new(stack, &format!("n{n}"))?;
    fleet.spawn("vogeler-server", &[])?;
    let count = n.to_string();
    let prefix = format!("{}-", &fleet.collective[6..]);
    fleet.spawn(
        "vogeler-agent",
        &["simulate", "--count", &count, "--prefix", &prefix],
    )?;
    let took = fleet
        .wait_registered(n, Duration::from_secs(60 + n as u64 / 20))
        .await?;
    Ok((fleet, took))
}

/// Footprint of one real agent process: idle for `idle`, then during a burst of `burst`
/// commands published at once.
#[derive(Debug, Clone, Copy)]
pub struct AgentFootprint {
    pub idle_rss_kib: u64,
    pub idle_cpu_s: f64,
    pub idle_cpu_percent: f64,
    pub burst_s: f64,
    pub burst_peak_rss_kib: u64,
    pub burst_cpu_s: f64,
}

pub async fn agent_footprint(
    stack: &Stack,
    idle: Duration,
    burst: usize,
) -> Result<AgentFootprint> {
    let mut fleet = Fleet::new(stack, "fp")?;
    fleet.spawn("vogeler-server", &[])?;
    let node = format!("{}-node", &fleet.collective[6..]);
    let pid = fleet.spawn("vogeler-agent", &["--node", &node])?;
    fleet.wait_registered(1, Duration::from_secs(60)).await?;
    // Settle after start-up before measuring idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = proc_stat(pid)?;
    let mut peak_idle = before.rss_kib;
    let until = Instant::now() + idle;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_idle = peak_idle.max(proc_stat(pid)?.rss_kib);
    }
    let after = proc_stat(pid)?;
    let idle_cpu_s = after.cpu_s - before.cpu_s;

    // The burst: `burst` signed commands for `hello`, published back to back.
    let settings = fleet.runner_settings()?;
    let key = vogeler_core::keyfile::load_private(&settings.signing_key)?;
    let conn = amqp::connect_any(&settings.broker.url, "vogeler-bench").await?;
    let ch = amqp::publisher_channel(&conn).await?;
    let topology = &settings.broker.topology;
    let target = Target::Node(NodeName::new(node.clone())?);
    let routing_key = Topology::command_routing_key(&target);
    let audit = fleet.dir.path().join("state").join(&node).join("audit.log");
    let finished_before = finished_lines(&audit);
    let started = Instant::now();
    for _ in 0..burst {
        let command = Message::Command(WireCommand::new(
            Uuid::new_v4(),
            PluginName::new("hello")?,
            target.clone(),
            Utc::now(),
            chrono::Duration::seconds(60),
        ));
        amqp::publish_command(
            &ch,
            &topology.commands_exchange(),
            &routing_key,
            &command,
            &key,
            Duration::from_secs(60),
        )
        .await?;
    }
    while finished_lines(&audit) < finished_before + burst {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the agent did not finish {burst} commands within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let burst_s = started.elapsed().as_secs_f64();
    let end = proc_stat(pid)?;
    let _ = conn.close(200, "done".into()).await;
    fleet.stop().await?;
    Ok(AgentFootprint {
        idle_rss_kib: peak_idle,
        idle_cpu_s,
        idle_cpu_percent: 100.0 * idle_cpu_s / idle.as_secs_f64(),
        burst_s,
        burst_peak_rss_kib: end.peak_rss_kib,
        burst_cpu_s: end.cpu_s - after.cpu_s,
    })
}

fn finished_lines(audit: &Path) -> usize {
    std::fs::read_to_string(audit)
        .map(|s| s.lines().filter(|l| l.contains("\"finished\"")).count())
        .unwrap_or(0)
}

/// The server process's memory while it stores `results` realistic results.
#[derive(Debug, Clone, Copy)]
pub struct ServerFootprint {
    pub idle_rss_kib: u64,
    pub peak_rss_kib: u64,
    pub seconds: f64,
}

pub async fn server_footprint(stack: &Stack, ing: ingest::Ingest) -> Result<ServerFootprint> {
    let mut fleet = Fleet::new(stack, "srv")?;
    let pid = fleet.spawn("vogeler-server", &[])?;
    let couch = fleet.couch()?;
    // Ready once it created the database (with its design document).
    let ready = Instant::now();
    while couch.doc_count(&fleet.database).await.unwrap_or(0) < 1 {
        ensure!(
            ready.elapsed() < Duration::from_secs(60),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle = proc_stat(pid)?.rss_kib;
    let settings = fleet.runner_settings()?;
    let started = Instant::now();
    ingest::publish_results(&settings.broker, ing).await?;
    let want = ing.results as u64 + 1;
    while couch.doc_count(&fleet.database).await.unwrap_or(0) < want {
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "server did not store the results"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak = proc_stat(pid)?.peak_rss_kib;
    fleet.stop().await?;
    Ok(ServerFootprint {
        idle_rss_kib: idle,
        peak_rss_kib: peak,
        seconds,
    })
}
