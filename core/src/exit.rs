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

/// What an error means to systemd and scripts: every error a program can end with says its
/// exit code here, in one place, instead of a per-program pair of `is_config`/`is_unavailable`.
pub trait ExitStatus: std::error::Error {
    /// [`CONFIG`] when only a change of configuration helps (systemd will not restart),
    /// [`UNAVAILABLE`] when the broker or database may come back (systemd restarts), else
    /// [`FAILURE`].
    fn exit_code(&self) -> u8;

    /// A way forward printed after the message, when the message itself does not give one.
    fn hint(&self) -> Option<&'static str> {
        None
    }
}

impl ExitStatus for vogeler_config::ConfigError {
    fn exit_code(&self) -> u8 {
        CONFIG
    }
}

impl ExitStatus for vogeler_proto::signing::KeyError {
    /// A key file missing, unreadable or malformed: the operator must fix it.
    fn exit_code(&self) -> u8 {
        CONFIG
    }
}

/// Whether failing to listen on the HTTP address is a configuration error (exit 78): an
/// address the machine lacks or may not use is; a port another process holds is not, since
/// it can be freed and systemd should retry (78 stops it through RestartPreventExitStatus).
pub fn listen_error_is_config(e: &std::io::Error) -> bool {
    e.kind() != std::io::ErrorKind::AddrInUse
}

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
