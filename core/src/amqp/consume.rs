//! The one trust boundary for what the programs consume: every delivery's signature headers
//! are taken, its bytes checked by the program's [`Verify`] (size, signature, decoding) before
//! anything else looks at them, and the program gets either an [`Incoming`] message it can
//! trust or a [`Refused`] one with the reason, each to settle: ack, reject, requeue, or copy
//! to the dead letters with its reason ([`DeadLetters`]). No program crate touches lapin.

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tracing::warn;
use vogeler_proto::{
    signing::{KEY_HEADER, SIGNATURE_HEADER},
    topology::Topology,
    trust::{self, Signed},
};

use super::AmqpError;

/// The header a dead-lettered copy carries its reason in.
pub const REASON_HEADER: &str = "x-vogeler-reason";
/// The header a dead-lettered copy carries its original routing key in.
pub const ROUTING_KEY_HEADER: &str = "x-vogeler-routing-key";

/// A delivery as the verifier sees it: the bytes and the signature headers, nothing parsed.
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a> {
    pub body: &'a [u8],
    /// The signer's public key header, when present as a string.
    pub key: Option<&'a str>,
    /// The signature header, when present as a string.
    pub signature: Option<&'a str>,
    /// Delivered before, to this or another consumer.
    pub redelivered: bool,
}

/// How a program decides whether to believe a delivery.
pub trait Verify {
    /// What a delivery becomes once believed.
    type Message;
    /// Why a delivery is not believed.
    type Refusal;
    fn verify(&self, raw: &Raw<'_>) -> Result<Self::Message, Self::Refusal>;
}

/// Results and announcements signed by an agent, as the server and the runner take them.
#[derive(Debug, Clone, Copy, Default)]
pub struct FromAgents;

impl Verify for FromAgents {
    type Message = Signed;
    type Refusal = String;
    fn verify(&self, raw: &Raw<'_>) -> Result<Signed, String> {
        trust::from_agent(raw.body, raw.key, raw.signature)
    }
}

/// One delivery's settlement with the broker. On a queue consumed without acks (a runner's
/// private reply queue) every settlement is a no-op.
#[derive(Debug)]
pub struct Settlement {
    delivery: Delivery,
    no_ack: bool,
    /// This delivery's share of the consumer's [`Budget`], given back when it is settled
    /// and dropped.
    _share: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Settlement {
    pub fn body(&self) -> &[u8] {
        &self.delivery.data
    }
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }
    pub fn routing_key(&self) -> &str {
        self.delivery.routing_key.as_str()
    }

    /// Done with it: the broker forgets it.
    pub async fn ack(&self) -> Result<(), AmqpError> {
        if self.no_ack {
            return Ok(());
        }
        self.delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Refused for good: not requeued (the queue's own dead-lettering, if any, takes it).
    pub async fn reject(&self) -> Result<(), AmqpError> {
        if self.no_ack {
            return Ok(());
        }
        self.delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await?;
        Ok(())
    }

    /// Not handled: back to the queue for whoever consumes next.
    pub async fn requeue(&self) -> Result<(), AmqpError> {
        if self.no_ack {
            return Ok(());
        }
        self.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
        Ok(())
    }
}

/// A delivery the program's [`Verify`] believed.
#[derive(Debug)]
pub struct Incoming<T> {
    pub message: T,
    pub settlement: Settlement,
}

/// A delivery the program's [`Verify`] refused, with why.
#[derive(Debug)]
pub struct Refused<E> {
    pub refusal: E,
    pub settlement: Settlement,
}

/// What [`Consumer::next`] hands over.
pub type Received<T, E> = Result<Incoming<T>, Refused<E>>;

/// How much a consumer may hold decoded at once, weighed by bytes: a delivery is verified
/// (and so decoded) only once its weight fits, and gives its weight back when settled. The
/// broker's prefetch bounds what arrives in messages; this bounds what is being worked on in
/// bytes, whatever the size of each message.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// In KiB, so that large budgets fit the semaphore's count.
    total_kib: u32,
    /// What holding one decoded delivery costs, per byte of its body.
    per_byte: u32,
}

impl Budget {
    /// `bytes` in all; each delivery weighs `per_byte` times its body (a decoded JSON tree
    /// and the copies working on it take several times the bytes it was sent in).
    pub fn new(bytes: usize, per_byte: u32) -> Self {
        let total_kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
            per_byte: per_byte.max(1),
        }
    }

