//! What a node sends against the real server binary, CouchDB and RabbitMQ: for each class
//! of over-limit or poisoned input, at least 100 crafted results signed with a valid agent
//! key, published beside 100 healthy nodes' results. Each class must be refused with its
//! reason (the dead-letter queue's `x-vogeler-reason`), every healthy result must be stored,
//! and the server must keep running in bounded memory. Run with `--nocapture` for the table.

use std::{process::Stdio, time::Duration};

use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;
use vogeler_core::amqp;
use vogeler_e2e::{
    TestStack,
    programs::{peak_rss_kib, program, run, with_couch},
    wait_for,
};
use vogeler_proto::{
    limits,
    names::{NodeName, PluginName},
    signing::{PrivateKey, Purpose},
    wire::{self, Message, Outcome, PluginResult},
};

const PER_CLASS: usize = 100;
const HEALTHY: usize = 100;
/// The server under test refuses documents over this (CouchDB's default is 8 MB; a small
/// one keeps the test's traffic small).
const MAX_DOCUMENT_BYTES: usize = 200_000;

fn result(node: &str, plugin: &str, value: Value) -> PluginResult {
    PluginResult {
        request_id: Uuid::new_v4(),
        node: NodeName::new(node).expect("node"),
        plugin: PluginName::new(plugin).expect("plugin"),
        outcome: Outcome::Ok,
        value: Some(value),
        truncated: false,
        collected_at: Utc::now(),
        duration_ms: 1,
        agent_version: "test".into(),
        scheduled: None,
    }
}

