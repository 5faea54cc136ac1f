//! A small CouchDB client over reqwest.
//!
//! Why not couch_rs (0.13, weighed again against Apache CouchDB 3.4.3 for issue 14):
//! - the server decides between re-reading (409), retrying (5xx, unreachable) and stopping
//!   with a configuration error (401/403, 413) from the exact status of every request;
//!   couch_rs turns a whole-request 401 or 413 into a body decode error, and its bulk get
//!   drops missing and deleted rows instead of reporting them;
//! - design documents must go out as `/_design/{name}`: couch_rs escapes the slash, and
//!   CouchDB answers that with a 301 to its own idea of the URL (plain http behind a TLS
//!   proxy), which couch_rs follows; this client follows no redirects;
//! - operators give a base URL with a path (a proxy prefix), a CA file and a per-request
//!   timeout; couch_rs drops the path, builds its own HTTP client and rounds the timeout
//!   to whole seconds (10 s default);
//! - its default features pull in native-tls (OpenSSL), which the rest of Vogeler avoids.
//!
//! This client uses only the documented CouchDB 3.x HTTP API: `GET /`, `HEAD/PUT/DELETE
//! /{db}`, `GET /{db}`, `GET/PUT /{db}/{docid}`, `POST /{db}/_bulk_docs`, `GET/POST
//! /{db}/_all_docs` and `GET /{db}/_design/{ddoc}/_view/{view}`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use reqwest::RequestBuilder;
// In `CouchError::Status`, so callers and tests can name them.
pub use reqwest::{Method, StatusCode};
use serde::{Serialize, de::DeserializeOwned};
use tracing::warn;
use url::Url;

use vogeler_proto::secret::{Secret, SecretUrl, SecretUrls};

