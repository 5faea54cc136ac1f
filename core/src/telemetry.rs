//! Logging: structured, to stderr, so stdout stays for results.

use tracing_subscriber::EnvFilter;

/// Start logging with `level` (a filter such as `info` or `vogeler_agent=debug`); `RUST_LOG`,
/// when set, wins for debugging sessions.
pub fn init(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    // Ignore a second init (tests start several programs in one process).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
