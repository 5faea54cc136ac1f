//! The limits every layer agrees on: what an agent may publish, the decoder accepts, the
//! server stores and every reader reads back.

/// Messages larger than this are refused before parsing (a plugin's output is capped far lower).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Commands are a few hundred bytes; anything near this is not from a runner.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The largest plugin value (as JSON) an agent publishes. RabbitMQ 4 refuses messages over
/// 16 MiB by default; this leaves room for the rest of the result.
pub const MAX_VALUE_BYTES: usize = 15 * 1024 * 1024;
