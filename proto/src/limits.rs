//! The limits every layer agrees on: what an agent may publish, the decoder accepts, the
//! server stores and every reader reads back. The table in `docs/operations.md` ("Limits")
//! lists each one and where it is enforced; [`check_message`] is the one check the server
//! applies to everything a node sends, and the agent applies [`check_value`] before it
//! publishes, so a value one layer takes is a value every later layer can store and read.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use crate::wire::{Announce, Message, Outcome, PluginResult};

/// Messages larger than this are refused before parsing: the largest result an agent
/// publishes (a value of [`MAX_VALUE_BYTES`] and its envelope) fits in it, and the server
/// sizes its prefetch window by it (see `server.max_in_flight_bytes`). RabbitMQ 4 refuses
/// messages over 16 MiB by default; set `max_message_size` to this on the broker to refuse
/// larger ones there (see docs/operations.md).
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Commands are a few hundred bytes; anything near this is not from a runner.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The largest plugin value (as JSON) an agent publishes: small enough that a node document
/// holding it stays within CouchDB's default `max_document_size` (8,000,000 bytes), so a
/// value one layer takes, the next can store.
pub const MAX_VALUE_BYTES: usize = 7 * 1024 * 1024;

/// How deeply arrays and objects may nest in a plugin value or in announced facts (`[]` is
/// one level). Every reader parses with serde_json's limit of [`READ_DEPTH`], and a value is
/// read back inside the layers of a node document, a history entry and a CouchDB response.
pub const MAX_VALUE_DEPTH: usize = 64;

/// The recursion limit of every JSON reader (serde_json's default).
pub const READ_DEPTH: usize = 128;

/// The most levels a stored value is wrapped in when it is read back: `_all_docs`
/// (`{"rows":[{"doc":{PLUGIN: value}}]}`: 4), a history entry inside `_all_docs` (5), a view
/// row (`{"rows":[{"value":...}]}`: 3) or a registry row's facts (4).
pub const WRAP_DEPTH: usize = 8;

const _: () = assert!(MAX_VALUE_DEPTH + WRAP_DEPTH < READ_DEPTH);
// A result is its value and a few short texts (each at most MAX_TEXT_BYTES).
const _: () = assert!(MAX_VALUE_BYTES + 16 * MAX_TEXT_BYTES < MAX_MESSAGE_BYTES);
const _: () = assert!(MAX_VALUE_BYTES < COUCHDB_MAX_DOCUMENT_BYTES);

/// Entries in one object of a value (a package list is an array, so this is generous).
pub const MAX_OBJECT_KEYS: usize = 100_000;

/// One object key inside a value. Keys become view keys and Fauxton column names.
pub const MAX_KEY_BYTES: usize = 1024;

/// Announced facts, as JSON: they are copied into every registry view row.
pub const MAX_FACTS_BYTES: usize = 64 * 1024;

/// Plugins one announcement may list.
pub const MAX_ANNOUNCED_PLUGINS: usize = 1024;

/// Plugin keys one node document holds at most: a key per plugin is the design, an unbounded
/// number of keys is a node filling the database.
pub const MAX_PLUGINS_PER_DOCUMENT: usize = 256;

/// Short texts a node sends (agent version, plugin hash, error text, stderr tail).
pub const MAX_TEXT_BYTES: usize = 8 * 1024;

/// How far into the future a node's clock may be: a timestamp later than this is refused,
/// since the newest stamp wins every merge and a future one would freeze the document.
pub const MAX_CLOCK_SKEW: TimeDelta = TimeDelta::minutes(5);

/// CouchDB's own default `[couchdb] max_document_size` (8 MB): the default of
/// `server.max_document_bytes`.
pub const COUCHDB_MAX_DOCUMENT_BYTES: usize = 8_000_000;

/// Why something a node sent is over a limit, in words that name the limit.
pub type Refusal = String;

/// Check a plugin value (or facts): nesting depth, object size, key length.
pub fn check_value(v: &Value) -> Result<(), Refusal> {
    // Iterative, so a value at the decoder's own depth limit costs no stack here.
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::Array(items) => {
                if depth + 1 > MAX_VALUE_DEPTH {
                    return Err(too_deep());
                }
                stack.extend(items.iter().map(|i| (i, depth + 1)));
            }
            Value::Object(map) => {
                if depth + 1 > MAX_VALUE_DEPTH {
                    return Err(too_deep());
                }
                if map.len() > MAX_OBJECT_KEYS {
                    return Err(format!(
                        "an object has {} keys, over the limit of {MAX_OBJECT_KEYS}",
                        map.len()
                    ));
                }
                if let Some(k) = map.keys().find(|k| k.len() > MAX_KEY_BYTES) {
                    return Err(format!(
                        "a key is {} bytes long, over the limit of {MAX_KEY_BYTES}",
                        k.len()
                    ));
                }
                stack.extend(map.values().map(|i| (i, depth + 1)));
            }
            _ => {}
        }
    }
    Ok(())
}

