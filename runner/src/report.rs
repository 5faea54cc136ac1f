//! What a query found, and how it is printed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Duration,
};

use serde_json::Value;
use uuid::Uuid;
use vogeler_proto::text::{printable, printable_lines};
use vogeler_proto::{
    names::{NodeName, PluginName},
    wire::PluginResult,
};

/// A stored value used instead of asking the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    pub value: Value,
    pub collected_at: chrono::DateTime<chrono::Utc>,
}

impl Cached {
    fn age(&self) -> std::time::Duration {
        (chrono::Utc::now() - self.collected_at)
            .to_std()
            .unwrap_or_default()
    }
}

/// The outcome of one fan-out.
#[derive(Debug, Clone)]
pub struct Report {
    pub request_id: Uuid,
    pub plugin: PluginName,
    /// The `-n` expression.
    pub nodes: String,
    /// Sent to every agent (`-n all`): any agent answering is welcome.
    pub broadcast: bool,
    /// Nodes that should answer: the registered nodes for `all`, the named node otherwise.
    pub expected: BTreeSet<NodeName>,
    /// Every reply received, by node (a node answers a request once).
    pub replies: BTreeMap<NodeName, PluginResult>,
    /// Nodes answered from stored values (`--cached`) instead of being asked.
    pub cached: BTreeMap<NodeName, Cached>,
    /// Nodes the broker could not deliver the command to, with why (no queue: the agent
    /// never connected; queue full: it has been away long). Not waited for.
    pub undelivered: BTreeMap<NodeName, String>,
    /// Replies signed by another key than the node's pinned one (or for a node the registry
    /// has no key for), with why: never shown as the node's answer.
    pub unverified: BTreeMap<NodeName, String>,
    /// Registered nodes the expression matched but that were not seen within the freshness
    /// window, so were not commanded.
    pub stale: usize,
    pub elapsed: Duration,
}

impl Report {
    /// Expected nodes that did not answer in time.
    pub fn missing(&self) -> Vec<&NodeName> {
        self.expected
            .iter()
            .filter(|n| {
                !self.replies.contains_key(*n)
                    && !self.cached.contains_key(*n)
                    && !self.undelivered.contains_key(*n)
            })
            .collect()
    }

    /// Nodes that answered without being expected. For `all` every agent is welcome (a node
    /// may have started after the registry was read), so only named targets have these.
    pub fn unexpected(&self) -> Vec<&NodeName> {
        if self.broadcast {
            vec![]
        } else {
            self.replies
                .keys()
                .filter(|n| !self.expected.contains(*n))
                .collect()
        }
    }

    /// Nodes the summary counts: the expected ones plus, for `all`, any late joiner.
    fn counted(&self) -> BTreeSet<&NodeName> {
        let mut s: BTreeSet<&NodeName> = self.expected.iter().collect();
        if self.broadcast {
            s.extend(self.replies.keys());
        }
        s
    }

    /// Success means every counted node answered `ok` and at least one did.
    pub fn success(&self) -> bool {
        let counted = self.counted();
        !counted.is_empty()
            && counted.iter().all(|n| {
                self.cached.contains_key(*n)
                    || self.replies.get(*n).is_some_and(|r| r.outcome.is_ok())
            })
    }

    /// The default text output: a row per node, then a summary.
    pub fn render_table(&self) -> String {
        self.render_table_with(false)
    }

