//! `deploy/rabbitmq/setup.sh` applied to the local broker (in a vhost of its own, removed
//! afterwards): the whole path works with one user per role, and each role is refused what
//! it has no business doing. Needs `rabbitmqctl` and root, as CI has.

use std::{path::PathBuf, process::Command, time::Duration};

use lapin::options::{BasicConsumeOptions, ExchangeDeleteOptions};
use vogeler_config as config;
use vogeler_core::amqp;
use vogeler_e2e::{HELLO, TestStack, ask_using, plugin_dir, spawn_agent, spawn_server};
use vogeler_proto::{secret::SecretUrl, signing::Purpose, topology::Topology};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rabbitmq/setup.sh")
}

/// The vhost and users of one test; removed when dropped.
struct Setup {
    vhost: String,
    prefix: String,
    secrets: tempfile::TempDir,
}

impl Setup {
    fn apply() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let setup = Self {
            vhost: format!("vogeler-test-{}", &id[..8]),
            prefix: format!("vt{}", &id[..8]),
            secrets: tempfile::tempdir().expect("secrets dir"),
        };
        let out = Command::new(script())
            .args(["--vhost", &setup.vhost, "--user-prefix", &setup.prefix])
            .arg("--secrets-dir")
            .arg(setup.secrets.path())
            .output()
            .expect("run deploy/rabbitmq/setup.sh (is rabbitmqctl installed?)");
        assert!(
            out.status.success(),
            "setup.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        setup
    }

    /// The broker URL for one role, with its generated password.
    fn url(&self, stack: &TestStack, role: &str) -> String {
        let pw = std::fs::read_to_string(
            self.secrets
                .path()
                .join(format!("rabbitmq-{role}.password")),
        )
        .expect("password file");
        let base = url::Url::parse(&stack.amqp_url).expect("url");
        format!(
            "amqp://{}-{role}:{}@{}:{}/{}",
            self.prefix,
            pw.trim(),
            base.host_str().expect("host"),
            base.port_or_known_default().expect("port"),
            self.vhost
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args([
                "--remove",
                "--vhost",
                &self.vhost,
                "--user-prefix",
                &self.prefix,
            ])
            .output();
    }
}

async fn connect(url: &str) -> lapin::Connection {
    amqp::connect(&SecretUrl::parse(url).expect("url"), "test-permissions")
        .await
        .expect("connect")
}

/// Publish one signed-looking message and report whether the broker took it.
async fn publish(url: &str, exchange: &str, key: &str) -> Result<(), String> {
    let conn = connect(url).await;
    let ch = amqp::publisher_channel(&conn)
        .await
        .map_err(|e| e.to_string())?;
    let signer = vogeler_proto::signing::PrivateKey::generate().expect("key");
    let body = b"{}";
    let props = lapin::BasicProperties::default().with_headers(amqp::signature_headers(
        &signer,
        Purpose::Command,
        body,
    ));
    let sent = async {
        ch.basic_publish(exchange.into(), key.into(), Default::default(), body, props)
            .await?
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), sent).await {
        Ok(Ok(c)) if c.is_ack() => Ok(()),
        Ok(Ok(c)) => Err(format!("nacked: {c:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn consume(url: &str, queue: &str) -> Result<(), String> {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        Default::default(),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

async fn delete_exchange(url: &str, exchange: &str) -> Result<(), String> {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
        .map_err(|e| e.to_string())
}

fn refused(r: Result<(), String>, what: &str) {
    let err = r.expect_err(what);
    assert!(
        err.contains("ACCESS_REFUSED") || err.contains("access"),
        "{what}: {err}"
    );
}

#[tokio::test]
async fn each_role_can_do_its_job_and_nothing_else() {
    let stack = TestStack::new().await;
    let setup = Setup::apply();
    // The script's vhost holds the default collective; the stack's database keeps the test's
    // documents apart.
    let with_user = |role: &str| {
        let mut s = stack.sources();
        s.set("amqp.collective", Some("vogeler"))
            .set("amqp.url", Some(setup.url(&stack, role)));
        config::load(&s).expect("load")
    };
    let t = Topology::new("vogeler", None);

    // The server runs first: it is the one allowed to create the exchanges and its queue.
    let _server = spawn_server(with_user("server").server().expect("server settings"));
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let mut agent = with_user("agent")
        .agent(Some("perm01".into()))
        .expect("agent settings");
    agent.plugin_dir = plugins.path().to_path_buf();
    let _agent = spawn_agent(agent);
    stack.wait_registered(&["perm01"]).await;
    let runner = with_user("runner").runner().expect("runner settings");
    let r = ask_using(&runner, "hello", "perm01", |_| {}).await;
    assert!(r.success(), "{}", r.render_table());

    let (agent_url, server_url, runner_url) = (
        setup.url(&stack, "agent"),
        setup.url(&stack, "server"),
        setup.url(&stack, "runner"),
    );
    // Only runners publish commands.
    refused(
        publish(&agent_url, &t.commands_exchange(), "all").await,
        "agent publishing a command",
    );
    refused(
        publish(&server_url, &t.commands_exchange(), "all").await,
        "server publishing a command",
    );
    publish(&runner_url, &t.commands_exchange(), "node.nobody")
        .await
        .expect("runner publishes commands");
    // Topic permissions: a runner's routing keys are all and node.*, an agent's result.* and
    // announce.*.
    refused(
        publish(&runner_url, &t.commands_exchange(), "evil").await,
        "runner with another routing key",
    );
    refused(
        publish(&agent_url, &t.results_exchange(), "command.x").await,
        "agent with another routing key",
    );
    // Only the server reads the results queue.
    refused(
        consume(&agent_url, &t.results_queue()).await,
        "agent consuming the results queue",
    );
    refused(
        consume(&runner_url, &t.results_queue()).await,
        "runner consuming the results queue",
    );
    // Nobody but the server may remove the shared exchanges.
    refused(
        delete_exchange(&agent_url, &t.commands_exchange()).await,
        "agent deleting the commands exchange",
    );
    refused(
        delete_exchange(&runner_url, &t.results_exchange()).await,
        "runner deleting the results exchange",
    );
}
