//! Declaring a collective's exchanges and queues on the broker, from the names and arguments
//! in [`vogeler_proto::topology`].
//!
//! A least-privilege broker user may declare less than it uses: an agent's per-node user
//! (`deploy/rabbitmq/setup.sh --agent`) may declare nothing at all, and finds its queue
//! declared and bound by the broker's administrator. What is refused but already there is
//! used as it is; what is refused and missing is an [`AmqpError`] that says who declares it.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tracing::info;
use uuid::Uuid;
use vogeler_proto::{
    names::NodeName,
    topology::{self, QueueArgument, Topology},
};

use super::{AmqpError, is_access_refused};

/// Queue arguments as lapin takes them.
fn table(args: Vec<(&'static str, QueueArgument)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (name, value) in args {
        let value = match value {
            QueueArgument::Int(i) => AMQPValue::LongLongInt(i),
            QueueArgument::Text(s) => AMQPValue::LongString(s.into()),
        };
        t.insert(name.into(), value);
    }
    t
}

async fn declare_exchanges(t: &Topology, ch: &Channel) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for ex in [t.commands_exchange(), t.results_exchange()] {
        ch.exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    }
    ch.exchange_declare(
        t.dead_letter_exchange().as_str().into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await
}

/// The dead-letter queue, bounded, and its binding to the dead-letter exchange.
async fn declare_dead_letters(t: &Topology, ch: &Channel) -> Result<(), lapin::Error> {
    let dlq = t.dead_letter_queue();
    ch.queue_declare(
        dlq.as_str().into(),
        QueueDeclareOptions::durable(),
        table(t.dead_letter_queue_arguments()),
    )
    .await?;
    ch.queue_bind(
        dlq.as_str().into(),
        t.dead_letter_exchange().as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

async fn declare_results_queue(t: &Topology, ch: &Channel) -> Result<(), lapin::Error> {
    let q = t.results_queue();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::durable(),
        table(t.results_queue_arguments()),
    )
    .await?;
    ch.queue_bind(
        q.as_str().into(),
        t.results_exchange().as_str().into(),
        topology::EVERYTHING.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Whether an exchange (with `kind`) or a queue exists. A passive declaration of a missing
/// one closes its channel, hence a channel of its own.
async fn exists(
    conn: &Connection,
    name: &str,
    kind: Option<ExchangeKind>,
) -> Result<bool, lapin::Error> {
    let probe = conn.create_channel().await?;
    let found = match kind {
        Some(kind) => {
            let opts = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            probe
                .exchange_declare(name.into(), kind, opts, FieldTable::default())
                .await
                .is_ok()
        }
        None => {
            let opts = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            probe
                .queue_declare(name.into(), opts, FieldTable::default())
                .await
                .is_ok()
        }
    };
    if found {
        let _ = probe.close(200, "done".into()).await;
    }
    Ok(found)
}

/// What agents and runners need before they publish: the exchanges, and the results and
/// dead-letter queues so results are kept even before any server ran. An existing queue is
/// left as it was declared (by the server, or an older release), whatever this program's
/// settings.
pub async fn shared(t: &Topology, conn: &Connection) -> Result<(), AmqpError> {
    let exchanges = [
        (t.commands_exchange(), ExchangeKind::Topic),
        (t.results_exchange(), ExchangeKind::Topic),
        (t.dead_letter_exchange(), ExchangeKind::Fanout),
    ];
    let mut missing = Vec::new();
    for (name, kind) in &exchanges {
        if !exists(conn, name, Some(kind.clone())).await? {
            missing.push(name.clone());
        }
    }
    let missing_queue = !exists(conn, &t.results_queue(), None).await?;
    if missing_queue {
        missing.push(t.results_queue());
    }
    if missing.is_empty() {
        return Ok(());
    }
    // Only a fresh broker gets here; declaring needs configure permissions, which a
    // least-privilege agent or runner lacks until the server has run once.
    let missing_dead_letters = !exists(conn, &t.dead_letter_queue(), None).await?;
    let declared = async {
        let ch = conn.create_channel().await?;
        declare_exchanges(t, &ch).await?;
        if missing_dead_letters {
            declare_dead_letters(t, &ch).await?;
        }
        if missing_queue {
            declare_results_queue(t, &ch).await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok::<_, lapin::Error>(())
    };
    match declared.await {
        Err(e) if is_access_refused(&e) => Err(AmqpError::Undeclared {
            names: missing.join(", "),
        }),
        r => Ok(r?),
    }
}

/// The server's declarations: the exchanges, the dead letters and the results queue, with
/// this server's settings. A queue declared with other arguments (by an older release, or
/// other settings) is [`AmqpError::Mismatch`], naming the queue and the way out: the broker
/// never changes a queue's arguments, and no reconnect can cure it.
pub async fn server(t: &Topology, conn: &Connection) -> Result<(), AmqpError> {
    let mismatch = |queue: String, settings: &'static str, first: &'static str| {
        move |e: lapin::Error| {
            if super::is_precondition_failed(&e) {
                AmqpError::Mismatch {
                    queue,
                    detail: e.to_string(),
                    settings,
                    first,
                }
            } else {
                e.into()
            }
        }
    };
    let ch = conn.create_channel().await?;
    declare_exchanges(t, &ch).await?;
    declare_dead_letters(t, &ch).await.map_err(mismatch(
        t.dead_letter_queue(),
        "amqp.dead_letters_max_length, amqp.dead_letters_max_bytes or amqp.results_queue_type, whose type it takes (releases before them declared it unbounded and classic)",
        "read what it holds if you still need it (Get messages in the management UI)",
    ))?;
    declare_results_queue(t, &ch).await.map_err(mismatch(
        t.results_queue(),
        "amqp.results_queue_type or amqp.results_max_length",
        "let a server with the old settings drain it",
    ))?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// An agent's own durable command queue, bound for commands addressed to it.
///
/// A broker user that may not declare it (a per-node user, see the module doc) gets it as
/// the administrator declared and bound it, with the administrator's bounds: the agent's
/// `amqp.agent_queue_*` settings do not apply then.
pub async fn agent_queue(
    t: &Topology,
    conn: &Connection,
    node: &NodeName,
) -> Result<String, AmqpError> {
    let q = t.agent_queue(node);
    let args = table(t.agent_queue_arguments());
    let mut ch = conn.create_channel().await?;
    if let Err(e) = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::durable(),
            args.clone(),
        )
        .await
    {
        if is_access_refused(&e) {
            // The refusal closed that channel; a passive declaration needs no permission.
            if !exists(conn, &q, None).await? {
                return Err(AmqpError::NotEnrolled {
                    queue: q,
                    node: node.to_string(),
                });
            }
            info!(queue = %q, "using the command queue the broker's administrator declared for this node (this broker user may not declare or bind it)");
            return Ok(q);
        }
        if !super::is_precondition_failed(&e) {
            return Err(e.into());
        }
        // Declared by an older release or with other bounds. It holds only commands, which
        // the runner can send again: replace it rather than refuse to start.
        tracing::warn!(queue = %q, "agent queue exists with other settings; replacing it (pending commands in it are dropped)");
        ch = conn.create_channel().await?;
        ch.queue_delete(q.as_str().into(), Default::default())
            .await?;
        ch.queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), args)
            .await?;
    }
    for key in Topology::agent_binding_keys(node) {
        ch.queue_bind(
            q.as_str().into(),
            t.commands_exchange().as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(q)
}

/// A runner's private reply queue for one request: exclusive, deleted with its connection.
pub async fn reply_queue(
    t: &Topology,
    conn: &Connection,
    request_id: Uuid,
) -> Result<String, lapin::Error> {
    // Exclusive to the connection, not the channel: declared on a channel of its own.
    let ch = conn.create_channel().await?;
    let opts = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare("".into(), opts, FieldTable::default())
        .await?;
    let name = q.name().to_string();
    ch.queue_bind(
        name.as_str().into(),
        t.results_exchange().as_str().into(),
        Topology::result_routing_key(request_id).as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(name)
}
