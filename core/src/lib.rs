//! Vogeler's shared library: everything the agent, the server and the runner must agree on.
//!
//! - [`wire`]: the typed messages that cross the broker, with their schema version.
//! - [`names`]: validated node and plugin names (they become CouchDB ids and keys).
//! - [`topology`]: exchange, queue and routing-key names, and their declaration.
//! - [`amqp`]: broker connection with retry and confirmed publishing.
//! - [`couch`]: a small CouchDB HTTP client that keeps to the documented API.
//! - [`document`]: the node document shape and how results merge into it.
//! - [`design`]: the design documents (views) the server installs.
//! - [`signing`]: Ed25519 keys, signatures and authorized-keys files.
//! - [`config`]: layered configuration (defaults < file < `VOGELER_*` env < flags).
//! - [`cli`]: the connection flags every program shares.
//! - [`duration`], [`secret`]: value types used by config.
//! - [`exit`], [`shutdown`], [`telemetry`]: process plumbing shared by the binaries.

pub mod amqp;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod couch;
pub mod design;
pub mod document;
pub mod duration;
pub mod exit;
pub mod names;
pub mod observe;
pub mod secret;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
pub mod topology;
pub mod wire;

/// The version every program reports in its announcements and results.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The host name: the default node name, and the default comment of a new key.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
}