fn too_deep() -> Refusal {
    format!("it nests deeper than {MAX_VALUE_DEPTH} levels of arrays and objects")
}

fn text(field: &str, s: &str) -> Result<(), Refusal> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "{field} is {} bytes, over the limit of {MAX_TEXT_BYTES}",
            s.len()
        ));
    }
    Ok(())
}

fn not_ahead(field: &str, at: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), Refusal> {
    if at > now + MAX_CLOCK_SKEW {
        return Err(format!(
            "{field} {} is {} ahead of the server's clock (more than the allowed {} of skew); fix the node's clock (NTP)",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            crate::duration::format((at - now).to_std().unwrap_or_default()),
            crate::duration::format(MAX_CLOCK_SKEW.to_std().unwrap_or_default()),
        ));
    }
    Ok(())
}

/// The longest plugin interval (31 days): beyond that a schedule is a mistake, and twice it
/// must still be a date.
pub const MAX_INTERVAL_S: u64 = 31 * 24 * 3600;

/// A plugin interval within bounds (1 s to [`MAX_INTERVAL_S`]), for plugin files and
/// `[agent.schedule]` alike.
pub fn check_interval(d: std::time::Duration) -> Result<std::time::Duration, String> {
    let max = std::time::Duration::from_secs(MAX_INTERVAL_S);
    if d < std::time::Duration::from_secs(1) {
        return Err(format!(
            "interval {} is under 1s",
            crate::duration::format(d)
        ));
    }
    if d > max {
        return Err(format!(
            "interval {} is over the longest, {}",
            crate::duration::format(d),
            crate::duration::format(max)
        ));
    }
    Ok(d)
}

/// Check a result against every limit; `now` is the receiver's clock.
pub fn check_result(r: &PluginResult, now: DateTime<Utc>) -> Result<(), Refusal> {
    not_ahead("collected_at", r.collected_at, now)?;
    text("agent_version", &r.agent_version)?;
    match &r.outcome {
        Outcome::Failed { stderr_tail, .. } => text("stderr_tail", stderr_tail)?,
        Outcome::InvalidOutput { format, error } => {
            text("format", format)?;
            text("error", error)?;
        }
        Outcome::FailedToStart { error } => text("error", error)?,
        Outcome::Unchanged { hash } => {
            text("hash", hash)?;
            if r.value.is_some() {
                return Err("an unchanged result carries no value".into());
            }
            if r.scheduled.is_none() {
                return Err(
                    "only a scheduled run may answer \"unchanged\"; a command's answer carries its value"
                        .into(),
                );
            }
        }
        Outcome::Ok | Outcome::TimedOut { .. } | Outcome::UnknownPlugin => {}
    }
    if let Some(s) = &r.scheduled
        && !(1..=MAX_INTERVAL_S).contains(&s.interval_s)
    {
        return Err(format!(
            "interval_s {} is outside 1 s to {MAX_INTERVAL_S} s",
            s.interval_s
        ));
    }
    if let Some(v) = &r.value {
        check_value(v).map_err(|e| format!("value of plugin {}: {e}", r.plugin))?;
    }
    Ok(())
}

