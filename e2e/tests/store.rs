//! The inventory store against the real broker and database: batched ingest through outages,
//! several servers at once, dead letters, views, design upgrades, quorum queues, stale nodes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{options::BasicConsumeOptions, types::AMQPValue};
use serde_json::{Value, json};
use uuid::Uuid;
use vogeler_core::amqp;
use vogeler_e2e::{TestStack, node, spawn_server, wait_for};
use vogeler_proto::{
    design,
    names::PluginName,
    secret::SecretUrl,
    topology::Topology,
    wire::{Announce, Message, Outcome, PluginResult},
};

fn result(n: &str, plugin: &str, value: Value, at: DateTime<Utc>) -> Message {
    Message::Result(PluginResult {
        request_id: Uuid::new_v4(),
        node: node(n),
        plugin: PluginName::new(plugin).expect("plugin"),
        outcome: Outcome::Ok,
        value: Some(value),
        truncated: false,
        collected_at: at,
        duration_ms: 1,
        agent_version: "test".into(),
        scheduled: None,
    })
}

fn announce(n: &str, facts: Value, at: DateTime<Utc>) -> Message {
    Message::Announce(Announce {
        node: node(n),
        agent_version: "test".into(),
        plugins: vec![],
        started_at: at,
        sent_at: at,
        facts: facts.as_object().cloned().unwrap_or_default(),
        schedules: None,
        packages: None,
    })
}

