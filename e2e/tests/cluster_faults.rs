//! Cluster faults: a RabbitMQ node, a CouchDB node, both at once, and a rolling restart of
//! the three RabbitMQ nodes, each under a continuous stream of `-n all` queries to 200
//! in-process agents. Each scenario prints one row of a Markdown table and asserts only what
//! must hold: every published result stored in the end, none stored twice. The rest (the
//! longest time a node went unheard, how many nodes fell silent, the recovery time) is
//! reported, not asserted.
//!
//! `#[ignore]`d, and they refuse to run unless `VOGELER_TEST_AMQP_URL` and
//! `VOGELER_TEST_COUCHDB_URL` list the three nodes of `scripts/cluster.sh`: they kill its
//! nodes. `scripts/faults.sh cluster` brings the cluster up and runs them one at a time.
//!
//! How results are counted:
//! - **published**: the agents' `finished` audit lines. An agent writes one when a run ends,
//!   then publishes the result, retrying until the broker confirms it (`agent/src/lib.rs`,
//!   `handle`); there is no audit line for the confirm itself. So once the stream has stopped
//!   and every `accepted` command has its `finished` line, each finished result is either
//!   confirmed by the broker or still being retried, and waiting until it is stored covers
//!   both.
//! - **stored**: the server's history. Each run's value is its request id and the shell's
//!   pid, so every stored result changes its plugin's value: its history entry names it
//!   (`request_id`), the next entry of that node's plugin names it again in `old`, and the
//!   node document holds the newest. The queries go round [`PLUGINS`] plugins so that no
//!   node's plugin changes more often than the server's history budget records
//!   ([`vogeler_server::budget::PER_WINDOW`] an hour); the first value of each has no entry
//!   of its own (it is not a change) but shows up as the next entry's `old`.
//! - **duplicated**: more than one history entry for one node and request id: a command run
//!   twice (the pid differs, so the value does). A redelivered result is the same value at
//!   the same time, the same entry id, and writes nothing new.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use vogeler_config::{RunnerSettings, Sources};
use vogeler_core::couch::Fetched;
use vogeler_core::observe::ServerMetrics;
use vogeler_e2e::{TestStack, plugin_dir, spawn_agent, spawn_server_with, url_list};
use vogeler_proto::{
    document::{HistoryEntry, NodeDocument},
    names::PluginName,
};

/// Simulated nodes: in-process agents, each with its own name, key, queue and connection.
/// `VOGELER_CLUSTER_AGENTS` sets another number (a shorter run while changing this file).
const AGENTS: usize = 200;
/// Plugins the queries go round (see the module doc: the history budget).
const PLUGINS: usize = 40;
/// The runner's timeout for each query, in seconds; `VOGELER_CLUSTER_TIMEOUT` sets another.
const TIMEOUT: &str = "5";
/// The runner's timeout for the queries before the stream, in seconds.
const WARMUP_TIMEOUT: &str = "120";
/// One query starts at most this often (one after another: the next starts when the last
/// ended, or this long after it started).
const PACE: Duration = Duration::from_secs(1);
/// Queries before the fault.
const STEADY: Duration = Duration::from_secs(10);
/// How long a killed node stays down.
const OUTAGE: Duration = Duration::from_secs(20);
/// How long after the last node came back every node must answer again before the stream
/// stops anyway (and the row says it did not recover).
const RECOVERY_LIMIT: Duration = Duration::from_secs(180);
/// How long after the stream stopped every published result must be stored.
const STORE_LIMIT: Duration = Duration::from_secs(180);
/// A node unheard for longer than this is counted as having fallen silent.
const SILENT: Duration = Duration::from_secs(10);

/// The three URLs in `var`, or a panic that says how to run these tests.
fn three_nodes(var: &str) -> Vec<String> {
    let raw = std::env::var(var).unwrap_or_default();
    let urls: Vec<String> = vogeler_proto::secret::split_url_list(&raw)
        .into_iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    assert!(
        urls.len() == 3,
        "{var} lists {} node(s); these tests kill nodes of the 3-node clusters of scripts/cluster.sh and need all three: run scripts/faults.sh cluster (or scripts/cluster.sh up && eval \"$(scripts/cluster.sh env)\" first)",
        urls.len()
    );
    urls
}

