//! The console: the database `pgsplit`, for admin users, answering
//! PgBouncer-style SHOW commands from psql and ending clients with
//! KILL_CLIENT.

use std::time::Duration;

use pgsplit_lab::stack::{Stack, StackOptions};

use crate::common::*;

/// `app` (the URL's user, an admin in quick mode) and `reader`, who is not.
fn console_stack() -> Stack {
    stack_with(StackOptions {
        toml: r#"
[[users]]
name = "reader"
password = "reader-secret"
server_user = "app"
server_password = "app"
"#
        .into(),
        ..Default::default()
    })
}

fn console_conn(s: &Stack, user: &str, password: &str) -> String {
    let a = s.proxy_addr();
    format!(
        "host={} port={} user={user} password={password} dbname=pgsplit",
        a.ip(),
        a.port()
    )
}

/// psql against the console: `-At`, one command.
fn psql_console(s: &Stack, sql: &str) -> (bool, String) {
    psql_through(s, "host=127.0.0.1 dbname=pgsplit", sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reads_the_console_and_only_admins_get_in() {
    let s = console_stack();
    // A client with a pool in use, so there is something to show.
    let app = client(&s).await;
    app.simple_query("SELECT 1").await.unwrap();

    let (ok, version) = psql_console(&s, "SHOW VERSION");
    assert!(ok, "{version}");
    assert!(version.contains("pgsplit "), "{version}");
    let (ok, pools) = psql_console(&s, "SHOW POOLS");
    assert!(ok, "{pools}");
    assert!(pools.contains("app|app|replica|1|0|"), "{pools}");
    let (ok, clients) = psql_console(&s, "show clients;");
    assert!(ok, "{clients}");
    assert!(clients.contains("C|app|app|active|127.0.0.1|"), "{clients}");
    assert!(clients.contains("C|app|pgsplit|console|"), "{clients}");
    let (ok, config) = psql_console(&s, "SHOW CONFIG");
    assert!(ok, "{config}");
    assert!(config.contains("pool.mode|transaction"), "{config}");
    assert!(config.contains("reader"), "{config}");
    assert!(
        !config.contains("reader-secret"),
        "a secret shown: {config}"
    );
    let (ok, repl) = psql_console(&s, "SHOW REPLICATION");
    assert!(ok, "{repl}");
    assert!(repl.contains("replica_up|yes"), "{repl}");
    let (ok, stats) = psql_console(&s, "SHOW STATS");
    assert!(ok && stats.contains("routed_replica|"), "{stats}");
    let (ok, servers) = psql_console(&s, "SHOW SERVERS");
    assert!(ok, "{servers}");
    assert!(servers.contains("S|app|app|idle|127.0.0.1|"), "{servers}");
    let (ok, lists) = psql_console(&s, "SHOW LISTS");
    assert!(ok && lists.contains("used_clients|1"), "{lists}");

    // Errors are errors, and the console goes on.
    let (ok, out) = psql_console(&s, "SHOW NONSENSE");
    assert!(!ok && out.contains("unknown console command"), "{out}");
    let admin = connect(&console_conn(&s, "app", "app")).await.unwrap();
    let e = admin.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    // A block holds its connection: listed as active, with its client.
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let servers = text_rows(admin.simple_query("SHOW SERVERS").await.unwrap());
    assert!(
        servers
            .iter()
            .any(|r| r[3] == "active" && r[1] == "app" && !r[8].is_empty()),
        "{servers:?}"
    );
    app.batch_execute("COMMIT").await.unwrap();
    let e = admin.simple_query("RESUME").await.unwrap_err();
    assert_eq!(code(&e), "55000", "RESUME without PAUSE");
    // The extended protocol is refused, up to its Sync.
    let e = admin.query("SHOW VERSION", &[]).await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    let v = text_rows(
        admin
            .simple_query("SHOW VERSION; SHOW USERS")
            .await
            .unwrap(),
    );
    assert!(v[0][0].starts_with("pgsplit "), "{v:?}");
    assert!(v.iter().any(|r| r[0] == "reader" && r[3] == "no"), "{v:?}");
    assert!(v.iter().any(|r| r[0] == "app" && r[3] == "yes"), "{v:?}");

    // Not an admin: 28000, before anything else.
    let e = connect(&console_conn(&s, "reader", "reader-secret"))
        .await
        .expect_err("reader is not an admin");
    assert_eq!(code(&e), "28000", "{e:?}");
    // A wrong password is still 28P01, not a hint that the user exists.
    let e = connect(&console_conn(&s, "app", "wrong"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01", "{e:?}");
    // The same user reaches its databases as before.
    let reader = connect(&format!(
        "host={} port={} user=reader password=reader-secret dbname=app",
        s.proxy_addr().ip(),
        s.proxy_addr().port()
    ))
    .await
    .unwrap();
    reader.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_that_client_only() {
    let s = console_stack();
    let victim = client(&s).await;
    victim
        .batch_execute("CREATE TABLE k (x int)")
        .await
        .unwrap();
    victim
        .batch_execute("BEGIN; INSERT INTO k VALUES (1)")
        .await
        .unwrap();
    let bystander = client(&s).await;
    bystander.simple_query("SELECT 1").await.unwrap();
    let admin = connect(&console_conn(&s, "app", "app")).await.unwrap();
    let clients = text_rows(admin.simple_query("SHOW CLIENTS").await.unwrap());
    let ids: Vec<&Vec<String>> = clients.iter().filter(|r| r[3] == "active").collect();
    assert_eq!(ids.len(), 2, "{clients:?}");
    // The victim connected first: the lower id.
    let id = ids
        .iter()
        .map(|r| r[8].parse::<u64>().unwrap())
        .min()
        .unwrap();
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .expect("KILL_CLIENT");
    let e = tokio::time::timeout(Duration::from_secs(5), victim.simple_query("SELECT 1"))
        .await
        .expect("the victim is told at once")
        .expect_err("the victim is gone");
    assert!(
        e.as_db_error().map(|d| d.code().code()) == Some("57P01") || victim.is_closed(),
        "{e:?}"
    );
    // Its block was rolled back; the bystander goes on.
    bystander.simple_query("SELECT 1").await.unwrap();
    assert_eq!(on_primary(&s, "SELECT count(*) FROM k"), "0");
    let after = text_rows(admin.simple_query("SHOW CLIENTS").await.unwrap());
    assert_eq!(
        after.iter().filter(|r| r[3] == "active").count(),
        1,
        "{after:?}"
    );
    let e = admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42704");
}