    /// A body's weight in KiB: at least 1, at most the whole budget (a delivery heavier
    /// than the budget waits until it has the budget to itself).
    fn weight(&self, body: usize) -> u32 {
        let kib = (body as u64 * u64::from(self.per_byte)).div_ceil(1024);
        u32::try_from(kib)
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_kib)
    }

    /// How much of the budget is free, in bytes (for tests and metrics).
    pub fn available_bytes(&self) -> usize {
        self.permits.available_permits() * 1024
    }
}

/// A consumer of one queue whose deliveries all pass one [`Verify`].
#[derive(Debug)]
pub struct Consumer<V> {
    channel: Channel,
    inner: lapin::Consumer,
    queue: String,
    tag: String,
    no_ack: bool,
    verify: V,
    budget: Option<Budget>,
    /// A delivery taken from the broker's stream whose share of the budget is not free yet:
    /// kept here so that a caller giving up on [`Consumer::next`] loses nothing.
    waiting: Option<Delivery>,
}

/// How to consume a queue.
#[derive(Debug, Clone)]
pub struct Consume<'a> {
    pub queue: &'a str,
    /// Shows in the broker's management UI; empty lets the broker choose.
    pub tag: &'a str,
    /// Unacked deliveries the broker hands over at once (`basic_qos`); `None` for no-ack.
    pub prefetch: Option<u16>,
    /// Deliveries count as settled once sent (a private reply queue).
    pub no_ack: bool,
}

impl<V: Verify> Consumer<V> {
    /// Start consuming on a channel of its own.
    pub async fn open(conn: &Connection, how: Consume<'_>, verify: V) -> Result<Self, AmqpError> {
        let channel = conn.create_channel().await?;
        Self::on(channel, how, verify).await
    }

    /// Start consuming on `channel` (one the program declared its queue on).
    pub async fn on(channel: Channel, how: Consume<'_>, verify: V) -> Result<Self, AmqpError> {
        if let Some(prefetch) = how.prefetch {
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
        }
        let opts = BasicConsumeOptions {
            no_ack: how.no_ack,
            ..Default::default()
        };
        let inner = channel
            .basic_consume(
                how.queue.into(),
                how.tag.into(),
                opts,
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            tag: inner.tag().to_string(),
            channel,
            inner,
            queue: how.queue.to_string(),
            no_ack: how.no_ack,
            verify,
            budget: None,
            waiting: None,
        })
    }

    /// Decode deliveries only within `budget`.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery, verified. An error means the channel or connection is gone (or the
    /// broker cancelled the consumer): reconnect.
    /// Cancel-safe: a delivery already taken waits in the consumer for the next call.
    pub async fn next(&mut self) -> Result<Received<V::Message, V::Refusal>, AmqpError> {
        if self.waiting.is_none() {
            self.waiting = Some(match self.inner.next().await {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(AmqpError::ConsumerEnded {
                        queue: self.queue.clone(),
                    });
                }
            });
        }
        let share = match (&self.budget, &self.waiting) {
            (Some(budget), Some(d)) => {
                let weight = budget.weight(d.data.len());
                Some(
                    budget
                        .permits
                        .clone()
                        .acquire_many_owned(weight)
                        .await
                        .unwrap_or_else(|_| unreachable!("the budget is never closed")),
                )
            }
            _ => None,
        };
        let Some(delivery) = self.waiting.take() else {
            unreachable!("a delivery is waiting")
        };
        let (key, signature) = signature_of(&delivery.properties);
        let raw = Raw {
            body: &delivery.data,
            key: key.as_deref(),
            signature: signature.as_deref(),
            redelivered: delivery.redelivered,
        };
        let verified = self.verify.verify(&raw);
        let settlement = Settlement {
            delivery,
            no_ack: self.no_ack,
            _share: share,
        };
        Ok(match verified {
            Ok(message) => Ok(Incoming {
                message,
                settlement,
            }),
            Err(refusal) => Err(Refused {
                refusal,
                settlement,
            }),
        })
    }

    /// Stop deliveries (unacked ones go back to the queue when the channel closes).
    /// Stop the broker's deliveries to this consumer. Bounded: at shutdown a broker busy with
    /// a flood must not hold the program (closing the connection cancels it anyway).
    pub async fn cancel(&self) {
        let cancel = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(super::CLOSE_WAIT, cancel).await;
    }

    /// Cancel and close the channel, before the connection closes: closing a connection
    /// under an open consumer makes the client log a channel error for a clean exit.
    pub async fn close(self) {
        self.cancel().await;
        let close = self.channel.close(200, "done".into());
        let _ = tokio::time::timeout(super::CLOSE_WAIT, close).await;
    }
}

