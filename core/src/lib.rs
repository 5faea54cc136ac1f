//! Vogeler's I/O library: the broker, the database, key files, configuration and process
//! plumbing the agent, the server and the runner share. What they must agree on without I/O
//! (names, wire format, document, views, limits, signatures, topology names) is
//! [`vogeler_proto`]'s.
//!
//! - [`amqp`]: broker connection with retry, topology declaration, confirmed publishing.
//! - [`couch`]: a small CouchDB HTTP client that keeps to the documented API.
//! - [`query`]: every read of the inventory's views, with typed rows.
//! - [`keyfile`]: private and authorized key files.
//! - [`config`]: layered configuration (defaults < file < `VOGELER_*` env < flags).
//! - [`cli`]: the connection flags every program shares.
//! - [`exit`], [`shutdown`], [`telemetry`]: process plumbing shared by the binaries.

pub mod amqp;
pub mod backoff;
pub mod cli;
pub mod couch;
pub mod exit;
pub mod keyfile;
pub mod observe;
pub mod query;
pub mod shutdown;
pub mod telemetry;

// Re-exported while the program crates move their imports to vogeler_proto.
/// The version every program reports in its announcements and results.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The host name: the default node name, and the default comment of a new key.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
}
