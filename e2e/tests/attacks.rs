//! Crafted commands against a real agent on the real broker: for each class of attack, 100
//! commands that must never run, next to 100 valid signed commands that must each run
//! exactly once. A canary plugin appends its request id to a marker file, so "ran" is
//! observed, not inferred. Refusals are counted by class in the agent's metrics, which see
//! every one (the audit log writes 100 a minute of each class). Run with `--nocapture` to
//! see the table.

use std::{collections::BTreeMap, path::Path, time::Duration};

use chrono::Utc;
use lapin::types::FieldTable;
use uuid::Uuid;
use vogeler_core::amqp;
use vogeler_core::observe::AgentMetrics;
use vogeler_e2e::{TestStack, node, plugin_dir, publish_bytes, spawn_agent_with, wait_for};
use vogeler_proto::{
    guard::Rejection,
    names::{NodeName, PluginName},
    signing::{PrivateKey, Purpose},
    wire::{self, Command, Message, Target},
};

const PER_CLASS: usize = 100;
const NODE: &str = "canary01";

/// One crafted delivery: body and headers.
type Crafted = (Vec<u8>, Option<FieldTable>);

fn command(plugin: &str, target: Target, issued: i64, ttl: i64) -> Command {
    Command::new(
        Uuid::new_v4(),
        PluginName::new(plugin).expect("plugin"),
        target,
        Utc::now() + chrono::Duration::seconds(issued),
        chrono::Duration::seconds(ttl),
    )
}

fn body(c: &Command) -> Vec<u8> {
    wire::encode(&Message::Command(c.clone()))
}

fn signed(key: &PrivateKey, body: Vec<u8>) -> Crafted {
    let headers = amqp::signature_headers(key, Purpose::Command, &body);
    (body, Some(headers))
}

/// Sign `c`, then change its JSON text with `edit`, keeping the original signature.
fn tampered(key: &PrivateKey, c: &Command, edit: impl Fn(String) -> String) -> Crafted {
    let original = body(c);
    let headers = amqp::signature_headers(key, Purpose::Command, &original);
    let text = String::from_utf8(original).expect("utf8");
    let changed = edit(text.clone());
    assert_ne!(changed, text, "the tampering must change the bytes");
    (changed.into_bytes(), Some(headers))
}

fn canary() -> Target {
    Target::Node(node(NODE))
}

fn count_lines(path: &Path) -> BTreeMap<String, usize> {
    let mut runs = BTreeMap::new();
    for id in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *runs.entry(id.to_string()).or_default() += 1;
    }
    runs
}

/// Refusals so far, by class.
fn rejections(metrics: &AgentMetrics) -> BTreeMap<&'static str, u64> {
    Rejection::CLASSES
        .into_iter()
        .map(|c| (c, metrics.rejected_count(c)))
        .collect()
}

/// The classes refused more often in `now` than in `before`, and how many refusals that is.
fn refused_since(
    before: &BTreeMap<&'static str, u64>,
    now: &BTreeMap<&'static str, u64>,
) -> (usize, std::collections::BTreeSet<String>) {
    let mut total = 0;
    let mut classes = std::collections::BTreeSet::new();
    for (class, n) in now {
        let more = n - before.get(class).copied().unwrap_or(0);
        if more > 0 {
            total += usize::try_from(more).expect("count");
            classes.insert(class.to_string());
        }
    }
    (total, classes)
}

fn audit_count(stack: &TestStack, event: &str) -> usize {
    stack.audit_events(NODE, event).len()
}

/// Publishes crafted commands to the canary agent's queue and watches what it did.
struct Attacker<'a> {
    stack: &'a TestStack,
    ch: &'a lapin::Channel,
    metrics: &'a AgentMetrics,
    exchange: String,
    routing: String,
    marker: &'a Path,
}

impl Attacker<'_> {
    /// Send one class and wait until the agent has decided on every message of it.
    async fn send(&self, class: &'static str, crafted: Vec<Crafted>, expect_runs: bool) -> Row {
        let (stack, marker) = (self.stack, self.marker);
        let runs_before: usize = count_lines(marker).values().sum();
        let rejected_before = rejections(self.metrics);
        let finished_before = audit_count(stack, "finished");
        for (body, headers) in &crafted {
            publish_bytes(
                self.ch,
                &self.exchange,
                &self.routing,
                body,
                headers.clone(),
            )
            .await;
        }
        let n = crafted.len();
        wait_for(
            &format!("the agent to decide on {n} {class} commands"),
            Duration::from_secs(60),
            || async {
                if expect_runs {
                    audit_count(stack, "finished") - finished_before >= n
                } else {
                    refused_since(&rejected_before, &rejections(self.metrics)).0 >= n
                }
            },
        )
        .await;
        let (rejected, reasons) = refused_since(&rejected_before, &rejections(self.metrics));
        Row {
            class,
            sent: n,
            executed: count_lines(marker).values().sum::<usize>() - runs_before,
            rejected,
            reasons,
        }
    }
}

