//! Secrets that must never reach a log line, and URLs printed without their password.

use std::fmt;

use serde::{Deserialize, Deserializer};
use url::Url;

/// A password or key. `Debug` and `Display` print a placeholder; only [`Secret::expose`]
/// gives the value, so every use is easy to find in review.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A URL that may carry a password (`amqp://user:pass@host`). Displays with the password
/// replaced, so it can go into logs and error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    pub fn parse(s: &str) -> Result<Self, url::ParseError> {
        Url::parse(s).map(Self)
    }
    pub fn expose(&self) -> &Url {
        &self.0
    }
    /// Add `key=value` to the query unless the URL already sets `key` (an operator's own
    /// `?heartbeat=30` wins over the configured default).
    pub fn set_query_default(&mut self, key: &str, value: &str) {
        if !self.0.query_pairs().any(|(k, _)| k == key) {
            self.0.query_pairs_mut().append_pair(key, value);
        }
    }

    /// Set a query parameter, replacing any value it had.
    pub fn set_query(&mut self, key: &str, value: &str) {
        let rest: Vec<(String, String)> = self
            .0
            .query_pairs()
            .filter(|(k, _)| k != key)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut q = self.0.query_pairs_mut();
        q.clear();
        for (k, v) in rest {
            q.append_pair(&k, &v);
        }
        q.append_pair(key, value);
    }

    /// Replace the user name (percent-encoded as needed). Returns false for a URL that
    /// cannot carry one (no host).
    pub fn set_username(&mut self, username: &str) -> bool {
        self.0.set_username(username).is_ok()
    }
    /// Replace the password (from a password file). Returns false for a URL that cannot
    /// carry one (no host).
    pub fn set_password(&mut self, password: &str) -> bool {
        self.0.set_password(Some(password)).is_ok()
    }
    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut u = self.0.clone();
        if u.password().is_some() {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = u.set_password(Some("***"));
        }
        u.to_string()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// The nodes of one service (a RabbitMQ or CouchDB cluster), tried in the order given.
/// Never empty. Displays comma-separated, each without its password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrls(Vec<SecretUrl>);

impl SecretUrls {
    /// `None` for an empty list.
    pub fn new(urls: Vec<SecretUrl>) -> Option<Self> {
        (!urls.is_empty()).then_some(Self(urls))
    }
    /// The first node: the one programs try first.
    pub fn first(&self) -> &SecretUrl {
        &self.0[0]
    }
    pub fn iter(&self) -> std::slice::Iter<'_, SecretUrl> {
        self.0.iter()
    }
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, SecretUrl> {
        self.0.iter_mut()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Always false; for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Every URL, each with any password replaced by `***`.
    pub fn redacted(&self) -> Vec<String> {
        self.0.iter().map(SecretUrl::redacted).collect()
    }
}

impl From<SecretUrl> for SecretUrls {
    fn from(url: SecretUrl) -> Self {
        Self(vec![url])
    }
}

impl<'a> IntoIterator for &'a SecretUrls {
    type Item = &'a SecretUrl;
    type IntoIter = std::slice::Iter<'a, SecretUrl>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for SecretUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted().join(","))
    }
}

impl fmt::Debug for SecretUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.redacted()).finish()
    }
}

/// Split a list of URLs given as one string (a flag or a `VOGELER_*` variable) at the
/// commas that start the next URL (`,scheme://`), so a comma inside one URL (in a password,
/// a path or a query) stays in it. Items are trimmed; empty ones are kept, for the caller
/// to report.
pub fn split_url_list(s: &str) -> Vec<&str> {
    let starts_url = |rest: &str| {
        let rest = rest.trim_start();
        let Some(end) = rest.find("://") else {
            return false;
        };
        let scheme = &rest[..end];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    let mut items = Vec::new();
    let mut from = 0;
    for (i, _) in s.match_indices(',') {
        let rest = &s[i + 1..];
        let next_empty = rest.trim().is_empty() || rest.trim_start().starts_with(',');
        if starts_url(rest) || next_empty || s[from..i].trim().is_empty() {
            items.push(s[from..i].trim());
            from = i + 1;
        }
    }
    items.push(s[from..].trim());
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_splits_only_where_the_next_url_starts() {
        assert_eq!(
            split_url_list("amqp://a:5681, amqp://b:5682,amqps://c"),
            ["amqp://a:5681", "amqp://b:5682", "amqps://c"]
        );
        // A comma in a password, a path or a query stays in its URL.
        assert_eq!(
            split_url_list("http://u:p,w@a:5984,http://b:5984/x?a=1,2"),
            ["http://u:p,w@a:5984", "http://b:5984/x?a=1,2"]
        );
        assert_eq!(split_url_list("amqp://a"), ["amqp://a"]);
        // Empty items are kept for the caller to report.
        assert_eq!(split_url_list("amqp://a,"), ["amqp://a", ""]);
        assert_eq!(split_url_list(",amqp://a"), ["", "amqp://a"]);
        assert_eq!(
            split_url_list("amqp://a,,amqp://b"),
            ["amqp://a", "", "amqp://b"]
        );
        assert_eq!(split_url_list(""), [""]);
    }

    #[test]
    fn a_list_displays_without_passwords() {
        let urls = SecretUrls::new(vec![
            SecretUrl::parse("amqp://guest:hunter2@a:5681").expect("url"),
            SecretUrl::parse("amqp://guest:hunter2@b:5682").expect("url"),
        ])
        .expect("list");
        assert_eq!(
            urls.to_string(),
            "amqp://guest:***@a:5681,amqp://guest:***@b:5682"
        );
        assert!(!format!("{urls:?}").contains("hunter2"));
        assert!(SecretUrls::new(Vec::new()).is_none());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s} {s:?}").contains("hunter2"));
        let u = SecretUrl::parse("amqp://guest:hunter2@127.0.0.1:5672/%2f").expect("url");
        assert_eq!(u.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{u:?}").contains("hunter2"));
        assert_eq!(u.expose().password(), Some("hunter2"));
    }
}
