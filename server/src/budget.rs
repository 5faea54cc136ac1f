//! How much history one flapping value may write: a plugin whose value changes on every run
//! (a counter, a timestamp, a list in random order) would otherwise add an entry, with both
//! whole values, every time. Each node's plugin gets [`PER_WINDOW`] entries per [`WINDOW`];
//! changes beyond that keep the node document current but get no entry of their own, and the
//! next recorded entry says how many it stands for (`unrecorded`).
//!
//! The budget lives in the server's memory, not in the node document: documents must merge
//! to the same result in any order, and a budget depends on the order changes arrive in. So
//! a restarted server starts each budget afresh, and two servers each keep their own: at
//! most twice the budget, still bounded.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use vogeler_proto::document::HistoryEntry;

/// History entries one node's plugin may write per window.
pub const PER_WINDOW: u32 = 12;
/// The window the budget renews in.
pub const WINDOW: TimeDelta = TimeDelta::hours(1);
/// Budgets kept at most; the oldest windows are dropped first (they are the ones that would
/// renew anyway), so memory stays bounded with any number of nodes and plugins.
pub const MAX_TRACKED: usize = 200_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    start: DateTime<Utc>,
    recorded: u32,
    /// Changes not recorded since the last entry that was.
    unrecorded: u64,
}

/// Every node's plugins' budgets.
#[derive(Debug, Default)]
pub struct HistoryBudget {
    windows: HashMap<(String, String), Window>,
}

impl HistoryBudget {
    /// Keep the entries the budget allows (in the order given, oldest first), each kept one
    /// carrying the count of changes dropped before it. Returns the node and plugin of each
    /// entry dropped.
    pub fn admit(&mut self, entries: &mut Vec<HistoryEntry>) -> Vec<(String, String)> {
        let mut dropped = Vec::new();
        entries.retain_mut(|e| {
            let kept = self.record(e);
            if !kept {
                dropped.push((e.node.clone(), e.plugin.clone()));
            }
            kept
        });
        if self.windows.len() > MAX_TRACKED {
            self.shrink();
        }
        dropped
    }

    fn record(&mut self, e: &mut HistoryEntry) -> bool {
        let w = self
            .windows
            .entry((e.node.clone(), e.plugin.clone()))
            .or_insert(Window {
                start: e.at,
                recorded: 0,
                unrecorded: 0,
            });
        if e.at - w.start >= WINDOW || e.at < w.start {
            w.start = e.at;
            w.recorded = 0;
        }
        if w.recorded < PER_WINDOW {
            w.recorded += 1;
            e.unrecorded = std::mem::take(&mut w.unrecorded);
            true
        } else {
            w.unrecorded += 1;
            false
        }
    }

    /// Drop the older half of the windows.
    fn shrink(&mut self) {
        let mut starts: Vec<DateTime<Utc>> = self.windows.values().map(|w| w.start).collect();
        let mid = starts.len() / 2;
        let (_, cutoff, _) = starts.select_nth_unstable(mid);
        let cutoff = *cutoff;
        self.windows.retain(|_, w| w.start >= cutoff);
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn entry(node: &str, at: DateTime<Utc>) -> HistoryEntry {
        HistoryEntry {
            id: format!("{node}:{at}"),
            node: node.into(),
            plugin: "flappy".into(),
            at,
            request_id: Uuid::new_v4(),
            old_hash: None,
            new_hash: String::new(),
            old: json!(0),
            new: json!(1),
            unrecorded: 0,
        }
    }

    #[test]
    fn a_value_flapping_every_second_writes_a_bounded_history() {
        let mut budget = HistoryBudget::default();
        let t0 = Utc::now();
        // Two hours of a change every second.
        let mut kept = Vec::new();
        for s in 0..7200 {
            let mut batch = vec![entry("web01", t0 + TimeDelta::seconds(s))];
            budget.admit(&mut batch);
            kept.extend(batch);
        }
        assert_eq!(kept.len(), 2 * PER_WINDOW as usize);
        // The first entry of the second hour stands for every change the first hour dropped.
        let second_hour = &kept[PER_WINDOW as usize];
        assert_eq!(second_hour.unrecorded, 3600 - u64::from(PER_WINDOW));
        assert!(
            kept[..PER_WINDOW as usize]
                .iter()
                .all(|e| e.unrecorded == 0)
        );
    }

    #[test]
    fn one_nodes_flapping_does_not_spend_anothers_budget() {
        let mut budget = HistoryBudget::default();
        let t0 = Utc::now();
        let mut flood: Vec<HistoryEntry> = (0..100)
            .map(|s| entry("noisy", t0 + TimeDelta::seconds(s)))
            .collect();
        assert_eq!(budget.admit(&mut flood).len(), 100 - PER_WINDOW as usize);
        let mut quiet = vec![entry("quiet", t0)];
        assert!(budget.admit(&mut quiet).is_empty());
        assert_eq!(quiet.len(), 1);
    }

    #[test]
    fn the_budget_itself_is_bounded() {
        let mut budget = HistoryBudget::default();
        let t0 = Utc::now();
        for n in 0..(MAX_TRACKED + 10) {
            let mut one = vec![entry(
                &format!("n{n}"),
                t0 + TimeDelta::milliseconds(n as i64),
            )];
            budget.admit(&mut one);
        }
        assert!(budget.len() <= MAX_TRACKED, "{}", budget.len());
        assert!(!budget.is_empty());
    }
}
