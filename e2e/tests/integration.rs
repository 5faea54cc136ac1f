//! Integration tests: the real agent, server and runner code in-process, against the real
//! RabbitMQ and Apache CouchDB, each test in its own collective and database.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vogeler_core::amqp;
use vogeler_e2e::{
    FaultProxy, HELLO, TestStack, ask, node, plugin_dir, spawn_agent, spawn_server, wait_for,
};
use vogeler_proto::{
    names::PluginName,
    secret::SecretUrl,
    topology::Topology,
    wire::{Message, Outcome, PluginResult},
};

#[tokio::test]
async fn fan_out_to_all_stores_one_document_per_node_and_updates_it() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(stack.server_settings());
    let nodes = ["web01", "web02", "web03"];
    let _agents: Vec<_> = nodes
        .iter()
        .map(|n| spawn_agent(stack.agent_settings(n, plugins.path())))
        .collect();
    stack.wait_registered(&nodes).await;

    let first = ask(&stack, "hello", "all", "10").await;
    assert!(first.success(), "{}", first.render_table());
    assert_eq!(first.replies.len(), 3);
    assert!(first.render_table().contains("3/3 nodes answered"));
    // Returned as soon as all answered, not at the 10 s timeout.
    assert!(
        first.elapsed < Duration::from_secs(9),
        "{:?}",
        first.elapsed
    );

    for n in nodes {
        wait_for(
            &format!("{n} stores request {}", first.request_id),
            Duration::from_secs(10),
            || async {
                stack.document(n).await.is_some_and(|d| {
                    d.meta
                        .plugins
                        .get("hello")
                        .is_some_and(|m| m.request_id == first.request_id)
                })
            },
        )
        .await;
        let doc = stack.document(n).await.expect("document");
        assert_eq!(doc.value("hello"), Some(&json!(["alpha", "beta"])));
        let meta = &doc.meta.plugins["hello"];
        assert_eq!((meta.outcome.as_str(), meta.exit_code), ("ok", Some(0)));
        let node = stack.node(n).await.expect("node");
        assert!(node.last_seen().is_some() && node.agent_version().is_some());
    }
    let created: Vec<_> = futures_created(&stack, &nodes).await;

    // A second run updates the same documents: no new ones, created_at kept.
    let second = ask(&stack, "hello", "all", "10").await;
    assert!(second.success(), "{}", second.render_table());
    for n in nodes {
        wait_for(
            &format!("{n} stores the second request"),
            Duration::from_secs(10),
            || async {
                stack
                    .document(n)
                    .await
                    .is_some_and(|d| d.meta.plugins["hello"].request_id == second.request_id)
            },
        )
        .await;
    }
    assert_eq!(stack.node_ids().await.len(), 3);
    assert_eq!(futures_created(&stack, &nodes).await, created);
}

async fn futures_created(stack: &TestStack, nodes: &[&str]) -> Vec<chrono::DateTime<Utc>> {
    let mut out = vec![];
    for n in nodes {
        out.push(stack.document(n).await.expect("document").meta.created_at);
    }
    out
}

#[tokio::test]
async fn single_node_target_runs_only_there() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(stack.server_settings());
    let _a = spawn_agent(stack.agent_settings("node-a", plugins.path()));
    let _b = spawn_agent(stack.agent_settings("node-b", plugins.path()));
    stack.wait_registered(&["node-a", "node-b"]).await;

    let r = ask(&stack, "hello", "node-a", "10").await;
    assert!(r.success(), "{}", r.render_table());
    assert_eq!(
        r.replies.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["node-a"]
    );
    wait_for("node-a stores hello", Duration::from_secs(10), || async {
        stack
            .document("node-a")
            .await
            .is_some_and(|d| d.value("hello").is_some())
    })
    .await;
    assert!(
        stack
            .document("node-b")
            .await
            .expect("node-b doc")
            .value("hello")
            .is_none()
    );
}

