//! Malformed messages (10,000 in `scripts/faults.sh`, 2,000 in the suite) against the real agent and server binaries, with valid traffic
//! mixed in: nothing crashes, every malformed message is refused with a reason (the agent's
//! audit log, the server's dead-letter queue), every valid one is handled, and memory stays
//! bounded. Then the stores such floods fill stay bounded: the agent's audit log (rotated,
//! refusals throttled) and the dead-letter queue (bounded, keeping the newest).

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
    // would otherwise, rightly, refuse part of it. Refusals are counted in /metrics (the
    // audit log writes only the first 100 of each class a minute).
    let agent_metrics = free_port();
    agent
        .args(["--node", "hostile01", "--plugin-dir"])
        .arg(plugins.path())
        .env("VOGELER_AMQP__AGENT_QUEUE_MAX_LENGTH", "20000")
        .env("VOGELER_AGENT__HTTP_LISTEN", agent_metrics.to_string())
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
        scheduled: None,
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
            refused(agent_metrics).await.values().sum::<u64>() >= malformed_n as u64
                && stack.audit_events("hostile01", "finished").len() >= valid_ids.len()
        },
    )
    .await;
    let agent_took = started.elapsed();
    assert_eq!(
        refused(agent_metrics).await.values().sum::<u64>(),
        malformed_n as u64
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

/// Ready messages in `queue`, or None when it does not exist (the probe closes the channel
/// of a failed passive declare, hence a channel each time).
async fn queue_length(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    let probe = amqp::consume::QueueLength::open(conn, queue)
        .await
        .expect("channel");
    probe.get().await.ok()
}

/// A valid result of `node`, signed by the stack's agent key: once the server stored it, it
/// has settled everything published before it (each batch's dead letters are confirmed
/// before its results are written).
fn marker_result(stack: &TestStack, node: &str) -> (String, Vec<u8>, lapin::types::FieldTable) {
    let body = wire::encode(&Message::Result(PluginResult {
        request_id: Uuid::new_v4(),
        node: NodeName::new(node).expect("node"),
        plugin: PluginName::new("hello").expect("plugin"),
        outcome: Outcome::Ok,
        value: Some(serde_json::json!(["marker"])),
        truncated: false,
        collected_at: Utc::now(),
        duration_ms: 1,
        agent_version: "test".into(),
        scheduled: None,
    }));
    let headers = amqp::signature_headers(&stack.key_for(node), Purpose::Agent, &body);
    ("result.marker".into(), body, headers)
}

#[tokio::test]
async fn the_dead_letter_queue_keeps_its_bounds_and_the_newest_letters() {
    const MAX_LENGTH: u64 = 50;
    const MAX_BYTES: u64 = 1024 * 1024;
    let stack = TestStack::new().await;
    let mut sources = stack.sources();
    sources
        .set("amqp.dead_letters_max_length", Some(MAX_LENGTH))
        .set("amqp.dead_letters_max_bytes", Some(MAX_BYTES));
    let settings = vogeler_config::load(&sources)
        .expect("load")
        .server()
        .expect("settings");
    let t = settings.broker.topology.clone();
    let metrics = vogeler_core::observe::ServerMetrics::default();
    let _server = vogeler_e2e::spawn_server_with(settings, metrics.clone());
    let url = vogeler_proto::secret::SecretUrl::parse(&stack.amqp_first()).expect("url");
    let conn = amqp::connect(&url, "test-dead-letters")
        .await
        .expect("connect");
    // Every letter is decided once the server counted it: a marker stored in one batch can
    // be acked while another batch still dead-letters. On a timeout, say where the letters
    // are (CI once saw the count stop short under the full suite).
    let malformed = || {
        metrics
            .dead_lettered
            .get_or_create(&vogeler_core::observe::ReasonLabel {
                reason: "malformed".into(),
            })
            .get()
    };
    let refused = |n: u64| {
        let (conn, t, metrics) = (&conn, &t, &metrics);
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            while malformed() < n {
                if tokio::time::Instant::now() >= deadline {
                    panic!(
                        "timed out after 90s waiting for {n} letters dead-lettered: {} counted, {} consumed, {} stored, results queue {:?}, dead letters {:?}",
                        malformed(),
                        metrics.consumed.get(),
                        metrics.stored.get(),
                        queue_length(conn, &t.results_queue()).await,
                        queue_length(conn, &t.dead_letter_queue()).await,
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Published only once the server declared its queues, with these bounds.
    wait_for(
        "the server's declarations",
        Duration::from_secs(20),
        || async { queue_length(&conn, &t.dead_letter_queue()).await.is_some() },
    )
    .await;
    let ch = amqp::publisher_channel(&conn).await.expect("channel");
    let results = t.results_exchange();
    let dlq = t.dead_letter_queue();
    let drain = || async {
        let mut bodies = Vec::new();
        while let Some(m) = ch
            .basic_get(
                dlq.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
        {
            bodies.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        }
        bodies
    };

    // By count: 200 unsigned letters, 50 kept, the newest.
    let mut garbage: Vec<_> = (0..200)
        .map(|i| {
            (
                "result.x".to_string(),
                format!("garbage {i:04}").into_bytes(),
                Default::default(),
            )
        })
        .collect();
    garbage.push(marker_result(&stack, "dl01"));
    publish_all(&ch, &results, garbage).await;
    wait_for("the marker stored", Duration::from_secs(90), || async {
        stack.document("dl01").await.is_some()
    })
    .await;
    refused(200).await;
    assert_eq!(
        queue_length(&conn, &dlq).await,
        Some(MAX_LENGTH as u32),
        "bounded in messages"
    );
    // The newest in the order they were dead-lettered, which two batches written at once
    // can shuffle within a prefetch window (32): the oldest are gone, the last is there.
    let kept = drain().await;
    let index = |b: &String| b["garbage ".len()..].parse::<usize>().expect("index");
    assert_eq!(kept.len(), MAX_LENGTH as usize);
    assert!(kept.iter().any(|b| index(b) == 199), "{kept:?}");
    assert!(
        kept.iter()
            .all(|b| index(b) >= 200 - MAX_LENGTH as usize - 32),
        "the oldest were dropped: {kept:?}"
    );

    // By bytes: 20 letters of 200 KiB, 5 kept (1 MiB), the newest.
    let big = |i: usize| {
        let mut b = format!("big {i:04} ").into_bytes();
        b.resize(200 * 1024, b'x');
        b
    };
    let mut large: Vec<_> = (0..20)
        .map(|i| ("result.x".to_string(), big(i), Default::default()))
        .collect();
    large.push(marker_result(&stack, "dl02"));
    publish_all(&ch, &results, large).await;
    wait_for(
        "the second marker stored",
        Duration::from_secs(90),
        || async { stack.document("dl02").await.is_some() },
    )
    .await;
    refused(220).await;
    assert_eq!(queue_length(&conn, &dlq).await, Some(5), "bounded in bytes");
    let mut kept: Vec<String> = drain().await.iter().map(|b| b[..8].to_string()).collect();
    kept.sort();
    assert_eq!(kept.len(), 5, "{kept:?}");
    assert!(kept.contains(&"big 0019".to_string()), "{kept:?}");
    assert!(kept.iter().all(|b| b.as_str() >= "big 0005"), "{kept:?}");
    println!(
        "dead letters: 200 published, {MAX_LENGTH} kept; 20 x 200 KiB published, 5 kept within {} KiB",
        MAX_BYTES / 1024
    );
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn an_unbounded_dead_letter_queue_stops_the_server_with_the_way_out() {
    use lapin::types::{AMQPValue, FieldTable};
    use vogeler_proto::topology::QueueArgument;

    let stack = TestStack::new().await;
    let t = stack.topology();
    let dlq = t.dead_letter_queue();
    let url = vogeler_proto::secret::SecretUrl::parse(&stack.amqp_first()).expect("url");
    let conn = amqp::connect(&url, "test-old-dead-letters")
        .await
        .expect("connect");
    let table = |args: Vec<(&'static str, QueueArgument)>| {
        let mut table = FieldTable::default();
        for (k, v) in args {
            let v = match v {
                QueueArgument::Int(i) => AMQPValue::LongLongInt(i),
                QueueArgument::Text(s) => AMQPValue::LongString(s.into()),
            };
            table.insert(k.into(), v);
        }
        table
    };
    let declare = |args: FieldTable| {
        let (conn, dlq) = (&conn, dlq.clone());
        async move {
            let ch = conn.create_channel().await.expect("channel");
            ch.queue_declare(
                dlq.as_str().into(),
                lapin::options::QueueDeclareOptions::durable(),
                args,
            )
            .await
            .map(|_| ())
        }
    };
    // As releases before the bound declared it: no limits.
    declare(table(t.queue_arguments()))
        .await
        .expect("old declaration");

    let out =
        vogeler_e2e::programs::run(with_couch(program("vogeler-server", &stack), &stack)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!("queue \"{dlq}\" exists with other settings"))
            && stderr.contains("amqp.dead_letters_max_length")
            && stderr.contains(&format!("rabbitmqctl delete_queue {dlq}")),
        "{stderr}"
    );

    // The way out works: deleted, the queue comes back with its bounds.
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(dlq.as_str().into(), Default::default())
        .await
        .expect("delete");
    let _server = vogeler_e2e::spawn_server(stack.server_settings());
    wait_for(
        "the server's declarations",
        Duration::from_secs(20),
        || async { queue_length(&conn, &dlq).await.is_some() },
    )
    .await;
    // Declaring succeeds only with the arguments it has.
    declare(table(t.dead_letter_queue_arguments()))
        .await
        .expect("declared with the bounds");
    assert!(declare(table(t.queue_arguments())).await.is_err());
    let _ = conn.close(200, "done".into()).await;
}

/// A free local port, for a program's `/metrics`.
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// An agent's refusals by class, from its `/metrics` (none while it is not listening yet).
async fn refused(addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, u64> {
    let Ok(response) = reqwest::get(format!("http://{addr}/metrics")).await else {
        return Default::default();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("vogeler_agent_commands_rejected_total{reason=\"")?;
            let (class, n) = rest.split_once("\"} ")?;
            Some((class.to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

/// Refused commands per class in the flood, for each of three classes that need no runner
/// key: anyone holding the broker credential can send them.
const FLOOD_PER_CLASS: usize = 1000;
/// The flood agent's audit log bounds: small, so the flood makes it rotate.
const FLOOD_AUDIT_MAX_BYTES: u64 = 64 * 1024;
const FLOOD_AUDIT_FILES: usize = 3;

#[tokio::test]
async fn a_flood_of_refusals_keeps_the_audit_log_bounded_and_the_agent_answering() {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use vogeler_agent::{audit, throttle};

    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", vogeler_e2e::HELLO)]);
    let _server = vogeler_e2e::spawn_server(stack.server_settings());
    let metrics = free_port();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut agent = program("vogeler-agent", &stack);
    agent
        .args(["--node", "flood01", "--plugin-dir"])
        .arg(plugins.path())
        .env("VOGELER_AMQP__AGENT_QUEUE_MAX_LENGTH", "20000")
        .env("VOGELER_AGENT__HTTP_LISTEN", metrics.to_string())
        .env(
            "VOGELER_AGENT__AUDIT_MAX_BYTES",
            FLOOD_AUDIT_MAX_BYTES.to_string(),
        )
        .env("VOGELER_AGENT__AUDIT_FILES", FLOOD_AUDIT_FILES.to_string())
        .stderr(log.reopen().expect("log file"));
    let mut agent = agent.spawn().expect("agent");
    let pid = agent.id().expect("pid");
    stack.wait_registered(&["flood01"]).await;
    let idle_kib = peak_rss_kib(pid);

    // Valid commands, unsigned, signed by a stranger, or carrying the runner's signature of
    // other bytes: three classes, interleaved.
    let node = NodeName::new("flood01").expect("node");
    let routing = Topology::command_routing_key(&Target::Node(node.clone()));
    let body = || {
        wire::encode(&Message::Command(Command::new(
            Uuid::new_v4(),
            PluginName::new("hello").expect("plugin"),
            Target::Node(node.clone()),
            Utc::now(),
            chrono::Duration::minutes(10),
        )))
    };
    let stranger = PrivateKey::generate().expect("key");
    let mut flood = Vec::new();
    for _ in 0..FLOOD_PER_CLASS {
        flood.push((routing.clone(), body(), Default::default()));
        let b = body();
        let headers = amqp::signature_headers(&stranger, Purpose::Command, &b);
        flood.push((routing.clone(), b, headers));
        let headers = amqp::signature_headers(&stack.runner_key, Purpose::Command, &body());
        flood.push((routing.clone(), body(), headers));
    }
    let sent = flood.len() as u64;
    let (conn, ch) = stack.publisher("test-flood").await;
    let started = std::time::Instant::now();
    publish_all(&ch, &stack.topology().commands_exchange(), flood).await;
    wait_for(
        "the agent to refuse the whole flood",
        Duration::from_secs(120),
        || async { refused(metrics).await.values().sum::<u64>() >= sent },
    )
    .await;
    let took = started.elapsed();
    let counted = refused(metrics).await;
    let classes = ["bad_signature", "unknown_key", "unsigned"];
    assert_eq!(
        counted,
        classes
            .iter()
            .map(|c| (c.to_string(), FLOOD_PER_CLASS as u64))
            .collect::<BTreeMap<_, _>>(),
        "the metric counts every refusal, by its class"
    );

    // It still answers a real command.
    let r = vogeler_e2e::ask(&stack, "hello", "flood01", "20").await;
    assert!(r.success(), "{}", r.render_table());
    let peak_kib = peak_rss_kib(pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let Ok(status) = tokio::time::timeout(Duration::from_secs(20), agent.wait()).await else {
        let logged = std::fs::read_to_string(log.path()).unwrap_or_default();
        let tail: Vec<&str> = logged.lines().rev().take(30).collect();
        let _ = agent.kill().await;
        panic!(
            "the agent did not stop within 20 s of SIGTERM; its last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    };
    let status = status.expect("agent status");
    assert!(status.success(), "{status}");
    let _ = conn.close(200, "done".into()).await;

    // The audit log rotated within its bounds, 0600 throughout.
    let path = stack.state_dir().join("flood01").join(audit::FILE);
    let mut files: Vec<std::path::PathBuf> = (1..=FLOOD_AUDIT_FILES)
        .rev()
        .map(|n| audit::rotated(&path, n))
        .filter(|p| p.exists())
        .collect();
    files.push(path.clone());
    assert!(!audit::rotated(&path, FLOOD_AUDIT_FILES + 1).exists());
    assert!(files.len() >= 2, "the flood made it rotate: {files:?}");
    let mut bytes = 0;
    for f in &files {
        let m = std::fs::metadata(f).expect("metadata");
        assert!(
            m.len() <= FLOOD_AUDIT_MAX_BYTES,
            "{} is {} bytes",
            f.display(),
            m.len()
        );
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", f.display());
        bytes += m.len();
    }
    let lines: Vec<serde_json::Value> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .expect("audit log")
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect::<Vec<_>>()
        })
        .collect();
    // Each class: its first refusals written, the rest summed up, none lost.
    let minutes = took.as_secs() / 60 + 2;
    let (mut written_total, mut suppressed_total) = (0, 0);
    for class in classes {
        let written = lines
            .iter()
            .filter(|l| l["event"] == "rejected" && l["outcome"] == class)
            .count() as u64;
        let suppressed: u64 = lines
            .iter()
            .filter(|l| l["event"] == "suppressed" && l["outcome"] == class)
            .filter_map(|l| l["count"].as_u64())
            .sum();
        assert_eq!(written + suppressed, FLOOD_PER_CLASS as u64, "{class}");
        assert!(
            written <= u64::from(throttle::PER_WINDOW) * minutes,
            "{class}: {written} lines"
        );
        assert!(suppressed > 0, "{class}: a summary line");
        written_total += written;
        suppressed_total += suppressed;
    }
    // What ran is never left out.
    let id = r.request_id.to_string();
    for event in ["accepted", "finished"] {
        assert!(
            lines
                .iter()
                .any(|l| l["event"] == event && l["request_id"] == id.as_str()),
            "{event} line of the real command"
        );
    }
    // The agent's own log follows the same rule.
    let text = std::fs::read_to_string(log.path()).expect("agent log");
    let warned = text
        .lines()
        .filter(|l| l.contains("refused a command"))
        .count() as u64;
    let summed = text
        .lines()
        .filter(|l| l.contains("more refusals of class"))
        .count();
    assert_eq!(warned, written_total, "one warning per written refusal");
    assert!(summed >= classes.len(), "{summed} summary warnings");
    println!(
        "{sent} refused commands in {:.1}s: audit log {} files, {} KiB ({} refusal lines written, {} suppressed, {} summary warnings); agent log {} KiB; agent peak RSS {} MiB (idle {} MiB)",
        took.as_secs_f64(),
        files.len(),
        bytes / 1024,
        written_total,
        suppressed_total,
        summed,
        text.len() / 1024,
        peak_kib / 1024,
        idle_kib / 1024
    );
    assert!(peak_kib < 128 * 1024, "agent peak RSS {peak_kib} KiB");
}