/// How long one HTTP request may take before it counts as a transient failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest view or `_find` answer read: the registry of 10,000 nodes is a few MiB,
/// and a `_find` page holds at most 500 documents' requested fields.
const MAX_ANSWER_BYTES: usize = 1 << 30;
/// Drop idle pooled connections before the server does: Node-based servers close idle
/// keep-alive connections after 5 s, and reusing one the server just closed fails the request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CouchError {
    #[error("database server at {url} is unreachable: {}", error_chain(source))]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path} on {url} failed with {status}: {reason}")]
    Status {
        method: Method,
        path: String,
        url: String,
        status: StatusCode,
        reason: String,
    },
    #[error("document {id:?} in {db:?} changed while we wrote it (conflict)")]
    Conflict { db: String, id: String },
    #[error("unexpected response to {path} from {url}: {reason}")]
    Protocol {
        path: String,
        url: String,
        reason: String,
    },
    #[error("unexpected response to {path} from {url}: {source}")]
    Decode {
        path: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// An error with its causes: reqwest's own message ("error sending request") hides the
/// reason (refused, TLS certificate, DNS) in its sources.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl CouchError {
    /// Worth retrying later with the same request: the server is down, overloaded or slow.
    pub fn is_transient(&self) -> bool {
        match self {
            CouchError::Unreachable { .. } => true,
            CouchError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            CouchError::Conflict { .. }
            | CouchError::Decode { .. }
            | CouchError::Protocol { .. } => false,
        }
    }

    /// A redirect or a 4xx (including every [`is_denied`](Self::is_denied)): the request
    /// itself is wrong (the URL, the account), so repeating it will not help.
    pub fn is_client_error(&self) -> bool {
        matches!(self, CouchError::Status { status, .. }
            if status.is_redirection() || status.is_client_error())
    }

    /// CouchDB refused this account (401: unknown user or wrong password; 403: not allowed
    /// here). Retrying will not help; the configuration must change.
    pub fn is_denied(&self) -> bool {
        matches!(self, CouchError::Status { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
    }

    /// No such database, document or view (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, CouchError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// Someone else wrote the document first: re-read, merge and write again. The client
    /// turns a 409 on a single-document write into [`CouchError::Conflict`]; a bare 409 status
    /// is one too.
    pub fn is_conflict(&self) -> bool {
        matches!(self, CouchError::Conflict { .. })
            || matches!(self, CouchError::Status { status, .. } if *status == StatusCode::CONFLICT)
    }
}

impl crate::exit::ExitStatus for CouchError {
    /// Down or overloaded: 69, worth a restart. The account or the URL refused: 78.
    fn exit_code(&self) -> u8 {
        if self.is_transient() {
            crate::exit::UNAVAILABLE
        } else if self.is_client_error() && !self.is_not_found() && !self.is_conflict() {
            crate::exit::CONFIG
        } else {
            crate::exit::FAILURE
        }
    }
}

/// The URL path segments of a document. Design and local documents live at
/// `/{db}/_design/{name}` and `/{db}/_local/{name}`: Apache CouchDB answers an escaped
/// `_design%2F{name}` with a redirect to its own idea of our URL (plain `http://` behind a TLS
/// proxy), so their prefix is a segment of its own. Any other `/` in an id is escaped.
fn doc_path<'a>(db: &'a str, id: &'a str) -> Vec<&'a str> {
    for prefix in ["_design", "_local"] {
        if let Some(name) = id.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) {
            return vec![db, prefix, name];
        }
    }
    vec![db, id]
}

pub use vogeler_config::Credentials;

/// A handle on one CouchDB server, or on the nodes of a CouchDB cluster (any node answers
/// for the whole cluster). Cheap to clone: clones share the connection pool and the node in
/// use.
#[derive(Debug, Clone)]
pub struct CouchClient {
    http: reqwest::Client,
    /// `couchdb.url`, never empty, without credentials.
    bases: Arc<[Url]>,
    /// The node requests go to: the first, until it cannot be reached.
    current: Arc<AtomicUsize>,
    credentials: Option<Credentials>,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    reason: String,
}

#[derive(serde::Deserialize)]
struct AllDocs {
    rows: Vec<AllDocsRow>,
}

#[derive(serde::Deserialize)]
struct AllDocsRow {
    id: String,
}

#[derive(serde::Deserialize)]
struct AllDocsDocs {
    rows: Vec<AllDocsDocRow>,
}

#[derive(serde::Deserialize)]
struct AllDocsDocRow {
    key: String,
    #[serde(default)]
    doc: Option<serde_json::Value>,
}

/// One document as [`CouchClient::get_many`] read it.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched<T> {
    /// No such document (or it was deleted).
    Missing,
    Found(T),
    /// The document exists but does not read as `T` (edited by hand, or written by a
    /// release with other limits): why. Writing over it would lose it, so callers leave it.
    Unreadable(String),
}

impl<T> Fetched<T> {
    /// The document, when it was read.
    pub fn found(self) -> Option<T> {
        match self {
            Fetched::Found(t) => Some(t),
            Fetched::Missing | Fetched::Unreadable(_) => None,
        }
    }

    pub fn as_found(&self) -> Option<&T> {
        match self {
            Fetched::Found(t) => Some(t),
            Fetched::Missing | Fetched::Unreadable(_) => None,
        }
    }
}

impl<T: DeserializeOwned> Fetched<T> {
    fn from_doc(doc: Option<serde_json::Value>) -> Self {
        match doc {
            None | Some(serde_json::Value::Null) => Fetched::Missing,
            Some(d) => match serde_json::from_value(d) {
                Ok(t) => Fetched::Found(t),
                Err(e) => Fetched::Unreadable(e.to_string()),
            },
        }
    }
}

/// One document's outcome in a `_bulk_docs` write.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct BulkResult {
    pub id: String,
    #[serde(default)]
    pub rev: Option<String>,
    /// `conflict`, `forbidden`, ... when this document was not written.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// One row of a view.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ViewRow {
    #[serde(default)]
    pub id: Option<String>,
    pub key: serde_json::Value,
    #[serde(default)]
    pub value: serde_json::Value,
    /// With `include_docs=true`.
    #[serde(default)]
    pub doc: Option<serde_json::Value>,
}

