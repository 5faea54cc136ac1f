//! Vogeler's protocol: everything the agent, the server and the runner must agree on, as pure
//! code. Nothing here touches the network or the file system, so all of it is unit-tested,
//! property-tested and fuzzed on its own.
//!
//! - [`names`]: validated node and plugin names (they become CouchDB ids and keys).
//! - [`wire`]: the typed messages that cross the broker, with their schema version.
//! - [`limits`]: the limits every layer enforces, and the one check of what a node sends.
//! - [`text`]: node-supplied text made safe for a terminal.
//! - [`signing`]: Ed25519 keys, signatures over bytes, authorized-keys parsing.
//! - [`guard`]: the checks every command passes on an agent, in order, before it may run.
//! - [`topology`]: exchange, queue and routing-key names, queue arguments, message routes.
//! - [`trust`]: what a receiver checks before it believes a message from an agent.
//! - [`document`]: the node document shape and how results merge into it.
//! - [`fresh`]: the small per-node freshness document (last seen, confirmations).
//! - [`design`]: the design documents (views) the server installs.
//! - [`enrollment`]: which key may speak for which node name (open or approve).
//! - [`version`]: package versions ordered by dpkg's or rpm's own rules.
//! - [`expr`]: the expression language over stored values (node sets, plugin paths, `has`),
//!   its evaluation over a node document and its narrowing into a CouchDB selector.
//! - [`duration`], [`secret`]: value types configuration is written in.

pub mod design;
pub mod document;
pub mod duration;
pub mod enrollment;
pub mod expr;
pub mod fresh;
pub mod guard;
pub mod limits;
pub mod names;
pub mod secret;
pub mod signing;
pub mod text;
pub mod topology;
pub mod trust;
pub mod version;
pub mod wire;