/// Publish messages as agents do (persistent, confirmed), on one connection.
async fn publish(stack: &TestStack, messages: &[Message]) {
    let (conn, ch) = stack.publisher("test-publisher").await;
    let t = stack.topology();
    for m in messages {
        let (key, signer) = match m {
            Message::Result(r) => (
                Topology::result_routing_key(r.request_id),
                stack.key_for(r.node.as_str()),
            ),
            Message::Announce(a) => (
                Topology::announce_routing_key(&a.node),
                stack.key_for(a.node.as_str()),
            ),
            Message::Command(_) => ("command".into(), stack.agent_key.clone()),
        };
        amqp::publish(&ch, &t.results_exchange(), &key, m, &signer)
            .await
            .expect("publish");
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_database_outage_loses_nothing_and_stores_nothing_twice() {
    // 20 s here; scripts/faults.sh runs it with VOGELER_FAULT_DB_DOWN_SECS=30.
    let down = Duration::from_secs(
        std::env::var("VOGELER_FAULT_DB_DOWN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let stack = TestStack::new().await;
    let (proxy, settings) = stack.server_behind_proxy().await;
    let _server = spawn_server(settings);
    publish(&stack, &[announce("warmup", json!({}), Utc::now())]).await;
    stack.wait_registered(&["warmup"]).await;

    proxy.cut();
    // 20 nodes, 10 distinct values each, published while the database is away.
    let start = Utc::now();
    let mut messages = vec![];
    for round in 0..10 {
        for n in 0..20 {
            messages.push(result(
                &format!("out{n:02}"),
                "counter",
                json!(round),
                start + chrono::Duration::milliseconds(round),
            ));
        }
    }
    publish(&stack, &messages).await;
    wait_for(
        "server retrying while the database is away",
        Duration::from_secs(10),
        || async { proxy.refused() >= 2 },
    )
    .await;
    tokio::time::sleep(down).await; // the outage itself, not a wait for a condition
    assert_eq!(
        stack.node_ids().await,
        ["warmup"],
        "nothing stored while down"
    );
    proxy.restore();
    let restored = std::time::Instant::now();

    wait_for(
        "all 200 results stored",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for n in 0..20 {
                all &= stack
                    .document(&format!("out{n:02}"))
                    .await
                    .is_some_and(|d| d.value("counter") == Some(&json!(9)));
            }
            all
        },
    )
    .await;
    let drained = restored.elapsed();
    // Every value change recorded exactly once: 9 per node (the first value is not a change).
    let history = stack.history_ids().await;
    let per_node = history
        .iter()
        .filter(|id| id.starts_with("out07:counter:"))
        .count();
    assert_eq!(per_node, 9, "{history:?}");
    assert_eq!(
        history.iter().filter(|id| id.starts_with("out")).count(),
        180
    );
    println!(
        "database down {}s: 200 results published, 200 stored, 0 lost, 0 stored twice (180 history entries); drained {:.1}s after it came back",
        down.as_secs(),
        drained.as_secs_f64()
    );
}

#[tokio::test]
async fn two_servers_on_one_queue_store_every_result_of_1000_nodes() {
    let stack = TestStack::new().await;
    let _a = spawn_server(stack.server_settings());
    let _b = spawn_server(stack.server_settings());
    let now = Utc::now();
    let messages: Vec<Message> = (0..1000)
        .flat_map(|n| {
            let name = format!("fleet{n:04}");
            // Each node twice: an announcement and a result, which both servers may race on.
            [
                announce(&name, json!({"kernel": "6.1"}), now),
                result(&name, "hello", json!([n]), now),
            ]
        })
        .collect();
    publish(&stack, &messages).await;
    wait_for(
        "1000 documents with their value",
        Duration::from_secs(60),
        || async {
            let rows = stack
                .couch
                .get_many::<vogeler_proto::document::NodeDocument>(
                    &stack.database,
                    &(0..1000)
                        .map(|n| format!("fleet{n:04}"))
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>(),
                )
                .await
                .expect("read");
            rows.iter().enumerate().all(|(n, (_, d))| {
                d.as_found().is_some_and(|d| {
                    d.value("hello") == Some(&json!([n]))
                        && d.meta.facts.get("kernel") == Some(&json!("6.1"))
                })
            })
        },
    )
    .await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_their_reason_while_valid_ones_flow() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let poison: Vec<&[u8]> = vec![
        b"not json",
        b"{\"schema\":99,\"kind\":\"result\"}",
        b"{\"schema\":1,\"kind\":\"result\",\"node\":\"_users\"}",
        b"{\"schema\":1,\"kind\":\"command\",\"request_id\":\"7d0b8a39-52a4-4d3c-9a9f-6a0d1f0c2b11\",\"plugin\":\"x\",\"target\":\"all\",\"issued_at\":\"2026-11-22T05:00:00Z\"}",
    ];
    stack
        .publish_raw(&stack.topology().results_exchange(), "result.raw", &poison)
        .await;
    publish(
        &stack,
        &[result("valid01", "hello", json!(["ok"]), Utc::now())],
    )
    .await;
    wait_for(
        "the valid result is stored",
        Duration::from_secs(10),
        || async { stack.document("valid01").await.is_some() },
    )
    .await;

    let conn = amqp::connect(
        &SecretUrl::parse(&stack.amqp_first()).expect("url"),
        "test-dlq",
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let opts = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut dead = ch
        .basic_consume(
            stack.topology().dead_letter_queue().as_str().into(),
            "".into(),
            opts,
            Default::default(),
        )
        .await
        .expect("consume");
    let mut reasons = vec![];
    while reasons.len() < poison.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), dead.next())
            .await
            .expect("dead letter arrives")
            .expect("stream")
            .expect("delivery");
        let headers = d.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get("x-vogeler-reason") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("no reason header: {other:?}"),
        };
        reasons.push((String::from_utf8_lossy(&d.data).to_string(), reason));
    }
    let text = format!("{reasons:#?}");
    for needle in [
        "not JSON",
        "schema version 99",
        "node name",
        "does not take command",
    ] {
        assert!(
            reasons.iter().any(|(_, r)| r.contains(needle)),
            "no reason with {needle:?}: {text}"
        );
    }
    assert_eq!(stack.node_ids().await, ["valid01"]);
}

