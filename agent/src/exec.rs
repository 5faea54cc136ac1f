//! Running one plugin, bounded: a timeout that kills the whole process group, capped output,
//! a clean environment, no stdin, and a typed outcome for every way a run can end.

use std::{
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use vogeler_proto::wire::Outcome;

use crate::plugin::Plugin;

/// The `PATH` plugins run with; the agent's own environment is not passed on.
pub const PLUGIN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where `program` is: itself when it names a path, else the first match on [`PLUGIN_PATH`].
/// Looked up at every run, so a tool installed after the agent started is found.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::split_paths(PLUGIN_PATH)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
/// How much of stderr is kept: enough for an error message, never a flood.
const STDERR_KEEP: usize = 2048;

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub outcome: Outcome,
    pub value: Option<Value>,
    /// Stdout hit the cap; the rest was read and thrown away.
    pub truncated: bool,
    pub duration: Duration,
}

/// Kill what plugin runs of a previous life of this agent left behind (it was killed with
/// SIGKILL, or the machine's OOM killer chose it): every process of a recorded process
/// group whose environment carries `VOGELER_NODE=<node>`, so a reused process group id is
/// never hit. Returns how many processes were killed.
pub fn reap_orphans(running: &Path, node: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(running) else {
        return 0;
    };
    let groups: Vec<i32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let _ = std::fs::remove_file(e.path());
            e.file_name().to_str()?.parse().ok()
        })
        .collect();
    if groups.is_empty() {
        return 0;
    }
    let marker = format!("VOGELER_NODE={node}");
    let mut killed = 0;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for p in procs.filter_map(|e| e.ok()) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // Field 5 of /proc/<pid>/stat, after the parenthesised command name.
        let pgrp = std::fs::read_to_string(p.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.to_string()))
            .and_then(|rest| {
                rest.split_whitespace()
                    .nth(2)
                    .and_then(|g| g.parse::<i32>().ok())
            });
        if !pgrp.is_some_and(|g| groups.contains(&g)) {
            continue;
        }
        let ours = std::fs::read(p.path().join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()));
        if ours && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// Run `plugin` to completion or timeout. Never panics, never hangs past the timeout.
pub async fn execute(plugin: &Plugin) -> Execution {
    execute_with(plugin, &[], None).await
}

/// [`execute`], with variables the agent adds for this run (`VOGELER_REQUEST_ID`,
/// `VOGELER_NODE`), so a plugin can tie its own logs to the request. With `running`, the
/// run's process group is recorded there while it runs (see [`reap_orphans`]).
pub async fn execute_with(
    plugin: &Plugin,
    run_env: &[(&str, &str)],
    running: Option<&Path>,
) -> Execution {
    let started = tokio::time::Instant::now();
    let failed_to_start = |error: String| Execution {
        outcome: Outcome::FailedToStart { error },
        value: None,
        truncated: false,
        duration: started.elapsed(),
    };
    let max_output = plugin.max_output;
    // An absolute path lets std start the plugin with posix_spawn (vfork) instead of fork:
    // with PATH set for the child and a bare program name it must fork, and forking copies
    // the agent's page tables, which dominated a simulation of 1,000 nodes.
    let program = find_program(&plugin.program).unwrap_or_else(|| plugin.program.clone());
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&plugin.args)
        .env_clear()
        .env("PATH", PLUGIN_PATH)
        .env("LANG", "C")
        .env("LC_ALL", "C")
        .envs(run_env.iter().copied())
        .envs(&plugin.env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can kill everything it started.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(name) = &plugin.user {
        // std drops supplementary groups (setgroups) before setuid when started as root.
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => {
                cmd.uid(u.uid.as_raw())
                    .gid(u.gid.as_raw())
                    .env("HOME", &u.dir)
                    .env("USER", name);
            }
            Ok(None) => return failed_to_start(format!("user {name:?} does not exist")),
            Err(e) => return failed_to_start(format!("cannot look up user {name:?}: {e}")),
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed_to_start(format!("{}: {e}", plugin.program.display())),
    };
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let record = running.zip(pgid).map(|(dir, p)| dir.join(p.to_string()));
    if let Some(r) = &record {
        let _ = std::fs::write(r, b"");
    }
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("stdout and stderr are piped above")
    };

    let finished = tokio::time::timeout(plugin.timeout, async {
        tokio::join!(
            read_capped(stdout, max_output, false),
            read_capped(stderr, STDERR_KEEP, true),
            child.wait()
        )
    })
    .await;
    // Whatever happened, nothing the plugin started may outlive the run.
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    if let Some(r) = &record {
        let _ = std::fs::remove_file(r);
    }
    let duration = started.elapsed();

    let ((out, truncated), (err, _), status) = match finished {
        Ok(r) => r,
        Err(_) => {
            let _ = child.wait().await;
            let timeout_ms = u64::try_from(plugin.timeout.as_millis()).unwrap_or(u64::MAX);
            return Execution {
                outcome: Outcome::TimedOut { timeout_ms },
                value: None,
                truncated: false,
                duration,
            };
        }
    };
    let stderr_tail = String::from_utf8_lossy(&err).trim().to_string();
    let outcome = match status {
        Err(e) => Outcome::Failed {
            exit_code: None,
            signal: None,
            stderr_tail: format!("cannot wait for plugin: {e}"),
        },
        Ok(s) if s.success() => match plugin.format.parse(&out) {
            Ok(v) => {
                return Execution {
                    outcome: Outcome::Ok,
                    value: Some(v),
                    truncated,
                    duration,
                };
            }
            Err(error) => {
                let error = if truncated {
                    format!("{error} (output was cut at {max_output} bytes)")
                } else {
                    error
                };
                Outcome::InvalidOutput {
                    format: plugin.format.name().to_string(),
                    error,
                }
            }
        },
        Ok(s) => Outcome::Failed {
            exit_code: s.code(),
            signal: s.signal(),
            stderr_tail,
        },
    };
    Execution {
        outcome,
        value: None,
        truncated,
        duration,
    }
}