/// Run `scripts/cluster.sh ARGS` (`kill NODE`, `start NODE`), failing the test if it fails.
async fn cluster_sh(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh");
    let out = tokio::process::Command::new(&script)
        .args(args)
        .output()
        .await
        .expect("run scripts/cluster.sh");
    assert!(
        out.status.success(),
        "scripts/cluster.sh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stack's settings with the results queue a quorum queue (it must survive its node).
fn sources(stack: &TestStack) -> Sources {
    let mut s = stack.sources();
    s.set("amqp.results_queue_type", Some("quorum"));
    s
}

/// One query of the stream, as the runner saw it.
#[derive(Debug)]
struct Asked {
    plugin: usize,
    started: Instant,
    ended: Instant,
    /// Each node that answered, with when its reply reached the runner.
    replies: Vec<(String, Instant)>,
    /// The runner's error, when the query failed as a whole.
    error: Option<String>,
}

/// Ask every node for plugin `rid<plugin>`, through the real runner code, keeping errors.
async fn ask(runner: &RunnerSettings, plugin: usize) -> Asked {
    let q = vogeler_runner::Query {
        plugin: PluginName::new(format!("rid{plugin:02}")).expect("plugin"),
        nodes: vogeler_runner::target::parse("all", &vogeler_runner::target::Files).expect("all"),
        nodes_text: "all".into(),
        timeout: runner.timeout,
        ttl: runner.ttl,
        batch: None,
        cached: None,
    };
    let started = Instant::now();
    let mut replies = Vec::new();
    let outcome = vogeler_runner::query(runner, &q, &CancellationToken::new(), &mut |p| {
        if let vogeler_runner::Progress::Reply(r) = p {
            replies.push((r.node.to_string(), Instant::now()));
        }
    })
    .await;
    Asked {
        plugin,
        started,
        ended: Instant::now(),
        replies,
        error: outcome.err().map(|e| e.to_string()),
    }
}

/// The server, the agents and the runner's settings of one scenario.
struct Fleet {
    names: Vec<String>,
    runner: RunnerSettings,
    /// The same with a timeout of [`WARMUP_TIMEOUT`]: before the fault every node must
    /// answer once, however slow the machine.
    warmup: RunnerSettings,
    agents: Vec<vogeler_e2e::Running<vogeler_agent::AgentError>>,
    server: vogeler_e2e::Running<vogeler_server::ServerError>,
    /// The server's counters: what it consumed and stored, what waits in its queue.
    metrics: ServerMetrics,
}

impl Fleet {
    /// A server on both lists, and `n` agents, agent `i` given the broker list rotated by
    /// `i` so that a third of them connect (and keep their queue) on each broker node.
    async fn start(stack: &TestStack, plugins: &Path, n: usize) -> Self {
        let metrics = ServerMetrics::default();
        let server = spawn_server_with(
            vogeler_config::load(&sources(stack))
                .expect("load")
                .server()
                .expect("server settings"),
            metrics.clone(),
        );
        let brokers: Vec<String> = url_list(&stack.amqp_url)
            .iter()
            .map(|u| u.expose().to_string())
            .collect();
        let names: Vec<String> = (0..n).map(|i| format!("cl{i:03}")).collect();
        let agents = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut list = brokers.clone();
                list.rotate_left(i % brokers.len());
                let mut s = sources(stack);
                s.set("amqp.url", Some(list.join(",")))
                    .set("agent.node", Some(name))
                    .set("agent.plugin_dir", Some(plugins.display()));
                spawn_agent(
                    vogeler_config::load(&s)
                        .expect("load")
                        .agent(None)
                        .expect("agent settings"),
                )
            })
            .collect();
        let runner_with = |timeout: &str| {
            let mut s = sources(stack);
            s.set("runner.timeout", Some(timeout));
            vogeler_config::load(&s)
                .expect("load")
                .runner()
                .expect("runner settings")
        };
        let runner = runner_with(
            &std::env::var("VOGELER_CLUSTER_TIMEOUT").unwrap_or_else(|_| TIMEOUT.into()),
        );
        let warmup = runner_with(WARMUP_TIMEOUT);
        vogeler_e2e::wait_for(
            &format!("{n} agents registered"),
            Duration::from_secs(120),
            || async { stack.node_ids().await.len() >= n },
        )
        .await;
        Self {
            names,
            runner,
            warmup,
            agents,
            server,
            metrics,
        }
    }

    /// Cancel every agent and the server and wait (up to 60 s) for them to stop: how many
    /// agents had not, and what the server's `run` returned (`None`: it had not stopped).
    async fn stop(mut self) -> (usize, Option<String>) {
        for a in &self.agents {
            a.cancel.cancel();
        }
        self.server.cancel.cancel();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut running = 0;
        for a in &mut self.agents {
            if let Some(task) = a.task.take()
                && tokio::time::timeout_at(deadline, task).await.is_err()
            {
                running += 1;
            }
        }
        let server = match self.server.task.take() {
            Some(task) => tokio::time::timeout_at(deadline, task).await.ok().map(|r| {
                match r.expect("the server task panicked") {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error: {e}"),
                }
            }),
            None => None,
        };
        (running, server)
    }
}

