//! The replay cache: request ids this agent has accepted, kept on disk until their command
//! expires, so a replayed command is refused even after the agent restarts.
//!
//! The file is a log of `<uuid> <unix seconds to forget after>` lines, appended before a
//! command runs (so a command runs at most once, even if the agent dies mid-run) and
//! rewritten without the expired entries when it has grown. Each append reaches the
//! operating system before the plugin starts; it is not fsynced, so only a machine crash,
//! not an agent crash, could lose one.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

#[derive(Debug)]
pub struct ReplayCache {
    path: PathBuf,
    file: File,
    /// Request id → unix time after which it may be forgotten.
    seen: HashMap<Uuid, i64>,
    /// Lines in the file, to know when compaction pays.
    lines: usize,
    since_prune: usize,
}

/// Inserts between two looks for expired entries.
const PRUNE_EVERY: usize = 1024;

impl ReplayCache {
    /// Open (or create) the cache at `path`, dropping entries expired before `now`.
    pub fn open(path: &Path, now: DateTime<Utc>) -> std::io::Result<Self> {
        let mut seen = HashMap::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line?;
                    let mut parts = line.split_whitespace();
                    // A torn last line (crash mid-write) is skipped, not fatal.
                    if let (Some(id), Some(until)) = (parts.next(), parts.next())
                        && let (Ok(id), Ok(until)) = (id.parse::<Uuid>(), until.parse::<i64>())
                        && until >= now.timestamp()
                    {
                        seen.insert(id, until);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut cache = Self {
            path: path.to_path_buf(),
            file: Self::rewrite(path, &seen)?,
            lines: seen.len(),
            since_prune: 0,
            seen,
        };
        cache.file.flush()?;
        Ok(cache)
    }

    /// Write the live entries to a fresh file and swap it in.
    fn rewrite(path: &Path, seen: &HashMap<Uuid, i64>) -> std::io::Result<File> {
        let tmp = path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        for (id, until) in seen {
            writeln!(f, "{id} {until}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        OpenOptions::new().append(true).open(path)
    }

    /// Record `id` until `until`. Returns false when it was already there (a replay).
    pub fn insert(
        &mut self,
        id: Uuid,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> std::io::Result<bool> {
        if self.seen.get(&id).is_some_and(|t| *t >= now.timestamp()) {
            return Ok(false);
        }
        writeln!(self.file, "{id} {}", until.timestamp())?;
        self.seen.insert(id, until.timestamp());
        self.lines += 1;
        self.since_prune += 1;
        // Every so often drop what expired, and rewrite once most of the file is dead.
        if self.since_prune >= PRUNE_EVERY {
            self.since_prune = 0;
            self.seen.retain(|_, t| *t >= now.timestamp());
            if self.lines > 2 * self.seen.len() {
                self.file = Self::rewrite(&self.path, &self.seen)?;
                self.lines = self.seen.len();
            }
        }
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_forgets_expired() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("replay");
        let now: DateTime<Utc> = "2026-11-22T08:00:00Z".parse().expect("time");
        let later = now + chrono::Duration::hours(2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut c = ReplayCache::open(&path, now).expect("open");
        assert!(
            c.insert(a, now + chrono::Duration::hours(1), now)
                .expect("a")
        );
        assert!(
            c.insert(b, now + chrono::Duration::hours(3), now)
                .expect("b")
        );
        assert!(
            !c.insert(a, now + chrono::Duration::hours(1), now)
                .expect("a again")
        );
        drop(c);
        let mut c = ReplayCache::open(&path, now).expect("reopen");
        assert!(!c.insert(a, now, now).expect("a after restart"));
        drop(c);
        // Two hours on, `a` has expired and is gone; `b` is still remembered.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"torn-li"))
            .expect("torn line");
        let mut c = ReplayCache::open(&path, later).expect("reopen later");
        assert_eq!(c.len(), 1);
        assert!(!c.insert(b, later, later).expect("b"));
    }

    #[test]
    fn compacts_when_grown() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("replay");
        let now: DateTime<Utc> = "2026-11-22T08:00:00Z".parse().expect("time");
        let mut c = ReplayCache::open(&path, now).expect("open");
        for _ in 0..3000 {
            c.insert(Uuid::new_v4(), now, now).expect("insert");
        }
        let after = now + chrono::Duration::seconds(1);
        for _ in 0..PRUNE_EVERY {
            c.insert(Uuid::new_v4(), after, after).expect("insert");
        }
        let lines = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        assert!(lines <= PRUNE_EVERY, "compacted to {lines} lines");
        assert!(c.len() <= PRUNE_EVERY);
    }
}
