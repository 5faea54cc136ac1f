//! Scheduled collection: the agent runs plugins that have an interval by itself, and
//! publishes their results as for a command, marked as scheduled.
//!
//! The rules, as pure functions unit-tested here (the agent's loop only sleeps and runs):
//! - a plugin's interval comes from its file (`interval`, `splay`), overridden by
//!   `[agent.schedule]` (an interval, or `"off"`);
//! - the first run without a record comes a random time within the splay (or, without one,
//!   within one interval) of the agent's start, so a fleet started together spreads out;
//! - the state directory records when each plugin last ran, so a restart resumes the
//!   schedule; after downtime longer than an interval there is one catch-up run, soon, and
//!   then the schedule goes on from it (never one run per missed interval);
//! - a scheduled run never overlaps another run of its plugin (it holds the plugin's lock
//!   alone; commands share it), and every run takes one of the agent's `concurrency` slots,
//!   as commands do.
//!
//! Change-only results: a scheduled run whose value hashes as the value this agent last
//! published for the plugin sends `unchanged` with the hash instead of the value, except
//! that the value goes out in full at least every `agent.full_every` and on the first run
//! after a start, so a server that lost it (a new database, a pruned node) gets it back.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use vogeler_config::ScheduleOverride;
use vogeler_proto::names::PluginName;

use crate::plugin::Plugin;

/// The file, in a node's state directory, that records when each plugin last ran.
pub const STATE_FILE: &str = "schedule.json";

/// Without a splay, a catch-up run after downtime comes within this (or the interval, if
/// shorter): soon, but not at the same instant on every node that was down together.
const CATCH_UP_SPREAD: Duration = Duration::from_secs(60);

/// One plugin's schedule on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every {
    pub interval: Duration,
    pub splay: Duration,
}