fn nested(depth: usize) -> Value {
    let mut v = json!("bottom");
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

/// One class: its name, the results it sends, and the words its refusals must contain.
struct Class {
    name: &'static str,
    results: Vec<PluginResult>,
    /// How many of them must be refused (the rest are stored).
    refused: usize,
    reason: &'static str,
    /// Signed all with one key (a key holder posing as many nodes), not each node's own.
    one_key: bool,
}

fn classes() -> Vec<Class> {
    vec![
        Class {
            name: "value nested too deep",
            results: (0..PER_CLASS)
                .map(|_| result("deep01", "hello", nested(limits::MAX_VALUE_DEPTH + 40)))
                .collect(),
            refused: PER_CLASS,
            reason: "nests deeper than 64",
            one_key: false,
        },
        Class {
            name: "timestamp in the future",
            results: (0..PER_CLASS)
                .map(|i| {
                    let mut r = result("future01", "hello", json!(i));
                    r.collected_at = Utc::now() + chrono::Duration::days(1 + i as i64);
                    r
                })
                .collect(),
            refused: PER_CLASS,
            reason: "ahead of the server's clock",
            one_key: false,
        },
        Class {
            name: "oversized text field",
            results: (0..PER_CLASS)
                .map(|_| {
                    let mut r = result("text01", "hello", json!(1));
                    r.agent_version = "\u{1b}[2J".repeat(limits::MAX_TEXT_BYTES);
                    r
                })
                .collect(),
            refused: PER_CLASS,
            reason: "agent_version is",
            one_key: false,
        },
        Class {
            name: "document over max size",
            results: (0..PER_CLASS)
                .map(|i| result("big01", &format!("blob{i}"), json!("x".repeat(150_000))))
                .collect(),
            // The first fits (150 kB under 200 kB); every later one would grow the document.
            refused: PER_CLASS - 1,
            reason: "over server.max_document_bytes",
            one_key: false,
        },
        Class {
            name: "plugin keys per document",
            results: (0..limits::MAX_PLUGINS_PER_DOCUMENT + PER_CLASS)
                .map(|i| result("keys01", &format!("p{i:04}"), json!(i)))
                .collect(),
            refused: PER_CLASS,
            reason: "already stores 256 plugins",
            one_key: false,
        },
        Class {
            name: "stored document unreadable",
            results: (0..PER_CLASS)
                .map(|i| result("poisoned01", "hello", json!(i)))
                .chain((0..PER_CLASS).map(|i| result("schema01", "hello", json!(i))))
                .collect(),
            refused: 2 * PER_CLASS,
            reason: "cannot be read back",
            one_key: false,
        },
        Class {
            name: "one key posing as many nodes",
            results: (0..PER_CLASS)
                .map(|i| result(&format!("squat{i:03}"), "hello", json!(i)))
                .collect(),
            // The first name is the key's; every other one is refused.
            refused: PER_CLASS - 1,
            reason: "already serves node",
            one_key: true,
        },
        Class {
            name: "value flapping on every run",
            results: (0..2 * PER_CLASS)
                .map(|i| {
                    let mut r = result("flap01", "hello", json!(i % 2));
                    r.collected_at = Utc::now() - chrono::Duration::seconds(300 - i as i64);
                    r
                })
                .collect(),
            // All stored (the document stays current); the history is what is bounded.
            refused: 0,
            reason: "(none)",
            one_key: false,
        },
    ]
}

/// Every dead letter of the queue, by reason.
async fn dead_letters(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    let mut reasons = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
    {
        let reason = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-vogeler-reason").cloned())
            .map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => s.to_string(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        reasons.push(reason);
    }
    reasons
}

#[tokio::test]
async fn poisoned_and_over_limit_results_are_refused_and_every_other_node_is_stored() {
    let stack = TestStack::new().await;
    // Two documents written by hand before the server starts: one nested deeper than any
    // JSON reader goes, one whose metadata has the wrong type.
    stack
        .couch
        .ensure_database(&stack.database)
        .await
        .expect("database");
    let deep = json!({ "hello": nested(limits::READ_DEPTH + 2) });
    stack
        .couch
        .put(&stack.database, "poisoned01", &deep)
        .await
        .expect("write the poisoned document");
    stack
        .couch
        .put(
            &stack.database,
            "schema01",
            &json!({ "vogeler": { "created_at": 5 } }),
        )
        .await
        .expect("write the hand-edited document");

    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut server = with_couch(program("vogeler-server", &stack), &stack)
        .env(
            "VOGELER_SERVER__MAX_DOCUMENT_BYTES",
            MAX_DOCUMENT_BYTES.to_string(),
        )
        .env("VOGELER_SERVER__HTTP_LISTEN", metrics_addr.to_string())
        .stderr(Stdio::null())
        .spawn()
        .expect("server");

    let t = stack.topology();
    let (conn, ch) = stack.publisher("test-poison").await;
    let shared = PrivateKey::generate().expect("key");
    let publish = |r: &PluginResult, one_key: bool| {
        let body = wire::encode(&Message::Result(r.clone()));
        let key = if one_key {
            shared.clone()
        } else {
            stack.key_for(r.node.as_str())
        };
        let headers = amqp::signature_headers(&key, Purpose::Agent, &body);
        (body, headers)
    };
    let classes = classes();
    let healthy: Vec<PluginResult> = (0..HEALTHY)
        .map(|n| result(&format!("healthy{n:03}"), "hello", json!([n])))
        .collect();
    // Poison first, the healthy results behind it: they must not wait for it.
    let started = std::time::Instant::now();
    let sent = classes
        .iter()
        .flat_map(|c| c.results.iter().map(|r| (r, c.one_key)))
        .chain(healthy.iter().map(|r| (r, false)));
    for (r, one_key) in sent {
        let (body, headers) = publish(r, one_key);
        vogeler_e2e::publish_bytes(&ch, &t.results_exchange(), "result.x", &body, Some(headers))
            .await;
    }
    let published = started.elapsed();

    let healthy_ids: Vec<String> = healthy.iter().map(|r| r.node.to_string()).collect();
    wait_for(
        "every healthy node's result stored",
        Duration::from_secs(60),
        || async {
            let ids = stack.node_ids().await;
            healthy_ids.iter().all(|n| ids.contains(n))
        },
    )
    .await;
    let healthy_after = started.elapsed();
    let expected_dead: usize = classes.iter().map(|c| c.refused).sum();
    let probe = conn.create_channel().await.expect("channel");
    let dlq = t.dead_letter_queue();
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while reasons.len() < expected_dead {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {expected_dead} refusals dead-lettered after 120 s",
            reasons.len()
        );
        reasons.extend(dead_letters(&probe, &dlq).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_decided = started.elapsed();
    assert_eq!(reasons.len(), expected_dead, "nothing else was refused");

    println!("| class | sent | refused | stored for others | reason |");
    println!("|---|---|---|---|---|");
    for c in &classes {
        let refused = reasons.iter().filter(|r| r.contains(c.reason)).count();
        if c.refused == 0 {
            continue; // the flapping value: below
        }
        println!(
            "| {} | {} | {refused} | {HEALTHY}/{HEALTHY} | {} |",
            c.name,
            c.results.len(),
            c.reason
        );
        assert_eq!(refused, c.refused, "{}: {:?}", c.name, reasons.first());
    }
    // What fits was stored: the first blob, the first 256 plugin keys.
    let big = stack.document("big01").await.expect("big01");
    assert!(big.value("blob0").is_some());
    let keys = stack.document("keys01").await.expect("keys01");
    assert_eq!(keys.meta.plugins.len(), limits::MAX_PLUGINS_PER_DOCUMENT);
    assert!(stack.document("future01").await.is_none());
    // A flapping value: the document holds the newest, the history a bounded part of it.
    let flap = stack.document("flap01").await.expect("flap01");
    assert_eq!(flap.value("hello"), Some(&json!(1)));
    let flap_history = stack
        .history_ids()
        .await
        .into_iter()
        .filter(|id| id.starts_with("flap01:"))
        .count();
    println!(
        "| value flapping on every run | {} | 0 (all stored) | {HEALTHY}/{HEALTHY} | history kept {flap_history} entries of {} changes |",
        2 * PER_CLASS,
        2 * PER_CLASS - 1
    );
    assert!(
        flap_history <= vogeler_server::budget::PER_WINDOW as usize,
        "{flap_history} history entries"
    );

    // The unreadable documents are flagged, in /metrics and in `vogeler-runner nodes`.
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("vogeler_server_quarantined_nodes 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vogeler_server_quarantined{node="poisoned01"} 1"#),
        "{metrics}"
    );
    let mut runner = with_couch(program("vogeler-runner", &stack), &stack);
    runner.args(["nodes"]);
    let out = run(runner).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("schema01") && l.contains("quarantined: ")),
        "{table}"
    );
    assert!(table.contains("2 quarantined"), "{table}");

    // Repaired (deleted), a quarantined node is stored again and its flag goes.
    let doc: Value = stack
        .couch
        .get(&stack.database, "schema01")
        .await
        .expect("read")
        .expect("there");
    let gone = json!({"_id": "schema01", "_rev": doc["_rev"], "_deleted": true});
    stack
        .couch
        .bulk_docs(&stack.database, &[gone])
        .await
        .expect("delete");
    let (body, headers) = publish(&result("schema01", "hello", json!("again")), false);
    vogeler_e2e::publish_bytes(&ch, &t.results_exchange(), "result.x", &body, Some(headers)).await;
    wait_for(
        "the repaired node stored",
        Duration::from_secs(30),
        || async {
            stack
                .document("schema01")
                .await
                .is_some_and(|d| d.value("hello") == Some(&json!("again")))
        },
    )
    .await;
    wait_for("its flag removed", Duration::from_secs(10), || async {
        stack
            .couch
            .get::<Value>(&stack.database, "quarantine:schema01")
            .await
            .expect("read")
            .is_none()
    })
    .await;

    assert!(
        server.try_wait().expect("server").is_none(),
        "server running"
    );
    let server_kib = peak_rss_kib(server.id().expect("pid"));
    println!(
        "published {} results in {:.1}s; all {HEALTHY} healthy nodes stored {:.1}s after the first publish; every refusal dead-lettered after {:.1}s; server peak RSS {} MiB",
        classes.iter().map(|c| c.results.len()).sum::<usize>() + HEALTHY,
        published.as_secs_f64(),
        healthy_after.as_secs_f64(),
        all_decided.as_secs_f64(),
        server_kib / 1024
    );
    assert!(server_kib < 512 * 1024, "server peak RSS {server_kib} KiB");
    let _ = conn.close(200, "done".into()).await;
    let _ = server.kill().await;
}

/// The runner's `nodes` table of a node whose agent version is an escape sequence shows the
/// escape, not its effect; `--output json` keeps the exact text.
#[tokio::test]
async fn node_supplied_text_reaches_the_terminal_escaped() {
    let stack = TestStack::new().await;
    let mut server = with_couch(program("vogeler-server", &stack), &stack)
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let mut first = result("escape01", "hello", json!("\u{1b}]0;owned\u{7}"));
    first.agent_version = "\u{1b}[2J\u{9b}H".into();
    first.collected_at = Utc::now() - chrono::Duration::seconds(1);
    let mut second = result("escape01", "hello", json!("\u{1b}[31mred"));
    second.agent_version = first.agent_version.clone();
    let bodies = [first, second].map(|r| wire::encode(&Message::Result(r)));
    stack
        .publish_raw(
            &stack.topology().results_exchange(),
            "result.x",
            &[&bodies[0], &bodies[1]],
        )
        .await;
    wait_for("the change recorded", Duration::from_secs(30), || async {
        !stack.history_ids().await.is_empty()
    })
    .await;

    let mut runner = with_couch(program("vogeler-runner", &stack), &stack);
    runner.args(["nodes"]);
    let out = run(runner).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        !table.contains('\u{1b}') && !table.contains('\u{9b}'),
        "{table:?}"
    );
    assert!(table.contains(r"\u{1b}[2J\u{9b}H"), "{table}");

    let mut runner = with_couch(program("vogeler-runner", &stack), &stack);
    runner.args(["history", "escape01", "hello"]);
    let out = run(runner).await;
    let history = String::from_utf8_lossy(&out.stdout);
    assert!(!history.contains('\u{1b}'), "{history:?}");
    assert!(
        history.contains(r"\u{1b}]0;owned\u{7} → \u{1b}[31mred"),
        "{history}"
    );

    let mut runner = with_couch(program("vogeler-runner", &stack), &stack);
    runner.args(["nodes", "--output", "json"]);
    let out = run(runner).await;
    let nodes: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        nodes[0]["agent_version"], "\u{1b}[2J\u{9b}H",
        "JSON stays exact"
    );
    let _ = server.kill().await;
}

