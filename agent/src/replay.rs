//! The replay cache: request ids this agent has accepted, kept on disk until their command
//! expires, so a replayed command is refused even after the agent restarts.
//!
//! The file is a log of `<uuid> <unix seconds to forget after>` lines, appended before a
//! command runs (so a command runs at most once, even if the agent dies mid-run) and
//! rewritten without the expired entries when it has grown. Each append reaches the
//! operating system before the plugin starts; it is not fsynced, so only a machine crash,
//! not an agent crash, could lose one.
//!
//! It holds at most [`MAX_ENTRIES`] unexpired ids. Only commands that passed the guard (a
//! trusted signature, a TTL within `agent.max_command_ttl`) are recorded, so filling it takes
//! a runner key; when it is full the cache fails closed: new commands are refused
//! ([`ReplayError::Full`]) and no unexpired id is ever dropped to make room, since that would
//! let its command be replayed.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Unexpired request ids held at most. A line is 48 bytes and an entry about 50 bytes of
/// memory (hash table included), so a full cache costs ~48 MB of file and ~50 MB of memory,
/// an amount a root-run agent may take on a node where someone floods it with a runner key.
/// Honest use is far below it: even one command a second for the longest TTL
/// (`agent.max_command_ttl`, 1 day) stays under 90,000 entries.
pub const MAX_ENTRIES: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the replay cache is full: {limit} request ids have not expired yet")]
    Full { limit: usize },
    #[error("cannot record the request id in the replay cache: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
pub struct ReplayCache {
    path: PathBuf,
    file: File,
    /// Request id → unix time after which it may be forgotten.
    seen: HashMap<Uuid, i64>,
    /// Lines in the file, to know when compaction pays.
    lines: usize,
    since_prune: usize,
    /// Unexpired ids held at most ([`MAX_ENTRIES`]; smaller in tests).
    limit: usize,
    /// The second of the last look for expired ids made because the cache was full: one look
    /// a second at most, as each walks the whole table.
    full_pruned_at: Option<i64>,
}

/// Inserts between two looks for expired entries.
const PRUNE_EVERY: usize = 1024;

impl ReplayCache {
    /// Open (or create) the cache at `path`, dropping entries expired before `now`.
    pub fn open(path: &Path, now: DateTime<Utc>) -> std::io::Result<Self> {
        Self::open_with_limit(path, now, MAX_ENTRIES)
    }

    /// [`ReplayCache::open`] holding at most `limit` unexpired ids. A file holding more (the
    /// limit was lowered) is kept whole: the cache refuses new commands until enough expire.
    pub fn open_with_limit(path: &Path, now: DateTime<Utc>, limit: usize) -> std::io::Result<Self> {
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
            limit,
            full_pruned_at: None,
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

    /// Record `id` until `until`. Returns false when it was already there (a replay), and
    /// [`ReplayError::Full`] when it holds its limit of unexpired ids.
    pub fn insert(
        &mut self,
        id: Uuid,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, ReplayError> {
        if self.seen.get(&id).is_some_and(|t| *t >= now.timestamp()) {
            return Ok(false);
        }
        if self.seen.len() >= self.limit {
            // Only what expired may make room.
            if self.full_pruned_at != Some(now.timestamp()) {
                self.full_pruned_at = Some(now.timestamp());
                self.seen.retain(|_, t| *t >= now.timestamp());
            }
            if self.seen.len() >= self.limit {
                return Err(ReplayError::Full { limit: self.limit });
            }
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

    #[test]
    fn a_full_cache_refuses_new_ids_and_never_forgets_a_live_one() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("replay");
        let now: DateTime<Utc> = "2026-11-22T08:00:00Z".parse().expect("time");
        let hour = chrono::Duration::hours(1);
        let mut c = ReplayCache::open_with_limit(&path, now, 3).expect("open");
        let short = Uuid::new_v4();
        assert!(c.insert(short, now, now).expect("short"));
        let live: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        for id in &live {
            assert!(c.insert(*id, now + hour, now).expect("live"));
        }
        let late = Uuid::new_v4();
        assert!(
            matches!(
                c.insert(late, now + hour, now),
                Err(ReplayError::Full { limit: 3 })
            ),
            "full"
        );
        // A replay is still a replay, not "full".
        assert!(!c.insert(live[0], now + hour, now).expect("replay"));
        assert_eq!(c.len(), 3);
        // Once `short` expired it makes room, and only it.
        let later = now + chrono::Duration::seconds(1);
        assert!(c.insert(late, later + hour, later).expect("room"));
        assert!(matches!(
            c.insert(Uuid::new_v4(), later + hour, later),
            Err(ReplayError::Full { .. })
        ));
        for id in live.iter().chain([&late]) {
            assert!(!c.insert(*id, later + hour, later).expect("kept"), "{id}");
        }
        // A restart with a lower limit keeps every live id and refuses until they expire.
        drop(c);
        let mut c = ReplayCache::open_with_limit(&path, later, 1).expect("reopen");
        assert_eq!(c.len(), 3);
        assert!(
            !c.insert(live[1], later + hour, later)
                .expect("still a replay")
        );
        assert!(matches!(
            c.insert(Uuid::new_v4(), later + hour, later),
            Err(ReplayError::Full { limit: 1 })
        ));
        let gone = later + hour + chrono::Duration::seconds(1);
        assert!(c.insert(Uuid::new_v4(), gone, gone).expect("all expired"));
    }
}
