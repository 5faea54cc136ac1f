//! The audit log: one JSON line per command this agent accepted, refused or finished, in
//! `<state dir>/audit.log` (mode 0600), for whoever must later answer "what ran here, and
//! on whose key?".
//!
//! It is bounded, since anyone who can publish into the agent's queue can make it write:
//! - refusals pass a [`Throttle`]: at most [`crate::throttle::PER_WINDOW`] lines per class a minute,
//!   then one `suppressed` line per class and minute with the count;
//! - when a line would take the file past [`Bounds::max_bytes`] (`agent.audit_max_bytes`),
//!   `audit.log` becomes `audit.log.1` (`.1` becomes `.2`, and so on) and a new one is
//!   started, keeping [`Bounds::files`] old ones (`agent.audit_files`): at most
//!   `(files + 1) × max_bytes` of disk.
//!
//! Accepted and finished lines are never suppressed; they age out only with their file,
//! after `files` more rotations (months in ordinary use, hours under a flood that never
//! stops; ship the log to a collector to keep it longer).

use std::{
    borrow::Cow,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::warn;

use crate::{
    guard::Provenance,
    throttle::{Decision, Suppressed, Throttle},
};

/// The audit log's file name in a node's state directory.
pub const FILE: &str = "audit.log";

/// A reason is cut to this many bytes in a line: a parser's error can quote most of a
/// 64 KiB command, which would make the line bound a poor bound on bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// How long to wait after a failed rotation before trying again (the line is still
/// written, to the current file).
const ROTATE_RETRY_SECS: i64 = 60;

/// How big the audit log may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// A file is rotated before a line would take it past this.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` to `audit.log.<files>`).
    pub files: usize,
}

#[derive(Debug)]
pub struct AuditLog {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    file: File,
    bounds: Bounds,
    throttle: Throttle,
    /// After a failed rotation, when to try again.
    rotate_after: Option<DateTime<Utc>>,
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
struct Line<'a> {
    time: DateTime<Utc>,
    event: &'a str,
    request_id: Option<uuid::Uuid>,
    key: Option<&'a str>,
    plugin: Option<&'a str>,
    /// Rejection class or plugin outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// How many refusals of one class were left out, and over which time.
#[derive(Debug, Serialize)]
struct SummaryLine<'a> {
    time: DateTime<Utc>,
    event: &'a str,
    outcome: &'a str,
    count: u64,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
}

/// The path of the `n`th rotated file beside `path` (`audit.log.1`, ...).
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{n}"));
    path.with_file_name(name)
}

/// `reason`, cut on a character boundary to [`MAX_REASON_BYTES`].
pub fn clip(reason: &str) -> Cow<'_, str> {
    if reason.len() <= MAX_REASON_BYTES {
        return Cow::Borrowed(reason);
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}... ({} bytes)", &reason[..end], reason.len()))
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

impl AuditLog {
    pub fn open(path: &Path, bounds: Bounds) -> std::io::Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner {
                path: path.to_path_buf(),
                file: open_append(path)?,
                bounds,
                throttle: Throttle::default(),
                rotate_after: None,
            }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn accepted(&self, provenance: &Provenance) {
        self.record("accepted", provenance, None, None);
    }

    pub fn finished(&self, provenance: &Provenance, outcome: &str) {
        self.record("finished", provenance, Some(outcome), None);
    }

    /// A refusal of `class` at `now`, written unless the throttle holds it back. The
    /// decision says whether it was, and carries the summary of the class's previous window
    /// (written just before), so the caller's log can follow the same rule.
    pub fn rejected(
        &self,
        provenance: &Provenance,
        class: &'static str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Decision {
        let mut inner = self.inner();
        let decision = inner.throttle.admit(class, now);
        if let Some(s) = &decision.closed {
            inner.summary(s, now);
        }
        if decision.write {
            inner.line(
                &Line {
                    time: now,
                    event: "rejected",
                    request_id: provenance.request_id,
                    key: provenance.key_id.as_deref(),
                    plugin: provenance.plugin.as_deref(),
                    outcome: Some(class),
                    reason: Some(&clip(reason)),
                },
                now,
            );
        }
        decision
    }

    /// Write the summaries of the throttle's windows that are over by `now` and return them.
    pub fn expired(&self, now: DateTime<Utc>) -> Vec<Suppressed> {
        let mut inner = self.inner();
        let over = inner.throttle.expired(now);
        for s in &over {
            inner.summary(s, now);
        }
        over
    }

    /// Write the summary of every open window (at shutdown) and return them.
    pub fn drain(&self, now: DateTime<Utc>) -> Vec<Suppressed> {
        let mut inner = self.inner();
        let open = inner.throttle.drain(now);
        for s in &open {
            inner.summary(s, now);
        }
        open
    }

