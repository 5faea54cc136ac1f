//! Enrollment on the real broker and database: with `server.enrollment = "approve"` a new
//! node waits, with no document, until `nodes accept`; `nodes reject` keeps it out; and in
//! every mode one key serves exactly one node name, however many names a key holder tries.

use std::time::Duration;

use chrono::Utc;
use vogeler_core::{amqp, observe::ServerMetrics};
use vogeler_e2e::{
    HELLO, TestStack, ask, node, plugin_dir, programs, spawn_agent, spawn_server,
    spawn_server_with, wait_for,
};
use vogeler_proto::{
    enrollment,
    signing::PrivateKey,
    topology::Topology,
    wire::{Announce, Message},
};
use vogeler_runner::inventory as inv;

fn approve_settings(stack: &TestStack) -> vogeler_config::ServerSettings {
    let mut s = stack.sources();
    s.set("server.enrollment", Some("approve"));
    vogeler_config::load(&s)
        .expect("load")
        .server()
        .expect("server settings")
}

fn announce(name: &str) -> Message {
    let now = Utc::now();
    let mut facts = serde_json::Map::new();
    facts.insert("hostname".into(), name.into());
    Message::Announce(Announce {
        node: node(name),
        agent_version: "test".into(),
        plugins: vec![],
        started_at: now,
        sent_at: now,
        facts,
        schedules: None,
        packages: None,
    })
}

/// Announce each name, signed with `key`, confirmed by the broker.
async fn announce_as(stack: &TestStack, names: &[String], key: &PrivateKey) {
    let (conn, ch) = stack.publisher("test-enroll").await;
    let t = stack.topology();
    for name in names {
        amqp::publish(
            &ch,
            &t.results_exchange(),
            &Topology::announce_routing_key(&node(name)),
            &announce(name),
            key,
        )
        .await
        .expect("publish");
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn with_approve_a_new_node_waits_until_accepted() {
    let stack = TestStack::new().await;
    let metrics = ServerMetrics::default();
    let _server = spawn_server_with(approve_settings(&stack), metrics.clone());
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let agent_settings = stack.agent_settings("web04", plugins.path());
    let key_id = vogeler_agent::security::node_key(&agent_settings)
        .expect("node key")
        .id();
    let _agent = spawn_agent(agent_settings);
    let runner = stack.runner_settings("5");

    // It asks, and waits: listed as pending with its key id, no document, nothing stored.
    wait_for("web04 pending", Duration::from_secs(20), || async {
        // The server creates the enrollment database when it starts.
        inv::pending(&runner.couch)
            .await
            .is_ok_and(|p| !p.is_empty())
    })
    .await;
    let pending = inv::pending(&runner.couch).await.expect("pending");
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].0, "web04");
    assert_eq!(pending[0].1.key_id.as_deref(), Some(key_id.as_str()));
    assert!(
        pending[0].1.facts.contains_key("kernel"),
        "what it announced: {:?}",
        pending[0].1.facts
    );
    assert!(
        stack.document("web04").await.is_none(),
        "no document while pending"
    );
    let table = inv::render_pending(&pending);
    assert!(
        table.contains(&key_id) && table.contains("web04"),
        "{table}"
    );
    assert!(metrics.held.get() >= 1, "its announcement was held back");

    // Accepted: the document is there at once, with the key pinned, and the node answers.
    let accepted = inv::accept(&runner.couch, &node("web04"), None)
        .await
        .expect("accept");
    assert_eq!(accepted.key_id, key_id);
    let doc = stack
        .document("web04")
        .await
        .expect("document right after accept");
    assert_eq!(
        doc.meta
            .key
            .as_deref()
            .and_then(vogeler_proto::signing::PublicKey::from_base64)
            .map(|k| k.id()),
        Some(key_id.clone())
    );
    assert_eq!(doc.meta.facts, pending[0].1.facts, "the facts it announced");
    assert!(
        inv::pending(&runner.couch)
            .await
            .expect("pending")
            .is_empty()
    );
    let r = ask(&stack, "hello", "web04", "10").await;
    assert!(r.success(), "{}", r.render_table());
    wait_for("web04's hello stored", Duration::from_secs(15), || async {
        stack
            .document("web04")
            .await
            .is_some_and(|d| d.value("hello").is_some())
    })
    .await;

    // The accepted key cannot also be another node, and accepting twice says why not.
    let err = inv::accept(&runner.couch, &node("web04"), None)
        .await
        .expect_err("nothing left to accept");
    assert!(err.to_string().contains("no key is waiting"), "{err}");
}

