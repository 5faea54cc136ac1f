//! `[couchdb]`: the database the server writes and the runner reads.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Table;

use super::{
    Problems, UrlList,
    effective::{insert_path, read_password},
    url_list_value, validate_urls,
};
use vogeler_proto::secret::{Secret, SecretUrls};

/// `[couchdb]` defaults, quoted by `--help` and the example configs.
pub mod defaults {
    pub const COUCHDB_URL: &str = "http://127.0.0.1:5984";
    pub const DATABASE: &str = "system_records";
}

/// Credentials for CouchDB's basic authentication.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCouch {
    /// The database server, or the nodes of a CouchDB cluster (tried in order, the next
    /// when one cannot be reached).
    pub url: Option<UrlList>,
    pub database: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (for systemd credentials or secret managers).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for `https://` (added to the system's).
    pub ca_file: Option<PathBuf>,
}

/// What the server and runner need to reach CouchDB.
#[derive(Debug, Clone)]
pub struct CouchSettings {
    /// Never empty.
    pub url: SecretUrls,
    pub database: String,
    pub credentials: Option<Credentials>,
    /// `couchdb.username` with `couchdb.password_file`: `credentials` once read at start-up.
    pub password_file: Option<(String, PathBuf)>,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

impl RawCouch {
    /// Validate into the database settings, with the top-level connect timeout.
    pub(super) fn settings(
        &self,
        connect_timeout: Duration,
        p: &mut Problems,
    ) -> Option<CouchSettings> {
        let c = self;
        let url = validate_urls(
            p,
            "couchdb.url",
            c.url.as_ref(),
            defaults::COUCHDB_URL,
            &["http", "https"],
        );
        let database = validate_database(p, c.database.as_deref());
        let mut credentials = None;
        let mut password_file = None;
        match (&c.username, &c.password, &c.password_file) {
            (_, Some(_), Some(_)) => {
                p.0.push("couchdb.password and couchdb.password_file: give one, not both".into())
            }
            (Some(u), Some(pw), None) => {
                credentials = Some(Credentials {
                    username: u.clone(),
                    password: pw.clone(),
                })
            }
            (Some(u), None, Some(file)) => password_file = Some((u.clone(), file.clone())),
            (None, None, None) => {}
            (Some(_), None, None) => p.0.push("couchdb.username is set but no password: set couchdb.password or couchdb.password_file (or VOGELER_COUCHDB__PASSWORD)".into()),
            (None, _, _) => {
                p.0.push("couchdb.password is set but no username: set couchdb.username".into())
            }
        }
        if let Some(u) = url.iter().flatten().find(|u| u.expose().scheme() == "http")
            && c.ca_file.is_some()
        {
            p.0.push(format!(
                "couchdb.ca_file is set but couchdb.url {u} is not TLS: use https://"
            ));
        }
        Some(CouchSettings {
            ca_file: c.ca_file.clone(),
            url: url?,
            database: database?,
            credentials,
            password_file,
            connect_timeout,
        })
    }
}

/// CouchDB's rule for database names.
fn validate_database(p: &mut Problems, raw: Option<&str>) -> Option<String> {
    let d = raw.unwrap_or(defaults::DATABASE);
    let mut chars = d.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_$()+-/".contains(c))
        && d.len() <= 238;
    if ok {
        Some(d.to_string())
    } else {
        p.0.push(format!(
            "couchdb.database: {d:?} is not a valid CouchDB database name (lowercase letter first, then a-z 0-9 _$()+-/)"
        ));
        None
    }
}

impl CouchSettings {
    pub(super) fn read_secrets(&mut self, problems: &mut Vec<String>) {
        if let Some((username, file)) = &self.password_file
            && let Some(password) = read_password(problems, "couchdb.password_file", file)
        {
            self.credentials = Some(Credentials {
                username: username.clone(),
                password,
            });
        }
    }

    pub(super) fn to_table(&self) -> Table {
        let mut c = Table::new();
        c.insert("url".into(), url_list_value(&self.url));
        c.insert("database".into(), self.database.clone().into());
        match (&self.credentials, &self.password_file) {
            (_, Some((user, file))) => {
                c.insert("username".into(), user.clone().into());
                insert_path(&mut c, "password_file", Some(file));
            }
            (Some(cred), None) => {
                c.insert("username".into(), cred.username.clone().into());
                c.insert("password".into(), "***".into());
            }
            (None, None) => {}
        }
        insert_path(&mut c, "ca_file", self.ca_file.as_deref());
        c
    }
}