impl Every {
    /// Whole seconds, rounded up (`1.9s` is published as 2: rounding down would put the
    /// plugin near overdue on every run).
    pub fn interval_s(&self) -> u64 {
        u64::try_from(self.interval.as_millis().div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// A plugin's schedule: the agent config's override, else the plugin file's, else none.
pub fn every(plugin: &Plugin, overrides: &BTreeMap<PluginName, ScheduleOverride>) -> Option<Every> {
    let interval = match overrides.get(&plugin.name) {
        Some(ScheduleOverride::Off) => return None,
        Some(ScheduleOverride::Every(d)) => *d,
        None => plugin.interval?,
    };
    Some(Every {
        interval,
        // An override shorter than the file's splay keeps runs from overtaking each other.
        splay: plugin.splay.unwrap_or_default().min(interval),
    })
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// `d` scaled by `fraction` (in `[0, 1)`).
fn part(d: Duration, fraction: f64) -> Duration {
    d.mul_f64(fraction.clamp(0.0, 1.0))
}

/// When a plugin is first due after the agent starts at `now`, given when it last ran (from
/// the state file) and a random `fraction` in `[0, 1)`.
pub fn first_due(
    every: Every,
    last_run: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    fraction: f64,
) -> DateTime<Utc> {
    let spread = if every.splay.is_zero() {
        every.interval
    } else {
        every.splay
    };
    match last_run {
        // Never ran here (or the record is from a clock far ahead): within the spread.
        None => now + delta(part(spread, fraction)),
        Some(last) if last > now + delta(every.interval) => now + delta(part(spread, fraction)),
        Some(last) => {
            let due = last + delta(every.interval) + delta(part(every.splay, fraction));
            if due >= now {
                due
            } else {
                // Missed while down: one catch-up run, soon.
                let spread = if every.splay.is_zero() {
                    CATCH_UP_SPREAD.min(every.interval)
                } else {
                    every.splay
                };
                now + delta(part(spread, fraction))
            }
        }
    }
}

/// The next slot after the one starting at `base`, and when in it the plugin runs: slots
/// are one interval apart and each run a random part of the splay into its slot, so the
/// period stays the interval (a splay added to the last run's time would stretch it to
/// interval + splay/2 and make healthy plugins look overdue). Behind by more than an
/// interval (a run that took that long, a suspended machine): the next slot starts now,
/// so there is one run, not one per slot missed.
pub fn next_slot(
    every: Every,
    base: DateTime<Utc>,
    now: DateTime<Utc>,
    fraction: f64,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let mut next = base + delta(every.interval);
    if next + delta(every.interval) < now {
        next = now;
    }
    (next, (next + delta(part(every.splay, fraction))).max(now))
}

/// A random fraction in `[0, 1)`, from the operating system's generator (through v4 UUIDs,
/// which the agent has already).
pub fn random_fraction() -> f64 {
    let bits = (uuid::Uuid::new_v4().as_u128() >> 75) as u64; // 53 random bits
    bits as f64 / (1u64 << 53) as f64
}

/// When each plugin last ran, kept in the state directory.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRuns {
    #[serde(default)]
    pub last_run: BTreeMap<String, DateTime<Utc>>,
}

impl LastRuns {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// The record, or an empty one when there is none yet. A file that does not parse is
    /// reported and replaced: the worst case is one early run per plugin.
    pub fn load(state_dir: &Path) -> Result<Self, String> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{}: cannot read the schedule record ({e}); it is replaced, and each scheduled plugin runs within its splay",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write the record atomically (a crash leaves the old one or the new one).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(state_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)
    }
}

/// What a scheduled run sends: the value, or only its hash when it is the one this agent
/// last published for the plugin and that went out in full less than `full_every` ago.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub hash: String,
    pub full_at: DateTime<Utc>,
}

/// Whether a value with `hash` may go as "unchanged", given what was last published.
pub fn may_skip_value(
    last: Option<&Published>,
    hash: &str,
    now: DateTime<Utc>,
    full_every: Duration,
) -> bool {
    last.is_some_and(|p| {
        p.hash == hash
            && p.full_at
                .checked_add_signed(delta(full_every))
                .is_none_or(|until| now < until)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time")
    }

    fn every(interval: u64, splay: u64) -> Every {
        Every {
            interval: Duration::from_secs(interval),
            splay: Duration::from_secs(splay),
        }
    }

    #[test]
    fn the_first_run_comes_within_the_splay_or_one_interval() {
        // No splay: within one interval of the start.
        assert_eq!(first_due(every(3600, 0), None, t(0), 0.0), t(0));
        assert_eq!(first_due(every(3600, 0), None, t(0), 0.5), t(1800));
        assert!(first_due(every(3600, 0), None, t(0), 0.999_999) < t(3600));
        // With a splay: within it.
        assert_eq!(first_due(every(3600, 300), None, t(0), 0.5), t(150));
    }

    #[test]
    fn a_restart_resumes_the_schedule() {
        // Ran 10 minutes ago on an hourly schedule: due 50 minutes from now, not at once.
        assert_eq!(first_due(every(3600, 0), Some(t(-600)), t(0), 0.7), t(3000));
        assert_eq!(
            first_due(every(3600, 60), Some(t(-600)), t(0), 0.5),
            t(3030)
        );
    }

    #[test]
    fn downtime_gives_one_catch_up_run_not_a_burst() {
        // Down for 10 intervals: one run within a minute, and the next a whole interval
        // after it.
        let e = every(60, 0);
        let catch_up = first_due(e, Some(t(-600)), t(0), 0.5);
        assert_eq!(catch_up, t(30));
        assert_eq!(next_slot(e, catch_up, catch_up, 0.5), (t(90), t(90)));
        // With a splay, the catch-up spreads over it.
        assert_eq!(
            first_due(every(3600, 600), Some(t(-7200)), t(0), 0.5),
            t(300)
        );
    }

    #[test]
    fn a_record_from_a_clock_far_ahead_does_not_postpone_the_first_run() {
        assert_eq!(first_due(every(60, 0), Some(t(86_400)), t(0), 0.5), t(30));
    }

    #[test]
    fn a_run_longer_than_its_interval_is_followed_at_once_not_repeatedly() {
        let e = every(10, 0);
        // Slot at 0, the run ended at 35: the next runs now, once, and slots go on from it.
        let (base, at) = next_slot(e, t(0), t(35), 0.0);
        assert_eq!((base, at), (t(35), t(35)));
        assert_eq!(next_slot(e, base, t(36), 0.0), (t(45), t(45)));
    }

    #[test]
    fn the_splay_does_not_stretch_the_period() {
        // Interval 100, splay 100: runs land anywhere in their slot, slots stay 100 apart,
        // so over 100 slots the schedule is 100 intervals long, not 150.
        let e = every(100, 100);
        let (mut base, mut at) = (t(0), t(0));
        for i in 0..100 {
            let fraction = if i % 2 == 0 { 0.99 } else { 0.01 };
            (base, at) = next_slot(e, base, at, fraction);
        }
        assert_eq!(base, t(10_000));
        assert!(at >= base && at < base + TimeDelta::seconds(100));
    }

    #[test]
    fn overrides_win_over_the_plugin_file() {
        let mut p = crate::plugin::parse_text(
            "name = \"facts\"\ncommand = [\"true\"]\nformat = \"string\"\ninterval = \"1h\"\nsplay = \"5m\"\n",
            Path::new("/etc/vogeler/plugins.d/facts.toml"),
            "sha256:00",
        )
        .remove(0)
        .expect("plugin");
        let none = BTreeMap::new();
        assert_eq!(super::every(&p, &none), Some(every(3600, 300)));
        let mut o = BTreeMap::new();
        o.insert(
            p.name.clone(),
            ScheduleOverride::Every(Duration::from_secs(120)),
        );
        assert_eq!(
            super::every(&p, &o),
            Some(every(120, 120)),
            "splay within the interval"
        );
        o.insert(p.name.clone(), ScheduleOverride::Off);
        assert_eq!(super::every(&p, &o), None);
        p.interval = None;
        p.splay = None;
        assert_eq!(super::every(&p, &none), None);
    }

    #[test]
    fn an_unchanged_value_goes_as_its_hash_until_full_every() {
        let day = Duration::from_secs(86_400);
        let last = Published {
            hash: "sha256:aa".into(),
            full_at: t(0),
        };
        assert!(may_skip_value(Some(&last), "sha256:aa", t(3600), day));
        assert!(
            !may_skip_value(Some(&last), "sha256:bb", t(3600), day),
            "changed"
        );
        assert!(
            !may_skip_value(Some(&last), "sha256:aa", t(86_400), day),
            "full again"
        );
        assert!(
            !may_skip_value(None, "sha256:aa", t(1), day),
            "first run after start"
        );
    }

    #[test]
    fn the_record_survives_a_restart_and_a_broken_one_is_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(LastRuns::load(dir.path()), Ok(LastRuns::default()));
        let mut r = LastRuns::default();
        r.last_run.insert("dpkg".into(), t(0));
        r.save(dir.path()).expect("save");
        assert_eq!(LastRuns::load(dir.path()), Ok(r));
        std::fs::write(LastRuns::path(dir.path()), b"{not json").expect("write");
        let e = LastRuns::load(dir.path()).expect_err("broken");
        assert!(e.contains("schedule.json") && e.contains("replaced"), "{e}");
    }

    #[test]
    fn random_fractions_stay_in_range() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }
}