/// Ask one query after another (at most one per [`PACE`]) until `stop`, going round the
/// plugins; `full` hears the start of each query every node answered.
async fn stream(
    runner: RunnerSettings,
    nodes: usize,
    first_plugin: usize,
    stop: CancellationToken,
    full: watch::Sender<Option<Instant>>,
) -> Vec<Asked> {
    let mut asked = Vec::new();
    let mut plugin = first_plugin;
    while !stop.is_cancelled() {
        let a = ask(&runner, plugin % PLUGINS).await;
        plugin += 1;
        if a.replies.len() >= nodes {
            full.send_replace(Some(a.started));
        }
        let next = a.started + PACE;
        asked.push(a);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = stop.cancelled() => {}
        }
    }
    asked
}

/// What the agents published and the server stored, at one moment.
#[derive(Debug, Default)]
struct Accounting {
    /// (node, request id) of every `finished` audit line.
    published: BTreeSet<(String, String)>,
    /// Commands accepted with no `finished` line yet (running, or about to be).
    running: usize,
    /// (node, request id) of every result the history or a node document shows stored.
    stored: BTreeSet<(String, String)>,
    /// Stored values beyond the first for one node and request id (a command run twice).
    duplicates: usize,
    history_entries: usize,
}

impl Accounting {
    fn lost(&self) -> Vec<&(String, String)> {
        self.published.difference(&self.stored).collect()
    }

    fn stored_published(&self) -> usize {
        self.published.intersection(&self.stored).count()
    }

    /// Results stored that no agent recorded as finished (none expected).
    fn unexplained(&self) -> usize {
        self.stored.difference(&self.published).count()
    }
}

/// The request id a `rid` value starts with, and the value.
fn request_of(value: &serde_json::Value) -> Option<(String, String)> {
    let text = value.as_str()?;
    Some((
        text.split_whitespace().next()?.to_string(),
        text.to_string(),
    ))
}

async fn account(stack: &TestStack, names: &[String]) -> Accounting {
    let mut a = Accounting::default();
    for n in names {
        let mut accepted = BTreeSet::new();
        for line in stack.audit_log(n).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line still being written
            };
            let Some(id) = v["request_id"].as_str() else {
                continue;
            };
            match v["event"].as_str() {
                Some("accepted") => {
                    accepted.insert(id.to_string());
                }
                Some("finished") => {
                    accepted.remove(id);
                    a.published.insert((n.clone(), id.to_string()));
                }
                _ => {}
            }
        }
        a.running += accepted.len();
    }
    let history_db = format!("{}_history", stack.database);
    let ids = stack.history_ids().await;
    a.history_entries = ids.len();
    // Every stored value, by node and request id: more than one is a command that ran twice.
    let mut values: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut note = |node: &str, value: &serde_json::Value| {
        if let Some((request, text)) = request_of(value) {
            values
                .entry((node.to_string(), request))
                .or_default()
                .insert(text);
        }
    };
    for chunk in ids.chunks(1000) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let entries = stack
            .couch
            .get_many::<HistoryEntry>(&history_db, &chunk)
            .await
            .expect("read history entries");
        for (_, e) in entries {
            let Fetched::Found(e) = e else { continue };
            note(&e.node, &e.new);
            note(&e.node, &e.old);
        }
    }
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    for chunk in wanted.chunks(100) {
        let docs = stack
            .couch
            .get_many::<NodeDocument>(&stack.database, chunk)
            .await
            .expect("read node documents");
        for (node, doc) in docs {
            let Fetched::Found(doc) = doc else { continue };
            for (key, value) in &doc.values {
                if key.starts_with("rid") {
                    note(&node, value);
                }
            }
        }
    }
    a.duplicates = values.values().map(|v| v.len() - 1).sum();
    a.stored = values.into_keys().collect();
    a
}