#[tokio::test]
async fn failures_are_reported_and_keep_the_last_good_value() {
    let stack = TestStack::new().await;
    let marker = tempfile::NamedTempFile::new().expect("marker");
    std::fs::write(marker.path(), "first\n").expect("write marker");
    let flaky = format!(
        "name = \"flaky\"\ncommand = [\"cat\", \"{}\"]\nformat = \"lines\"\n",
        marker.path().display()
    );
    let slow =
        "name = \"slow\"\ncommand = [\"sleep\", \"30\"]\nformat = \"lines\"\ntimeout = \"300ms\"\n";
    let plugins = plugin_dir(&[("flaky.toml", &flaky), ("slow.toml", slow)]);
    let _server = spawn_server(stack.server_settings());
    let _agent = spawn_agent(stack.agent_settings("web01", plugins.path()));
    stack.wait_registered(&["web01"]).await;
    let web01 = || "web01";

    let ok = ask(&stack, "flaky", web01(), "10").await;
    assert!(ok.success(), "{}", ok.render_table());
    std::fs::remove_file(marker.path()).expect("remove marker");
    let failed = ask(&stack, "flaky", web01(), "10").await;
    assert!(!failed.success());
    let reply = &failed.replies[&node("web01")];
    assert!(
        matches!(
            reply.outcome,
            Outcome::Failed {
                exit_code: Some(1),
                ..
            }
        ),
        "{:?}",
        reply.outcome
    );
    assert!(
        failed.render_table().contains("No such file"),
        "{}",
        failed.render_table()
    );

    wait_for("failed run recorded", Duration::from_secs(10), || async {
        stack.document("web01").await.is_some_and(|d| {
            d.meta
                .plugins
                .get("flaky")
                .is_some_and(|m| m.request_id == failed.request_id)
        })
    })
    .await;
    let doc = stack.document("web01").await.expect("doc");
    assert_eq!(
        doc.value("flaky"),
        Some(&json!(["first"])),
        "last good value kept"
    );
    assert_eq!(doc.meta.plugins["flaky"].outcome, "failed");
    assert!(
        doc.meta.plugins["flaky"]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("exit code 1"))
    );

    let timed_out = ask(&stack, "slow", web01(), "10").await;
    assert_eq!(
        timed_out.replies[&node("web01")].outcome,
        Outcome::TimedOut { timeout_ms: 300 }
    );

    let unknown = ask(&stack, "not_there", web01(), "10").await;
    assert_eq!(
        unknown.replies[&node("web01")].outcome,
        Outcome::UnknownPlugin
    );
    assert!(
        unknown.render_table().contains("no such plugin"),
        "{}",
        unknown.render_table()
    );
}

#[tokio::test]
async fn all_with_no_agent_at_all_returns_at_once_and_says_so() {
    let stack = TestStack::new().await;
    let r = ask(&stack, "hello", "all", "20").await;
    assert!(!r.success());
    assert!(r.replies.is_empty() && r.expected.is_empty());
    // No queue took the broadcast (the broker returned it): the 20 s timeout is not waited
    // out (margin: 15 s).
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    assert!(r.render_table().contains("no nodes are registered"));
}

#[tokio::test]
async fn a_silent_node_is_named_in_no_response_from() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(stack.server_settings());
    let live = spawn_agent(stack.agent_settings("alive", plugins.path()));
    let gone = spawn_agent(stack.agent_settings("gone", plugins.path()));
    stack.wait_registered(&["alive", "gone"]).await;
    gone.stop().await.expect("agent stops cleanly");

    let r = ask(&stack, "hello", "all", "1500ms").await;
    assert!(!r.success());
    assert!(
        r.render_table().contains("1/2 nodes answered"),
        "{}",
        r.render_table()
    );
    assert!(
        r.render_table().contains("no response from: gone\n"),
        "{}",
        r.render_table()
    );
    drop(live);
}

#[tokio::test]
async fn malformed_messages_are_dropped_and_traffic_keeps_flowing() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(stack.server_settings());
    let _agent = spawn_agent(stack.agent_settings("web01", plugins.path()));
    stack.wait_registered(&["web01"]).await;
    let t = stack.topology();
    let garbage: [&[u8]; 5] = [
        b"not json",
        b"{\"schema\":99,\"kind\":\"result\"}",
        b"{\"schema\":1,\"kind\":\"result\",\"node\":\"_users\"}",
        b"{\"schema\":1,\"kind\":\"command\",\"plugin\":\"../../bin/sh\"}",
        b"\xff\xfe\x00",
    ];
    for body in garbage {
        stack
            .publish_raw(&t.results_exchange(), "result.garbage", &[body])
            .await;
        stack
            .publish_raw(&t.commands_exchange(), "all", &[body])
            .await;
    }
    let r = ask(&stack, "hello", "all", "10").await;
    assert!(r.success(), "{}", r.render_table());
    // Nothing was requeued forever: the results queue drains to empty.
    let conn = amqp::connect(
        &SecretUrl::parse(&stack.amqp_first()).expect("url"),
        "test-inspect",
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    wait_for("results queue drained", Duration::from_secs(10), || async {
        let opts = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ch
            .queue_declare(t.results_queue().as_str().into(), opts, Default::default())
            .await
            .expect("inspect queue");
        q.message_count() == 0
    })
    .await;
    assert_eq!(stack.node_ids().await, ["web01"], "no document for garbage");
}

