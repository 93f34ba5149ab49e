//! Every wait is bounded: statement_timeout enforced by the proxy, the
//! bounded wait for a write's outcome, idle-in-transaction, idle backend
//! connections, and the heartbeat that notices a black-holed tunnel.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::Which;
use pgsplit_protocol::encode;

use crate::common::*;

fn stack_set(set: &[&str]) -> Stack {
    stack_with(StackOptions {
        set: set.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
}

/// Active statements running `needle` on a server, seen directly.
fn active(s: &Stack, which: Which, needle: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
         AND query LIKE '%{needle}%' AND query NOT LIKE '%pg_stat_activity%'"
    );
    psql_on(s, which, &sql).parse().unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_answers_at_the_deadline_and_cancels_on_the_server() {
    let s = stack_set(&["timeouts.statement_timeout=300ms"]);
    let c = client(&s).await;
    // A read on the replica.
    let started = Instant::now();
    let e = c.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(code(&e), "57014");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    tokio::task::block_in_place(|| {
        wait_until("the replica's statement to be cancelled", || {
            active(&s, Which::Replica, "pg_sleep(5)") == 0
        })
    });
    // The session goes on.
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    // The extended protocol too.
    let e = c.query("SELECT pg_sleep(5)", &[]).await.unwrap_err();
    assert_eq!(code(&e), "57014");
    c.query("SELECT 1", &[]).await.unwrap();
}

/// Every statement's deadline is its own: one that starts after another
/// ended is not cut at the earlier statement's deadline, nor left without
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_statement_gets_the_whole_statement_timeout() {
    let s = stack_set(&["timeouts.statement_timeout=1s"]);
    let c = client(&s).await;
    for _ in 0..3 {
        c.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
        c.query("SELECT pg_sleep(0.3)", &[]).await.unwrap();
    }
    // Started 0.6 s after the last deadline was set: it runs its full 1 s.
    c.query("SELECT 1", &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let started = Instant::now();
    let e = c.query("SELECT pg_sleep(5)", &[]).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(code(&e), "57014");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_block_can_never_commit() {
    let s = stack_set(&["timeouts.statement_timeout=300ms"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE tb (x int)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO tb VALUES (1)").await.unwrap();
    // Over a slow tunnel: the answer comes at the deadline, not after the
    // cancel and the reply have crossed it.
    s.tunnel().delay(Duration::from_millis(400));
    let started = Instant::now();
    let e = c
        .batch_execute("INSERT INTO tb VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "57014");
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    let e = c.batch_execute("COMMIT").await;
    // COMMIT of a failed block reports ROLLBACK, as on one server.
    assert!(e.is_ok(), "{e:?}");
    s.tunnel().restore();
    let n = on_primary(&s, "SELECT count(*) FROM tb");
    assert_eq!(n, "0", "nothing of the block committed");
    c.batch_execute("INSERT INTO tb VALUES (2)").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_autocommit_write_gets_its_true_outcome() {
    let s = stack_set(&["timeouts.statement_timeout=300ms"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE aw (x int)").await.unwrap();
    // Cancelled by the proxy's cancel: the server's own answer (57014) is
    // the true outcome, and the row is absent.
    let e = c
        .batch_execute("INSERT INTO aw SELECT 1 FROM pg_sleep(2)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "57014");
    let n = on_primary(&s, "SELECT count(*) FROM aw");
    assert_eq!(n, "0");
    c.batch_execute("INSERT INTO aw VALUES (2)").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_into_a_black_hole_is_unknown_not_failed() {
    // Autocommit writes run as they are (by default, not as one-statement
    // blocks), so the proxy cannot know whether a write that went out
    // committed.
    let s = stack_set(&[
        "timeouts.statement_timeout=300ms",
        "timeouts.commit_resolution_timeout=500ms",
        "monitor.heartbeat_timeout=10s",
    ]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE bh (x int)").await.unwrap();
    s.tunnel().blackhole();
    let started = Instant::now();
    let e = c
        .batch_execute("INSERT INTO bh VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08007", "{e}");
    let took = started.elapsed();
    println!("time-to-error: autocommit write into a black hole -> 08007 in {took:?}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Reads go on meanwhile.
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    s.tunnel().restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_write_into_a_black_hole_times_out_and_never_commits() {
    // With commit_resolution = "all" an autocommit write runs as a
    // one-statement block whose COMMIT the proxy sends only after the write
    // answered: a write stuck before that point can be cancelled for sure
    // (57014 at the deadline).
    let s = stack_set(&[
        "timeouts.commit_resolution=all",
        "timeouts.statement_timeout=300ms",
        "monitor.heartbeat_timeout=10s",
    ]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE wb (x int)").await.unwrap();
    s.tunnel().blackhole();
    let started = Instant::now();
    let e = c
        .batch_execute("INSERT INTO wb VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "57014", "{e}");
    let took = started.elapsed();
    println!("time-to-error: wrapped write into a black hole -> 57014 in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    // The held statements reach the server once the tunnel is back; the
    // proxy's connection is gone, so the block rolls back.
    s.tunnel().restore();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = on_primary(&s, "SELECT count(*) FROM wb");
    assert_eq!(n, "0");
    c.batch_execute("INSERT INTO wb VALUES (2)").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_ends_the_session() {
    let s = stack_set(&["timeouts.idle_in_transaction_timeout=300ms"]);
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::query(&mut b, "BEGIN");
    raw.send(&b).await;
    raw.until_ready().await;
    let (sev, code, _) = raw.error().await;
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "25P03"));
    assert!(raw.frame().await.is_none(), "connection closed");
    // Idle outside a block is fine.
    let c = client(&s).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backend_connections_are_closed_and_reopened() {
    let s = stack_set(&["timeouts.server_idle_timeout=300ms"]);
    let c = client(&s).await;
    let r = replica_port(&s);
    let sessions = || {
        psql_on(
            &s,
            Which::Replica,
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' \
             AND datname = 'app' AND backend_type = 'client backend'",
        )
        .parse::<i64>()
        .unwrap()
    };
    assert_eq!(port_of(&c, "SELECT inet_server_port()").await, r);
    assert_eq!(sessions(), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sessions(), 0, "the idle replica connection was closed");
    assert_eq!(port_of(&c, "SELECT inet_server_port()").await, r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_answers_statements_stuck_in_a_black_hole() {
    let s = stack_set(&["monitor.heartbeat_timeout=500ms"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE hb (x int)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO hb VALUES (1)").await.unwrap();
    s.tunnel().blackhole();
    let started = Instant::now();
    let e = c
        .batch_execute("INSERT INTO hb VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08006", "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    // New primary work fails fast while the link is down; reads go on.
    let started = Instant::now();
    let e = c
        .batch_execute("INSERT INTO hb VALUES (3)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08001");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    // The link back: writes work again, without reconnecting the client.
    s.tunnel().restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.batch_execute("INSERT INTO hb VALUES (4)").await {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(code(&e), "08001");
                assert!(Instant::now() < deadline, "writes did not come back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let rows = on_primary(&s, "SELECT string_agg(x::text, ',' ORDER BY x) FROM hb");
    assert_eq!(rows, "4", "only what the client was told succeeded");

    // The same in the extended protocol (the statement prepared before).
    let insert = c.prepare("INSERT INTO hb VALUES ($1)").await.unwrap();
    c.execute("BEGIN", &[]).await.unwrap();
    c.execute(&insert, &[&5i32]).await.unwrap();
    s.tunnel().blackhole();
    let started = Instant::now();
    let e = c.execute(&insert, &[&6i32]).await.unwrap_err();
    assert_eq!(code(&e), "08006", "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let e = c.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    c.execute("ROLLBACK", &[]).await.unwrap();
    let e = c.execute(&insert, &[&7i32]).await.unwrap_err();
    assert_eq!(code(&e), "08001");
    s.tunnel().restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = c.execute(&insert, &[&8i32]).await {
        assert_eq!(code(&e), "08001");
        assert!(Instant::now() < deadline, "writes did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = on_primary(&s, "SELECT string_agg(x::text, ',' ORDER BY x) FROM hb");
    assert_eq!(rows, "4,8", "only what the client was told succeeded");
}

/// Resident memory of this process (the proxy runs inside it), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_on_a_black_hole_do_not_stop_the_reads() {
    let s = stack_set(&["monitor.heartbeat_timeout=1s"]);
    let reader = client(&s).await;
    reader
        .batch_execute("CREATE TABLE fifty (x int)")
        .await
        .unwrap();
    let before = rss_kib();
    let sessions_before = s.proxy().shared().cancels.len();
    s.tunnel().blackhole();
    let mut writers = Vec::new();
    for i in 0..50i32 {
        let c = client(&s).await;
        writers.push(tokio::spawn(async move {
            let started = Instant::now();
            let e = c
                .execute("INSERT INTO fifty VALUES ($1)", &[&i])
                .await
                .expect_err("no write gets through a black hole");
            (code(&e), started.elapsed())
        }));
    }
    // Reads for another client go on meanwhile, each promptly.
    for _ in 0..30 {
        let started = Instant::now();
        assert_eq!(
            port_of(&reader, "SELECT inet_server_port()").await,
            replica_port(&s)
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in writers {
        let (code, took) = w.await.unwrap();
        assert!(
            ["08001", "08006", "08007"].contains(&code.as_str()),
            "{code}"
        );
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    s.tunnel().restore();
    // Every writer's session ended with its client: nothing left behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.proxy().shared().cancels.len() > sessions_before {
        assert!(Instant::now() < deadline, "sessions leaked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
    let n = on_primary(&s, "SELECT count(*) FROM fifty");
    assert_eq!(n, "0", "no write was acknowledged, none is there");
}