struct Row {
    class: &'static str,
    sent: usize,
    executed: usize,
    rejected: usize,
    /// The classes the agent counted them under.
    reasons: std::collections::BTreeSet<String>,
}

#[tokio::test]
async fn no_crafted_command_runs_and_every_valid_one_runs_once() {
    let stack = TestStack::new().await;
    let marker = tempfile::NamedTempFile::new().expect("marker");
    let canary_plugin = vogeler_e2e::canary_plugin(marker.path());
    let plugins = plugin_dir(&[("canary.toml", &canary_plugin)]);
    let settings = stack.agent_settings(NODE, plugins.path());
    let metrics = AgentMetrics::default();
    let mut agent = spawn_agent_with(settings.clone(), metrics.clone());
    let runner = &stack.runner_key;
    let stranger = PrivateKey::generate().expect("key");
    let t = stack.topology();
    let (conn, ch) = stack.publisher("test-attacker").await;
    // The agent consumes only after its queue is bound: before that, commands would be
    // unroutable.
    stack.wait_consuming(NODE).await;

    let attacker = Attacker {
        stack: &stack,
        ch: &ch,
        metrics: &metrics,
        exchange: t.commands_exchange(),
        routing: format!("node.{NODE}"),
        marker: marker.path(),
    };
    let mut rows: Vec<Row> = Vec::new();
    // Valid commands first: they are what the replay classes replay.
    let valid: Vec<Crafted> = (0..PER_CLASS)
        .map(|_| signed(runner, body(&command("canary", canary(), 0, 600))))
        .collect();
    rows.push(attacker.send("valid, signed", valid.clone(), true).await);
    let runs = count_lines(marker.path());
    assert_eq!(runs.len(), PER_CLASS, "every valid command ran");
    assert!(
        runs.values().all(|n| *n == 1),
        "each valid command ran exactly once: {runs:?}"
    );

    let other = NodeName::new("db01").expect("node");
    let classes: Vec<(&'static str, Vec<Crafted>)> = vec![
        (
            "unsigned",
            (0..PER_CLASS)
                .map(|_| (body(&command("canary", canary(), 0, 600)), None))
                .collect(),
        ),
        (
            "signed by an unknown key",
            (0..PER_CLASS)
                .map(|_| signed(&stranger, body(&command("canary", canary(), 0, 600))))
                .collect(),
        ),
        (
            "tampered plugin",
            (0..PER_CLASS)
                .map(|_| {
                    tampered(runner, &command("canaryx", canary(), 0, 600), |s| {
                        s.replace("\"canaryx\"", "\"canary\"")
                    })
                })
                .collect(),
        ),
        (
            "tampered target",
            (0..PER_CLASS)
                .map(|_| {
                    tampered(
                        runner,
                        &command("canary", Target::Node(other.clone()), 0, 600),
                        |s| s.replace("{\"node\":\"db01\"}", "\"all\""),
                    )
                })
                .collect(),
        ),
        (
            "tampered issue time",
            (0..PER_CLASS)
                .map(|_| {
                    let c = command("canary", canary(), -7200, 600);
                    let old = c
                        .issued_at
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                    let new = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                    tampered(runner, &c, |s| s.replace(&old, &new))
                })
                .collect(),
        ),
        (
            "tampered ttl",
            (0..PER_CLASS)
                .map(|_| {
                    let c = command("canary", canary(), -7200, 60);
                    let old = c
                        .expires_at
                        .expect("expiry")
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                    let new = (Utc::now() + chrono::Duration::hours(1))
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                    tampered(runner, &c, |s| s.replace(&old, &new))
                })
                .collect(),
        ),
        ("replayed within ttl", valid.clone()),
        (
            "expired",
            (0..PER_CLASS)
                .map(|_| signed(runner, body(&command("canary", canary(), -7200, 600))))
                .collect(),
        ),
        (
            "future-dated",
            (0..PER_CLASS)
                .map(|_| signed(runner, body(&command("canary", canary(), 3600, 600))))
                .collect(),
        ),
        (
            "targeted at another node",
            (0..PER_CLASS)
                .map(|_| {
                    signed(
                        runner,
                        body(&command("canary", Target::Node(other.clone()), 0, 600)),
                    )
                })
                .collect(),
        ),
        (
            "unknown plugin",
            (0..PER_CLASS)
                .map(|_| signed(runner, body(&command("nosuch", canary(), 0, 600))))
                .collect(),
        ),
        (
            "oversized",
            (0..PER_CLASS)
                .map(|_| {
                    let text = String::from_utf8(body(&command("canary", canary(), 0, 600)))
                        .expect("utf8");
                    let padded = text.replacen(
                        '{',
                        &format!("{{\"pad\":\"{}\",", "x".repeat(wire::MAX_COMMAND_BYTES)),
                        1,
                    );
                    signed(runner, padded.into_bytes())
                })
                .collect(),
        ),
        (
            "invalid utf-8",
            (0..PER_CLASS)
                .map(|_| {
                    let mut b = body(&command("canary", canary(), 0, 600));
                    let at = b.iter().position(|c| *c == b'c').expect("a 'c'");
                    b[at] = 0xff;
                    signed(runner, b)
                })
                .collect(),
        ),
        (
            "duplicate json keys",
            (0..PER_CLASS)
                .map(|_| {
                    let text = String::from_utf8(body(&command("nosuch", canary(), 0, 600)))
                        .expect("utf8");
                    let dup = text.replace(
                        "\"plugin\":\"nosuch\"",
                        "\"plugin\":\"nosuch\",\"plugin\":\"canary\"",
                    );
                    signed(runner, dup.into_bytes())
                })
                .collect(),
        ),
    ];
    for (class, crafted) in classes {
        rows.push(attacker.send(class, crafted, false).await);
    }

    // The replay cache is on disk: a restarted agent still refuses the old commands.
    agent.cancel.cancel();
    let task = agent.task.take().expect("task");
    task.await
        .expect("agent task")
        .expect("agent stopped cleanly");
    let _agent = spawn_agent_with(settings, metrics.clone());
    rows.push(
        attacker
            .send("replayed after agent restart", valid, false)
            .await,
    );
    let _ = conn.close(200, "done".into()).await;

    println!(
        "\n{:<30} {:>5} {:>9} {:>9}  refused as",
        "class", "sent", "executed", "rejected"
    );
    for r in &rows {
        let reasons: Vec<&str> = r.reasons.iter().map(String::as_str).collect();
        println!(
            "{:<30} {:>5} {:>9} {:>9}  {}",
            r.class,
            r.sent,
            r.executed,
            r.rejected,
            reasons.join(",")
        );
    }
    // Each attack is stopped by the check meant for it, not by an accident earlier on.
    let expected = [
        ("unsigned", "unsigned"),
        ("signed by an unknown key", "unknown_key"),
        ("tampered plugin", "bad_signature"),
        ("tampered target", "bad_signature"),
        ("tampered issue time", "bad_signature"),
        ("tampered ttl", "bad_signature"),
        ("replayed within ttl", "replayed"),
        ("expired", "expired"),
        ("future-dated", "future"),
        ("targeted at another node", "other_node"),
        ("unknown plugin", "unknown_plugin"),
        ("oversized", "too_large"),
        ("invalid utf-8", "malformed"),
        ("duplicate json keys", "malformed"),
        ("replayed after agent restart", "replayed"),
    ];
    for (class, reason) in expected {
        let row = rows.iter().find(|r| r.class == class).expect(class);
        assert_eq!(
            row.reasons.iter().collect::<Vec<_>>(),
            [reason],
            "{class} refused for the wrong reason"
        );
    }
    let (valid_row, attacks) = rows.split_first().expect("rows");
    assert_eq!(valid_row.executed, PER_CLASS);
    for r in attacks {
        assert_eq!(r.executed, 0, "{} commands ran", r.class);
        assert_eq!(r.rejected, r.sent, "{}: every one rejected", r.class);
    }
    let runs = count_lines(marker.path());
    assert!(
        runs.len() == PER_CLASS && runs.values().all(|n| *n == 1),
        "still exactly the valid commands, once each: {runs:?}"
    );
    assert!(attacks.len() >= 15, "every attack class was sent");
}
