//! `deploy/rabbitmq/setup.sh` applied to the local broker (in a vhost of its own, removed
//! afterwards): the whole path works with one user per role and one per agent node, each
//! role is refused what it has no business doing, and one node's user cannot reach another
//! node's queue or name, by any route the broker offers (queues, bindings, exchanges of its
//! own, exchange-to-exchange bindings, the default exchange). Needs `rabbitmqctl` and root,
//! as CI has. Run with `--nocapture` to see every refusal with the broker's words.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use chrono::Utc;
use lapin::{
    Channel, ExchangeKind,
    options::{
        BasicConsumeOptions, BasicGetOptions, ExchangeBindOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
        QueuePurgeOptions,
    },
    types::FieldTable,
};
use uuid::Uuid;
use vogeler_config::{self as config, ProgramSettings};
use vogeler_core::amqp::{self, AmqpError};
use vogeler_e2e::{
    HELLO, TestStack, ask_using, node, plugin_dir, spawn_agent, spawn_server, wait_for,
};
use vogeler_proto::{
    names::PluginName,
    secret::SecretUrl,
    signing::PrivateKey,
    topology::Topology,
    wire::{self, Announce, Message, Target},
};

/// Publishes that must be refused are each tried this often, on fresh channels.
const PER_CLASS: usize = 100;

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
    /// The script applied with per-node users for `nodes`.
    fn apply(nodes: &[&str]) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let setup = Self {
            vhost: format!("vogeler-test-{}", &id[..8]),
            prefix: format!("vt{}", &id[..8]),
            secrets: tempfile::tempdir().expect("secrets dir"),
        };
        let mut args = Vec::new();
        for n in nodes {
            args.extend(["--agent", n]);
        }
        setup.expect_ok(&args);
        setup
    }

    /// Run the script on this vhost, prefix and secrets directory, with `extra` arguments.
    fn run(&self, extra: &[&str]) -> Output {
        Command::new(script())
            .args(["--vhost", &self.vhost, "--user-prefix", &self.prefix])
            .arg("--secrets-dir")
            .arg(self.secrets.path())
            .args(extra)
            .output()
            .expect("run deploy/rabbitmq/setup.sh (is rabbitmqctl installed?)")
    }

    /// [`Setup::run`], which must succeed; its stdout and stderr.
    fn expect_ok(&self, extra: &[&str]) -> String {
        let out = self.run(extra);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "setup.sh {extra:?} failed: {text}");
        text
    }

    fn password_file(&self, file: &str) -> PathBuf {
        self.secrets
            .path()
            .join(format!("rabbitmq-{file}.password"))
    }

    fn password(&self, file: &str) -> String {
        std::fs::read_to_string(self.password_file(file))
            .expect("password file")
            .trim()
            .to_string()
    }

    /// The broker URL of this vhost, without credentials.
    fn base_url(&self, stack: &TestStack) -> String {
        let base = url::Url::parse(&stack.amqp_first()).expect("url");
        format!(
            "amqp://{}:{}/{}",
            base.host_str().expect("host"),
            base.port_or_known_default().expect("port"),
            self.vhost
        )
    }

    fn url_as(&self, stack: &TestStack, user: &str, password: &str) -> String {
        let mut u = url::Url::parse(&self.base_url(stack)).expect("url");
        u.set_username(user).expect("user");
        u.set_password(Some(password)).expect("password");
        u.to_string()
    }

    /// The broker URL for one role, with its generated password.
    fn url(&self, stack: &TestStack, role: &str) -> String {
        self.url_as(
            stack,
            &format!("{}-{role}", self.prefix),
            &self.password(role),
        )
    }

    /// The user name of node `n`.
    fn agent_user(&self, n: &str) -> String {
        format!("{}-agent-{n}", self.prefix)
    }

    /// The broker URL for node `n`'s own user.
    fn agent_url(&self, stack: &TestStack, n: &str) -> String {
        self.url_as(
            stack,
            &self.agent_user(n),
            &self.password(&format!("agent-{n}")),
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

/// One broker user's connection. Every operation gets a channel of its own, since a refusal
/// closes the channel it happened on (not the connection).
struct As {
    conn: lapin::Connection,
}

impl As {
    async fn connect(url: &str) -> Self {
        Self {
            conn: amqp::connect(&SecretUrl::parse(url).expect("url"), "test-permissions")
                .await
                .expect("connect"),
        }
    }

    async fn channel(&self) -> Result<Channel, String> {
        self.conn.create_channel().await.map_err(|e| e.to_string())
    }

    /// Publish `message` signed by a fresh key, and wait for the broker's confirm.
    async fn publish(&self, exchange: &str, key: &str, message: &Message) -> Result<(), String> {
        let ch = amqp::publisher_channel(&self.conn)
            .await
            .map_err(|e| e.to_string())?;
        let signer = PrivateKey::generate().expect("key");
        let sent = amqp::publish(&ch, exchange, key, message, &signer);
        match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn consume(&self, queue: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Take one message from `queue`: whether there was one.
    async fn get(&self, queue: &str) -> Result<bool, String> {
        let ch = self.channel().await?;
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .map(|m| m.is_some())
            .map_err(|e| e.to_string())
    }

    async fn declare_queue(&self, queue: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Whether `queue` exists, and how many messages it holds (a passive declaration, which
    /// needs no permission).
    async fn messages(&self, queue: &str) -> Option<u32> {
        let ch = self.channel().await.ok()?;
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), opts, FieldTable::default())
            .await
            .ok()
            .map(|q| q.message_count())
    }

    async fn declare_exchange(&self, exchange: &str, kind: ExchangeKind) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    async fn unbind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.queue_unbind(
            queue.into(),
            exchange.into(),
            key.into(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// Bind exchange `destination` to `source`.
    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.exchange_bind(
            destination.into(),
            source.into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn purge(&self, queue: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .map_err(|e| e.to_string())
    }
}

/// The refusals a test saw, printed with `--nocapture`.
#[derive(Default)]
struct Refusals(Vec<(String, String)>);

impl Refusals {
    /// `r` must be the broker's ACCESS_REFUSED; kept with what was tried.
    fn check(&mut self, r: Result<(), String>, what: &str) {
        let err = r.expect_err(what);
        assert!(err.contains("ACCESS_REFUSED"), "{what}: {err}");
        self.0.push((what.to_string(), err));
    }

    fn print(&self, title: &str) {
        println!("{title}: {} operations refused", self.0.len());
        for (what, err) in &self.0 {
            println!("  {what:<62} {err}");
        }
    }
}

fn command(target: Target) -> Message {
    Message::Command(wire::Command::new(
        Uuid::new_v4(),
        PluginName::new("hello").expect("plugin"),
        target,
        Utc::now(),
        chrono::Duration::seconds(60),
    ))
}

fn announce(as_node: &str) -> Message {
    Message::Announce(Announce {
        node: node(as_node),
        agent_version: "0".into(),
        plugins: vec![],
        started_at: Utc::now(),
        sent_at: Utc::now(),
        facts: Default::default(),
        schedules: None,
        packages: None,
    })
}

/// A result as a node would publish it, for request `id`.
fn result(from: &str, id: Uuid) -> Message {
    Message::Result(wire::PluginResult {
        request_id: id,
        node: node(from),
        plugin: PluginName::new("hello").expect("plugin"),
        outcome: wire::Outcome::Ok,
        value: Some(serde_json::json!(["alpha"])),
        truncated: false,
        collected_at: Utc::now(),
        duration_ms: 1,
        agent_version: "0".into(),
        scheduled: None,
    })
}

/// Config sources of `stack` with this vhost's broker and the default collective (the
/// script's); the stack's database keeps the test's documents apart.
fn sources(stack: &TestStack, url: &str) -> config::Sources {
    let mut s = stack.sources();
    s.set("amqp.collective", Some("vogeler"))
        .set("amqp.url", Some(url));
    s
}

async fn wait_until_declared(url: &str, queue: &str) {
    let probe = As::connect(url).await;
    wait_for(
        &format!("the server to declare {queue}"),
        Duration::from_secs(20),
        || async { probe.messages(queue).await.is_some() },
    )
    .await;
}

#[tokio::test]
async fn each_role_can_do_its_job_and_nothing_else() {
    let stack = TestStack::new().await;
    let setup = Setup::apply(&["perm01", "perm02"]);
    let with_url = |url: String| config::load(&sources(&stack, &url)).expect("load");
    let t = Topology::new("vogeler", None);
    let (server_url, runner_url) = (setup.url(&stack, "server"), setup.url(&stack, "runner"));

    // The server runs first: it is the one allowed to create its queue.
    let _server = spawn_server(
        with_url(server_url.clone())
            .server()
            .expect("server settings"),
    );
    wait_until_declared(&server_url, &t.results_queue()).await;
    // The agent as config management sets it up: the shared broker URL, its own user name
    // and password file.
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let mut s = sources(&stack, &setup.base_url(&stack));
    s.set("amqp.username", Some(setup.agent_user("perm01")))
        .set(
            "amqp.password_file",
            Some(setup.password_file("agent-perm01").display()),
        )
        .set("agent.node", Some("perm01"))
        .set("agent.plugin_dir", Some(plugins.path().display()));
    let agent = config::load(&s)
        .expect("load")
        .agent(None)
        .expect("agent settings")
        .read_secrets()
        .expect("agent password");
    let _agent = spawn_agent(agent);
    stack.wait_registered(&["perm01"]).await;
    let runner = with_url(runner_url.clone())
        .runner()
        .expect("runner settings");
    let r = ask_using(&runner, "hello", "perm01", |_| {}).await;
    assert!(r.success(), "{}", r.render_table());

    let agent = As::connect(&setup.agent_url(&stack, "perm01")).await;
    let server = As::connect(&server_url).await;
    let runner = As::connect(&runner_url).await;
    let mut refused = Refusals::default();
    // Only runners publish commands.
    let all = command(Target::All);
    refused.check(
        agent.publish(&t.commands_exchange(), "all", &all).await,
        "agent publishing a command",
    );
    refused.check(
        server.publish(&t.commands_exchange(), "all", &all).await,
        "server publishing a command",
    );
    runner
        .publish(
            &t.commands_exchange(),
            "node.nobody",
            &command(Target::Node(node("nobody"))),
        )
        .await
        .expect("runner publishes commands");
    // Topic permissions: a runner's routing keys are all and node.*, an agent's
    // result.<request id> and announce.<itself>.
    refused.check(
        runner.publish(&t.commands_exchange(), "evil", &all).await,
        "runner with another routing key",
    );
    refused.check(
        agent
            .publish(&t.results_exchange(), "command.x", &announce("perm01"))
            .await,
        "agent with another routing key",
    );
    // Only the server reads the results queue.
    refused.check(
        agent.consume(&t.results_queue()).await,
        "agent consuming the results queue",
    );
    refused.check(
        runner.consume(&t.results_queue()).await,
        "runner consuming the results queue",
    );
    // Nobody but the server may remove the shared exchanges.
    refused.check(
        agent.delete_exchange(&t.commands_exchange()).await,
        "agent deleting the commands exchange",
    );
    refused.check(
        runner.delete_exchange(&t.results_exchange()).await,
        "runner deleting the results exchange",
    );
    refused.print("roles");
}

/// perm02 holds its own credential (as anyone with root on that node does) and tries every
/// route to perm01's commands and name; each is refused, while its own job still works.
#[tokio::test]
async fn a_node_reaches_only_its_own_queue_and_name() {
    let stack = TestStack::new().await;
    let setup = Setup::apply(&["perm01", "perm02"]);
    let t = Topology::new("vogeler", None);
    let (q1, q2) = (
        t.agent_queue(&node("perm01")),
        t.agent_queue(&node("perm02")),
    );
    let (commands, results) = (t.commands_exchange(), t.results_exchange());
    let rogue = As::connect(&setup.agent_url(&stack, "perm02")).await;
    let mut refused = Refusals::default();

    // 1. Another node's command queue: read, bound, declared, changed.
    refused.check(rogue.consume(&q1).await, "consume perm01's queue");
    refused.check(
        rogue.get(&q1).await.map(|_| ()),
        "basic.get from perm01's queue",
    );
    refused.check(rogue.declare_queue(&q1).await, "declare perm01's queue");
    for (exchange, key) in [
        (&commands, "#"),
        (&commands, "node.perm02"),
        (&results, "#"),
    ] {
        refused.check(
            rogue.bind(&q1, exchange, key).await,
            &format!("bind perm01's queue to {exchange} with {key}"),
        );
    }
    refused.check(
        rogue.unbind(&q1, &commands, "node.perm01").await,
        "unbind perm01's queue",
    );
    refused.check(rogue.delete_queue(&q1).await, "delete perm01's queue");
    refused.check(rogue.purge(&q1).await, "purge perm01's queue");

    // 2. Copying the fleet's commands: binding its own queue, or any new one, to the
    // commands exchange; a new queue cannot be made at all.
    for key in ["#", "node.perm01", "node.*", "*.perm01"] {
        refused.check(
            rogue.bind(&q2, &commands, key).await,
            &format!("bind its own queue to {commands} with {key}"),
        );
    }
    for queue in [format!("{q2}.copy"), "perm02".into(), "".into()] {
        refused.check(
            rogue.declare_queue(&queue).await,
            &format!("declare a queue named {queue:?}"),
        );
    }
    refused.check(
        rogue.bind("perm02-copy", &commands, "#").await,
        "bind a queue it names to the commands exchange",
    );

    // 3. An exchange of its own, to route into other queues or around its topic
    // permissions; exchange-to-exchange bindings from and to the shared exchanges.
    for (exchange, kind) in [
        (q2.clone(), ExchangeKind::Fanout),
        (format!("{q2}.x"), ExchangeKind::Topic),
        ("vogeler.agent.x".into(), ExchangeKind::Direct),
    ] {
        refused.check(
            rogue.declare_exchange(&exchange, kind).await,
            &format!("declare an exchange named {exchange}"),
        );
    }
    refused.check(
        rogue.bind(&q1, &q2, "").await,
        "bind perm01's queue to an exchange named after itself",
    );
    for (destination, source, key) in [
        (results.as_str(), commands.as_str(), "#"),
        (results.as_str(), commands.as_str(), "all"),
        (q2.as_str(), commands.as_str(), "node.perm01"),
        (commands.as_str(), results.as_str(), "#"),
        (results.as_str(), "amq.topic", "#"),
    ] {
        refused.check(
            rogue.bind_exchange(destination, source, key).await,
            &format!("bind exchange {destination} to {source} with {key}"),
        );
    }
    // The one binding its permissions would allow (read on its own name, write on the
    // results exchange) needs an exchange by its queue's name, which it cannot make (above)
    // and no other user may make either: the broker finds none.
    let err = rogue
        .bind_exchange(&results, &q2, "#")
        .await
        .expect_err("no exchange named after its queue");
    assert!(err.contains("NOT_FOUND"), "{err}");
    refused
        .0
        .push((format!("bind exchange {results} to {q2} with #"), err));

    // 4. Publishing what only others may: commands (to the commands exchange, or straight
    // into a queue through the default exchange), another node's announcements, results
    // under a key that is no request id.
    refused.check(
        rogue.publish(&commands, "all", &command(Target::All)).await,
        "publish a command for all",
    );
    let for_perm01 = command(Target::Node(node("perm01")));
    refused.check(
        rogue.publish(&commands, "node.perm01", &for_perm01).await,
        "publish a command for perm01",
    );
    refused.check(
        rogue.publish("", &q1, &for_perm01).await,
        "publish into perm01's queue by the default exchange",
    );
    refused.check(
        rogue.publish("amq.topic", "node.perm01", &for_perm01).await,
        "publish to amq.topic",
    );
    refused.check(
        rogue
            .publish(&results, "result.perm01", &result("perm02", Uuid::new_v4()))
            .await,
        "publish a result under a key that is no request id",
    );
    let mut impersonations = Vec::new();
    for _ in 0..PER_CLASS {
        impersonations.push(
            rogue
                .publish(&results, "announce.perm01", &announce("perm01"))
                .await
                .expect_err("announcing as perm01 must be refused"),
        );
    }
    assert!(
        impersonations.iter().all(|e| e.contains("ACCESS_REFUSED")),
        "{impersonations:?}"
    );
    refused.0.push((
        format!("publish announce.perm01 ({PER_CLASS} times, fresh channels)"),
        impersonations[0].clone(),
    ));
    refused.print("perm02 against perm01");
    // Nothing of the above reached perm01's queue or made a queue.
    assert_eq!(rogue.messages(&q1).await, Some(0), "perm01's queue");
    assert_eq!(rogue.messages(&format!("{q2}.copy")).await, None);

    // Its own job still works: its queue (declared and bound by the script) receives the
    // commands for it and for all, not perm01's; it announces itself and publishes results.
    let runner = As::connect(&setup.url(&stack, "runner")).await;
    for (key, target) in [
        ("node.perm02", Target::Node(node("perm02"))),
        ("all", Target::All),
        ("node.perm01", Target::Node(node("perm01"))),
    ] {
        runner
            .publish(&commands, key, &command(target))
            .await
            .expect("runner publishes");
    }
    assert_eq!(rogue.messages(&q2).await, Some(2), "node.perm02 and all");
    assert_eq!(rogue.messages(&q1).await, Some(2), "node.perm01 and all");
    assert_eq!(rogue.get(&q2).await, Ok(true), "perm02 reads its own queue");
    rogue
        .consume(&q2)
        .await
        .expect("perm02 consumes its own queue");
    rogue
        .publish(&results, "announce.perm02", &announce("perm02"))
        .await
        .expect("perm02 announces itself");
    let id = Uuid::new_v4();
    rogue
        .publish(
            &results,
            &Topology::result_routing_key(id),
            &result("perm02", id),
        )
        .await
        .expect("perm02 publishes a result");

    // The agent's own declarations with this user: its queue as the script made it. A node
    // not enrolled, and the server's queue before any server ran, are errors that say who
    // declares them, and that the agent waits for (instead of reconnecting at once).
    let own = amqp::declare::agent_queue(&t, &rogue.conn, &node("perm02"))
        .await
        .expect("its own queue, as declared by the script");
    assert_eq!(own, q2);
    let err = amqp::declare::agent_queue(&t, &rogue.conn, &node("perm03"))
        .await
        .expect_err("perm03 is not enrolled");
    assert!(
        matches!(err, AmqpError::NotEnrolled { .. }) && err.awaits_setup(),
        "{err}"
    );
    assert!(err.to_string().contains("setup.sh --agent perm03"), "{err}");
    let err = amqp::declare::shared(&t, &rogue.conn)
        .await
        .expect_err("no server has declared its queue yet");
    assert!(
        matches!(err, AmqpError::Undeclared { .. }) && err.awaits_setup(),
        "{err}"
    );
    assert!(err.to_string().contains(&t.results_queue()), "{err}");
}

/// The script enrols and revokes nodes the way config management runs it: again and again
/// with the same outcome, revocation at once, and only valid node names.
#[tokio::test]
async fn enrolment_is_idempotent_and_revocation_immediate() {
    let stack = TestStack::new().await;
    let setup = Setup::apply(&["perm01", "perm02"]);
    let t = Topology::new("vogeler", None);
    let q2 = t.agent_queue(&node("perm02"));
    let before = (
        setup.password("agent-perm01"),
        setup.password("agent-perm02"),
    );
    let file = setup.secrets.path().join("nodes");
    std::fs::write(&file, "# the fleet\nperm01\n  perm02   # a comment\n\n").expect("nodes");
    setup.expect_ok(&["--agents-file", file.to_str().expect("path")]);
    assert_eq!(
        (
            setup.password("agent-perm01"),
            setup.password("agent-perm02")
        ),
        before,
        "a second run keeps the passwords"
    );
    for n in ["perm01", "perm02"] {
        let mode = std::fs::metadata(setup.password_file(&format!("agent-{n}")))
            .expect("password file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{n}"
        );
    }
    // A connected node, cut off by its revocation.
    let perm02 = As::connect(&setup.agent_url(&stack, "perm02")).await;
    perm02.consume(&q2).await.expect("perm02 consumes");
    let out = setup.expect_ok(&["--agent", "perm01", "--remove-agent", "perm02"]);
    assert!(out.contains("revoked perm02"), "{out}");
    wait_for(
        "perm02's connection to be closed",
        Duration::from_secs(10),
        || async { !perm02.conn.status().connected() },
    )
    .await;
    assert!(!setup.password_file("agent-perm02").exists());
    let perm01 = As::connect(&setup.agent_url(&stack, "perm01")).await;
    assert_eq!(perm01.messages(&q2).await, None, "perm02's queue is gone");
    let url = SecretUrl::parse(&setup.url_as(&stack, &setup.agent_user("perm02"), &before.1))
        .expect("url");
    let err = amqp::connect(&url, "test-revoked")
        .await
        .expect_err("a revoked node cannot log in");
    assert!(
        err.to_string().contains("ACCESS_REFUSED") || err.to_string().contains("auth"),
        "{err}"
    );
    perm01
        .publish(
            &t.results_exchange(),
            "announce.perm01",
            &announce("perm01"),
        )
        .await
        .expect("perm01 is untouched");

    // The shared agent user only on request, and deleted once not asked for.
    let shared = format!("{}-agent", setup.prefix);
    setup.expect_ok(&["--shared-agent-user"]);
    let shared_url = setup.url_as(&stack, &shared, &setup.password("agent"));
    drop(As::connect(&shared_url).await);
    let out = setup.expect_ok(&[]);
    assert!(out.contains("deleted the shared agent user"), "{out}");
    amqp::connect(&SecretUrl::parse(&shared_url).expect("url"), "test-shared")
        .await
        .expect_err("the shared user is gone");

    for bad in ["-rf", ".hidden", "a/b", "web 01", "node.#", "x*", ""] {
        let out = setup.run(&["--agent", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?} must be refused");
    }
    assert!(!Path::new(&setup.password_file("agent-a/b")).exists());
}
