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

#[cfg(test)]
mod tests {
    use super::*;

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
