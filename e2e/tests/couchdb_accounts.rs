//! `deploy/couchdb/setup.sh` applied to Apache CouchDB (a database pair and two accounts of
//! this test's own, removed afterwards): vogeler-server stores results as `<prefix>-server`,
//! vogeler-runner reads as `<prefix>-runner`, and `_security` with the read-only design
//! document refuses the reader every write and anonymous requests everything. The script runs
//! twice (it is idempotent) under a `curl` shim that records every argv, which must hold no
//! password. Run with `--nocapture` to see the status lines CouchDB answered.

use std::{
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use vogeler_core::couch::CouchClient;
use vogeler_e2e::{
    HELLO, TestStack, plugin_dir,
    programs::{bare, program, run},
};
use vogeler_proto::secret::SecretUrl;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/couchdb/setup.sh")
}

/// `%XX` escapes decoded: the test URL's user and password are percent-encoded.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("UTF-8 credentials")
}

/// A file only its owner may read, as a password file must be.
fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create private file");
    f.write_all(text.as_bytes()).expect("write private file");
}

/// The first `curl` on `PATH`, which the shim hands every call to.
fn real_curl() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("curl"))
        .find(|p| p.is_file())
        .expect("curl is not on PATH; deploy/couchdb/setup.sh needs it")
}

/// The accounts and databases of one test, and what the script needs to run: the admin's
/// password file and a `curl` shim that logs each argv. The `_users` documents go when
/// dropped; the databases are the [`TestStack`]'s, which deletes them.
struct Accounts {
    /// CouchDB without credentials: what the programs are given, with an account's.
    url: String,
    /// The test URL, with the admin's credentials: for cleaning up.
    admin_url: String,
    admin: (String, String),
    database: String,
    prefix: String,
    secrets: tempfile::TempDir,
    /// The admin's password file, the shim (`bin/curl`), its log and the server's log.
    work: tempfile::TempDir,
    /// Databases a probe might have created, deleted when dropped.
    probes: Vec<String>,
}