/// Headers that fit the broker's largest frame but not a 16 KiB one: the server (which reads
/// what any holder of the agent credential publishes) takes the broker's largest frames, so
/// such a message is handled like any other instead of costing it its connection on every
/// redelivery.
#[tokio::test]
async fn headers_larger_than_a_small_frame_do_not_cost_the_server_its_connection() {
    let stack = TestStack::new().await;
    let _server = vogeler_e2e::spawn_server(stack.server_settings());
    let (conn, ch) = stack.publisher("test-big-headers").await;
    let t = stack.topology();
    // 100 padded with 100 KiB of headers each (several times a 16 KiB frame), then one plain.
    let nodes: Vec<String> = (0..PER_CLASS)
        .map(|i| format!("padded{i:03}"))
        .chain(["after01".to_string()])
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        let body = wire::encode(&Message::Result(result(node, "hello", json!(i))));
        let mut headers = amqp::signature_headers(&stack.key_for(node), Purpose::Agent, &body);
        if i < PER_CLASS {
            headers.insert(
                "x-pad".into(),
                lapin::types::AMQPValue::LongString("p".repeat(100 * 1024).into()),
            );
        }
        vogeler_e2e::publish_bytes(&ch, &t.results_exchange(), "result.x", &body, Some(headers))
            .await;
    }
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    stack.wait_registered(&names).await;
    println!(
        "| headers over a 16 KiB frame | {PER_CLASS} | 0 (all stored, the connection kept) | 1/1 | - |"
    );
    let _ = conn.close(200, "done".into()).await;
}

