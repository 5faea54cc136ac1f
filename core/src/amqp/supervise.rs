//! The one reconnect loop: connect (giving up at start-up after the connect timeout), serve
//! until the connection is lost, reconnect with capped backoff, forever, until shutdown. The
//! agent, the agent simulator and the server all run inside a [`Supervisor`]:
//!
//! ```ignore
//! let Some(mut broker) = Supervisor::connect(&settings.broker, NAME, &cancel).await? else {
//!     return Ok(()); // shut down before the broker answered
//! };
//! loop {
//!     let served = serve(broker.connection()).await;
//!     if !broker.again(served).await? {
//!         break;
//!     }
//! }
//! broker.close().await;
//! ```
//!
//! (A loop in the caller rather than a function taking the serving closure: the closure's
//! future borrows the caller's state, and async closures cannot yet promise such a future is
//! `Send`, which every task on tokio's runtime must be.)

use std::time::Duration;

use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{AmqpError, connect_with_retry};
use vogeler_config::BrokerSettings;

/// How long to wait before trying again when the broker lacks what this user may not
/// declare ([`AmqpError::awaits_setup`]): the connection itself works, so without a pause the
/// loop would reconnect at once, forever; an operator's fix (enrolling the node, starting
/// the server) is picked up within this.
pub const SETUP_RETRY: Duration = Duration::from_secs(15);

/// A connection lost sooner than this after it was made counts as a failed attempt: the
/// next one waits the backoff. A node that accepts connections but cannot serve (a cluster
/// node whose queue's home node is down answers every declaration with 404) would otherwise
/// be reconnected to many times a second.
pub const SHORT_LIVED: Duration = Duration::from_secs(10);

/// A broker connection that is replaced whenever it is lost.
#[derive(Debug)]
pub struct Supervisor<'a> {
    broker: &'a BrokerSettings,
    name: String,
    cancel: CancellationToken,
    conn: Connection,
    connected_at: tokio::time::Instant,
    /// Connections in a row lost within [`SHORT_LIVED`]: how far along the backoff the
    /// next pause is.
    short_lived: usize,
}

impl<'a> Supervisor<'a> {
    /// The first connection: retried until the connect timeout, then
    /// [`AmqpError::Unavailable`]. `None` when `cancel` fires first.
    pub async fn connect(
        broker: &'a BrokerSettings,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Self>, AmqpError> {
        match connect_with_retry(broker, name, Some(broker.connect_timeout), cancel).await {
            Ok(conn) => Ok(Some(Self {
                broker,
                name: name.to_string(),
                cancel: cancel.clone(),
                conn,
                connected_at: tokio::time::Instant::now(),
                short_lived: 0,
            })),
            Err(AmqpError::Cancelled) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The current connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// After serving on [`Supervisor::connection`]: `Ok(true)` with a new connection to
    /// serve on again; `Ok(false)` when serving ended for shutdown; the error when no new
    /// connection can cure it ([`AmqpError::is_fatal`]), after closing this one.
    pub async fn again(&mut self, served: Result<(), AmqpError>) -> Result<bool, AmqpError> {
        match served {
            Ok(()) => return Ok(false),
            Err(e) if e.is_fatal() => {
                self.close_bounded("stopping").await;
                return Err(e);
            }
            Err(_) if self.cancel.is_cancelled() => return Ok(false),
            Err(e) if e.awaits_setup() => {
                error!(connection = %self.name, error = %e, retry_in_s = SETUP_RETRY.as_secs(), "the broker is not set up for this program yet");
                let _ = self
                    .conn
                    .close(200, "waiting for broker setup".into())
                    .await;
                tokio::select! {
                    () = self.cancel.cancelled() => return Ok(false),
                    () = tokio::time::sleep(SETUP_RETRY) => {}
                }
            }
            Err(e) if self.connected_at.elapsed() < SHORT_LIVED => {
                let delay = crate::backoff::delays()
                    .nth(self.short_lived.min(64))
                    .unwrap_or(crate::backoff::MAX_DELAY);
                self.short_lived += 1;
                warn!(connection = %self.name, error = %e, retry_in_ms = delay.as_millis() as u64, "lost the broker connection soon after making it; reconnecting after a pause");
                self.close_bounded("reconnecting").await;
                tokio::select! {
                    () = self.cancel.cancelled() => return Ok(false),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                self.short_lived = 0;
                warn!(connection = %self.name, error = %e, "lost the broker connection; reconnecting");
                // A session can end on a channel error while the connection lives on: close
                // it, or the deliveries its consumer held stay unacked on it, neither
                // processed nor redelivered.
                self.close_bounded("reconnecting").await;
            }
        }
        // Without a time limit: only shutdown ends it.
        match connect_with_retry(self.broker, &self.name, None, &self.cancel).await {
            Ok(conn) => {
                self.conn = conn;
                self.connected_at = tokio::time::Instant::now();
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Close the current connection (unacked deliveries go back to their queues), waiting
    /// at most [`super::CLOSE_WAIT`] for the broker to confirm: the socket closes anyway.
    pub async fn close(self) {
        self.close_bounded("shutting down").await;
    }

    /// Close the current connection, waiting at most [`super::CLOSE_WAIT`].
    async fn close_bounded(&self, reason: &str) {
        let _ = tokio::time::timeout(super::CLOSE_WAIT, self.conn.close(200, reason.into())).await;
    }
}