impl Accounts {
    fn new(stack: &TestStack) -> Self {
        let parsed = url::Url::parse(&stack.couch_first()).expect("test CouchDB URL");
        let admin = (
            percent_decoded(parsed.username()),
            percent_decoded(parsed.password().unwrap_or_default()),
        );
        assert!(
            !admin.0.is_empty(),
            "VOGELER_TEST_COUCHDB_URL has no admin credentials: eval \"$(scripts/stack.sh env)\""
        );
        let id = uuid::Uuid::new_v4().simple().to_string();
        let work = tempfile::tempdir().expect("work dir");
        write_private(&work.path().join("admin.password"), &admin.1);
        std::fs::create_dir(work.path().join("bin")).expect("shim dir");
        let shim = work.path().join("bin/curl");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{}'\nexec '{}' \"$@\"\n",
                work.path().join("argv.log").display(),
                real_curl().display()
            ),
        )
        .expect("write curl shim");
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self {
            url: format!(
                "{}://{}:{}",
                parsed.scheme(),
                parsed.host_str().expect("host"),
                parsed.port_or_known_default().expect("port")
            ),
            admin_url: stack.couch_first(),
            admin,
            database: stack.database.clone(),
            prefix: format!("vt-{}", &id[..10]),
            secrets: tempfile::tempdir().expect("secrets dir"),
            work,
            probes: vec![],
        }
    }

    /// Run `deploy/couchdb/setup.sh` with the shim first on `PATH`.
    async fn apply(&self) -> Output {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.work.path().join("bin")];
        dirs.extend(std::env::split_paths(&path));
        let mut cmd = Command::new(script());
        cmd.args([
            "--url",
            &self.url,
            "--admin",
            &self.admin.0,
            "--database",
            &self.database,
            "--user-prefix",
            &self.prefix,
        ])
        .arg("--secrets-dir")
        .arg(self.secrets.path())
        .env("PATH", std::env::join_paths(dirs).expect("PATH"))
        .env(
            "COUCHDB_ADMIN_PASSWORD_FILE",
            self.work.path().join("admin.password"),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("setup.sh finished within 60 s")
            .expect("run deploy/couchdb/setup.sh");
        assert!(
            out.status.success(),
            "setup.sh failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn user(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn password_file(&self, role: &str) -> PathBuf {
        self.secrets.path().join(format!("couchdb-{role}.password"))
    }

    fn password(&self, role: &str) -> String {
        std::fs::read_to_string(self.password_file(role))
            .expect("password file")
            .trim_end()
            .to_string()
    }

    /// Every argv the script gave curl, one per line.
    fn curl_argv(&self) -> String {
        std::fs::read_to_string(self.work.path().join("argv.log")).unwrap_or_default()
    }

    /// A program pointed at this database as `<prefix>-<role>`, the way the docs say:
    /// `couchdb.username` and `couchdb.password_file`, from the environment.
    fn as_role(&self, mut cmd: Command, role: &str) -> Command {
        cmd.args(["--couchdb-url", &self.url, "--database", &self.database])
            .env("VOGELER_COUCHDB__USERNAME", self.user(role))
            .env("VOGELER_COUCHDB__PASSWORD_FILE", self.password_file(role));
        cmd
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        // As TestStack's drop: a runtime of its own on its own thread.
        let admin = self.admin_url.clone();
        let users: Vec<String> = ["server", "runner"]
            .iter()
            .map(|r| format!("org.couchdb.user:{}", self.user(r)))
            .collect();
        let probes = std::mem::take(&mut self.probes);
        let _ = std::thread::spawn(move || {
            let (Ok(rt), Ok(url)) = (
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
                SecretUrl::parse(&admin),
            ) else {
                return;
            };
            let Ok(couch) = CouchClient::new(&url, None) else {
                return;
            };
            rt.block_on(async {
                for id in &users {
                    if let Ok(Some(doc)) = couch.get::<Value>("_users", id).await {
                        let gone = json!({ "_rev": doc["_rev"], "_deleted": true });
                        let _ = couch.put("_users", id, &gone).await;
                    }
                }
                for db in &probes {
                    let _ = couch.delete_database(db).await;
                }
            });
        })
        .join();
    }
}

/// Raw HTTP to CouchDB as one account (or none), for what the programs never try.
struct Http {
    client: reqwest::Client,
    url: String,
}