/// Check an announcement against every limit; `now` is the receiver's clock.
pub fn check_announce(a: &Announce, now: DateTime<Utc>) -> Result<(), Refusal> {
    not_ahead("sent_at", a.sent_at, now)?;
    not_ahead("started_at", a.started_at, now)?;
    text("agent_version", &a.agent_version)?;
    if a.plugins.len() > MAX_ANNOUNCED_PLUGINS {
        return Err(format!(
            "it announces {} plugins, over the limit of {MAX_ANNOUNCED_PLUGINS}",
            a.plugins.len()
        ));
    }
    for p in &a.plugins {
        text("a plugin hash", &p.hash)?;
    }
    for (name, interval_s) in a.schedules.iter().flatten() {
        if !a.plugins.iter().any(|p| p.name.as_str() == name) {
            return Err(format!(
                "it schedules plugin {:?}, which it does not announce",
                crate::text::printable(name)
            ));
        }
        if !(1..=MAX_INTERVAL_S).contains(interval_s) {
            return Err(format!(
                "it schedules plugin {name} every {interval_s} s, outside 1 s to {MAX_INTERVAL_S} s"
            ));
        }
    }
    // Each name must be announced, so there are at most as many as announced plugins.
    for (name, scheme) in a.packages.iter().flatten() {
        if !a.plugins.iter().any(|p| p.name.as_str() == name) {
            return Err(format!(
                "it declares plugin {:?} a package inventory, which it does not announce",
                crate::text::printable(name)
            ));
        }
        // Readers know these by name; a stored contradiction would compare one way in the
        // views and another in `has`. The agent refuses such a plugin file.
        if let Some(by_name) = crate::version::Scheme::by_name(name)
            && by_name != *scheme
        {
            return Err(format!(
                "it declares plugin {name} a package inventory in {scheme}'s version order, but {name} is always {by_name}'s"
            ));
        }
    }
    let facts = Value::Object(a.facts.clone());
    check_value(&facts).map_err(|e| format!("facts: {e}"))?;
    let size = serde_json::to_vec(&facts).map_or(usize::MAX, |b| b.len());
    if size > MAX_FACTS_BYTES {
        return Err(format!(
            "facts are {size} bytes as JSON, over the limit of {MAX_FACTS_BYTES}"
        ));
    }
    Ok(())
}

/// What the results queue takes from a node: results and announcements within the limits.
pub fn check_message(m: &Message, now: DateTime<Utc>) -> Result<(), Refusal> {
    match m {
        Message::Result(r) => check_result(r, now),
        Message::Announce(a) => check_announce(a, now),
        Message::Command(_) => Err("the results queue does not take command messages".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for i in 0..depth {
            v = if i % 2 == 0 {
                json!([v])
            } else {
                json!({ "k": v })
            };
        }
        v
    }

    #[test]
    fn depth_is_counted_in_containers() {
        assert!(check_value(&json!(1)).is_ok());
        assert!(check_value(&nested(MAX_VALUE_DEPTH)).is_ok());
        let err = check_value(&nested(MAX_VALUE_DEPTH + 1)).expect_err("too deep");
        assert!(err.contains("deeper than 64"), "{err}");
    }

    #[test]
    fn a_value_at_the_limit_reads_back_inside_every_wrapper() {
        // The worst reader: a history entry's value inside an `_all_docs` response.
        let v = nested(MAX_VALUE_DEPTH);
        let mut wrapped = v;
        for _ in 0..WRAP_DEPTH {
            wrapped = json!({ "w": [wrapped] });
        }
        let text = serde_json::to_string(&wrapped).expect("json");
        // Each wrapper above adds two levels, so this is twice as strict as needed.
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }

    #[test]
    fn declared_package_plugins_must_be_announced_and_agree_with_their_names() {
        use crate::{names::PluginName, version::Scheme, wire::PluginInfo};
        let now: DateTime<Utc> = "2026-11-22T05:00:00Z".parse().expect("time");
        let announce = |packages: &[(&str, Scheme)]| Announce {
            node: crate::names::NodeName::new("web01").expect("node"),
            agent_version: "0.1.0".into(),
            plugins: ["pip", "dpkg"]
                .map(|p| PluginInfo {
                    name: PluginName::new(p).expect("plugin"),
                    hash: "sha256:1".into(),
                })
                .into(),
            started_at: now,
            sent_at: now,
            facts: Default::default(),
            schedules: None,
            packages: Some(packages.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
        };
        assert!(check_announce(&announce(&[]), now).is_ok());
        assert!(check_announce(&announce(&[("pip", Scheme::Rpm)]), now).is_ok());
        assert!(check_announce(&announce(&[("dpkg", Scheme::Dpkg)]), now).is_ok());
        let err = check_announce(&announce(&[("apk", Scheme::Rpm)]), now).expect_err("apk");
        assert!(
            err.contains("\"apk\"") && err.contains("does not announce"),
            "{err}"
        );
        let err = check_announce(&announce(&[("dpkg", Scheme::Rpm)]), now).expect_err("dpkg");
        assert!(err.contains("dpkg is always dpkg's"), "{err}");
    }

    #[test]
    fn object_size_and_key_length_are_capped() {
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let err = check_value(&json!({ long: 1 })).expect_err("long key");
        assert!(err.contains("key is 1025 bytes"), "{err}");
        let wide: serde_json::Map<String, Value> = (0..=MAX_OBJECT_KEYS)
            .map(|i| (i.to_string(), json!(null)))
            .collect();
        let err = check_value(&Value::Object(wide)).expect_err("wide");
        assert!(err.contains("100001 keys"), "{err}");
    }
}
