//! Several broker and database URLs (the nodes of a cluster): programs start on the first
//! node that answers and move to the next when theirs goes away. Here each "node" is a fault
//! proxy in front of the shared broker or database, so the suite can take one away without
//! stopping anything shared; `scripts/cluster-faults.sh` kills real cluster nodes.

use std::time::Duration;

use vogeler_core::couch::CouchClient;
use vogeler_e2e::{
    FaultProxy, HELLO, TestStack, ask_using, node, plugin_dir, retarget, spawn_agent, spawn_server,
    upstream, url_list, wait_for,
};

/// Two proxies in front of one server, and `url` rewritten to go through each.
async fn two_nodes(url: &str, scheme: &str) -> (FaultProxy, FaultProxy, String) {
    let (a, b) = (
        FaultProxy::start(&upstream(url)).await,
        FaultProxy::start(&upstream(url)).await,
    );
    let via = |p: &FaultProxy| retarget(url, scheme, &p.addr().ip().to_string(), p.addr().port());
    let list = format!("{},{}", via(&a), via(&b));
    (a, b, list)
}

#[tokio::test]
async fn the_database_client_moves_to_the_next_node_and_stays_there() {
    let stack = TestStack::new().await;
    let (a, b, list) = two_nodes(&stack.couch_first(), "http").await;
    // A node that is not listening at all comes first: start-up skips it.
    let dead = retarget(&stack.couch_first(), "http", "127.0.0.1", 1);
    let couch =
        CouchClient::with_ca(&url_list(&format!("{dead},{list}")), None, None).expect("client");
    couch.ping().await.expect("the second node answers");
    let port = |c: &CouchClient| url::Url::parse(c.url()).expect("url").port();
    assert_eq!(port(&couch), Some(a.addr().port()));
    couch
        .ensure_database(&stack.database)
        .await
        .expect("create");

    a.cut();
    // Every request after the cut is answered, by the other node, and clones share it.
    let copy = couch.clone();
    for i in 0..20 {
        let doc = serde_json::json!({"i": i});
        copy.put(&stack.database, &format!("doc{i}"), &doc)
            .await
            .unwrap_or_else(|e| panic!("write {i} after the cut: {e}"));
    }
    assert_eq!(port(&couch), Some(b.addr().port()));
    assert_eq!(couch.doc_count(&stack.database).await.expect("count"), 20);

    // With every node gone the error names them all, and no password.
    b.cut();
    let err = couch.ping().await.expect_err("nothing answers");
    let text = err.to_string();
    assert!(err.is_transient(), "{text}");
    assert!(text.contains("other nodes in couchdb.url"), "{text}");
    let password = url::Url::parse(&stack.couch_first())
        .expect("url")
        .password()
        .map(str::to_string);
    if let Some(pw) = password {
        assert!(!text.contains(&pw), "{text}");
    }
}

#[tokio::test]
async fn agents_server_and_runner_fail_over_to_the_next_broker_and_database_node() {
    let stack = TestStack::new().await;
    let (amqp_a, amqp_b, amqp) = two_nodes(&stack.amqp_first(), "amqp").await;
    let (couch_a, couch_b, couchdb) = two_nodes(&stack.couch_first(), "http").await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let mut sources = stack.sources();
    sources
        .set("amqp.url", Some(&amqp))
        .set("couchdb.url", Some(&couchdb))
        .set("amqp.heartbeat", Some("2s"));
    let raw = vogeler_config::load(&sources).expect("load");
    let _server = spawn_server(raw.server().expect("server"));
    let names = ["fo01", "fo02", "fo03"];
    let mut agents = Vec::new();
    for name in names {
        let mut s = stack.sources();
        s.set("amqp.url", Some(&amqp))
            .set("amqp.heartbeat", Some("2s"))
            .set("agent.node", Some(name))
            .set("agent.plugin_dir", Some(plugins.path().display()));
        let settings = vogeler_config::load(&s)
            .expect("load")
            .agent(None)
            .expect("agent");
        agents.push(spawn_agent(settings));
    }
    stack.wait_registered(&names).await;
    let runner = {
        let mut s = sources;
        s.set("runner.timeout", Some("20"));
        vogeler_config::load(&s)
            .expect("load")
            .runner()
            .expect("runner")
    };
    let ask = || ask_using(&runner, "hello", "fo0*", |_| {});
    let before = ask().await;
    assert!(before.success(), "{}", before.render_table());

    // The first broker node and the first database node go away together.
    amqp_a.cut();
    couch_a.cut();
    // The agents reconnect through the second node by themselves; a command sent while they
    // do may find no one, so ask until all three answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut after = ask().await;
    while !after.success() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all three answer 60 s after the failover:\n{}",
            after.render_table()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = ask().await;
    }
    for n in names {
        let reply = after.replies.get(&node(n)).expect("reply");
        assert_eq!(reply.request_id, after.request_id);
        // No command ran twice: each request id is accepted once in the agent's audit log.
        let accepted: Vec<String> = stack
            .audit_events(n, "accepted")
            .iter()
            .map(|l| l["request_id"].to_string())
            .collect();
        let unique: std::collections::BTreeSet<_> = accepted.iter().collect();
        assert_eq!(
            unique.len(),
            accepted.len(),
            "{n} ran a command twice: {accepted:?}"
        );
        assert!(accepted.len() >= 2, "{n}: {accepted:?}");
    }
    // The server stores the answers through the second database node.
    wait_for(
        "the answers stored after the failover",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for n in names {
                let stored = stack.document(n).await.and_then(|d| {
                    d.meta
                        .plugins
                        .get("hello")
                        .map(|p| p.request_id == after.request_id)
                });
                all &= stored == Some(true);
            }
            all
        },
    )
    .await;
    assert!(amqp_a.refused() > 0 || couch_a.refused() > 0);
    drop((amqp_b, couch_b));
}

#[tokio::test]
async fn an_agent_moves_its_classic_queue_to_a_quorum_queue_and_keeps_answering() {
    let stack = TestStack::new().await;
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(stack.server_settings());
    let agent = |kind: &str| {
        let mut s = stack.sources();
        s.set("amqp.agent_queue_type", Some(kind))
            .set("agent.node", Some("q01"))
            .set("agent.plugin_dir", Some(plugins.path().display()));
        vogeler_config::load(&s)
            .expect("load")
            .agent(None)
            .expect("agent")
    };
    let classic = spawn_agent(agent("classic"));
    stack.wait_registered(&["q01"]).await;
    let r = vogeler_e2e::ask(&stack, "hello", "q01", "20").await;
    assert!(r.success(), "{}", r.render_table());
    classic.stop().await.expect("stop");

    // The same node configured for a cluster: its classic queue cannot be redeclared as a
    // quorum queue (the broker refuses other arguments), so the agent replaces it.
    let _quorum = spawn_agent(agent("quorum"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = vogeler_e2e::ask(&stack, "hello", "q01", "5").await;
        if r.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer through the quorum queue:\n{}",
            r.render_table()
        );
    }
    let err = vogeler_config::load(&{
        let mut s = stack.sources();
        s.set("amqp.agent_queue_type", Some("stream"));
        s
    })
    .expect("load")
    .agent(Some("q01".into()))
    .expect_err("not a queue type");
    assert!(err.to_string().contains("amqp.agent_queue_type"), "{err}");
}