/// The issue's scenario: one node whose stored document cannot be read back keeps
/// publishing, among 100 healthy nodes publishing at the same time. Prints how long the
/// healthy results took to be stored after they were published, and where the poison went.
#[tokio::test]
async fn one_poisoned_node_among_100_healthy_ones_delays_nobody() {
    let stack = TestStack::new().await;
    stack
        .couch
        .ensure_database(&stack.database)
        .await
        .expect("database");
    let deep = json!({ "hello": nested(limits::READ_DEPTH + 2) });
    stack
        .couch
        .put(&stack.database, "poison01", &deep)
        .await
        .expect("write the poisoned document");
    let mut server = with_couch(program("vogeler-server", &stack), &stack)
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let t = stack.topology();
    let (conn, ch) = stack.publisher("test-one-poison").await;
    // Interleaved: the poisoned node publishes as often as all the others together.
    let mut published = Vec::new();
    let started = std::time::Instant::now();
    for n in 0..HEALTHY {
        for r in [
            result("poison01", "hello", json!(n)),
            result(&format!("ok{n:03}"), "hello", json!(n)),
        ] {
            let body = wire::encode(&Message::Result(r.clone()));
            let headers =
                amqp::signature_headers(&stack.key_for(r.node.as_str()), Purpose::Agent, &body);
            vogeler_e2e::publish_bytes(
                &ch,
                &t.results_exchange(),
                "result.x",
                &body,
                Some(headers),
            )
            .await;
        }
        published.push(started.elapsed());
    }
    let healthy: Vec<String> = (0..HEALTHY).map(|n| format!("ok{n:03}")).collect();
    wait_for(
        "every healthy node stored beside the poisoned one",
        Duration::from_secs(60),
        || async {
            let ids = stack.node_ids().await;
            healthy.iter().all(|n| ids.contains(n))
        },
    )
    .await;
    let stored = started.elapsed();
    let probe = conn.create_channel().await.expect("channel");
    let dlq = t.dead_letter_queue();
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while reasons.len() < HEALTHY {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {HEALTHY} poisoned results dead-lettered",
            reasons.len()
        );
        reasons.extend(dead_letters(&probe, &dlq).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reasons.len(), HEALTHY, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("cannot be read back")),
        "{reasons:?}"
    );
    let flag: Option<Value> = stack
        .couch
        .get(&stack.database, "quarantine:poison01")
        .await
        .expect("read flag");
    assert!(flag.is_some(), "poison01 is flagged");
    let last = published.last().copied().unwrap_or_default();
    println!(
        "one poisoned node among {HEALTHY} healthy: all {HEALTHY} healthy results stored {:.1} s after the first publish, {:.1} s after the last healthy one was published; the poisoned node's {HEALTHY} results went to {dlq} (\"cannot be read back\"), and the node is flagged quarantine:poison01",
        stored.as_secs_f64(),
        stored.saturating_sub(last).as_secs_f64()
    );
    let _ = conn.close(200, "done".into()).await;
    let _ = server.kill().await;
}
