//! TLS on the client side, against TLS-terminating proxies in front of the shared broker and
//! database: the right CA connects, a wrong CA or host name is refused, a broker that wants
//! a client certificate gets one, and the whole runner → agent → server → CouchDB path runs
//! over `amqps://` and `https://`.

use std::time::Duration;

use vogeler_config::{self as config, TlsFiles};
use vogeler_core::{amqp, couch::CouchClient};
use vogeler_e2e::{
    HELLO, TestStack, ask_using, plugin_dir, retarget, spawn_agent, spawn_server,
    tls::{TestCa, TlsProxy},
    upstream,
};
use vogeler_proto::secret::SecretUrl;

async fn amqps(port: u16, files: TlsFiles) -> Result<lapin::Connection, String> {
    let url = SecretUrl::parse(&format!("amqps://guest:guest@localhost:{port}/%2f")).expect("url");
    let tls = amqp::tls_config(&files).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(10),
        amqp::connect_tls(&url, &tls, "test-tls"),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())
}

fn ca_only(ca: &TestCa) -> TlsFiles {
    TlsFiles {
        ca_file: Some(ca.ca_file()),
        client: None,
    }
}

#[tokio::test]
async fn broker_over_tls_needs_the_right_ca_and_host_name() {
    let stack = TestStack::new().await;
    let broker = upstream(&stack.amqp_first());
    let ca = TestCa::new("right");
    let wrong = TestCa::new("wrong");
    let proxy = TlsProxy::start(&broker, &ca.issue("broker", &["localhost"]), None).await;
    let misnamed = TlsProxy::start(&broker, &ca.issue("other", &["broker.invalid"]), None).await;

    let conn = amqps(proxy.port(), ca_only(&ca)).await.expect("right CA");
    conn.create_channel().await.expect("a working connection");
    let _ = conn.close(200, "done".into()).await;

    let err = amqps(proxy.port(), ca_only(&wrong))
        .await
        .expect_err("wrong CA");
    println!("wrong CA: {err}");
    let err = amqps(proxy.port(), TlsFiles::default())
        .await
        .expect_err("only the system's CAs");
    println!("no CA file: {err}");
    let err = amqps(misnamed.port(), ca_only(&ca))
        .await
        .expect_err("wrong host name");
    println!("wrong host name: {err}");
    assert!(err.contains("not valid for name"), "{err}");

    // A broker that requires client certificates.
    let strict = TlsProxy::start(&broker, &ca.issue("strict", &["localhost"]), Some(&ca)).await;
    let client = ca.issue("agent-web01", &["web01"]);
    let err = amqps(strict.port(), ca_only(&ca))
        .await
        .expect_err("no client certificate");
    println!("no client certificate: {err}");
    let with_cert = TlsFiles {
        ca_file: Some(ca.ca_file()),
        client: Some((client.cert_file.clone(), client.key_file.clone())),
    };
    let conn = amqps(strict.port(), with_cert)
        .await
        .expect("client certificate accepted");
    conn.create_channel().await.expect("a working connection");

    let missing = TlsFiles {
        ca_file: Some(ca.dir.path().join("nope.pem")),
        client: None,
    };
    let err = amqps(proxy.port(), missing)
        .await
        .expect_err("missing file");
    assert!(err.contains("nope.pem"), "{err}");
}

#[tokio::test]
async fn database_over_tls_needs_the_right_ca_and_host_name() {
    let stack = TestStack::new().await;
    let db = upstream(&stack.couch_first());
    let ca = TestCa::new("right");
    let wrong = TestCa::new("wrong");
    let proxy = TlsProxy::start(&db, &ca.issue("couch", &["localhost"]), None).await;
    let misnamed = TlsProxy::start(&db, &ca.issue("other", &["couch.invalid"]), None).await;
    let settings = |port: u16, ca_file: &std::path::Path| {
        let mut s = stack.sources();
        s.set(
            "couchdb.url",
            Some(retarget(&stack.couch_first(), "https", "localhost", port)),
        )
        .set("couchdb.ca_file", Some(ca_file.display()));
        config::load(&s)
            .expect("load")
            .server()
            .expect("settings")
            .couch
    };
    let ping = |port, ca: &std::path::Path| {
        let c = CouchClient::from_settings(&settings(port, ca)).expect("client");
        async move { c.ping().await.map_err(|e| e.to_string()) }
    };
    ping(proxy.port(), &ca.ca_file()).await.expect("right CA");
    let err = ping(proxy.port(), &wrong.ca_file())
        .await
        .expect_err("wrong CA");
    println!("wrong CA: {err}");
    let err = ping(misnamed.port(), &ca.ca_file())
        .await
        .expect_err("wrong host name");
    println!("wrong host name: {err}");
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn the_whole_path_runs_over_tls() {
    let stack = TestStack::new().await;
    let ca = TestCa::new("stack");
    let broker = TlsProxy::start(
        &upstream(&stack.amqp_first()),
        &ca.issue("broker", &["localhost"]),
        None,
    )
    .await;
    let couch = TlsProxy::start(
        &upstream(&stack.couch_first()),
        &ca.issue("couch", &["localhost"]),
        None,
    )
    .await;
    let mut sources = stack.sources();
    sources
        .set(
            "amqp.url",
            Some(retarget(
                &stack.amqp_first(),
                "amqps",
                "localhost",
                broker.port(),
            )),
        )
        .set("amqp.ca_file", Some(ca.ca_file().display()))
        .set(
            "couchdb.url",
            Some(retarget(
                &stack.couch_first(),
                "https",
                "localhost",
                couch.port(),
            )),
        )
        .set("couchdb.ca_file", Some(ca.ca_file().display()));
    let raw = config::load(&sources).expect("load");
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let _server = spawn_server(raw.server().expect("server settings"));
    let mut agent = raw.agent(Some("tls01".into())).expect("agent settings");
    agent.plugin_dir = plugins.path().to_path_buf();
    let _agent = spawn_agent(agent);
    stack.wait_registered(&["tls01"]).await;
    let runner = raw.runner().expect("runner settings");
    let r = ask_using(&runner, "hello", "tls01", |_| {}).await;
    assert!(r.success(), "{}", r.render_table());
    vogeler_e2e::wait_for("the result stored", Duration::from_secs(10), || async {
        stack
            .document("tls01")
            .await
            .is_some_and(|d| d.value("hello").is_some())
    })
    .await;
}