/// A page of `_find` results.
#[derive(Debug, serde::Deserialize)]
pub struct FindPage {
    pub docs: Vec<serde_json::Value>,
    /// Where the next page starts.
    #[serde(default)]
    pub bookmark: Option<String>,
}

#[derive(serde::Deserialize)]
struct ViewRows {
    rows: Vec<ViewRow>,
}

#[derive(serde::Deserialize)]
struct PutOk {
    rev: String,
}

impl CouchClient {
    /// Credentials embedded in the URL (`http://user:pass@host`) are used when none are given.
    pub fn new(url: &SecretUrl, credentials: Option<Credentials>) -> Result<Self, reqwest::Error> {
        Self::with_ca(&url.clone().into(), credentials, None)
    }

    /// A client for the configured server: its credentials and, for `https://`, its CA file.
    pub fn from_settings(settings: &vogeler_config::CouchSettings) -> Result<Self, String> {
        let ca = match &settings.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read couchdb.ca_file {}: {e}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| format!("couchdb.ca_file {} is not PEM: {e}", path.display()))?;
                Some(certs)
            }
            None => None,
        };
        Self::with_ca(&settings.url, settings.credentials.clone(), ca)
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// A client for the nodes in `urls` (tried in order), also trusting `ca` (on top of the
    /// system's CAs). Host names are always verified. Credentials come from the first URL
    /// that carries some, when none are given.
    pub fn with_ca(
        urls: &SecretUrls,
        credentials: Option<Credentials>,
        ca: Option<Vec<reqwest::Certificate>>,
    ) -> Result<Self, reqwest::Error> {
        let mut from_url = None;
        let bases: Vec<Url> = urls
            .iter()
            .map(|url| {
                let mut base = url.expose().clone();
                if from_url.is_none() && !base.username().is_empty() {
                    from_url = Some(Credentials {
                        username: base.username().to_string(),
                        password: Secret::new(base.password().unwrap_or_default()),
                    });
                }
                let _ = base.set_username("");
                let _ = base.set_password(None);
                base
            })
            .collect();
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            // The database never needs to send us elsewhere; following a redirect could carry
            // our credentials to another origin or downgrade https to http.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT);
        for cert in ca.into_iter().flatten() {
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build()?;
        Ok(Self {
            http,
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            credentials: credentials.or(from_url),
        })
    }

    /// The base URL of the node in use, without credentials.
    pub fn url(&self) -> &str {
        self.bases[self.node()].as_str()
    }

    fn node(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.bases.len()
    }

    fn endpoint(&self, node: usize, segments: &[&str]) -> Url {
        let mut u = self.bases[node].clone();
        if let Ok(mut path) = u.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        // CouchDB reads a raw `+` in a path as a space (`PUT /a+b` creates "a b"), and `+` is
        // legal in database names and ids; every literal `%` is already `%25` here.
        if u.path().contains('+') {
            let path = u.path().replace('+', "%2B");
            u.set_path(&path);
        }
        u
    }

    fn request(&self, node: usize, method: Method, segments: &[&str]) -> RequestBuilder {
        let req = self.http.request(method, self.endpoint(node, segments));
        match &self.credentials {
            Some(c) => req.basic_auth(&c.username, Some(c.password.expose())),
            None => req,
        }
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&[u8]>,
    ) -> Result<reqwest::Response, CouchError> {
        self.send_query(method, segments, &[], body).await
    }

    /// Send to the node in use; when it cannot be reached, to the next nodes in turn, and
    /// keep using the one that answered. Every request we send is safe to repeat: a repeated
    /// write comes back as a conflict, which callers already handle.
    async fn send_query(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<reqwest::Response, CouchError> {
        let n = self.bases.len();
        let first = self.node();
        for k in 0..n {
            let node = (first + k) % n;
            let attempt = || {
                let mut req = self.request(node, method.clone(), segments).query(query);
                if let Some(b) = body {
                    req = req
                        .header("content-type", "application/json")
                        .body(b.to_vec());
                }
                req.send()
            };
            let sent = match attempt().await {
                Ok(r) => Ok(r),
                // One immediate retry on a fresh connection covers a pooled connection the
                // server closed at the moment we reused it.
                Err(e) if !e.is_timeout() => attempt().await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(r) => {
                    if node != first
                        && self
                            .current
                            .compare_exchange(first, node, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        warn!(from = %self.bases[first], to = %self.bases[node], "database node unreachable; using the next one in couchdb.url");
                    }
                    return Ok(r);
                }
                // A slow node is not a lost one, and another node coordinating the same
                // shards would be as slow: the request fails (callers retry), and the next
                // request goes to the next node, so a node that hangs is left too.
                Err(e) if e.is_timeout() => {
                    if n > 1 {
                        let _ = self.current.compare_exchange(
                            first,
                            (node + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    return Err(CouchError::Unreachable {
                        url: self.bases[node].to_string(),
                        source: e,
                    });
                }
                Err(e) if k + 1 < n => {
                    warn!(url = %self.bases[node], error = %error_chain(&e), "cannot reach database node; trying the next one in couchdb.url");
                }
                Err(e) => return Err(self.unreachable(node, e)),
            }
        }
        unreachable!("couchdb.url is never an empty list")
    }

    /// The node that failed last, with how many others failed before it.
    fn unreachable(&self, node: usize, source: reqwest::Error) -> CouchError {
        let url = match self.bases.len() {
            1 => self.bases[node].to_string(),
            n => format!(
                "{} (and the {} other nodes in couchdb.url)",
                self.bases[node],
                n - 1
            ),
        };
        CouchError::Unreachable { url, source }
    }

    async fn error(
        &self,
        method: Method,
        segments: &[&str],
        resp: reqwest::Response,
    ) -> CouchError {
        let status = resp.status();
        let body: ErrorBody = resp.json().await.unwrap_or(ErrorBody {
            error: String::new(),
            reason: String::new(),
        });
        let reason = match (body.error.is_empty(), body.reason.is_empty()) {
            (true, true) => status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_string(),
            (false, true) => body.error,
            (_, false) => format!("{} ({})", body.reason, body.error),
        };
        let reason = if status == StatusCode::UNAUTHORIZED {
            let who = match &self.credentials {
                Some(c) => format!("as {:?}", c.username),
                None => "without credentials".to_string(),
            };
            format!(
                "{reason}; logged in {who}: set couchdb.username with couchdb.password_file (or \
                 VOGELER_COUCHDB__USERNAME and VOGELER_COUCHDB__PASSWORD_FILE) to an account \
                 deploy/couchdb/setup.sh created"
            )
        } else {
            reason
        };
        CouchError::Status {
            method,
            path: format!("/{}", segments.join("/")),
            url: self.url().to_string(),
            status,
            reason,
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        resp: reqwest::Response,
    ) -> Result<T, CouchError> {
        resp.json().await.map_err(|source| CouchError::Decode {
            path: format!("/{}", segments.join("/")),
            url: self.url().to_string(),
            source,
        })
    }

    /// [`CouchClient::json`] for answers whose size the nodes decide (view rows, `_find`
    /// pages): read up to [`MAX_ANSWER_BYTES`], so a database holding something hostile
    /// fails the question with a reason instead of exhausting the reader's memory.
    async fn json_bounded<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        mut resp: reqwest::Response,
    ) -> Result<T, CouchError> {
        let path = || format!("/{}", segments.join("/"));
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|source| CouchError::Decode {
            path: path(),
            url: self.url().to_string(),
            source,
        })? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CouchError::Protocol {
                    path: path(),
                    url: self.url().to_string(),
                    reason: format!(
                        "the answer is over {} MiB, more than any question reads; check the database's views and documents (a node storing huge values?)",
                        MAX_ANSWER_BYTES >> 20
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| CouchError::Protocol {
            path: path(),
            url: self.url().to_string(),
            reason: format!("not the JSON CouchDB answers with: {e}"),
        })
    }

    async fn bytes(
        &self,
        segments: &[&str],
        resp: reqwest::Response,
    ) -> Result<bytes::Bytes, CouchError> {
        resp.bytes().await.map_err(|source| CouchError::Decode {
            path: format!("/{}", segments.join("/")),
            url: self.url().to_string(),
            source,
        })
    }

    /// `GET /`: is the server there and answering?
    pub async fn ping(&self) -> Result<(), CouchError> {
        self.welcome().await.map(|_| ())
    }

    /// `GET /`, the server's welcome: `{"couchdb":"Welcome","version":"3.4.3",...}` on
    /// Apache CouchDB. Benchmarks record it so every number says what it was measured on.
    pub async fn welcome(&self) -> Result<serde_json::Value, CouchError> {
        let resp = self.send(Method::GET, &[], None).await?;
        if !resp.status().is_success() {
            return Err(self.error(Method::GET, &[], resp).await);
        }
        self.json::<serde_json::Value>(&[], resp).await
    }

    /// Create `db` unless it exists. Returns whether it was created.
    ///
    /// Looks first (`HEAD /{db}`, which a database member may do) and creates only a missing
    /// database: Apache CouchDB answers `PUT /{db}` with 401 for anyone but a server admin,
    /// even when the database exists, and the server runs with a member account.
    pub async fn ensure_database(&self, db: &str) -> Result<bool, CouchError> {
        let resp = self.send(Method::HEAD, &[db], None).await?;
        match resp.status() {
            s if s.is_success() => return Ok(false),
            StatusCode::NOT_FOUND => {}
            _ => return Err(self.error(Method::HEAD, &[db], resp).await),
        }
        let resp = self.send(Method::PUT, &[db], None).await?;
        match resp.status() {
            StatusCode::CREATED | StatusCode::ACCEPTED => Ok(true),
            // Created by someone else since we looked.
            StatusCode::PRECONDITION_FAILED => Ok(false),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(CouchError::Status {
                method: Method::PUT,
                path: format!("/{db}"),
                url: self.url().to_string(),
                status: resp.status(),
                reason: format!(
                    "database {db:?} does not exist and this account may not create it: \
                     create it with deploy/couchdb/setup.sh (or as a CouchDB server admin)"
                ),
            }),
            _ => Err(self.error(Method::PUT, &[db], resp).await),
        }
    }

    /// Delete `db`; a missing database is not an error.
    pub async fn delete_database(&self, db: &str) -> Result<(), CouchError> {
        let resp = self.send(Method::DELETE, &[db], None).await?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.error(Method::DELETE, &[db], resp).await),
        }
    }

    /// Read a document; `None` when it (or the database) does not exist.
    pub async fn get<T: DeserializeOwned>(
        &self,
        db: &str,
        id: &str,
    ) -> Result<Option<T>, CouchError> {
        let path = doc_path(db, id);
        let resp = self.send(Method::GET, &path, None).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => self.json(&path, resp).await.map(Some),
            _ => Err(self.error(Method::GET, &path, resp).await),
        }
    }

    /// Write a document (its `_rev` in the body decides create versus update) and return the
    /// new revision. A stale `_rev` gives [`CouchError::Conflict`].
    pub async fn put<T: Serialize>(
        &self,
        db: &str,
        id: &str,
        doc: &T,
    ) -> Result<String, CouchError> {
        let body = serde_json::to_vec(doc).unwrap_or_else(|e| unreachable!("document encode: {e}"));
        let path = doc_path(db, id);
        let resp = self.send(Method::PUT, &path, Some(&body)).await?;
        match resp.status() {
            StatusCode::CONFLICT => Err(CouchError::Conflict {
                db: db.into(),
                id: id.into(),
            }),
            s if s.is_success() => Ok(self.json::<PutOk>(&path, resp).await?.rev),
            _ => Err(self.error(Method::PUT, &path, resp).await),
        }
    }

    /// Documents by id in one request (`POST /{db}/_all_docs?include_docs=true`), in the
    /// order asked; missing and deleted documents are `None`.
    pub async fn get_many<T: DeserializeOwned>(
        &self,
        db: &str,
        ids: &[&str],
    ) -> Result<Vec<(String, Fetched<T>)>, CouchError> {
        let path = [db, "_all_docs"];
        let body = serde_json::json!({ "keys": ids }).to_string();
        let query = [("include_docs", "true".to_string())];
        let resp = self
            .send_query(Method::POST, &path, &query, Some(body.as_bytes()))
            .await?;
        if !resp.status().is_success() {
            return Err(self.error(Method::POST, &path, resp).await);
        }
        let bytes = self.bytes(&path, resp).await?;
        if let Ok(rows) = serde_json::from_slice::<AllDocsDocs>(&bytes) {
            return Ok(rows
                .rows
                .into_iter()
                .map(|r| (r.key, Fetched::from_doc(r.doc)))
                .collect());
        }
        // One document the whole answer cannot hold (nested deeper than a reader goes, say)
        // must not make every other one unreadable: read them one by one, so only that one
        // is [`Fetched::Unreadable`].
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push((id.to_string(), self.fetch(db, id).await?));
        }
        Ok(out)
    }

    /// Read one document as [`Fetched`]: missing, read, or there but unreadable (and why).
    pub async fn fetch<T: DeserializeOwned>(
        &self,
        db: &str,
        id: &str,
    ) -> Result<Fetched<T>, CouchError> {
        let path = doc_path(db, id);
        let resp = self.send(Method::GET, &path, None).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(Fetched::Missing),
            s if s.is_success() => {
                let bytes = self.bytes(&path, resp).await?;
                Ok(match serde_json::from_slice(&bytes) {
                    Ok(doc) => Fetched::Found(doc),
                    Err(e) => Fetched::Unreadable(e.to_string()),
                })
            }
            _ => Err(self.error(Method::GET, &path, resp).await),
        }
    }

    /// Write many documents in one request (`POST /{db}/_bulk_docs`). The request succeeds as
    /// a whole; each document's own result (new revision, or an error such as `conflict`)
    /// must be checked.
    pub async fn bulk_docs<T: Serialize>(
        &self,
        db: &str,
        docs: &[T],
    ) -> Result<Vec<BulkResult>, CouchError> {
        let path = [db, "_bulk_docs"];
        // Serialized straight from the documents: going through a `Value` would copy them.
        #[derive(Serialize)]
        struct Bulk<'a, T> {
            docs: &'a [T],
        }
        let body = serde_json::to_vec(&Bulk { docs })
            .unwrap_or_else(|e| unreachable!("document encode: {e}"));
        let resp = self.send(Method::POST, &path, Some(&body)).await?;
        if !resp.status().is_success() {
            return Err(self.error(Method::POST, &path, resp).await);
        }
        self.json(&path, resp).await
    }

    /// Query a view (`GET /{db}/_design/{ddoc}/_view/{view}`). Values in `params` are sent
    /// as given: JSON-encode keys (`key`, `startkey`, `endkey`) first.
    pub async fn view(
        &self,
        db: &str,
        ddoc: &str,
        view: &str,
        params: &[(&str, String)],
    ) -> Result<Vec<ViewRow>, CouchError> {
        let path = [db, "_design", ddoc, "_view", view];
        let resp = self.send_query(Method::GET, &path, params, None).await?;
        if !resp.status().is_success() {
            return Err(self.error(Method::GET, &path, resp).await);
        }
        let rows: ViewRows = self.json_bounded(&path, resp).await?;
        Ok(rows.rows)
    }

    /// One page of a Mango query (`POST /{db}/_find`): `body` holds the selector, fields,
    /// limit and bookmark.
    pub async fn find(&self, db: &str, body: &serde_json::Value) -> Result<FindPage, CouchError> {
        let path = [db, "_find"];
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        let resp = self
            .send_query(Method::POST, &path, &[], Some(&bytes))
            .await?;
        if !resp.status().is_success() {
            return Err(self.error(Method::POST, &path, resp).await);
        }
        self.json_bounded(&path, resp).await
    }

    /// The number of documents in `db` (`GET /{db}`), design documents included.
    pub async fn doc_count(&self, db: &str) -> Result<u64, CouchError> {
        #[derive(serde::Deserialize)]
        struct Info {
            doc_count: u64,
        }
        let resp = self.send(Method::GET, &[db], None).await?;
        if !resp.status().is_success() {
            return Err(self.error(Method::GET, &[db], resp).await);
        }
        Ok(self.json::<Info>(&[db], resp).await?.doc_count)
    }

    /// A database's information (`GET /{db}`): `doc_count`, `update_seq`, `sizes`, ...
    pub async fn database_info(&self, db: &str) -> Result<serde_json::Value, CouchError> {
        let resp = self.send(Method::GET, &[db], None).await?;
        if !resp.status().is_success() {
            return Err(self.error(Method::GET, &[db], resp).await);
        }
        self.json::<serde_json::Value>(&[db], resp).await
    }

    /// Ids of every non-design document; `None` when the database does not exist.
    pub async fn all_ids(&self, db: &str) -> Result<Option<Vec<String>>, CouchError> {
        let path = [db, "_all_docs"];
        let resp = self.send(Method::GET, &path, None).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let docs: AllDocs = self.json(&path, resp).await?;
                Ok(Some(
                    docs.rows
                        .into_iter()
                        .map(|r| r.id)
                        .filter(|id| !id.starts_with("_design/"))
                        .collect(),
                ))
            }
            _ => Err(self.error(Method::GET, &path, resp).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_escape_ids_and_drop_url_credentials() {
        let url = SecretUrl::parse("http://admin:pw@127.0.0.1:5984/").expect("url");
        let c = CouchClient::new(&url, None).expect("client");
        assert_eq!(c.url(), "http://127.0.0.1:5984/");
        assert_eq!(
            c.credentials.as_ref().map(|c| c.username.as_str()),
            Some("admin")
        );
        assert_eq!(
            c.endpoint(0, &["db", "a/b c"]).as_str(),
            "http://127.0.0.1:5984/db/a%2Fb%20c"
        );
        assert_eq!(
            c.endpoint(0, &doc_path("db", "_design/vogeler")).as_str(),
            "http://127.0.0.1:5984/db/_design/vogeler"
        );
        assert_eq!(
            c.endpoint(0, &doc_path("db", "_local/x/y")).as_str(),
            "http://127.0.0.1:5984/db/_local/x%2Fy"
        );
        assert_eq!(
            c.endpoint(0, &["a+b", "c+%"]).as_str(),
            "http://127.0.0.1:5984/a%2Bb/c%2B%25"
        );
        assert_eq!(
            c.endpoint(0, &doc_path("db", "_designer/x")).as_str(),
            "http://127.0.0.1:5984/db/_designer%2Fx"
        );
        let prefixed = SecretUrl::parse("http://h:5984/couch/").expect("url");
        let c = CouchClient::new(&prefixed, None).expect("client");
        assert_eq!(
            c.endpoint(0, &["db", "_all_docs"]).as_str(),
            "http://h:5984/couch/db/_all_docs"
        );
    }
}
