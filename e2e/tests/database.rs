//! The database the whole suite runs on: Apache CouchDB 3, reached with admin credentials, and
//! closed to anonymous requests. A suite that quietly ran on a stand-in (pouchdb-server does
//! not enforce `_security`) would prove nothing about access control, so this says so loudly.

use reqwest::StatusCode;
use vogeler_core::couch::CouchClient;
use vogeler_e2e::TestStack;
use vogeler_proto::secret::SecretUrl;

#[tokio::test]
async fn the_suite_runs_on_apache_couchdb_with_credentials() {
    let stack = TestStack::new().await;
    let welcome = stack.couch.welcome().await.expect("GET /");
    println!("database under test: {welcome}");
    assert_eq!(
        welcome["couchdb"], "Welcome",
        "the test database is not Apache CouchDB ({welcome}); run scripts/stack.sh up, which \
         installs it, and use the VOGELER_TEST_COUCHDB_URL of scripts/stack.sh env"
    );
    let version = welcome["version"].as_str().unwrap_or_default();
    assert!(
        version.starts_with("3."),
        "Apache CouchDB {version}, not 3.x"
    );

    // The test URL carries the admin: it may create a database, read it and delete it.
    assert!(
        stack
            .couch
            .ensure_database(&stack.database)
            .await
            .expect("create as admin")
    );
    assert_eq!(
        stack.couch.doc_count(&stack.database).await.expect("read"),
        0
    );

    // Anonymous: refused a database and the list of databases, and may not create one.
    let url = SecretUrl::parse(&stack.couch_first()).expect("url");
    let host = url.expose().host_str().expect("host").to_string();
    let port = url.expose().port_or_known_default().expect("port");
    let anonymous = format!("http://{host}:{port}/");
    let http = reqwest::Client::new();
    for path in [stack.database.clone(), "_all_dbs".to_string()] {
        let status = http
            .get(format!("{anonymous}{path}"))
            .send()
            .await
            .expect("anonymous request")
            .status();
        println!("anonymous GET /{path}: {status}");
        assert_eq!(status, StatusCode::UNAUTHORIZED, "anonymous GET /{path}");
    }
    let anon = CouchClient::new(&SecretUrl::parse(&anonymous).expect("url"), None).expect("client");
    let err = anon
        .ensure_database(&format!("{}_anon", stack.database))
        .await
        .expect_err("anonymous may not create a database");
    println!("anonymous create: {err}");
    assert!(err.to_string().contains("setup.sh"), "{err}");
}