impl Http {
    /// The status and body of one request; prints its status line as `who METHOD path -> ...`.
    async fn call(
        &self,
        who: Option<(&str, &str)>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, String) {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some((user, pw)) = who {
            req = req.basic_auth(user, Some(pw));
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("CouchDB answers");
        let (version, status) = (resp.version(), resp.status());
        let text = resp.text().await.unwrap_or_default();
        println!(
            "{:<9} {method} {path} -> {version:?} {status}  {}",
            who.map_or("anonymous", |(u, _)| {
                if u.ends_with("-runner") {
                    "reader"
                } else {
                    "writer"
                }
            }),
            text.trim().replace('\n', "")
        );
        (status, text)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Poll `check` until it holds, failing at once (with the server's log) if the server exits
/// and after `limit` otherwise.
async fn wait_with_server<F, Fut>(
    what: &str,
    limit: Duration,
    server: &mut Child,
    accounts: &Accounts,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if let Some(status) = server.try_wait().expect("server status") {
            panic!(
                "vogeler-server exited ({status}) while waiting for {what}; its log:\n{}",
                accounts.server_log()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for {what}; server log:\n{}",
                accounts.server_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The revision number of a `_users` document.
async fn user_rev(stack: &TestStack, name: &str) -> u64 {
    let user: Value = stack
        .couch
        .get("_users", &format!("org.couchdb.user:{name}"))
        .await
        .expect("read _users")
        .unwrap_or_else(|| panic!("no _users document for {name}"));
    user["_rev"]
        .as_str()
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("revision of {user}"))
}

#[tokio::test]
async fn setup_script_gives_each_account_exactly_its_rights() {
    let stack = TestStack::new().await;
    let mut accounts = Accounts::new(&stack);
    let first = accounts.apply().await;
    println!(
        "setup.sh (first run): {}{}",
        String::from_utf8_lossy(&first.stderr),
        String::from_utf8_lossy(&first.stdout)
    );
    for role in ["server", "runner"] {
        let mode = std::fs::metadata(accounts.password_file(role))
            .expect("password file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "couchdb-{role}.password");
    }
    let user_revs = [
        user_rev(&stack, &accounts.user("server")).await,
        user_rev(&stack, &accounts.user("runner")).await,
    ];
    let db = accounts.database.clone();
    let history = format!("{db}_history");
    let http = Http {
        client: reqwest::Client::new(),
        url: accounts.url.clone(),
    };
    let (writer_pw, reader_pw) = (accounts.password("server"), accounts.password("runner"));
    let writer_name = accounts.user("server");
    let reader_name = accounts.user("runner");
    let writer = Some((writer_name.as_str(), writer_pw.as_str()));
    let reader = Some((reader_name.as_str(), reader_pw.as_str()));

    // The writer is no server admin: it could not have created a database, so a server that
    // starts below runs on what the script set up.
    let probe = format!("{db}_probe");
    accounts.probes.push(probe.clone());
    let (status, _) = http
        .call(writer, Method::PUT, &format!("/{probe}"), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "writer creating a database"
    );

    // The server stores with the writer account, the runner asks with the reader's.
    let log = std::fs::File::create(accounts.work.path().join("server.log")).expect("log");
    let mut server = accounts
        .as_role(program("vogeler-server", &stack), "server")
        .stderr(Stdio::from(log))
        .spawn()
        .expect("server");
    let plugins = plugin_dir(&[("hello.toml", HELLO)]);
    let node = "acct-web01";
    let mut agent = program("vogeler-agent", &stack);
    agent
        .args(["--node", node, "--plugin-dir"])
        .arg(plugins.path())
        .stderr(Stdio::null());
    let _agent = agent.spawn().expect("agent");
    wait_with_server(
        "the agent registered",
        Duration::from_secs(30),
        &mut server,
        &accounts,
        || async { stack.document(node).await.is_some() },
    )
    .await;

    let mut ask = accounts.as_role(program("vogeler-runner", &stack), "runner");
    ask.args(["-c", "hello", "-n", "all", "--timeout", "10"]);
    let out = run(ask).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "runner as reader: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1/1 nodes answered"),
        "{}",
        text(&out)
    );
    wait_with_server(
        "the result stored",
        Duration::from_secs(20),
        &mut server,
        &accounts,
        || async {
            stack
                .document(node)
                .await
                .is_some_and(|d| d.meta.plugins.contains_key("hello"))
        },
    )
    .await;
    let stored: Value = stack
        .couch
        .get(&db, node)
        .await
        .expect("read")
        .expect("node document");
    assert_eq!(stored["hello"], json!(["alpha", "beta"]), "{stored:#}");
    assert!(
        stack.document(node).await.expect("doc").meta.key.is_some(),
        "the server pinned the node's key"
    );

    // The reader's inventory commands: listing, reading a value, and questions over stored
    // values, which need nothing but reads (views, their reduce, `_find`).
    for (args, needle) in [
        (&["nodes"][..], node),
        (&["show", node, "hello"][..], "alpha"),
        (&["query", "hello has alpha", "-o", "jsonl"][..], node),
        (&["count", "os.family"][..], "1 value(s) over 1 node(s)"),
    ] {
        let mut cmd = accounts.as_role(bare("vogeler-runner"), "runner");
        cmd.args(args);
        let out = run(cmd).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} as reader: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(needle),
            "{args:?}: {}",
            text(&out)
        );
    }

    // What the reader may and may not do, by hand.
    println!("--- status lines from Apache CouchDB ---");
    let (status, _) = http
        .call(reader, Method::GET, &format!("/{db}/_all_docs"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "reader listing documents");
    let (status, _) = http
        .call(reader, Method::GET, &format!("/{history}/_all_docs"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "reader listing history");
    let (status, body) = http
        .call(
            reader,
            Method::PUT,
            &format!("/{db}/probe"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "reader writing a document");
    assert!(body.contains("read-only"), "{body}");
    let (status, _) = http
        .call(
            reader,
            Method::PUT,
            &format!("/{history}/probe"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "reader writing history");
    let mut doc = stored.clone();
    doc["hello"] = json!(["forged"]);
    let (status, _) = http
        .call(reader, Method::PUT, &format!("/{db}/{node}"), Some(doc))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "reader changing a node");
    let (status, body) = http
        .call(
            reader,
            Method::POST,
            &format!("/{db}/_bulk_docs"),
            Some(json!({ "docs": [{ "_id": "probe-bulk" }] })),
        )
        .await;
    assert!(
        body.contains("forbidden"),
        "reader writing through _bulk_docs: {status} {body}"
    );
    // Removing the guard itself: the read-only design document, at its current revision.
    let ddoc: Value = stack
        .couch
        .get(&db, "_design/readonly")
        .await
        .expect("read")
        .expect("_design/readonly");
    let (status, _) = http
        .call(
            reader,
            Method::PUT,
            &format!("/{db}/_design/readonly"),
            Some(json!({ "_rev": ddoc["_rev"], "validate_doc_update": "function() {}" })),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "reader changing a design doc"
    );
    let (status, _) = http
        .call(
            reader,
            Method::PUT,
            &format!("/{db}/_design/evil"),
            Some(json!({ "views": {} })),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "reader adding a design doc");
    // CouchDB 3.4 answers a member's _security write with 500 no_majority (every shard
    // refused it as forbidden): what matters is that it is refused and nothing changed.
    let open = json!({ "admins": { "names": [reader_name], "roles": [] }, "members": {} });
    let (status, _) = http
        .call(reader, Method::PUT, &format!("/{db}/_security"), Some(open))
        .await;
    assert!(!status.is_success(), "reader changing _security: {status}");
    let security: Value = stack
        .couch
        .get(&db, "_security")
        .await
        .expect("read")
        .expect("_security");
    let want = json!({
        "admins": { "names": [], "roles": ["vogeler-writer"] },
        "members": { "names": [], "roles": ["vogeler-reader", "vogeler-writer"] },
    });
    assert_eq!(security, want, "_security after the reader's attempt");
    let (status, _) = http
        .call(reader, Method::DELETE, &format!("/{db}"), None)
        .await;
    assert!(
        !status.is_success(),
        "reader deleting the database: {status}"
    );
    assert_eq!(
        stack
            .couch
            .all_ids(&db)
            .await
            .expect("list")
            .map(|ids| ids.len()),
        Some(1),
        "only the node's document, nothing the reader wrote"
    );

    // Anonymous requests get nothing.
    for (method, path) in [
        (Method::GET, format!("/{db}/_all_docs")),
        (Method::GET, format!("/{db}/{node}")),
        (Method::GET, format!("/{history}/_all_docs")),
        (Method::PUT, format!("/{db}/probe")),
    ] {
        let body = (method == Method::PUT).then(|| json!({}));
        let (status, _) = http.call(None, method, &path, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "anonymous {path}");
    }

    // Idempotent: a second run keeps the passwords, updates the users (at their current
    // revisions) and leaves the stored documents and _security as they are.
    let second = accounts.apply().await;
    println!(
        "setup.sh (second run): {}{}",
        String::from_utf8_lossy(&second.stderr),
        String::from_utf8_lossy(&second.stdout)
    );
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("generated"),
        "the second run kept the password files"
    );
    assert_eq!(accounts.password("server"), writer_pw);
    assert_eq!(accounts.password("runner"), reader_pw);
    for (role, before) in ["server", "runner"].into_iter().zip(&user_revs) {
        let after = user_rev(&stack, &accounts.user(role)).await;
        assert!(after > *before, "{role} user updated at its revision");
    }
    let security: Value = stack
        .couch
        .get(&history, "_security")
        .await
        .expect("read")
        .expect("_security");
    assert_eq!(security, want, "history _security after the second run");
    let kept: Value = stack
        .couch
        .get(&db, node)
        .await
        .expect("read")
        .expect("the second run left the node's document");
    assert_eq!(kept["hello"], stored["hello"], "{kept:#}");

    // `nodes forget` writes, so it needs the server's account, as docs/security.md says;
    // the reader is refused.
    let mut forget = accounts.as_role(bare("vogeler-runner"), "runner");
    forget.args(["nodes", "forget", node]);
    let out = run(forget).await;
    // A refused account is a configuration problem (EX_CONFIG), not a passing fault.
    assert_eq!(
        out.status.code(),
        Some(78),
        "forget as reader: {}",
        text(&out)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("403") && said.contains("the server's CouchDB account"),
        "{}",
        text(&out)
    );
    println!(
        "reader: vogeler-runner nodes forget {node} -> {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(stack.document(node).await.expect("doc").meta.key.is_some());

    // An account CouchDB does not know (a typo in couchdb.username, a password file from
    // another install): both programs stop with EX_CONFIG and say which account and how to fix
    // it. An unknown name, so CouchDB's lockout after repeated failures hits no real account.
    let wrong = accounts.work.path().join("wrong.password");
    write_private(&wrong, "not-the-password");
    for (program_name, args) in [
        ("vogeler-runner", vec!["nodes"]),
        ("vogeler-server", vec!["--http-listen", "127.0.0.1:0"]),
    ] {
        let mut cmd = accounts.as_role(program(program_name, &stack), "nobody");
        cmd.args(&args)
            .env("VOGELER_COUCHDB__PASSWORD_FILE", &wrong);
        let out = run(cmd).await;
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{program_name}: {}",
            text(&out)
        );
        assert!(
            said.contains("401")
                && said.contains(&format!("logged in as \"{}\"", accounts.user("nobody")))
                && said.contains("deploy/couchdb/setup.sh"),
            "{program_name}: {}",
            text(&out)
        );
        assert!(!said.contains("not-the-password"), "{}", text(&out));
        println!("unknown account: {program_name} -> {}", said.trim());
    }

    let mut forget = accounts.as_role(bare("vogeler-runner"), "server");
    forget.args(["nodes", "forget", node]);
    let out = run(forget).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "forget as writer: {}",
        text(&out)
    );
    println!(
        "writer: vogeler-runner nodes forget {node} -> {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("forgot pinned key"),
        "{}",
        text(&out)
    );

    // The server is still running on the writer account, with nothing to complain about.
    assert!(
        server.try_wait().expect("status").is_none(),
        "server exited"
    );
    let log = accounts.server_log();
    assert!(!log.contains("ERROR"), "server log:\n{log}");
    assert!(!log.contains("created database"), "server log:\n{log}");
    for line in log.lines().filter(|l| l.contains("database")) {
        println!("server: {line}");
    }

    // No password, generated or the admin's, was ever in curl's argv.
    let argv = accounts.curl_argv();
    assert!(
        argv.lines().filter(|l| l.contains("--data-binary")).count() >= 8,
        "the shim saw every request with a body:\n{argv}"
    );
    for (what, secret) in [
        ("server", writer_pw.as_str()),
        ("runner", reader_pw.as_str()),
        ("admin", accounts.admin.1.as_str()),
    ] {
        assert!(!secret.is_empty());
        assert!(
            !argv.contains(secret),
            "the {what} password was on curl's command line:\n{}",
            argv.replace(secret, "<the password>")
        );
    }
    println!(
        "curl argv recorded by the shim: {} calls, no password in any",
        argv.lines().count()
    );
}