/// Read a stream to its end, keeping at most `cap` bytes (the first ones, or the last ones
/// with `keep_tail`). Reading on past the cap keeps the plugin from blocking on a full pipe.
async fn read_capped(
    mut r: impl AsyncRead + Unpin,
    cap: usize,
    keep_tail: bool,
) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut cut = false;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if keep_tail {
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > cap {
                kept.drain(..kept.len() - cap);
                cut = true;
            }
        } else {
            let room = cap.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
            cut |= n > room;
        }
    }
    (kept, cut)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bare_program_names_resolve_to_absolute_paths_so_spawning_needs_no_fork() {
        let sh = find_program(Path::new("sh")).expect("sh on PLUGIN_PATH");
        assert!(sh.is_absolute(), "{}", sh.display());
        assert_eq!(
            find_program(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(find_program(Path::new("no-such-program-vogeler")), None);
    }

    use super::*;
    use crate::format::Format;
    use serde_json::json;
    use std::path::PathBuf;
    use vogeler_proto::names::PluginName;

    fn plugin(argv: &[&str], format: &str, timeout: Duration) -> Plugin {
        Plugin {
            name: PluginName::new("t").expect("name"),
            description: None,
            program: PathBuf::from(argv[0]),
            args: argv[1..].iter().map(|s| s.to_string()).collect(),
            format: Format::from_parts(format, None, None).expect("format"),
            timeout,
            max_output: 1024,
            user: None,
            env: Default::default(),
            file: PathBuf::from("/dev/null"),
            hash: String::new(),
            interval: None,
            splay: None,
            packages: None,
        }
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn completed_run_is_parsed() {
        let e = execute(&plugin(&["printf", "alpha\\nbeta\\n"], "lines", T)).await;
        assert_eq!(e.outcome, Outcome::Ok);
        assert_eq!(e.value, Some(json!(["alpha", "beta"])));
    }

    #[tokio::test]
    async fn nonzero_exit_reports_stderr() {
        let e = execute(&plugin(
            &["sh", "-c", "echo broken >&2; exit 3"],
            "lines",
            T,
        ))
        .await;
        assert_eq!(
            e.outcome,
            Outcome::Failed {
                exit_code: Some(3),
                signal: None,
                stderr_tail: "broken".into()
            }
        );
    }

    #[tokio::test]
    async fn missing_program_fails_to_start() {
        let e = execute(&plugin(&["rpm-does-not-exist"], "lines", T)).await;
        let Outcome::FailedToStart { error } = e.outcome else {
            panic!("{:?}", e.outcome)
        };
        assert!(error.contains("rpm-does-not-exist"), "{error}");
    }

    #[tokio::test]
    async fn bad_output_is_invalid_not_dropped() {
        let e = execute(&plugin(&["echo", "{nope"], "json", T)).await;
        assert!(
            matches!(e.outcome, Outcome::InvalidOutput { ref format, .. } if format == "json"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn environment_is_clean() {
        // SAFETY-free way to prove the agent's own environment does not leak: this process
        // has HOME and friends set, the plugin must see none of them.
        let e = execute(&plugin(&["env"], "kv", T)).await;
        let v = e.value.expect("env output");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["LANG", "LC_ALL", "PATH"], "{v}");
        let mut p = plugin(&["env"], "kv", T);
        p.env.insert("TZ".into(), "UTC".into());
        let v = execute(&p).await.value.expect("env output");
        assert_eq!(v["TZ"], "UTC");
    }

    #[tokio::test]
    async fn unknown_user_fails_to_start() {
        let mut p = plugin(&["id"], "string", T);
        p.user = Some("no-such-user-vogeler".into());
        let e = execute(&p).await;
        assert_eq!(
            e.outcome,
            Outcome::FailedToStart {
                error: "user \"no-such-user-vogeler\" does not exist".into()
            }
        );
    }

    #[tokio::test]
    async fn output_is_capped() {
        let mut p = plugin(&["sh", "-c", "yes | head -c 3000000"], "string", T);
        p.max_output = 1000;
        let e = execute(&p).await;
        assert!(e.truncated);
        assert_eq!(
            e.value.expect("value").as_str().map(str::len),
            Some(999),
            "trimmed newline"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        // A grandchild keeps stdout open: the run must still end at the timeout.
        let p = plugin(
            &["sh", "-c", "sleep 30 & sleep 30"],
            "lines",
            Duration::from_millis(300),
        );
        let e = execute(&p).await;
        assert_eq!(e.outcome, Outcome::TimedOut { timeout_ms: 300 });
        // Margin: the kill and reap take far less than 2 s.
        assert!(e.duration < Duration::from_millis(2300), "{:?}", e.duration);
    }
}
