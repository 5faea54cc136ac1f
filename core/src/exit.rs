//! Exit codes are interface: systemd units and scripts act on them.

use std::process::ExitCode;

/// Everything went as asked.
pub const OK: u8 = 0;
/// The job ran but some of it failed (runner: a node failed or did not answer).
pub const FAILURE: u8 = 1;
/// The command line was wrong (clap uses the same code).
pub const USAGE: u8 = 2;
/// The broker or the database could not be reached (`EX_UNAVAILABLE`): worth a restart.
pub const UNAVAILABLE: u8 = 69;
/// The configuration is invalid (`EX_CONFIG`): a restart will not help.
pub const CONFIG: u8 = 78;

/// Shorthand for binaries.
pub fn code(c: u8) -> ExitCode {
    ExitCode::from(c)
}

/// Run a binary's async body on a fresh multi-threaded runtime, mapping a runtime that cannot
/// start to exit 1 with a message naming `program`.
pub fn block_on(program: &str, body: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(body),
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            code(FAILURE)
        }
    }
}