    fn record(
        &self,
        event: &str,
        provenance: &Provenance,
        outcome: Option<&str>,
        reason: Option<&str>,
    ) {
        let now = Utc::now();
        self.inner().line(
            &Line {
                time: now,
                event,
                request_id: provenance.request_id,
                key: provenance.key_id.as_deref(),
                plugin: provenance.plugin.as_deref(),
                outcome,
                reason,
            },
            now,
        );
    }
}

impl Inner {
    fn line(&mut self, line: &Line<'_>, now: DateTime<Utc>) {
        let mut text = serde_json::to_vec(line).unwrap_or_default();
        text.push(b'\n');
        self.append(&text, now);
    }

    fn summary(&mut self, s: &Suppressed, now: DateTime<Utc>) {
        let mut text = serde_json::to_vec(&SummaryLine {
            time: now,
            event: "suppressed",
            outcome: s.class,
            count: s.count,
            since: s.since,
            until: s.until,
        })
        .unwrap_or_default();
        text.push(b'\n');
        self.append(&text, now);
    }

    /// Append one line, rotating first when it would take the file past its bound. The size
    /// is the file's own (not counted here), so an outside `copytruncate` is no surprise.
    fn append(&mut self, text: &[u8], now: DateTime<Utc>) {
        let size = self.file.metadata().map_or(0, |m| m.len());
        let len = u64::try_from(text.len()).unwrap_or(u64::MAX);
        if size > 0
            && size.saturating_add(len) > self.bounds.max_bytes
            && self.rotate_after.is_none_or(|t| now >= t)
        {
            match self.rotate() {
                Ok(()) => self.rotate_after = None,
                Err(e) => {
                    self.rotate_after = Some(now + chrono::Duration::seconds(ROTATE_RETRY_SECS));
                    warn!(path = %self.path.display(), error = %e, retry_in_s = ROTATE_RETRY_SECS, "cannot rotate the audit log; writing on in the current file");
                }
            }
        }
        if let Err(e) = self.file.write_all(text) {
            warn!(path = %self.path.display(), error = %e, "cannot write the audit log");
        }
    }

    /// `audit.log.<files-1>` becomes `.<files>` (replacing the oldest), ..., `audit.log`
    /// becomes `.1`, and a new `audit.log` is opened. Files beyond `files` (the setting was
    /// lowered) are removed.
    fn rotate(&mut self) -> std::io::Result<()> {
        let files = self.bounds.files;
        let mut extra = files + 1;
        while std::fs::remove_file(rotated(&self.path, extra)).is_ok() {
            extra += 1;
        }
        for n in (1..files).rev() {
            match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        // Until this succeeds, lines go on into the renamed file: nothing is lost.
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::throttle;

    fn t0() -> DateTime<Utc> {
        "2026-11-22T08:00:00Z".parse().expect("time")
    }

    fn provenance(n: u128) -> Provenance {
        Provenance {
            request_id: Some(uuid::Uuid::from_u128(n)),
            key_id: Some("4e69809b22b3b8f6".into()),
            plugin: Some("hello".into()),
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Every line of the log, oldest first, and the files it is in.
    fn all_lines(path: &Path, files: usize) -> (Vec<serde_json::Value>, Vec<PathBuf>) {
        let mut paths: Vec<PathBuf> = (1..=files)
            .rev()
            .map(|n| rotated(path, n))
            .filter(|p| p.exists())
            .collect();
        paths.push(path.to_path_buf());
        (paths.iter().flat_map(|p| lines(p)).collect(), paths)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn rotates_at_the_size_and_keeps_a_fixed_number_of_files() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE);
        let bounds = Bounds {
            max_bytes: 2048,
            files: 3,
        };
        let log = AuditLog::open(&path, bounds).expect("open");
        assert_eq!(mode(&path), 0o600);
        let one = {
            log.accepted(&provenance(0));
            std::fs::metadata(&path).expect("size").len()
        };
        // Enough lines to fill every file many times over.
        let total = 100u128;
        for n in 1..total {
            log.accepted(&provenance(n));
        }
        for n in 1..=3 {
            let p = rotated(&path, n);
            assert!(p.exists(), "{} exists", p.display());
            assert_eq!(mode(&p), 0o600, "{}", p.display());
            let size = std::fs::metadata(&p).expect("size").len();
            assert!(
                size <= bounds.max_bytes && size > bounds.max_bytes - 2 * one,
                "{} is {size} bytes",
                p.display()
            );
        }
        assert!(!rotated(&path, 4).exists(), "no fourth file");
        assert_eq!(mode(&path), 0o600);
        assert!(std::fs::metadata(&path).expect("size").len() <= bounds.max_bytes);
        // What is kept is the newest lines, in order, each whole.
        let (kept, _) = all_lines(&path, 3);
        let ids: Vec<u128> = kept
            .iter()
            .map(|l| {
                l["request_id"]
                    .as_str()
                    .and_then(|s| s.parse::<uuid::Uuid>().ok())
                    .expect("id")
                    .as_u128()
            })
            .collect();
        assert_eq!(ids.last(), Some(&(total - 1)));
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        assert!(ids.len() as u64 >= 3 * (bounds.max_bytes / (one + 8)));
    }

    #[test]
    fn a_lowered_file_count_removes_the_files_beyond_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE);
        let fill = |files: usize| {
            let log = AuditLog::open(
                &path,
                Bounds {
                    max_bytes: 1024,
                    files,
                },
            )
            .expect("open");
            for n in 0..60 {
                log.accepted(&provenance(n));
            }
        };
        fill(5);
        assert!(rotated(&path, 5).exists());
        fill(2);
        assert!(rotated(&path, 2).exists());
        assert!((3..=6).all(|n| !rotated(&path, n).exists()));
    }

    #[test]
    fn refusals_are_throttled_and_summed_up_while_what_ran_never_is() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE);
        let log = AuditLog::open(
            &path,
            Bounds {
                max_bytes: 1 << 20,
                files: 2,
            },
        )
        .expect("open");
        let unsigned = Provenance::default();
        let flood = 250u64;
        let mut written = 0;
        for n in 0..flood {
            let at = t0() + chrono::Duration::milliseconds(i64::try_from(n).expect("n"));
            written += u64::from(
                log.rejected(&unsigned, "unsigned", "message is not signed", at)
                    .write,
            );
            if n % 50 == 0 {
                // Commands that ran, in the middle of the flood.
                log.accepted(&provenance(n.into()));
                log.finished(&provenance(n.into()), "ok");
            }
        }
        assert_eq!(written, u64::from(throttle::PER_WINDOW));
        let few = log.rejected(&provenance(9), "unknown_key", "signed by key x", t0());
        assert!(few.write && few.closed.is_none());
        // Nothing over yet; a minute later the flood's window is summed up once.
        assert!(log.expired(t0() + chrono::Duration::seconds(30)).is_empty());
        let over = log.expired(t0() + chrono::Duration::seconds(61));
        assert_eq!(over.len(), 1, "{over:?}");
        assert!(log.expired(t0() + chrono::Duration::seconds(62)).is_empty());