#[tokio::test]
async fn views_answer_by_package_and_by_fact() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let now = Utc::now();
    let pkg = |name: &str, version: &str| json!({"name": name, "version": version, "arch": "amd64", "status": "installed"});
    publish(
        &stack,
        &[
            result("deb1", "dpkg", json!([pkg("openssl", "3.0.11-1"), pkg("bash", "5.2")]), now),
            result("deb2", "dpkg", json!([pkg("openssl", "3.0.13-1"), {"name": "gone", "version": "1", "arch": "all", "status": "config-files"}]), now),
            result("rh1", "rpms", json!([{"name": "openssl", "version": "3.0.7-24.el9", "arch": "x86_64"}]), now),
            announce("deb1", json!({"os": {"family": "Debian"}, "kernel": "6.1.0-18-amd64", "arch": "x86_64"}), now),
            announce("deb2", json!({"os": {"family": "Debian"}, "kernel": "6.1.0-20-amd64", "arch": "aarch64"}), now),
            announce("rh1", json!({"os": {"family": "RedHat"}, "kernel": "5.14.0", "arch": "x86_64"}), now),
        ],
    )
    .await;
    stack.wait_registered(&["deb1", "deb2", "rh1"]).await;
    let settings = stack.runner_settings("5").couch;
    use vogeler_runner::inventory::{find_fact, find_package};
    wait_for(
        "all three documents complete",
        Duration::from_secs(10),
        || async {
            find_fact(&settings, "os.family", &json!("RedHat"))
                .await
                .expect("view")
                == ["rh1"]
                && find_package(&settings, "openssl", None)
                    .await
                    .expect("view")
                    .len()
                    == 3
        },
    )
    .await;
    assert_eq!(
        find_package(&settings, "openssl", None)
            .await
            .expect("view"),
        ["deb1", "deb2", "rh1"]
    );
    assert_eq!(
        find_package(&settings, "openssl", Some("3.0.13-1"))
            .await
            .expect("view"),
        ["deb2"]
    );
    assert_eq!(
        find_package(&settings, "bash", None).await.expect("view"),
        ["deb1"]
    );
    assert!(
        find_package(&settings, "gone", None)
            .await
            .expect("view")
            .is_empty(),
        "removed packages do not count"
    );
    assert_eq!(
        find_fact(&settings, "os.family", &json!("Debian"))
            .await
            .expect("view"),
        ["deb1", "deb2"]
    );
    assert_eq!(
        find_fact(&settings, "arch", &json!("x86_64"))
            .await
            .expect("view"),
        ["deb1", "rh1"]
    );
    assert_eq!(
        find_fact(&settings, "kernel", &json!("6.1.0-20-amd64"))
            .await
            .expect("view"),
        ["deb2"]
    );
    // Nodes by plugin, straight from the view as the web UI shows it.
    let rows = stack
        .couch
        .view(
            &stack.database,
            design::NODES_DDOC,
            "nodes_by_plugin",
            &[("key", "\"rpms\"".into())],
        )
        .await
        .expect("view");
    assert_eq!(
        rows.iter()
            .filter_map(|r| r.id.as_deref())
            .collect::<Vec<_>>(),
        ["rh1"]
    );
}

#[tokio::test]
async fn an_older_design_document_is_upgraded_on_start() {
    let stack = TestStack::new().await;
    stack
        .couch
        .ensure_database(&stack.database)
        .await
        .expect("create db");
    let old = json!({"_id": "_design/vogeler", "vogeler_version": 0, "views": {"obsolete": {"map": "function (doc) { emit(doc._id, 1); }"}}});
    stack
        .couch
        .put(&stack.database, "_design/vogeler", &old)
        .await
        .expect("old design");
    let _server = spawn_server(stack.server_settings());
    wait_for(
        "design document upgraded",
        Duration::from_secs(15),
        || async {
            let d: Option<Value> = stack
                .couch
                .get(&stack.database, "_design/vogeler")
                .await
                .expect("read");
            d.is_some_and(|d| design::version_of(&d) == design::VERSION)
        },
    )
    .await;
    let d: Value = stack
        .couch
        .get(&stack.database, "_design/vogeler")
        .await
        .expect("read")
        .expect("design");
    assert!(
        d["views"].get("obsolete").is_none() && d["views"].get("registry").is_some(),
        "{d:#}"
    );
    assert!(d["_rev"].as_str().is_some_and(|r| r.starts_with("2-")));
    // A newer one (from a newer server) is left alone.
    let mut newer = d.clone();
    newer["vogeler_version"] = json!(design::VERSION + 1);
    stack
        .couch
        .put(&stack.database, "_design/vogeler", &newer)
        .await
        .expect("newer");
    let status =
        vogeler_server::maintenance::ensure_design(&stack.couch, &stack.database, design::nodes())
            .await
            .expect("ensure");
    assert_eq!(status, "newer");
}

