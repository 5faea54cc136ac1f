//! Malformed messages (10,000 in `scripts/faults.sh`, 2,000 in the suite) against the real agent and server binaries, with valid traffic
//! mixed in: nothing crashes, every malformed message is refused with a reason (the agent's
//! audit log, the server's dead-letter queue), every valid one is handled, and memory stays
//! bounded.

use std::{process::Stdio, time::Duration};

use chrono::Utc;
use uuid::Uuid;
use vogeler_core::amqp;
use vogeler_e2e::{
    TestStack, plugin_dir,
    programs::{peak_rss_kib, program, with_couch},
    wait_for,
};
use vogeler_proto::{
    names::{NodeName, PluginName},
    signing::{PrivateKey, Purpose},
    topology::Topology,
    wire::{self, Command, Message, Outcome, PluginResult, Target},
};

/// Malformed messages per side (agent, server). The suite sends 1,000 each;
/// `scripts/faults.sh` sets VOGELER_HOSTILE_MESSAGES=5000 for the full 10,000.
fn malformed_count() -> usize {
    std::env::var("VOGELER_HOSTILE_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

/// A deterministic generator, so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Malformed variants of a valid `template`: random bytes, truncations, wrong types, huge
/// strings, deep nesting, other schema versions, wrong kinds.
fn malformed(template: &str, i: usize, rng: &mut Rng) -> Vec<u8> {
    match i % 8 {
        0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        1 => template.as_bytes()[..rng.below(template.len())].to_vec(),
        2 => template.replacen("\"schema\":1", "\"schema\":\"1\"", 1).replacen("\"request_id\":", "\"request_id\":42,\"x\":", 1).into_bytes(),
        // A huge string where a request id belongs (an unknown huge field would be valid:
        // unknown fields are ignored for compatibility).
        3 => template
            .replacen(
                "\"request_id\":\"",
                &format!("\"request_id\":\"{}", "x".repeat(64 * 1024 + rng.below(200_000))),
                1,
            )
            .into_bytes(),
        4 => {
            let depth = 200 + rng.below(5000);
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
        }
        5 => template.replacen("\"schema\":1", &format!("\"schema\":{}", 2 + rng.below(1000)), 1).into_bytes(),
        6 => template.replacen("\"kind\":\"", "\"kind\":\"x", 1).into_bytes(),
        _ => serde_json::json!({"schema": 1, "kind": "result", "node": rng.next(), "plugin": [], "outcome": {"status": "ok"}}).to_string().into_bytes(),
    }
}

/// Publish every body with its headers, confirms awaited together (pipelined).
async fn publish_all(
    ch: &lapin::Channel,
    exchange: &str,
    items: Vec<(String, Vec<u8>, lapin::types::FieldTable)>,
) {
    let mut confirms = Vec::with_capacity(items.len());
    for (key, body, headers) in &items {
        let props = lapin::BasicProperties::default().with_headers(headers.clone());
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                key.as_str().into(),
                Default::default(),
                body,
                props,
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        assert!(
            c.await.expect("confirm").is_ack(),
            "broker refused a message"
        );
    }
}

#[tokio::test]
async fn malformed_messages_crash_nothing_and_are_all_refused() {
    let malformed_n = malformed_count();
    let stack = TestStack::new().await;
    let marker = tempfile::NamedTempFile::new().expect("marker");
    let canary = vogeler_e2e::canary_plugin(marker.path());
    let plugins = plugin_dir(&[("canary.toml", &canary)]);
    let mut server = with_couch(program("vogeler-server", &stack), &stack)
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let mut agent = program("vogeler-agent", &stack);
    // The flood arrives faster than the agent refuses it: lift the queue bound (1000) that
    // would otherwise, rightly, refuse part of it.
    agent
        .args(["--node", "hostile01", "--plugin-dir"])
        .arg(plugins.path())
        .env("VOGELER_AMQP__AGENT_QUEUE_MAX_LENGTH", "20000")
        .stderr(Stdio::null());
    let mut agent = agent.spawn().expect("agent");
    stack.wait_registered(&["hostile01"]).await;

    let t = stack.topology();
    let (conn, ch) = stack.publisher("test-hostile").await;
    let mut rng = Rng(0x5eed);
    let node = NodeName::new("hostile01").expect("node");
    let command = |plugin: &str| {
        Command::new(
            Uuid::new_v4(),
            PluginName::new(plugin).expect("plugin"),
            Target::Node(node.clone()),
            Utc::now(),
            chrono::Duration::minutes(10),
        )
    };
    let template =
        String::from_utf8(wire::encode(&Message::Command(command("canary")))).expect("utf8");

    // Agent: half signed by its trusted runner key (so they reach the parser), half unsigned,
    // with 50 valid commands spread among them.
    let mut to_agent = Vec::new();
    let mut valid_ids = Vec::new();
    for i in 0..malformed_n {
        let body = malformed(&template, i, &mut rng);
        let headers = if i % 2 == 0 {
            amqp::signature_headers(&stack.runner_key, Purpose::Command, &body)
        } else {
            Default::default()
        };
        to_agent.push((format!("node.{node}"), body, headers));
        if i % 100 == 0 {
            let c = command("canary");
            valid_ids.push(c.request_id.to_string());
            let body = wire::encode(&Message::Command(c));
            let headers = amqp::signature_headers(&stack.runner_key, Purpose::Command, &body);
            to_agent.push((format!("node.{node}"), body, headers));
        }
    }

    // Server: malformed results signed by an agent key, with 200 valid results for 20 nodes.
    let result = |n: usize| PluginResult {
        request_id: Uuid::new_v4(),
        node: NodeName::new(format!("valid{:02}", n % 20)).expect("node"),
        plugin: PluginName::new("hello").expect("plugin"),
        outcome: Outcome::Ok,
        value: Some(serde_json::json!([n])),
        truncated: false,
        collected_at: Utc::now() + chrono::Duration::milliseconds(n as i64),
        duration_ms: 1,
        agent_version: "test".into(),
    };
    let result_template =
        String::from_utf8(wire::encode(&Message::Result(result(0)))).expect("utf8");
    // Signed as each node's own agent would (one key serves one node): a body that still
    // decodes by its node's key, the rest by a stray key.
    let key = PrivateKey::generate().expect("key");
    let signer = |body: &[u8]| match wire::decode(body) {
        Ok(Message::Result(r)) => stack.key_for(r.node.as_str()),
        _ => key.clone(),
    };
    let mut to_server = Vec::new();
    for i in 0..malformed_n {
        let body = malformed(&result_template, i, &mut rng);
        let headers = amqp::signature_headers(&signer(&body), Purpose::Agent, &body);
        to_server.push((Topology::result_routing_key(Uuid::new_v4()), body, headers));
        if i % 25 == 0 {
            let body = wire::encode(&Message::Result(result(i / 25)));
            let headers = amqp::signature_headers(&signer(&body), Purpose::Agent, &body);
            to_server.push(("result.valid".to_string(), body, headers));
        }
    }
    let started = std::time::Instant::now();
    let (commands, results) = (t.commands_exchange(), t.results_exchange());
    tokio::join!(
        publish_all(&ch, &commands, to_agent),
        publish_all(&ch, &results, to_server),
    );

    // The agent refused every malformed one and ran every valid one once.
    wait_for(
        "the agent to decide on every command",
        Duration::from_secs(120),
        || async {
            stack.audit_events("hostile01", "rejected").len() >= malformed_n
                && stack.audit_events("hostile01", "finished").len() >= valid_ids.len()
        },
    )
    .await;
    let agent_took = started.elapsed();
    assert_eq!(
        stack.audit_events("hostile01", "rejected").len(),
        malformed_n
    );
    let ran = std::fs::read_to_string(marker.path()).expect("marker");
    let ran: Vec<&str> = ran.lines().collect();
    assert_eq!(ran.len(), valid_ids.len(), "only the valid commands ran");
    assert!(valid_ids.iter().all(|id| ran.contains(&id.as_str())));

    // The server dead-lettered every malformed one, with a reason, and stored the valid ones.
    let probe = conn.create_channel().await.expect("channel");
    wait_for(
        "every malformed result dead-lettered",
        Duration::from_secs(120),
        || async {
            let q = probe
                .queue_declare(
                    t.dead_letter_queue().as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .expect("dead-letter queue");
            q.message_count() as usize >= malformed_n
        },
    )
    .await;
    let sample = probe
        .basic_get(t.dead_letter_queue().as_str().into(), Default::default())
        .await
        .expect("get")
        .expect("a dead letter");
    assert!(
        sample
            .delivery
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-vogeler-reason")),
        "dead letters carry their reason"
    );
    wait_for(
        "the valid results stored",
        Duration::from_secs(60),
        || async {
            let ids = stack.node_ids().await;
            (0..20).all(|n| ids.iter().any(|i| *i == format!("valid{n:02}")))
        },
    )
    .await;
    let took = started.elapsed();

    // Nothing crashed, and memory stayed bounded.
    assert!(
        server.try_wait().expect("server").is_none(),
        "server still running"
    );
    assert!(
        agent.try_wait().expect("agent").is_none(),
        "agent still running"
    );
    let (server_kib, agent_kib) = (
        peak_rss_kib(server.id().expect("pid")),
        peak_rss_kib(agent.id().expect("pid")),
    );
    println!(
        "{} malformed + {} valid messages handled in {:.1}s (agent done after {:.1}s); peak RSS server {} MiB, agent {} MiB",
        2 * malformed_n,
        valid_ids.len() + malformed_n / 25,
        took.as_secs_f64(),
        agent_took.as_secs_f64(),
        server_kib / 1024,
        agent_kib / 1024
    );
    assert!(server_kib < 256 * 1024, "server peak RSS {server_kib} KiB");
    assert!(agent_kib < 128 * 1024, "agent peak RSS {agent_kib} KiB");
    let _ = conn.close(200, "done".into()).await;
    let _ = server.kill().await;
    let _ = agent.kill().await;
}
