//! OS signals mapped to one cancellation token.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// A token cancelled on SIGINT or SIGTERM. Long-running functions take it as an argument, so
/// tests cancel the same token instead of sending signals.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!(signal = "SIGINT", "shutting down"),
            () = term => info!(signal = "SIGTERM", "shutting down"),
        }
        t.cancel();
    });
    token
}
