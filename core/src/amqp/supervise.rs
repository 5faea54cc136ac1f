//! The one reconnect loop: connect (giving up at start-up after the connect timeout), serve
//! until the connection is lost, reconnect with capped backoff, forever, until shutdown. The
//! agent, the agent simulator and the server all run inside it.

use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{AmqpError, connect_with_retry};
use crate::config::BrokerSettings;

/// Serve the broker through `serve`, reconnecting whenever it returns an error that a new
/// connection can cure. `up` is told when a connection is up and when it is lost (the
/// `broker_up` gauge). Returns `Ok` when `serve` returns `Ok` (shutdown) or `cancel` fires;
/// [`AmqpError::Unavailable`] when the broker cannot be reached within the connect timeout at
/// start-up; and any error [`AmqpError::is_fatal`] says no reconnect can cure.
pub async fn supervise(
    broker: &BrokerSettings,
    name: &str,
    cancel: &CancellationToken,
    up: &(dyn Fn(bool) + Sync),
    mut serve: impl AsyncFnMut(&Connection) -> Result<(), AmqpError>,
) -> Result<(), AmqpError> {
    let mut conn =
        match connect_with_retry(broker, name, Some(broker.connect_timeout), cancel).await {
            Ok(c) => c,
            Err(AmqpError::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        };
    let ended = loop {
        up(true);
        let served = serve(&conn).await;
        up(false);
        match served {
            Ok(()) => break Ok(()),
            Err(e) if e.is_fatal() => break Err(e),
            Err(_) if cancel.is_cancelled() => break Ok(()),
            Err(e) => {
                warn!(connection = name, error = %e, "lost the broker connection; reconnecting")
            }
        }
        conn = match connect_with_retry(broker, name, None, cancel).await {
            Ok(c) => c,
            // Only shutdown ends a reconnect without a time limit.
            Err(_) => return Ok(()),
        };
    };
    let _ = conn.close(200, "shutting down".into()).await;
    ended
}
