//! Durations as operators write them: `3` (seconds) or `500ms`, `1m30s`, `2h`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parse `3`, `2.5` (seconds) or a humantime duration such as `500ms` or `1m30s`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a valid number of seconds"));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write seconds like 3 or units like 500ms")
    })
}

/// Render a duration the way [`parse`] reads it.
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A serde helper: a duration in config given as a number of seconds or a string.
pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
        Str(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Int(n)) => Ok(Some(Duration::from_secs(n))),
        Some(Raw::Float(f)) => Duration::try_from_secs_f64(f)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{f} is not a valid number of seconds"))),
        Some(Raw::Str(s)) => parse(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_units() {
        assert_eq!(parse("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse("-1").is_err());
        assert!(parse("soon").unwrap_err().contains("500ms"));
    }
}

/// `d` before `now`, or the earliest time there is when `d` reaches back further (an operator
/// may write `--since 100000y`): never a panic.
pub fn before(now: chrono::DateTime<chrono::Utc>, d: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::TimeDelta::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

#[cfg(test)]
mod before_tests {
    #[test]
    fn a_huge_duration_reaches_the_earliest_time_without_panicking() {
        let now = chrono::Utc::now();
        assert_eq!(
            super::before(now, std::time::Duration::from_secs(60)),
            now - chrono::TimeDelta::seconds(60)
        );
        assert_eq!(
            super::before(now, std::time::Duration::from_secs(u64::MAX)),
            chrono::DateTime::<chrono::Utc>::MIN_UTC
        );
    }
}