    /// [`Report::render_table`], with values printed in full when `full`.
    pub fn render_table_with(&self, full: bool) -> String {
        let counted = self.counted();
        let width = counted
            .iter()
            .map(|n| n.as_str().len())
            .chain(self.unexpected().iter().map(|n| n.as_str().len()))
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = String::new();
        let mut rows: Vec<&NodeName> = counted.iter().copied().collect();
        rows.extend(self.unexpected());
        for node in rows {
            let _ = match self.replies.get(node) {
                Some(r) => {
                    let detail = match (&r.value, r.outcome.error_text()) {
                        (_, Some(err)) => err,
                        (Some(v), None) if full => v.to_string(),
                        (Some(v), None) => {
                            summarize(v) + if r.truncated { " (truncated)" } else { "" }
                        }
                        (None, None) => String::new(),
                    };
                    writeln!(
                        out,
                        "{node:<width$}  {:<15}  {:>7}  {}",
                        r.outcome.status(),
                        format!("{}ms", r.duration_ms),
                        // Node-supplied text: escapes are shown, not obeyed.
                        if full {
                            printable_lines(&detail)
                        } else {
                            printable(&one_line(&detail, 100)).into_owned().into()
                        }
                    )
                }
                None => match self.cached.get(node) {
                    Some(c) => {
                        let value = if full {
                            c.value.to_string()
                        } else {
                            one_line(&summarize(&c.value), 100)
                        };
                        let age = vogeler_proto::duration::format(std::time::Duration::from_secs(
                            c.age().as_secs(),
                        ));
                        writeln!(
                            out,
                            "{node:<width$}  {:<15}  {:>7}  stored {age} ago: {}",
                            "cached",
                            "-",
                            printable_lines(&value)
                        )
                    }
                    None => writeln!(out, "{node:<width$}  {:<15}  {:>7}", "no response", "-"),
                },
            };
        }
        let answered = counted
            .iter()
            .filter(|n| self.replies.contains_key(**n))
            .count();
        let cached = counted
            .iter()
            .filter(|n| self.cached.contains_key(**n))
            .count();
        let failed = counted
            .iter()
            .filter(|n| self.replies.get(**n).is_some_and(|r| !r.outcome.is_ok()))
            .count();
        let _ = write!(
            out,
            "{}/{} nodes answered",
            answered + cached,
            counted.len()
        );
        if cached > 0 {
            let _ = write!(out, ", {cached} from stored values");
        }
        if failed > 0 {
            let _ = write!(out, ", {failed} failed");
        }
        let _ = writeln!(out, " in {:.2}s", self.elapsed.as_secs_f64());
        let missing = self.missing();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|n| n.as_str()).collect();
            let _ = writeln!(out, "no response from: {}", names.join(", "));
        }
        if !self.undelivered.is_empty() {
            let names: Vec<String> = self
                .undelivered
                .iter()
                .map(|(n, why)| format!("{n} ({why})"))
                .collect();
            let _ = writeln!(out, "not delivered to: {}", names.join(", "));
        }
        let unexpected = self.unexpected();
        if !unexpected.is_empty() {
            let names: Vec<&str> = unexpected.iter().map(|n| n.as_str()).collect();
            let _ = writeln!(out, "unexpected response from: {}", names.join(", "));
        }
        for (n, why) in &self.unverified {
            let _ = writeln!(out, "unverified reply as {n} (not shown): {why}");
        }
        if counted.is_empty() && self.broadcast {
            let _ = writeln!(
                out,
                "no nodes are registered and none answered: is an agent running in this collective?"
            );
        } else if counted.is_empty() && self.stale > 0 {
            let _ = writeln!(
                out,
                "-n {q} matches {n} registered node(s), none seen within the freshness window: nothing was sent (see `vogeler-runner nodes -n {q}`; runner.freshness or VOGELER_RUNNER__FRESHNESS widens the window)",
                q = printable(&shell_quote(&self.nodes)),
                n = self.stale,
            );
        } else if counted.is_empty() {
            // A selection that matched nobody is not a missing agent.
            let _ = writeln!(
                out,
                "no registered node matches -n {q}: nothing was sent (see `vogeler-runner query {q}`)",
                q = printable(&shell_quote(&self.nodes)),
            );
        }
        out
    }
}

impl Report {
    /// The whole report as one JSON document: request, per-node results, summary. Values
    /// are summarised unless `full`.
    pub fn to_json(&self, full: bool) -> Value {
        let counted = self.counted();
        let mut results: serde_json::Map<String, Value> = self
            .replies
            .iter()
            .map(|(n, r)| (n.to_string(), reply_json(r, full)))
            .collect();
        for (n, c) in &self.cached {
            results.insert(n.to_string(), cached_json(n, c, full));
        }
        let failed: Vec<&str> = counted
            .iter()
            .filter(|n| self.replies.get(**n).is_some_and(|r| !r.outcome.is_ok()))
            .map(|n| n.as_str())
            .collect();
        serde_json::json!({
            "request_id": self.request_id,
            "plugin": self.plugin,
            "nodes": self.nodes,
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "results": results,
            "summary": {
                "expected": counted.len(),
                "answered": counted.iter().filter(|n| self.replies.contains_key(**n)).count(),
                "failed": failed,
                "no_response": self.missing().iter().map(|n| n.as_str()).collect::<Vec<_>>(),
                "not_delivered": &self.undelivered,
                "unexpected": self.unexpected().iter().map(|n| n.as_str()).collect::<Vec<_>>(),
                "unverified": &self.unverified,
                "success": self.success(),
            }
        })
    }

