//! Reloading the configuration (the console's RELOAD; SIGHUP is tested
//! against the binary) and PAUSE/RESUME, with sessions connected and
//! inside blocks.

use std::time::Duration;

use pgsplit_lab::stack::{Stack, StackOptions};

use crate::common::*;

fn stack_with_toml(toml: &str) -> Stack {
    stack_with(StackOptions {
        toml: toml.into(),
        ..Default::default()
    })
}

async fn console(s: &Stack) -> tokio_postgres::Client {
    let a = s.proxy_addr();
    connect(&format!(
        "host={} port={} user=app password=app dbname=pgsplit",
        a.ip(),
        a.port()
    ))
    .await
    .unwrap()
}

async fn config_value(admin: &tokio_postgres::Client, key: &str) -> String {
    let rows = text_rows(admin.simple_query("SHOW CONFIG").await.unwrap());
    rows.into_iter()
        .find(|r| r[0] == key)
        .unwrap_or_else(|| panic!("{key} not in SHOW CONFIG"))[1]
        .clone()
}

async fn staleness(c: &tokio_postgres::Client) -> String {
    text_rows(c.simple_query("SHOW pgsplit.max_staleness").await.unwrap())[0][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_from_the_next_transaction_and_a_bad_file_changes_nothing() {
    let s = stack_with_toml("[routing]\nmax_replica_lag = \"2s\"\n");
    let admin = console(&s).await;
    let app = client(&s).await;
    app.batch_execute("CREATE TABLE rl (x int)").await.unwrap();
    assert_eq!(config_value(&admin, "routing.max_replica_lag").await, "2s");
    let before = staleness(&app).await;
    app.batch_execute("BEGIN; INSERT INTO rl VALUES (1)")
        .await
        .unwrap();

    std::fs::write(
        s.config_file(),
        "workers = 3\n[routing]\nmax_replica_lag = \"7s\"\n[pool]\nsize = 7\n",
    )
    .unwrap();
    let rows = text_rows(admin.simple_query("RELOAD").await.unwrap());
    let status = |key: &str| {
        rows.iter()
            .find(|r| r[0] == key)
            .map(|r| (r[1].clone(), r[2].clone(), r[3].clone()))
    };
    assert_eq!(
        status("routing.max_replica_lag"),
        Some(("2s".into(), "7s".into(), "applied".into())),
        "{rows:?}"
    );
    assert_eq!(
        status("pool.size").map(|s| s.2),
        Some("applied".into()),
        "{rows:?}"
    );
    assert_eq!(
        status("workers").map(|s| (s.1, s.2)),
        Some(("3".into(), "needs a restart".into())),
        "{rows:?}"
    );
    assert_eq!(config_value(&admin, "routing.max_replica_lag").await, "7s");
    assert_ne!(config_value(&admin, "workers").await, "3", "restart-only");
    let pools = text_rows(admin.simple_query("SHOW POOLS").await.unwrap());
    assert!(pools.iter().all(|r| r[7] == "7"), "pool_size: {pools:?}");

    // Inside the block, the session keeps the configuration it began with.
    assert_eq!(staleness(&app).await, before);
    app.batch_execute("INSERT INTO rl VALUES (2); COMMIT")
        .await
        .unwrap();
    // From its next transaction, the new default.
    let after = staleness(&app).await;
    assert_ne!(after, before);
    assert!(after.contains('7'), "{after}");
    assert_eq!(on_primary(&s, "SELECT count(*) FROM rl"), "2");

    // A file that does not load: F0000 naming the key, nothing changed.
    std::fs::write(s.config_file(), "[routing]\nmax_replica_lag = \"soon\"\n").unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&e), "F0000", "{e:?}");
    let msg = e.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("max_replica_lag"), "{msg}");
    assert_eq!(config_value(&admin, "routing.max_replica_lag").await, "7s");
    let stats = text_rows(admin.simple_query("SHOW STATS").await.unwrap());
    assert!(
        stats
            .iter()
            .any(|r| r[0] == "config_reload_failures" && r[1] == "1"),
        "{stats:?}"
    );
    app.simple_query("SELECT 1").await.unwrap();
    let admin_addr = s.proxy().admin_addr().expect("admin endpoint on");
    let (_, metrics) = crate::admin::get(admin_addr, &crate::admin::request("/metrics")).await;
    assert!(
        metrics.contains("pgsplit_config_reload_failures 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_blocks_holds_new_transactions_and_resume_releases_them() {
    let s = stack();
    let admin = console(&s).await;
    let writer = client(&s).await;
    writer
        .batch_execute("CREATE TABLE pz (x int)")
        .await
        .unwrap();
    writer
        .batch_execute("BEGIN; INSERT INTO pz VALUES (1)")
        .await
        .unwrap();
    let idle = client(&s).await;
    idle.simple_query("SELECT 1").await.unwrap();

    let pause = tokio::spawn(async move {
        let started = std::time::Instant::now();
        admin
            .simple_query("PAUSE")
            .await
            .map(|_| started.elapsed())
            .map(|d| (d, admin))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pause.is_finished(), "PAUSE answered with a block open");
    // The block goes on and ends; then PAUSE answers.
    writer
        .batch_execute("INSERT INTO pz VALUES (2); COMMIT")
        .await
        .unwrap();
    let (took, admin) = tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .expect("PAUSE answers once the block ended")
        .unwrap()
        .unwrap();
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // New transactions wait, from old sessions and new ones.
    let held = tokio::spawn(async move { idle.simple_query("SELECT 2").await.map(|_| idle) });
    let late = client(&s).await;
    let late_q = tokio::spawn(async move { late.simple_query("SELECT 3").await.map(|_| late) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !held.is_finished() && !late_q.is_finished(),
        "ran while paused"
    );
    let stats = text_rows(admin.simple_query("SHOW STATS").await.unwrap());
    assert!(
        stats.iter().any(|r| r[0] == "paused" && r[1] == "1"),
        "{stats:?}"
    );
    // Idle server connections were closed for the maintenance.
    let servers = text_rows(admin.simple_query("SHOW SERVERS").await.unwrap());
    assert!(
        servers.iter().all(|r| r[3] != "idle"),
        "idle connections left: {servers:?}"
    );

    admin.simple_query("RESUME").await.unwrap();
    let idle = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("released by RESUME")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), late_q)
        .await
        .expect("released by RESUME")
        .unwrap()
        .unwrap();
    idle.simple_query("SELECT 4").await.unwrap();
    assert_eq!(on_primary(&s, "SELECT count(*) FROM pz"), "2");
    let e = admin.simple_query("RESUME").await.unwrap_err();
    assert_eq!(code(&e), "55000");
}