#[tokio::test]
async fn a_quorum_results_queue_works_end_to_end() {
    let stack = TestStack::new().await;
    let mut sources = stack.sources();
    sources.set("amqp.results_queue_type", Some("quorum"));
    let settings = vogeler_config::load(&sources)
        .expect("load")
        .server()
        .expect("settings");
    let _server = spawn_server(settings);
    // The server declares the queue; wait for it before agents publish.
    let conn = amqp::connect(
        &SecretUrl::parse(&stack.amqp_first()).expect("url"),
        "test-inspect",
    )
    .await
    .expect("connect");
    wait_for(
        "quorum results queue declared",
        Duration::from_secs(10),
        || async {
            let ch = conn.create_channel().await.expect("channel");
            let opts = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            ch.queue_declare(
                stack.topology().results_queue().as_str().into(),
                opts,
                Default::default(),
            )
            .await
            .is_ok()
        },
    )
    .await;
    publish(
        &stack,
        &[result("q01", "hello", json!(["quorum"]), Utc::now())],
    )
    .await;
    wait_for(
        "stored through the quorum queue",
        Duration::from_secs(10),
        || async {
            stack
                .document("q01")
                .await
                .is_some_and(|d| d.value("hello") == Some(&json!(["quorum"])))
        },
    )
    .await;
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "type"])
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with(&stack.topology().results_queue()))
            .unwrap_or_default();
        assert!(line.contains("quorum"), "{line:?}");
    }
}

#[tokio::test]
async fn stale_nodes_are_reported_and_prune_removes_only_old_ones() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let now = Utc::now();
    publish(
        &stack,
        &[
            announce("old01", json!({}), now - chrono::Duration::days(40)),
            announce("old02", json!({}), now - chrono::Duration::days(31)),
            announce("mid01", json!({}), now - chrono::Duration::days(3)),
            announce("new01", json!({}), now),
        ],
    )
    .await;
    stack
        .wait_registered(&["old01", "old02", "mid01", "new01"])
        .await;
    let day = Duration::from_secs(86_400);
    let stale = vogeler_server::maintenance::stale_nodes(
        &vogeler_core::query::Inventory::new(stack.couch.clone(), &stack.database),
        day,
    )
    .await
    .expect("stale");
    assert_eq!(stale, ["old01", "old02", "mid01"]);
    let pruned = vogeler_server::maintenance::prune(
        &vogeler_core::query::Inventory::new(stack.couch.clone(), &stack.database),
        30 * day,
    )
    .await
    .expect("prune");
    assert_eq!(pruned, ["old01", "old02"]);
    let mut left = stack.node_ids().await;
    left.sort();
    assert_eq!(left, ["mid01", "new01"]);
    // Their keys are free again: only the remaining nodes' bindings are left.
    let bindings = stack
        .couch
        .all_ids(&vogeler_proto::enrollment::enrollment_database(
            &stack.database,
        ))
        .await
        .expect("enrollment ids")
        .unwrap_or_default();
    let bound = |n: &str| {
        bindings.contains(&vogeler_proto::enrollment::key_binding_id(
            &stack.key_for(n).public(),
        ))
    };
    assert!(!bound("old01") && !bound("old02"), "{bindings:?}");
    assert!(bound("mid01") && bound("new01"), "{bindings:?}");
}
