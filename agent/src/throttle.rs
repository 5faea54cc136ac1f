//! How many refusals of one class the audit log and the agent's log write under a flood.
//! Anyone who can publish into an agent's queue (a runner key holder, or any holder of the
//! shared broker credential) can send it unsigned commands as fast as the broker takes them:
//! each class gets [`PER_WINDOW`] lines a minute, the rest are only counted, and one summary
//! per class and minute says how many were left out. Accepted and finished commands never
//! pass through here: what ran is always written. Pure: the clock is passed in.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

/// Refusals of one class written per window; more are counted in the window's summary.
pub const PER_WINDOW: u32 = 100;
/// How long a window lasts, in seconds.
pub const WINDOW_SECS: i64 = 60;

/// Refusals of one class left out of the log in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub class: &'static str,
    pub count: u64,
    /// When the window began (its first refusal).
    pub since: DateTime<Utc>,
    /// When it ended, or the time it was closed early (at shutdown).
    pub until: DateTime<Utc>,
}

/// What to do with one refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Write its line and its warning.
    pub write: bool,
    /// The summary of this class's previous window, to write first.
    pub closed: Option<Suppressed>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    since: DateTime<Utc>,
    written: u32,
    suppressed: u64,
}

#[derive(Debug)]
pub struct Throttle {
    per_window: u32,
    window: Duration,
    /// One open window per class (a dozen classes at most).
    classes: BTreeMap<&'static str, Window>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(PER_WINDOW, Duration::seconds(WINDOW_SECS))
    }
}

impl Throttle {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            classes: BTreeMap::new(),
        }
    }

    /// Whether a window that began at `since` is over at `now`. A clock set back also ends
    /// it, so a step back cannot stretch one window over hours.
    fn over(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        now < since || now - since >= self.window
    }

    fn summary(class: &'static str, w: &Window, until: DateTime<Utc>) -> Option<Suppressed> {
        (w.suppressed > 0).then_some(Suppressed {
            class,
            count: w.suppressed,
            since: w.since,
            until,
        })
    }

    /// Decide on a refusal of `class` at `now`.
    pub fn admit(&mut self, class: &'static str, now: DateTime<Utc>) -> Decision {
        let mut closed = None;
        let window = self.window;
        if let Some(w) = self.classes.get(class).copied()
            && self.over(w.since, now)
        {
            closed = Self::summary(class, &w, (w.since + window).min(now).max(w.since));
            self.classes.remove(class);
        }
        let w = self.classes.entry(class).or_insert(Window {
            since: now,
            written: 0,
            suppressed: 0,
        });
        let write = w.written < self.per_window;
        if write {
            w.written += 1;
        } else {
            w.suppressed += 1;
        }
        Decision { write, closed }
    }

    /// The summaries of the windows over by `now`: when a flood stops, no later refusal of
    /// its class comes to close its window, so the agent asks every few seconds.
    pub fn expired(&mut self, now: DateTime<Utc>) -> Vec<Suppressed> {
        let window = self.window;
        let over: Vec<&'static str> = self
            .classes
            .iter()
            .filter(|(_, w)| self.over(w.since, now))
            .map(|(c, _)| *c)
            .collect();
        over.into_iter()
            .filter_map(|c| {
                let w = self.classes.remove(c)?;
                Self::summary(c, &w, (w.since + window).min(now).max(w.since))
            })
            .collect()
    }

    /// Every open window's summary, over or not (at shutdown, so no count is lost).
    pub fn drain(&mut self, now: DateTime<Utc>) -> Vec<Suppressed> {
        std::mem::take(&mut self.classes)
            .into_iter()
            .filter_map(|(c, w)| Self::summary(c, &w, now.max(w.since)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        "2026-11-22T08:00:00Z".parse().expect("time")
    }

    fn secs(s: i64) -> DateTime<Utc> {
        t0() + Duration::seconds(s)
    }

    #[test]
    fn writes_the_first_of_each_class_then_counts() {
        let mut t = Throttle::new(3, Duration::seconds(60));
        let written: Vec<bool> = (0..10).map(|_| t.admit("unsigned", t0()).write).collect();
        assert_eq!(written.iter().filter(|w| **w).count(), 3);
        assert!(
            written[..3].iter().all(|w| *w),
            "the first ones are written"
        );
        // Another class has its own allowance.
        assert!(t.admit("unknown_key", secs(1)).write);
        // The next window starts afresh and brings the last one's summary.
        let d = t.admit("unsigned", secs(60));
        assert!(d.write);
        assert_eq!(
            d.closed,
            Some(Suppressed {
                class: "unsigned",
                count: 7,
                since: t0(),
                until: secs(60),
            })
        );
    }

    #[test]
    fn a_window_without_suppression_has_no_summary() {
        let mut t = Throttle::new(3, Duration::seconds(60));
        for _ in 0..3 {
            assert!(t.admit("expired", t0()).write);
        }
        assert_eq!(t.admit("expired", secs(61)).closed, None);
        assert!(t.expired(secs(200)).is_empty());
        assert!(t.drain(secs(300)).is_empty());
    }

    #[test]
    fn windows_that_ended_are_summed_up_without_another_refusal() {
        let mut t = Throttle::new(1, Duration::seconds(60));
        for _ in 0..5 {
            t.admit("unsigned", t0());
        }
        for _ in 0..3 {
            t.admit("malformed", secs(30));
        }
        assert!(t.expired(secs(59)).is_empty(), "not over yet");
        let over = t.expired(secs(65));
        assert_eq!(over.len(), 1);
        assert_eq!((over[0].class, over[0].count), ("unsigned", 4));
        assert_eq!(over[0].until, secs(60));
        assert!(t.expired(secs(66)).is_empty(), "summed up once");
        // At shutdown the open window is summed up too.
        let rest = t.drain(secs(70));
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].class, rest[0].count), ("malformed", 2));
        assert_eq!((rest[0].since, rest[0].until), (secs(30), secs(70)));
        assert!(t.drain(secs(71)).is_empty());
    }

    #[test]
    fn a_clock_set_back_ends_the_window() {
        let mut t = Throttle::new(1, Duration::seconds(60));
        t.admit("unsigned", t0());
        assert!(!t.admit("unsigned", t0()).write);
        let d = t.admit("unsigned", t0() - Duration::hours(1));
        assert!(d.write, "a new window");
        assert_eq!(d.closed.map(|s| s.count), Some(1));
    }
}