#[tokio::test]
async fn duplicate_deliveries_leave_the_document_as_if_delivered_once() {
    let stack = TestStack::new().await;
    let _server = spawn_server(stack.server_settings());
    let t = stack.topology();
    let result = PluginResult {
        request_id: Uuid::new_v4(),
        node: node("dup01"),
        plugin: PluginName::new("hello").expect("plugin"),
        outcome: Outcome::Ok,
        value: Some(json!(["x"])),
        truncated: false,
        collected_at: Utc::now(),
        duration_ms: 1,
        agent_version: "test".into(),
        scheduled: None,
    };
    let body = vogeler_proto::wire::encode(&Message::Result(result.clone()));
    let key = Topology::result_routing_key(result.request_id);
    stack
        .publish_raw(&t.results_exchange(), &key, &[&body])
        .await;
    wait_for("first copy stored", Duration::from_secs(10), || async {
        stack.document("dup01").await.is_some()
    })
    .await;
    // Two more copies, in whatever batches the server makes of them.
    for _ in 0..2 {
        stack
            .publish_raw(&t.results_exchange(), &key, &[&body])
            .await;
    }
    // A later, different result proves the duplicates before it were processed.
    let mut later = result.clone();
    later.request_id = Uuid::new_v4();
    later.collected_at = Utc::now() + chrono::Duration::seconds(1);
    later.value = Some(json!(["y"]));
    let body = vogeler_proto::wire::encode(&Message::Result(later.clone()));
    stack
        .publish_raw(
            &t.results_exchange(),
            &Topology::result_routing_key(later.request_id),
            &[&body],
        )
        .await;
    wait_for("later result stored", Duration::from_secs(10), || async {
        stack
            .document("dup01")
            .await
            .is_some_and(|d| d.meta.plugins["hello"].request_id == later.request_id)
    })
    .await;
    let doc = stack.document("dup01").await.expect("doc");
    let rev = doc.rev.clone().expect("rev");
    assert!(
        rev.starts_with("2-"),
        "one write for the three copies, one for the later result: {rev}"
    );
    assert_eq!(doc.value("hello"), Some(&json!(["y"])));
}

#[tokio::test]
async fn database_outage_holds_results_until_it_returns() {
    let stack = TestStack::new().await;
    let (proxy, settings) = stack.server_behind_proxy().await;
    let _server = spawn_server(settings);
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _agent = spawn_agent(stack.agent_settings("web01", plugins.path()));
    stack.wait_registered(&["web01"]).await;

    proxy.cut();
    let r = ask(&stack, "hello", "web01", "10").await;
    assert!(
        r.success(),
        "the runner does not need the database for a named node"
    );
    wait_for(
        "server retrying against the cut database",
        Duration::from_secs(10),
        || async { proxy.refused() >= 2 },
    )
    .await;
    assert!(
        stack
            .document("web01")
            .await
            .expect("doc")
            .value("hello")
            .is_none(),
        "not stored while down"
    );

    proxy.restore();
    wait_for(
        "result stored after the database returned",
        Duration::from_secs(20),
        || async {
            stack.document("web01").await.is_some_and(|d| {
                d.meta
                    .plugins
                    .get("hello")
                    .is_some_and(|m| m.request_id == r.request_id)
            })
        },
    )
    .await;
}