/// What is done to the cluster.
enum Fault {
    /// Kill these nodes together, keep them down for [`OUTAGE`], start them again.
    Outage(&'static [&'static str]),
    /// Kill and start each in turn, the next once the last is back in its cluster.
    RollingRestart(&'static [&'static str]),
}

/// When the fault happened, as the scenario saw it.
struct Timeline {
    /// The first kill.
    killed: Instant,
    /// The last node back in its cluster (`scripts/cluster.sh start` returned).
    back: Instant,
    /// How long each `start` took, node by node.
    starts: Vec<(&'static str, Duration)>,
}

async fn inflict(fault: &Fault) -> Timeline {
    let mut starts = Vec::new();
    let killed = Instant::now();
    match fault {
        Fault::Outage(nodes) => {
            futures_util::future::join_all(
                nodes
                    .iter()
                    .map(|n| async move { cluster_sh(&["kill", n]).await }),
            )
            .await;
            println!("cluster killed {}", nodes.join(" and "));
            tokio::time::sleep(OUTAGE).await; // the outage itself
            // One at a time: starts share the cluster script's state directory.
            for n in *nodes {
                let t = Instant::now();
                cluster_sh(&["start", n]).await;
                starts.push((*n, t.elapsed()));
            }
        }
        Fault::RollingRestart(nodes) => {
            for n in *nodes {
                cluster_sh(&["kill", n]).await;
                let t = Instant::now();
                cluster_sh(&["start", n]).await;
                starts.push((*n, t.elapsed()));
                println!(
                    "cluster restarted {n}: back in its cluster {:.1}s after the kill",
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    Timeline {
        killed,
        back: Instant::now(),
        starts,
    }
}

/// Per node, the longest time no answer of it reached the runner within the stream.
fn gaps(asked: &[Asked], names: &[String]) -> BTreeMap<String, Duration> {
    let (Some(first), Some(last)) = (asked.first(), asked.last()) else {
        return BTreeMap::new();
    };
    let mut heard: BTreeMap<&str, Vec<Instant>> =
        names.iter().map(|n| (n.as_str(), Vec::new())).collect();
    for a in asked {
        for (n, at) in &a.replies {
            if let Some(times) = heard.get_mut(n.as_str()) {
                times.push(*at);
            }
        }
    }
    heard
        .into_iter()
        .map(|(n, mut times)| {
            times.sort();
            let mut bounds = vec![first.started];
            bounds.extend(times);
            bounds.push(last.ended);
            let gap = bounds
                .windows(2)
                .map(|w| w[1].saturating_duration_since(w[0]))
                .max()
                .unwrap_or_default();
            (n.to_string(), gap)
        })
        .collect()
}

const HEADER: &str = "| scenario | queries (failed, all answered) | results published | stored | lost | duplicated in history | longest gap in answers | nodes that missed an answer (silent > 10 s) | recovery |\n|---|---|---|---|---|---|---|---|---|";

/// One scenario's numbers.
struct Row {
    lost: usize,
    duplicates: usize,
}

async fn scenario(name: &str, fault: Fault) -> Row {
    three_nodes("VOGELER_TEST_AMQP_URL");
    three_nodes("VOGELER_TEST_COUCHDB_URL");
    // lapin logs every passive declare that finds nothing (the probes) at ERROR.
    vogeler_core::telemetry::init("warn,lapin=off");
    let nodes = std::env::var("VOGELER_CLUSTER_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(AGENTS);
    let began = Instant::now();
    let stack = TestStack::new().await;
    // Each run's value is its request id and the shell's pid (see the module doc).
    let files: Vec<(String, String)> = (0..PLUGINS)
        .map(|i| {
            (
                format!("rid{i:02}.toml"),
                format!(
                    "name = \"rid{i:02}\"\ncommand = [\"sh\", \"-c\", \"echo $VOGELER_REQUEST_ID $$\"]\nformat = \"string\"\n"
                ),
            )
        })
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, b)| (f.as_str(), b.as_str()))
        .collect();
    let plugins = plugin_dir(&files);
    let fleet = Fleet::start(&stack, plugins.path(), nodes).await;

    // Every node answers before the fault.
    let mut warmup = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let a = ask(&fleet.warmup, PLUGINS - 1).await;
        let all = a.replies.len() >= nodes;
        let within = |secs: u64| {
            a.replies
                .iter()
                .filter(|(_, at)| at.duration_since(a.started) <= Duration::from_secs(secs))
                .count()
        };
        println!(
            "cluster {name}: warm-up query: {} of {nodes} answered in {:.1}s (within 1 s {}, 2 s {}, 5 s {}), runner error {:?}",
            a.replies.len(),
            (a.ended - a.started).as_secs_f64(),
            within(1),
            within(2),
            within(5),
            a.error
        );
        warmup.push(a);
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all {nodes} agents answer before the fault, 300 s after they registered: {} did, runner error {:?}",
            warmup.last().map_or(0, |a| a.replies.len()),
            warmup.last().and_then(|a| a.error.clone())
        );
        tokio::time::sleep(PACE).await;
    }
    println!(
        "cluster {name}: {nodes} agents registered and answering {:.1}s after the start",
        began.elapsed().as_secs_f64()
    );

    let stop = CancellationToken::new();
    let (full_tx, mut full) = watch::channel(None);
    let streaming = tokio::spawn(stream(
        fleet.runner.clone(),
        nodes,
        0,
        stop.clone(),
        full_tx,
    ));
    tokio::time::sleep(STEADY).await;
    let timeline = inflict(&fault).await;
    let back = timeline.back;
    let answering = tokio::time::timeout(
        RECOVERY_LIMIT,
        full.wait_for(|started| started.is_some_and(|t| t >= back)),
    )
    .await
    .is_ok();
    let all_answering_at = answering.then(Instant::now);
    stop.cancel();
    let asked = streaming.await.expect("the query stream");

    let store_deadline = Instant::now() + STORE_LIMIT;
    let mut reads = Vec::new();
    let (books, stored_at) = loop {
        let t = Instant::now();
        let books = account(&stack, &fleet.names).await;
        reads.push(t.elapsed());
        if books.running == 0 && books.lost().is_empty() {
            break (books, Some(Instant::now()));
        }
        if Instant::now() >= store_deadline {
            break (books, None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let server_state = if fleet.server.task.as_ref().is_some_and(|t| t.is_finished()) {
        "the server had stopped by itself"
    } else {
        "the server running"
    };
    let names = fleet.names.clone();
    let ingest = format!(
        "the server consumed {} messages and stored {}, its results queue held {} at its last poll",
        fleet.metrics.consumed.get(),
        fleet.metrics.stored.get(),
        fleet.metrics.queue_messages.get()
    );
    let (agents_running, server_result) = fleet.stop().await;

    // The numbers.
    let failed: Vec<&Asked> = asked.iter().filter(|a| a.error.is_some()).collect();
    let all_answered = asked.iter().filter(|a| a.replies.len() >= nodes).count();
    let gaps = gaps(&asked, &names);
    let (worst_node, worst) = gaps
        .iter()
        .max_by_key(|(_, g)| **g)
        .map(|(n, g)| (n.clone(), *g))
        .unwrap_or_default();
    let mut missed = BTreeSet::new();
    for a in asked.iter().filter(|a| a.error.is_none()) {
        let heard: BTreeSet<&str> = a.replies.iter().map(|(n, _)| n.as_str()).collect();
        missed.extend(
            names
                .iter()
                .filter(|n| !heard.contains(n.as_str()))
                .cloned(),
        );
    }
    let silent: Vec<&String> = gaps
        .iter()
        .filter(|(_, g)| **g > SILENT)
        .map(|(n, _)| n)
        .collect();
    // Agent i's first broker node is node i % 3 of the list, where its queue was declared.
    let mut silent_by_home = [0usize; 3];
    for n in &silent {
        if let Some(i) = n.strip_prefix("cl").and_then(|i| i.parse::<usize>().ok()) {
            silent_by_home[i % 3] += 1;
        }
    }
    let recovered_at = match (all_answering_at, stored_at) {
        (Some(a), Some(s)) => Some(a.max(s)),
        _ => None,
    };
    let recovery = match recovered_at {
        Some(at) => format!("{:.1} s", at.duration_since(back).as_secs_f64()),
        None if all_answering_at.is_none() => {
            format!("not all answering within {} s", RECOVERY_LIMIT.as_secs())
        }
        None => format!("not all stored within {} s", STORE_LIMIT.as_secs()),
    };
    let lost = books.lost();
    let mut per_plugin = BTreeMap::new();
    for a in warmup.iter().chain(&asked) {
        *per_plugin.entry(a.plugin).or_insert(0u32) += 1;
    }
    let most_per_plugin = per_plugin.values().copied().max().unwrap_or(0);
    let mut took: Vec<Duration> = asked.iter().map(|a| a.ended - a.started).collect();
    took.sort();
    let median = took.get(took.len() / 2).copied().unwrap_or_default();
    let slowest = took.last().copied().unwrap_or_default();

    println!(
        "cluster {name}: fault {:.1}s after the stream started; {} back {:.1}s after the first kill ({}); queries {} (median {:.1}s, slowest {:.1}s), failed {}, all {nodes} answered in {all_answered}; {} nodes missed at least one answer, {} went unheard for more than {} s (by first broker node: rabbit1 {}, rabbit2 {}, rabbit3 {}); longest gap {:.1}s ({worst_node}); results published {}, stored {}, lost {}, duplicated {}, stored but not in an audit log {}, history entries {} (read {} times, the last in {:.1}s); {server_state}, {ingest}; after cancelling, {agents_running} agents still running 60 s later, the server returned {server_result:?}; scenario took {:.0}s",
        timeline
            .killed
            .duration_since(asked.first().map_or(timeline.killed, |a| a.started))
            .as_secs_f64(),
        timeline
            .starts
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
        back.duration_since(timeline.killed).as_secs_f64(),
        timeline
            .starts
            .iter()
            .map(|(n, d)| format!("start {n} took {:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        asked.len(),
        median.as_secs_f64(),
        slowest.as_secs_f64(),
        failed.len(),
        missed.len(),
        silent.len(),
        SILENT.as_secs(),
        silent_by_home[0],
        silent_by_home[1],
        silent_by_home[2],
        worst.as_secs_f64(),
        books.published.len(),
        books.stored_published(),
        lost.len(),
        books.duplicates,
        books.unexplained(),
        books.history_entries,
        reads.len(),
        reads.last().copied().unwrap_or_default().as_secs_f64(),
        began.elapsed().as_secs_f64(),
    );
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &failed {
        *errors.entry(a.error.as_deref().unwrap_or("")).or_default() += 1;
    }
    for (e, count) in &errors {
        println!("cluster {name}: runner error ({count}x): {e}");
    }
    if !lost.is_empty() {
        println!(
            "cluster {name}: lost (node, request id), first few: {:?}",
            lost.iter().take(5).collect::<Vec<_>>()
        );
    }
    if books.running > 0 {
        println!(
            "cluster {name}: {} commands accepted but never finished",
            books.running
        );
    }
    if most_per_plugin > vogeler_server::budget::PER_WINDOW {
        println!(
            "cluster {name}: WARNING a plugin was asked {most_per_plugin} times, more than the history budget records ({}): raise PLUGINS, the stored count is short",
            vogeler_server::budget::PER_WINDOW
        );
    }
    println!("{HEADER}");
    println!(
        "| {name} | {} ({}, {all_answered}) | {} | {} | {} | {} | {:.1} s | {} ({}) | {recovery} |",
        asked.len(),
        failed.len(),
        books.published.len(),
        books.stored_published(),
        lost.len(),
        books.duplicates,
        worst.as_secs_f64(),
        missed.len(),
        silent.len(),
    );
    Row {
        lost: lost.len(),
        duplicates: books.duplicates,
    }
}

/// Nothing lost, nothing stored twice: what must hold in every scenario.
fn must_hold(row: &Row) {
    assert_eq!(row.lost, 0, "published results never stored");
    assert_eq!(row.duplicates, 0, "results stored twice in the history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills cluster nodes: run by scripts/faults.sh cluster"]
async fn rabbit_node() {
    must_hold(&scenario("rabbit_node", Fault::Outage(&["rabbit2"])).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills cluster nodes: run by scripts/faults.sh cluster"]
async fn couch_node() {
    must_hold(&scenario("couch_node", Fault::Outage(&["couch2"])).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills cluster nodes: run by scripts/faults.sh cluster"]
async fn both() {
    must_hold(&scenario("both", Fault::Outage(&["rabbit2", "couch3"])).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills cluster nodes: run by scripts/faults.sh cluster"]
async fn rolling_restart() {
    must_hold(
        &scenario(
            "rolling_restart",
            Fault::RollingRestart(&["rabbit1", "rabbit2", "rabbit3"]),
        )
        .await,
    );
}