/// A queue's length, read on a channel of its own (for metrics): a passive declaration
/// answers with it, and one that fails closes only this channel.
#[derive(Debug)]
pub struct QueueLength {
    channel: Channel,
    queue: String,
}

impl QueueLength {
    pub async fn open(conn: &Connection, queue: &str) -> Result<Self, AmqpError> {
        Ok(Self {
            channel: conn.create_channel().await?,
            queue: queue.to_string(),
        })
    }

    pub async fn get(&self) -> Result<u32, AmqpError> {
        let q = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }
}

/// The (public key, signature) header values of a delivery, when present as strings.
fn signature_of(props: &BasicProperties) -> (Option<String>, Option<String>) {
    let get = |name: &str| {
        props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(s.to_string()),
                AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
                _ => None,
            })
    };
    (get(KEY_HEADER), get(SIGNATURE_HEADER))
}

/// The dead-letter exchange, for messages that can never be stored: each copy carries its
/// reason, and the original is acked only once the broker confirmed the copy.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    channel: Channel,
    exchange: String,
}

impl DeadLetters {
    pub async fn open(conn: &Connection, topology: &Topology) -> Result<Self, AmqpError> {
        Ok(Self {
            channel: super::publisher_channel(conn).await?,
            exchange: topology.dead_letter_exchange(),
        })
    }

    /// Copy each message with its reason to the dead letters and ack it; a message whose
    /// copy the broker will not take is rejected instead (the results queue dead-letters it
    /// too, without our reason). The copies are published together and then confirmed: one
    /// confirm round trip each would make a flood of garbage slow to clear.
    pub async fn send(&self, refused: &[(&Settlement, &str)]) {
        let mut pending = Vec::with_capacity(refused.len());
        for &(s, reason) in refused {
            let d = &s.delivery;
            warn!(reason = %reason, redelivered = d.redelivered, bytes = d.data.len(), "dead-lettering a message");
            let copy = self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &d.data,
                    dead_letter_properties(d, reason),
                )
                .await;
            pending.push((s, copy));
        }
        for (s, copy) in pending {
            let confirmed = match copy {
                Ok(c) => c.await.is_ok_and(|c| c.is_ack()),
                Err(_) => false,
            };
            let settled = if confirmed {
                s.ack().await
            } else {
                s.reject().await
            };
            if let Err(e) = settled {
                warn!(error = %e, "could not settle a dead-lettered message; it will be redelivered");
            }
        }
    }
}

fn dead_letter_properties(d: &Delivery, reason: &str) -> BasicProperties {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(
        ROUTING_KEY_HEADER.into(),
        AMQPValue::LongString(d.routing_key.as_str().into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_weighs_its_decoded_size_within_the_budget() {
        let b = Budget::new(128 * 1024 * 1024, 24);
        assert_eq!(b.weight(0), 1, "even an empty body takes a share");
        assert_eq!(b.weight(1024), 24);
        // 4 MiB decodes to ~96 MiB: two fit, the third waits.
        assert_eq!(b.weight(4 << 20), 96 * 1024);
        // Heavier than the whole budget: it waits for the budget to itself, never for ever.
        assert_eq!(b.weight(8 << 20), 128 * 1024);
        assert_eq!(b.available_bytes(), 128 * 1024 * 1024);
    }
}