    /// The rows (jsonl, csv) of every node that did not answer itself, printed after the
    /// replies streamed as they came ([`reply_json`]): answered from a stored value, no
    /// response, not delivered, and replies not shown because their signature did not
    /// verify. Values are summarised unless `full`.
    pub fn rest_rows(&self, full: bool) -> Vec<Value> {
        let cached = self.cached.iter().map(|(n, c)| cached_json(n, c, full));
        let missing = self
            .missing()
            .into_iter()
            .map(|n| serde_json::json!({"node": n, "status": "no_response"}));
        let undelivered = self.undelivered.iter().map(
            |(n, why)| serde_json::json!({"node": n, "status": "not_delivered", "reason": why}),
        );
        let unverified = self
            .unverified
            .iter()
            .map(|(n, why)| serde_json::json!({"node": n, "status": "unverified", "reason": why}));
        cached
            .chain(missing)
            .chain(undelivered)
            .chain(unverified)
            .collect()
    }
}

/// A fan-out's csv columns: every field of any row ([`reply_json`], [`Report::rest_rows`]).
pub const COLUMNS: &[&str] = &[
    "node",
    "status",
    "error",
    "exit_code",
    "duration_ms",
    "truncated",
    "collected_at",
    "age_s",
    "reason",
    "value",
];

/// A node answered from its stored value, as JSON.
fn cached_json(n: &NodeName, c: &Cached, full: bool) -> Value {
    let value = if full {
        c.value.clone()
    } else {
        Value::String(summarize(&c.value))
    };
    serde_json::json!({"node": n, "status": "cached", "collected_at": c.collected_at, "age_s": c.age().as_secs(), "value": value})
}

/// One node's reply as JSON: status, outcome details, duration, value.
pub fn reply_json(r: &PluginResult, full: bool) -> Value {
    let value = match &r.value {
        Some(v) if full => v.clone(),
        Some(v) => Value::String(summarize(v)),
        None => Value::Null,
    };
    serde_json::json!({
        "node": r.node,
        "status": r.outcome.status(),
        "error": r.outcome.error_text(),
        "exit_code": r.outcome.exit_code(),
        "duration_ms": r.duration_ms,
        "truncated": r.truncated,
        "value": value,
    })
}