#[tokio::test]
async fn agent_reconnects_after_the_broker_connection_is_cut() {
    let stack = TestStack::new().await;
    let broker = SecretUrl::parse(&stack.amqp_first()).expect("url");
    let upstream = format!(
        "{}:{}",
        broker.expose().host_str().expect("host"),
        broker.expose().port().unwrap_or(5672)
    );
    let proxy = FaultProxy::start(&upstream).await;
    let mut via_proxy = broker.expose().clone();
    via_proxy.set_port(Some(proxy.addr().port())).expect("port");
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let mut settings = stack.agent_settings("web01", plugins.path());
    settings.broker.url = SecretUrl::parse(via_proxy.as_str())
        .expect("proxy url")
        .into();
    let _server = spawn_server(stack.server_settings());
    let _agent = spawn_agent(settings);
    stack.wait_registered(&["web01"]).await;

    proxy.cut();
    wait_for(
        "agent retrying while cut",
        Duration::from_secs(10),
        || async { proxy.refused() >= 1 },
    )
    .await;
    proxy.restore();
    // The agent's own reconnect loop brings it back; its queue is durable, so a command sent
    // right after the restore is answered once it is back.
    let r = ask(&stack, "hello", "web01", "20").await;
    assert!(r.success(), "{}", r.render_table());
}

#[tokio::test]
async fn unreachable_broker_and_database_are_named_without_passwords() {
    let stack = TestStack::new().await;
    let mut sources = stack.sources();
    sources
        .set("amqp.url", Some("amqp://guest:hunter2@127.0.0.1:1/%2f"))
        .set("couchdb.url", Some("http://127.0.0.1:1"))
        .set("connect_timeout", Some("300ms"));
    let raw = vogeler_config::load(&sources).expect("load");

    let err = vogeler_server::run(raw.server().expect("settings"), CancellationToken::new())
        .await
        .expect_err("no database");
    assert_eq!(
        vogeler_core::exit::ExitStatus::exit_code(&err),
        vogeler_core::exit::UNAVAILABLE,
        "{err}"
    );
    assert!(err.to_string().contains("http://127.0.0.1:1/"), "{err}");

    let agent = raw.agent(Some("web01".into())).expect("settings");
    let err = vogeler_agent::run(agent, CancellationToken::new())
        .await
        .expect_err("no broker");
    assert_eq!(
        vogeler_core::exit::ExitStatus::exit_code(&err),
        vogeler_core::exit::UNAVAILABLE,
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("amqp://guest:***@127.0.0.1:1") && !text.contains("hunter2"),
        "{text}"
    );
}

#[tokio::test]
async fn an_agent_without_an_authorized_key_refuses_to_start() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let mut settings = stack.agent_settings("web01", plugins.path());
    let empty = stack.keys.path().join("empty.pub");
    std::fs::write(&empty, "# nobody yet\n").expect("write");
    for path in [empty, stack.keys.path().join("missing.pub")] {
        settings.authorized_keys = path;
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            vogeler_agent::run(settings.clone(), CancellationToken::new()),
        )
        .await
        .expect("refused at once, before connecting")
        .expect_err("no key");
        assert_eq!(
            vogeler_core::exit::ExitStatus::exit_code(&err),
            vogeler_core::exit::CONFIG,
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("vogeler-runner keygen"), "{text}");
    }
}

/// Broadcasts are transient (persisting one costs the broker a write per agent queue);
/// a command for one node is persistent. Both carry their TTL.
#[tokio::test]
async fn broadcasts_are_transient_and_node_commands_persistent() {
    let stack = TestStack::new().await;
    let topology = stack.topology();
    let (conn, ch) = stack.publisher("test-persistence").await;
    let node = node("persist01");
    let queue = vogeler_core::amqp::declare::agent_queue(&topology, &conn, &node)
        .await
        .expect("agent queue");
    for (target, mode) in [
        (vogeler_proto::wire::Target::All, 1u8),
        (vogeler_proto::wire::Target::Node(node.clone()), 2u8),
    ] {
        let command = Message::Command(vogeler_proto::wire::Command::new(
            Uuid::new_v4(),
            PluginName::new("hello").expect("name"),
            target.clone(),
            Utc::now(),
            chrono::Duration::seconds(60),
        ));
        let delivered = amqp::publish_command(
            &ch,
            &topology.commands_exchange(),
            &Topology::command_routing_key(&target),
            &command,
            &stack.runner_key,
            Duration::from_secs(60),
        )
        .await
        .expect("publish");
        assert_eq!(delivered, amqp::Delivery::Queued);
        let got = ch
            .basic_get(queue.as_str().into(), Default::default())
            .await
            .expect("get")
            .expect("a message in the agent's queue");
        assert_eq!(
            got.delivery.properties.delivery_mode(),
            &Some(mode),
            "{target:?}"
        );
        assert_eq!(
            got.delivery
                .properties
                .expiration()
                .as_ref()
                .map(|e| e.as_str()),
            Some("60000")
        );
    }
    let _ = conn.close(200, "done".into()).await;
}
