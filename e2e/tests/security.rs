//! Results bound to their node (key pinning, `nodes forget`), per-key restrictions and the
//! audit log, on the real broker and database.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;
use vogeler_e2e::{
    HELLO, TestStack, ask, ask_using, ask_with, node, plugin_dir, spawn_agent, spawn_server,
    wait_for,
};
use vogeler_proto::{
    names::PluginName,
    topology::Topology,
    wire::{Message, Outcome, PluginResult},
};

fn forged(node_name: &str, value: serde_json::Value) -> (PluginResult, Vec<u8>) {
    let r = PluginResult {
        request_id: Uuid::new_v4(),
        node: node(node_name),
        plugin: PluginName::new("hello").expect("plugin"),
        outcome: Outcome::Ok,
        value: Some(value),
        truncated: false,
        collected_at: Utc::now() + chrono::Duration::seconds(5),
        duration_ms: 1,
        agent_version: "rogue".into(),
        scheduled: None,
    };
    let body = vogeler_proto::wire::encode(&Message::Result(r.clone()));
    (r, body)
}

async fn dead_letters(stack: &TestStack) -> Vec<String> {
    let (conn, ch) = stack.publisher("test-dead").await;
    let mut reasons = Vec::new();
    while let Some(m) = ch
        .basic_get(
            stack.topology().dead_letter_queue().as_str().into(),
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
            .and_then(|h| h.inner().get("x-vogeler-reason").cloned());
        if let Some(lapin::types::AMQPValue::LongString(r)) = reason {
            reasons.push(r.to_string());
        }
    }
    let _ = conn.close(200, "done".into()).await;
    reasons
}

#[tokio::test]
async fn one_agent_cannot_change_another_nodes_document() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(stack.server_settings());
    let _agent = spawn_agent(stack.agent_settings("web01", plugins.path()));
    stack.wait_registered(&["web01"]).await;
    let r = ask(&stack, "hello", "web01", "10").await;
    assert!(r.success(), "{}", r.render_table());
    let doc = stack.document("web01").await.expect("document");
    let pinned = doc.meta.key.clone().expect("web01's key is pinned");

    // Another node's agent (same broker user, its own key) claims to be web01.
    let (_, body) = forged("web01", json!(["forged"]));
    let key = Topology::result_routing_key(Uuid::new_v4());
    stack
        .publish_raw(&stack.topology().results_exchange(), &key, &[&body])
        .await;
    let collected = std::sync::Mutex::new(Vec::new());
    let (collected_ref, stack_ref) = (&collected, &stack);
    wait_for(
        "the forged result dead-lettered",
        Duration::from_secs(15),
        || async move {
            let got = dead_letters(stack_ref).await;
            let mut all = collected_ref.lock().expect("lock");
            all.extend(got);
            !all.is_empty()
        },
    )
    .await;
    let reasons = collected.into_inner().expect("lock");
    assert!(
        reasons[0].contains("pinned to key") && reasons[0].contains("nodes forget web01"),
        "{reasons:?}"
    );
    let doc = stack.document("web01").await.expect("document");
    assert_eq!(doc.value("hello"), Some(&json!(["alpha", "beta"])));
    assert_eq!(doc.meta.key.as_deref(), Some(pinned.as_str()));

    // The operator says web01 was reinstalled: its next key is pinned instead.
    let forgot = vogeler_runner::inventory::forget(
        &stack.runner_settings("5").couch,
        &vogeler_proto::names::NodeName::new("web01").expect("node"),
    )
    .await
    .expect("forget");
    assert_eq!(
        forgot,
        vogeler_proto::signing::PublicKey::from_base64(&pinned).map(|k| k.id())
    );
    let (_, body) = forged("web01", json!(["reinstalled"]));
    stack
        .publish_raw(&stack.topology().results_exchange(), &key, &[&body])
        .await;
    wait_for(
        "the new key's result stored",
        Duration::from_secs(15),
        || async {
            stack
                .document("web01")
                .await
                .is_some_and(|d| d.value("hello") == Some(&json!(["reinstalled"])))
        },
    )
    .await;
    let doc = stack.document("web01").await.expect("document");
    assert_eq!(
        doc.meta.key,
        Some(stack.key_for("web01").public().to_base64())
    );
}