#[tokio::test]
async fn a_rejected_key_stays_out_and_a_squatter_needs_a_choice() {
    let stack = TestStack::new().await;
    let _server = spawn_server(approve_settings(&stack));
    let runner = stack.runner_settings("5");
    let (real, squatter) = (stack.key_for("db09"), PrivateKey::generate().expect("key"));
    let names = vec!["db09".to_string()];
    announce_as(&stack, &names, &squatter).await;
    announce_as(&stack, &names, &real).await;
    wait_for("two claims on db09", Duration::from_secs(20), || async {
        inv::pending(&runner.couch)
            .await
            .is_ok_and(|p| p.len() == 2)
    })
    .await;
    let err = inv::accept(&runner.couch, &node("db09"), None)
        .await
        .expect_err("ambiguous");
    assert!(err.to_string().contains("2 keys claim this name"), "{err}");
    let squatter_id = squatter.public().id();
    let rejected = inv::reject(&runner.couch, &node("db09"), Some(&squatter_id[..8]))
        .await
        .expect("reject");
    assert_eq!(rejected, vec![squatter_id]);
    let accepted = inv::accept(&runner.couch, &node("db09"), None)
        .await
        .expect("accept the real one");
    assert_eq!(accepted.key_id, real.public().id());
    // The squatter keeps speaking: held back, never stored.
    announce_as(&stack, &names, &squatter).await;
    announce_as(&stack, &names, &real).await;
    wait_for(
        "db09 announced with its own key",
        Duration::from_secs(15),
        || async {
            stack
                .node("db09")
                .await
                .is_some_and(|d| d.agent_version() == Some("test"))
        },
    )
    .await;
    let doc = stack.document("db09").await.expect("document");
    assert_eq!(doc.meta.key, Some(real.public().to_base64()));

    // Forgetting the node starts it afresh: its key binding and record go, it waits again.
    inv::forget(&runner.couch, &node("db09"))
        .await
        .expect("forget");
    announce_as(&stack, &names, &real).await;
    wait_for("db09 pending again", Duration::from_secs(20), || async {
        inv::pending(&runner.couch)
            .await
            .is_ok_and(|p| p.len() == 1)
    })
    .await;
}

/// One key holder tries 100 names, in both modes: the first name is its, the other 99 are
/// refused (open) or never recorded beyond one claim per key (approve).
#[tokio::test]
async fn one_key_serves_one_node_name_whatever_a_node_tries() {
    let stack = TestStack::new().await;
    let metrics = ServerMetrics::default();
    let _server = spawn_server_with(stack.server_settings(), metrics.clone());
    let key = PrivateKey::generate().expect("key");
    let names: Vec<String> = (0..100).map(|i| format!("squat{i:03}")).collect();
    announce_as(&stack, &names[..1], &key).await;
    stack.wait_registered(&["squat000"]).await;
    announce_as(&stack, &names[1..], &key).await;
    // A healthy node publishing meanwhile is stored.
    announce_as(
        &stack,
        &["healthy01".to_string()],
        &stack.key_for("healthy01"),
    )
    .await;
    stack.wait_registered(&["healthy01"]).await;
    wait_for("99 names refused", Duration::from_secs(20), || async {
        metrics
            .dead_lettered
            .get_or_create(&vogeler_core::observe::ReasonLabel {
                reason: "wrong_key".into(),
            })
            .get()
            >= 99
    })
    .await;
    let ids = stack.node_ids().await;
    let squatted: Vec<&String> = ids.iter().filter(|i| i.starts_with("squat")).collect();
    assert_eq!(squatted, vec!["squat000"], "one name per key");
    let binding: enrollment::KeyBinding = stack
        .couch
        .get(
            &enrollment::enrollment_database(&stack.database),
            &enrollment::key_binding_id(&key.public()),
        )
        .await
        .expect("read binding")
        .expect("binding");
    assert_eq!(binding.node, "squat000");
    println!(
        "one key, 100 names: 1 stored, {} refused as wrong_key",
        metrics
            .dead_lettered
            .get_or_create(&vogeler_core::observe::ReasonLabel {
                reason: "wrong_key".into()
            })
            .get()
    );
}

/// The runner's command line, as an operator types it: pending, then accept.
#[tokio::test]
async fn nodes_pending_and_accept_from_the_command_line() {
    let stack = TestStack::new().await;
    let _server = spawn_server(approve_settings(&stack));
    let key = stack.key_for("cli01");
    announce_as(&stack, &["cli01".to_string()], &key).await;
    let runner = stack.runner_settings("5");
    wait_for("cli01 pending", Duration::from_secs(20), || async {
        // The server creates the enrollment database when it starts.
        inv::pending(&runner.couch)
            .await
            .is_ok_and(|p| !p.is_empty())
    })
    .await;
    let run = |args: &'static [&'static str]| {
        let mut cmd = programs::with_couch(programs::program("vogeler-runner", &stack), &stack);
        cmd.args(args);
        programs::run(cmd)
    };
    let out = run(&["nodes", "pending"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cli01") && stdout.contains(&key.public().id()),
        "{stdout}"
    );
    println!("$ vogeler-runner nodes pending\n{stdout}");
    let out = run(&["nodes", "pending", "--output", "jsonl"]).await;
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one jsonl line");
    assert_eq!(line["node"], "cli01");
    let out = run(&["nodes", "accept", "cli01"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("accepted key"), "{stdout}");
    println!("$ vogeler-runner nodes accept cli01\n{stdout}");
    assert!(stack.document("cli01").await.is_some());
    let out = run(&["nodes", "accept", "cli01"]).await;
    assert_eq!(out.status.code(), Some(1), "nothing left to accept");
}
