//! The real binaries, for end-to-end tests.

use std::{
    path::PathBuf,
    process::{Output, Stdio},
    sync::OnceLock,
    time::Duration,
};

use tokio::process::Command;

use crate::TestStack;

/// Build the binaries once per test run (cargo does not build other packages' binaries for
/// a test) and return the directory holding them.
pub fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "-p",
                "vogeler-agent",
                "-p",
                "vogeler-server",
                "-p",
                "vogeler-runner",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        // target/debug/deps/<this test> -> target/debug
        let exe = std::env::current_exe().expect("test exe");
        exe.parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .to_path_buf()
    })
}

/// A binary with a clean environment (no `VOGELER_*` from the caller) and nothing else.
pub fn bare(name: &str) -> Command {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} is missing", path.display());
    let mut cmd = Command::new(path);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A binary connected to this stack's broker and collective.
pub fn program(name: &str, stack: &TestStack) -> Command {
    let mut cmd = bare(name);
    cmd.args([
        "--amqp-url",
        &stack.amqp_url,
        "--collective",
        &stack.collective,
        "--connect-timeout",
        "10",
    ])
    .env("VOGELER_AMQP__QUEUE_EXPIRES", crate::QUEUE_EXPIRES)
    .env("VOGELER_AGENT__AUTHORIZED_KEYS", stack.authorized_keys())
    .env("VOGELER_AGENT__STATE_DIR", stack.state_dir())
    .env(
        "VOGELER_RUNNER__SIGNING_KEY",
        stack.keys.path().join("runner.key"),
    );
    cmd
}

/// Add this stack's CouchDB flags.
pub fn with_couch(mut cmd: Command, stack: &TestStack) -> Command {
    cmd.args([
        "--couchdb-url",
        &stack.couchdb_url,
        "--database",
        &stack.database,
    ]);
    cmd
}

/// A process's peak resident memory (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("process status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Run a one-shot command to completion (60 s at most), capturing its output.
pub async fn run(mut cmd: Command) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("command finished within 60 s")
        .expect("run command")
}