/// A short, human summary of a plugin value.
pub fn summarize(v: &Value) -> String {
    // Records (package lists, users) read best by their name.
    fn short(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Object(o) => match o.get("name") {
                Some(Value::String(name)) => name.clone(),
                _ => v.to_string(),
            },
            other => other.to_string(),
        }
    }
    let listing = |total: usize, items: Vec<String>, noun: &str| {
        let shown: Vec<String> = items.into_iter().take(3).collect();
        let more = if total > shown.len() { ", ..." } else { "" };
        format!(
            "{total} {noun}{}: {}{more}",
            if total == 1 { "" } else { "s" },
            shown.join(", ")
        )
    };
    match v {
        Value::Array(a) if a.is_empty() => "0 items".into(),
        Value::Array(a) => listing(a.len(), a.iter().map(short).collect(), "item"),
        Value::Object(o) if o.is_empty() => "0 keys".into(),
        Value::Object(o) => listing(o.len(), o.keys().cloned().collect(), "key"),
        other => short(other),
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

/// `s` as one shell word, so a printed command can be pasted back.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,*@/".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;
    use vogeler_proto::wire::Outcome;

    fn node(n: &str) -> NodeName {
        NodeName::new(n).expect("node")
    }

    fn reply(n: &str, outcome: Outcome, value: Option<Value>) -> (NodeName, PluginResult) {
        (
            node(n),
            PluginResult {
                request_id: Uuid::nil(),
                node: node(n),
                plugin: PluginName::new("hello").expect("plugin"),
                outcome,
                value,
                truncated: false,
                collected_at: Utc::now(),
                duration_ms: 7,
                agent_version: "0".into(),
                scheduled: None,
            },
        )
    }

    fn report(
        broadcast: bool,
        expected: &[&str],
        replies: Vec<(NodeName, PluginResult)>,
    ) -> Report {
        Report {
            stale: 0,
            request_id: Uuid::nil(),
            plugin: PluginName::new("hello").expect("plugin"),
            nodes: "test".into(),
            broadcast,
            expected: expected.iter().map(|n| node(n)).collect(),
            replies: replies.into_iter().collect(),
            cached: BTreeMap::new(),
            undelivered: BTreeMap::new(),
            unverified: BTreeMap::new(),
            elapsed: Duration::from_millis(1500),
        }
    }

    #[test]
    fn all_answered_ok() {
        let r = report(
            true,
            &["a", "b"],
            vec![
                reply("a", Outcome::Ok, Some(json!(["x", "y"]))),
                reply("b", Outcome::Ok, Some(json!({"k": 1}))),
            ],
        );
        assert!(r.success());
        let t = r.render_table();
        assert!(t.contains("2/2 nodes answered"), "{t}");
        assert!(t.contains("2 items: x, y"), "{t}");
        assert!(t.contains("1 key: k"), "{t}");
        assert!(!t.contains("no response"), "{t}");
    }

    #[test]
    fn missing_and_failed_nodes_are_named() {
        let failed = Outcome::Failed {
            exit_code: Some(3),
            signal: None,
            stderr_tail: "boom".into(),
        };
        let r = report(
            true,
            &["a", "b", "c"],
            vec![
                reply("a", Outcome::Ok, Some(json!("v"))),
                reply("b", failed, None),
                reply("late", Outcome::Ok, Some(json!(1))),
            ],
        );
        assert!(!r.success());
        let t = r.render_table();
        assert!(t.contains("3/4 nodes answered, 1 failed"), "{t}");
        assert!(t.contains("no response from: c\n"), "{t}");
        assert!(t.contains("exit code 3: boom"), "{t}");
    }

    #[test]
    fn named_target_reports_unexpected_responders() {
        let r = report(
            false,
            &["a"],
            vec![
                reply("a", Outcome::Ok, Some(json!(1))),
                reply("z", Outcome::Ok, Some(json!(1))),
            ],
        );
        assert!(
            r.success(),
            "unexpected responders alone do not fail the run"
        );
        assert!(r.render_table().contains("unexpected response from: z"));
    }

    #[test]
    fn nobody_is_not_success() {
        let r = report(true, &[], vec![]);
        assert!(!r.success());
        assert!(r.render_table().contains("0/0 nodes answered"));
    }

    #[test]
    fn a_selection_of_stale_nodes_says_so_not_that_nothing_matched() {
        let mut r = report(false, &[], vec![]);
        assert!(
            r.render_table()
                .contains("no registered node matches -n test")
        );
        r.stale = 2;
        let t = r.render_table();
        assert!(
            t.contains(
                "-n test matches 2 registered node(s), none seen within the freshness window"
            ),
            "{t}"
        );
        assert!(!t.contains("no registered node matches"), "{t}");
    }

    #[test]
    fn json_report_parses_back_with_the_summary() {
        let failed = Outcome::Failed {
            exit_code: Some(3),
            signal: None,
            stderr_tail: "boom".into(),
        };
        let r = report(
            false,
            &["a", "b", "c"],
            vec![
                reply("a", Outcome::Ok, Some(json!(["x", "y"]))),
                reply("b", failed, None),
            ],
        );
        let text = serde_json::to_string(&r.to_json(false)).expect("encode");
        let v: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["summary"]["expected"], 3);
        assert_eq!(v["summary"]["answered"], 2);
        assert_eq!(v["summary"]["failed"], json!(["b"]));
        assert_eq!(v["summary"]["no_response"], json!(["c"]));
        assert_eq!(v["results"]["a"]["value"], "2 items: x, y");
        assert_eq!(v["results"]["b"]["error"], "exit code 3: boom");
        assert_eq!(r.to_json(true)["results"]["a"]["value"], json!(["x", "y"]));
        assert_eq!(
            r.rest_rows(false),
            [json!({"node": "c", "status": "no_response"})]
        );
    }

    #[test]
    fn every_node_not_streamed_has_a_row_that_fits_the_columns() {
        let mut r = report(
            false,
            &["a", "b", "c", "d"],
            vec![reply("a", Outcome::Ok, Some(json!("v")))],
        );
        r.cached.insert(
            node("b"),
            Cached {
                value: json!(["x"]),
                collected_at: Utc::now(),
            },
        );
        r.undelivered.insert(node("c"), "no agent queue".into());
        r.unverified
            .insert(node("a"), "not signed by the pinned key".into());
        let rest = r.rest_rows(false);
        let statuses: Vec<(&str, &str)> = rest
            .iter()
            .map(|row| {
                (
                    row["node"].as_str().unwrap_or(""),
                    row["status"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            statuses,
            [
                ("b", "cached"),
                ("d", "no_response"),
                ("c", "not_delivered"),
                ("a", "unverified")
            ]
        );
        assert_eq!(rest[0]["value"], "1 item: x");
        assert_eq!(r.rest_rows(true)[0]["value"], json!(["x"]));
        let replied = reply_json(&r.replies[&node("a")], false);
        for row in rest.iter().chain([&replied]) {
            for key in row.as_object().expect("object").keys() {
                assert!(COLUMNS.contains(&key.as_str()), "{key} is not a column");
            }
        }
    }

    #[test]
    fn summaries() {
        assert_eq!(
            summarize(&json!(["a", "b", "c", "d"])),
            "4 items: a, b, c, ..."
        );
        assert_eq!(summarize(&json!([])), "0 items");
        assert_eq!(summarize(&json!("text")), "text");
        assert_eq!(summarize(&json!(42)), "42");
        assert_eq!(
            summarize(&json!([{"name": "bash", "version": "5"}, {"v": 1}])),
            "2 items: bash, {\"v\":1}"
        );
    }
}
