//! The broker connection: connect with retry, open channels, publish signed messages with
//! confirms.
//!
//! - [`declare`]: the collective's exchanges and queues.
//! - [`consume`]: the verified consumer every program receives through, and the dead letters.
//! - [`supervise`]: the reconnect loop.

pub mod consume;
pub mod declare;
pub mod supervise;

pub use lapin::Connection;
pub use supervise::Supervisor;

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Confirmation, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    tcp::{OwnedIdentity, OwnedTLSConfig},
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use vogeler_config::{BrokerSettings, TlsFiles};
use vogeler_proto::{
    secret::{SecretUrl, SecretUrls},
    signing::{KEY_HEADER, PrivateKey, Purpose, SIGNATURE_HEADER},
    topology::Topology,
    wire,
};

use crate::backoff;

/// How long shutdown waits for the broker to confirm a consumer cancel or a connection
/// close: a broker busy with a flood must not hold a program that was told to stop.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("broker at {url} is unavailable after {}: {source}", vogeler_proto::duration::format(*waited))]
    Unavailable {
        url: String,
        waited: Duration,
        #[source]
        source: lapin::Error,
    },
    #[error("broker refused message for exchange {exchange:?} key {routing_key:?}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error(
        "queue {queue:?} exists with other settings than this server's ({detail}); it was declared by an older release or with other {settings}: {first}, then delete it (rabbitmqctl delete_queue {queue}) and start again"
    )]
    Mismatch {
        queue: String,
        detail: String,
        /// The settings the queue's arguments come from.
        settings: &'static str,
        /// What to do before deleting it.
        first: &'static str,
    },
    #[error(
        "the broker lacks {names}, which this broker user may not declare: start the server once (it declares the exchanges and its queue), or run deploy/rabbitmq/setup.sh"
    )]
    Undeclared { names: String },
    #[error(
        "the broker has no command queue {queue:?} and this broker user may not declare it: enrol the node at the broker (deploy/rabbitmq/setup.sh --agent {node}) and check amqp.username"
    )]
    NotEnrolled { queue: String, node: String },
    #[error("the broker ended our consumer on queue {queue:?}")]
    ConsumerEnded { queue: String },
    #[error("shutting down")]
    Cancelled,
    #[error("cannot set up TLS for the broker: {0}")]
    Tls(String),
}

impl AmqpError {
    /// No reconnect can cure it: a queue declared with other settings, unusable TLS files.
    pub fn is_fatal(&self) -> bool {
        matches!(self, AmqpError::Mismatch { .. } | AmqpError::Tls(_))
    }

    /// The broker lacks an exchange or queue this user may not declare: retrying helps only
    /// once someone else has declared it, so it is worth a pause (see
    /// [`supervise::SETUP_RETRY`]).
    pub fn awaits_setup(&self) -> bool {
        matches!(
            self,
            AmqpError::Undeclared { .. } | AmqpError::NotEnrolled { .. }
        )
    }
}

impl crate::exit::ExitStatus for AmqpError {
    fn exit_code(&self) -> u8 {
        match self {
            AmqpError::Mismatch { .. } | AmqpError::Tls(_) => crate::exit::CONFIG,
            AmqpError::Unavailable { .. }
            | AmqpError::Undeclared { .. }
            | AmqpError::NotEnrolled { .. } => crate::exit::UNAVAILABLE,
            _ => crate::exit::FAILURE,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            AmqpError::Unavailable { .. }
            | AmqpError::Broker(_)
            | AmqpError::ConsumerEnded { .. } => {
                Some("check that the broker is running and the URL is right")
            }
            _ => None,
        }
    }
}

/// The broker refused a declaration because the exchange or queue exists with other
/// arguments: retrying cannot help.
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err)
        if matches!(err.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// The broker refused an operation to this user (its permissions do not cover the name).
pub fn is_access_refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err)
        if matches!(err.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)))
}

/// Connect once, without TLS settings. `name` shows in the broker's management UI.
pub async fn connect(url: &SecretUrl, name: &str) -> Result<Connection, lapin::Error> {
    connect_tls(url, &OwnedTLSConfig::default(), name).await
}

/// Connect once with TLS material (used only by `amqps://` URLs).
pub async fn connect_tls(
    url: &SecretUrl,
    tls: &OwnedTLSConfig,
    name: &str,
) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime()?;
    // The config holds the client key: it is passed along, never logged.
    Connection::connect_with_config(url.expose().as_str(), props, tls.clone(), runtime).await
}