#[tokio::test]
async fn restricted_keys_may_run_only_their_plugins_on_their_nodes_and_all_is_audited() {
    let stack = TestStack::new().await;
    // A second runner key, limited to `hello` on web* nodes.
    let helpdesk = stack.keys.path().join("helpdesk");
    vogeler_runner::inventory::keygen(&helpdesk, "helpdesk").expect("key");
    let line = std::fs::read_to_string(helpdesk.join("runner.pub")).expect("pub");
    let trusted = std::fs::read_to_string(stack.authorized_keys()).expect("keys");
    std::fs::write(
        stack.authorized_keys(),
        format!("{trusted}plugins=hello nodes=web* {line}"),
    )
    .expect("write keys");

    let busy = "name = \"uptime\"\ncommand = [\"cat\", \"/proc/uptime\"]\nformat = \"string\"\n";
    let plugins = plugin_dir(&[("hello.toml", HELLO), ("uptime.toml", busy)]);
    let _server = spawn_server(stack.server_settings());
    let _agents: Vec<_> = ["web01", "db01"]
        .iter()
        .map(|n| spawn_agent(stack.agent_settings(n, plugins.path())))
        .collect();
    stack.wait_registered(&["web01", "db01"]).await;

    let mut helpdesk_settings = stack.runner_settings("3");
    helpdesk_settings.signing_key = helpdesk.join("runner.key");
    let as_helpdesk = |plugin: &'static str| ask_using(&helpdesk_settings, plugin, "all", |_| {});
    // hello: web01 answers; db01 is outside the key's nodes and stays silent.
    let r = as_helpdesk("hello").await;
    assert!(
        r.replies.contains_key(&node("web01")),
        "{}",
        r.render_table()
    );
    assert!(
        !r.replies.contains_key(&node("db01")),
        "{}",
        r.render_table()
    );
    // uptime: outside the key's plugins everywhere.
    let r = as_helpdesk("uptime").await;
    assert!(r.replies.is_empty(), "{}", r.render_table());
    // The unrestricted key still runs anything anywhere.
    let r = ask_with(&stack, "uptime", "all", "10", |_| {}).await;
    assert!(r.success(), "{}", r.render_table());

    let helpdesk_id = vogeler_core::keyfile::load_private(&helpdesk.join("runner.key"))
        .expect("key")
        .public()
        .id();
    let lines = |n: &str| -> Vec<serde_json::Value> {
        stack
            .audit_log(n)
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    };
    let web = lines("web01");
    let db = lines("db01");
    let has = |lines: &[serde_json::Value], event: &str, plugin: &str, key: &str| {
        lines.iter().any(|l| {
            l["event"] == event
                && l["plugin"] == plugin
                && l["key"] == key
                && l["request_id"].is_string()
                && l["time"].is_string()
        })
    };
    assert!(has(&web, "accepted", "hello", &helpdesk_id), "{web:#?}");
    assert!(has(&web, "finished", "hello", &helpdesk_id), "{web:#?}");
    assert!(has(&web, "rejected", "uptime", &helpdesk_id), "{web:#?}");
    assert!(has(&db, "rejected", "hello", &helpdesk_id), "{db:#?}");
    let denied = db
        .iter()
        .find(|l| l["event"] == "rejected" && l["plugin"] == "hello")
        .expect("denied line");
    assert_eq!(denied["outcome"], "denied");
    assert!(
        denied["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nodes=web*")),
        "{denied}"
    );
    let runner_id = stack.runner_key.public().id();
    assert!(has(&db, "finished", "uptime", &runner_id), "{db:#?}");
}