        let all = lines(&path);
        let count = |event: &str| all.iter().filter(|l| l["event"] == event).count();
        assert_eq!(count("accepted"), 5);
        assert_eq!(count("finished"), 5);
        assert_eq!(count("rejected"), 101);
        let summary: Vec<_> = all.iter().filter(|l| l["event"] == "suppressed").collect();
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0]["outcome"], "unsigned");
        assert_eq!(
            summary[0]["count"].as_u64(),
            Some(flood - u64::from(throttle::PER_WINDOW))
        );
        assert_eq!(summary[0]["since"], "2026-11-22T08:00:00Z");
        assert_eq!(summary[0]["until"], "2026-11-22T08:01:00Z");
    }

    #[test]
    fn a_new_window_writes_the_last_ones_summary_and_shutdown_drains_the_rest() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(FILE);
        let log = AuditLog::open(
            &path,
            Bounds {
                max_bytes: 1 << 20,
                files: 2,
            },
        )
        .expect("open");
        let p = Provenance::default();
        for _ in 0..=throttle::PER_WINDOW {
            log.rejected(&p, "bad_signature", "signature does not match", t0());
        }
        let next = t0() + chrono::Duration::seconds(throttle::WINDOW_SECS);
        let d = log.rejected(&p, "bad_signature", "signature does not match", next);
        assert!(d.write);
        assert_eq!(d.closed.as_ref().map(|s| s.count), Some(1));
        for _ in 0..throttle::PER_WINDOW + 2 {
            log.rejected(&p, "bad_signature", "signature does not match", next);
        }
        let left = log.drain(next + chrono::Duration::seconds(5));
        assert_eq!(left.iter().map(|s| s.count).collect::<Vec<_>>(), [3]);
        let counts: Vec<u64> = lines(&path)
            .iter()
            .filter(|l| l["event"] == "suppressed")
            .filter_map(|l| l["count"].as_u64())
            .collect();
        assert_eq!(counts, [1, 3]);
    }

    #[test]
    fn long_reasons_are_clipped() {
        let long = format!("invalid type: string \"{}\"", "é".repeat(5000));
        let c = clip(&long);
        assert!(c.len() < MAX_REASON_BYTES + 32, "{}", c.len());
        assert!(c.ends_with(&format!("... ({} bytes)", long.len())), "{c}");
        assert_eq!(clip("short"), "short");
    }
}