/// Read the CA and client certificate files. Hostname verification is always on: the
/// broker's certificate must name the host in the URL.
pub fn tls_config(files: &TlsFiles) -> Result<OwnedTLSConfig, AmqpError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| AmqpError::Tls(format!("cannot read {}: {e}", p.display())))
    };
    let cert_chain = match &files.ca_file {
        Some(p) => Some(
            String::from_utf8(read(p)?)
                .map_err(|_| AmqpError::Tls(format!("{} is not a PEM file", p.display())))?,
        ),
        None => None,
    };
    let identity = match &files.client {
        Some((cert, key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert)?,
            key: read(key)?,
        }),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// How long one node of the list may take to accept a connection before the next is
/// tried: a node that accepts TCP but never finishes the AMQP handshake (stopping, or
/// overloaded) would otherwise hold the program on it.
pub const ENDPOINT_TRY: Duration = Duration::from_secs(15);

/// Connect to the first node of `amqp.url` that accepts, in the order given, retrying the
/// whole list with capped backoff. With `give_up_after` set (start-up), returns
/// [`AmqpError::Unavailable`] once that time has passed; without it (reconnects), retries
/// until `cancel` fires. Reconnects start again from the first node, so a program goes
/// back to the preferred node once it is back and its current one goes away.
pub async fn connect_with_retry(
    broker: &BrokerSettings,
    name: &str,
    give_up_after: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<Connection, AmqpError> {
    let urls = &broker.url;
    let tls = tls_config(&broker.tls)?;
    let started = tokio::time::Instant::now();
    let mut delays = backoff::delays();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut last = None;
        for (i, url) in urls.iter().enumerate() {
            let tried = tokio::time::timeout(ENDPOINT_TRY, connect_tls(url, &tls, name));
            let err = tokio::select! {
                () = cancel.cancelled() => return Err(AmqpError::Cancelled),
                r = tried => match r {
                    Ok(Ok(conn)) => {
                        info!(url = %url, attempt, "connected to broker");
                        return Ok(conn);
                    }
                    Ok(Err(e)) => e,
                    Err(_) => lapin::Error::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no AMQP handshake within {}s", ENDPOINT_TRY.as_secs()),
                    )),
                },
            };
            if i + 1 < urls.len() {
                warn!(url = %url, attempt, error = %err, next = %urls.iter().nth(i + 1).map(ToString::to_string).unwrap_or_default(), "cannot reach broker node, trying the next");
            }
            last = Some((url, err));
        }
        let Some((url, err)) = last else {
            unreachable!("amqp.url is never an empty list")
        };
        let waited = started.elapsed();
        let what = if urls.len() == 1 {
            url.redacted()
        } else {
            format!("any of {urls}")
        };
        if give_up_after.is_some_and(|limit| waited >= limit) {
            return Err(AmqpError::Unavailable {
                url: what,
                waited,
                source: err,
            });
        }
        let delay = delays.next().unwrap_or(backoff::MAX_DELAY);
        warn!(url = %what, attempt, error = %err, retry_in_ms = delay.as_millis() as u64, "cannot reach broker, retrying");
        tokio::select! {
            () = cancel.cancelled() => return Err(AmqpError::Cancelled),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Connect once to the first node of `urls` that accepts (tools and benchmarks, which do
/// not retry).
pub async fn connect_any(urls: &SecretUrls, name: &str) -> Result<Connection, lapin::Error> {
    let mut last = None;
    for url in urls {
        match connect(url, name).await {
            Ok(conn) => return Ok(conn),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| unreachable!("amqp.url is never an empty list")))
}

/// A channel with publisher confirms on, so a publish returns only once the broker has the
/// message.
pub async fn publisher_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publish a persistent message signed with `signer`, and wait for the broker's confirm.
pub async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    message: &wire::Message,
    signer: &PrivateKey,
) -> Result<(), AmqpError> {
    let how = Delivering {
        ttl: None,
        mandatory: false,
        persistent: true,
    };
    match send(ch, exchange, routing_key, message, signer, how).await? {
        Confirmation::Nack(_) => Err(AmqpError::Nacked {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
        }),
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
    }
}

/// Where the programs publish: a channel with confirms, and the collective's routes, so the
/// exchange and routing key of every message come from [`Topology::route`] alone.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

impl Publisher {
    /// Close the channel (bounded), before the connection closes.
    pub async fn close(self) {
        let close = self.channel.close(200, "done".into());
        let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
    }

    pub async fn open(conn: &Connection, topology: &Topology) -> Result<Self, AmqpError> {
        Ok(Self {
            channel: publisher_channel(conn).await?,
            topology: topology.clone(),
        })
    }

    /// Publish a result or announcement (persistent) and wait for the broker's confirm.
    pub async fn publish(
        &self,
        message: &wire::Message,
        signer: &PrivateKey,
    ) -> Result<(), AmqpError> {
        let route = self.topology.route(message);
        publish(
            &self.channel,
            &route.exchange,
            &route.routing_key,
            message,
            signer,
        )
        .await
    }

    /// Publish a command that expires after `ttl`, and say whether any queue took it.
    pub async fn command(
        &self,
        message: &wire::Message,
        signer: &PrivateKey,
        ttl: Duration,
    ) -> Result<Delivery, AmqpError> {
        let route = self.topology.route(message);
        publish_command(
            &self.channel,
            &route.exchange,
            &route.routing_key,
            message,
            signer,
            ttl,
        )
        .await
    }
}

/// How the broker should treat a message.
#[derive(Debug, Clone, Copy)]
struct Delivering {
    /// Expire in queues after this long.
    ttl: Option<Duration>,
    /// Returned by the broker when no queue takes it.
    mandatory: bool,
    /// Written to disk by durable queues, so it survives a broker restart.
    persistent: bool,
}

/// Publish a signed message and wait for the broker's confirm.
async fn send(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    message: &wire::Message,
    signer: &PrivateKey,
    how: Delivering,
) -> Result<Confirmation, AmqpError> {
    let Delivering {
        ttl,
        mandatory,
        persistent,
    } = how;
    let body = wire::encode(message);
    let mut props = BasicProperties::default()
        .with_headers(signature_headers(signer, purpose_of(message), &body))
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_content_type("application/json".into())
        .with_type(message.kind().into());
    if let Some(ttl) = ttl {
        props = props.with_expiration(ttl.as_millis().max(1).to_string().as_str().into());
    }
    let opts = BasicPublishOptions {
        mandatory,
        ..Default::default()
    };
    Ok(ch
        .basic_publish(exchange.into(), routing_key.into(), opts, &body, props)
        .await?
        .await?)
}

/// The purpose a message of this kind is signed for.
pub fn purpose_of(message: &wire::Message) -> Purpose {
    match message {
        wire::Message::Command(_) => Purpose::Command,
        wire::Message::Result(_) | wire::Message::Announce(_) => Purpose::Agent,
    }
}

/// Headers carrying the signature of `body`.
pub fn signature_headers(signer: &PrivateKey, purpose: Purpose, body: &[u8]) -> FieldTable {
    let (key, sig) = signer.sign(purpose, body);
    let mut headers = FieldTable::default();
    headers.insert(KEY_HEADER.into(), AMQPValue::LongString(key.into()));
    headers.insert(SIGNATURE_HEADER.into(), AMQPValue::LongString(sig.into()));
    headers
}

/// Whether the broker took a command for at least one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// In a queue (or several).
    Queued,
    /// No queue is bound for the routing key: no agent of that name ever connected (or its
    /// queue expired).
    Unroutable,
    /// A queue refused it: an agent offline long enough for its bounded queue to fill.
    Refused,
}

/// Publish a signed command as mandatory, so the broker says when no queue takes it instead
/// of dropping it, and wait for the confirm.
pub async fn publish_command(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    message: &wire::Message,
    signer: &PrivateKey,
    ttl: Duration,
) -> Result<Delivery, AmqpError> {
    // A broadcast is stored once in every agent's queue, and persisting it costs the broker
    // a write per queue: 22 s of broker CPU for 5,000 queues on a 2-core machine, against
    // 0.2 s transient. Commands are short-lived and answered live, so a broadcast that a
    // broker restart drops is the same as one an offline agent missed; a command addressed
    // to one node (one queue) stays persistent.
    let broadcast = matches!(
        message,
        wire::Message::Command(wire::Command {
            target: wire::Target::All,
            ..
        })
    );
    let how = Delivering {
        ttl: Some(ttl),
        mandatory: true,
        persistent: !broadcast,
    };
    let confirm = send(ch, exchange, routing_key, message, signer, how).await?;
    Ok(match confirm {
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Delivery::Unroutable,
        Confirmation::Nack(None) => Delivery::Refused,
        Confirmation::Ack(None) | Confirmation::NotRequested => Delivery::Queued,
    })
}
