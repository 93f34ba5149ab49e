//! Following a promoted primary: pgsplit is given two primary candidates
//! (the primary through the tunnel, and the node's own replica), the lab
//! promotes the replica with `pg_promote()`, and writes must move there —
//! and never reach the old primary again, even when it comes back writable
//! on its old timeline.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgsplit_lab::stack::Stack;
use pgsplit_lab::Which;
use tokio_postgres::Client;

use crate::admin::{get, request};
use crate::chaos::{gather, writer};
use crate::common::*;

/// The default `[monitor] failover_grace`.
const GRACE: Duration = Duration::from_secs(1);

/// A stack whose pgsplit has the primary (through the tunnel) and the
/// replica as primary candidates, with `extra` settings; `setup` runs on
/// the primary first (the monitor's login may read the standby's timeline
/// once it is in `pg_read_all_stats`).
fn following_stack(setup: &str, extra: &[&str]) -> Stack {
    let mut s = stack();
    on_primary(
        &s,
        &format!(
            "GRANT pg_read_all_stats TO app; {setup}; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO app"
        ),
    );
    caught_up(&s);
    let mut set = vec![format!(
        "primary.hosts=[\"{}\", \"{}\"]",
        s.tunnel().addr(),
        s.cluster().replica_addr()
    )];
    set.extend(extra.iter().map(|e| (*e).to_owned()));
    tokio::task::block_in_place(|| s.restart_proxy(&set)).expect("pgsplit restarts");
    s
}

/// `SHOW pgsplit.primaries`, one row per candidate.
async fn primaries(c: &Client) -> Vec<Vec<String>> {
    text_rows(
        c.simple_query("SHOW pgsplit.primaries")
            .await
            .expect("SHOW pgsplit.primaries"),
    )
}

/// Waits (within 10 s) until `SHOW pgsplit.primaries` names `addr` as the
/// current primary; returns its row.
async fn current_is(c: &Client, addr: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = primaries(c).await;
        if let Some(r) = rows.iter().find(|r| r[0] == addr && r[3] == "yes") {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never became current: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn keys_on(s: &Stack, which: Which, sql: &str) -> HashSet<i64> {
    psql_on(s, which, sql)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|k| k.parse().expect("a key"))
        .collect()
}

/// A session reading (no writes) every 20 ms until `stop`: returns how many
/// reads it made and the errors it got.
fn reader(conn: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let c = connect(&conn).await.expect("the reader connects");
        let (mut reads, mut errors) = (0, Vec::new());
        let bound = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::SeqCst) && Instant::now() < bound {
            match tokio::time::timeout(
                Duration::from_secs(5),
                c.simple_query("SELECT count(*) FROM f"),
            )
            .await
            {
                Ok(Ok(_)) => reads += 1,
                Ok(Err(e)) => errors.push(format!("{}: {e}", code(&e))),
                Err(_) => errors.push("a read hung for 5 s".into()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (reads, errors)
    })
}

/// The primary stops, the replica is promoted: the first write through
/// pgsplit succeeds on it within `failover_grace` + 2 s of the promotion,
/// reads never fail, the session that wrote just before still reads its
/// write, and when the old primary comes back writable on its old timeline
/// no write reaches it and the conflict is raised in `/health`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promoted_replica_and_never_return_to_the_old_primary() {
    let mut s = following_stack("CREATE TABLE f (k bigint PRIMARY KEY)", &[]);
    let tunnel = s.tunnel().addr().to_string();
    let replica = s.cluster().replica_addr().to_string();
    let admin = s.proxy().admin_addr().expect("admin endpoint on");
    let c = client(&s).await;
    let row = current_is(&c, &tunnel).await;
    assert_eq!(row[2], "1", "the primary's timeline: {row:?}");
    c.batch_execute("INSERT INTO f VALUES (1)").await.unwrap();
    caught_up(&s);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(s.conn_string(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    tokio::task::block_in_place(|| s.cluster_mut().stop_primary()).expect("the primary stops");
    // No writable candidate: a write fails cleanly, the session goes on.
    let e = c
        .batch_execute("INSERT INTO f VALUES (2)")
        .await
        .expect_err("no primary takes writes");
    assert!(["08001", "08006"].contains(&code(&e).as_str()), "{e:?}");

    assert_eq!(psql_on(&s, Which::Replica, "SELECT pg_promote()"), "t");
    let promoted = Instant::now();
    let mut tries = 0;
    let took = loop {
        tries += 1;
        match c.batch_execute("INSERT INTO f VALUES (3)").await {
            Ok(()) => break promoted.elapsed(),
            Err(e) => {
                assert_eq!(code(&e), "08001", "while no primary is followed yet: {e:?}");
                assert!(
                    promoted.elapsed() < Duration::from_secs(10),
                    "writes never followed"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("promotion to first successful write: {took:?} ({tries} tries)");
    assert!(took <= GRACE + Duration::from_secs(2), "{took:?}");
    assert_eq!(
        psql_on(&s, Which::Replica, "SELECT count(*) FROM f WHERE k = 3"),
        "1",
        "the write is on the promoted server"
    );
    // Written just before the failover, still read after it.
    let mine = c
        .query_one("SELECT count(*) FROM f WHERE k = 1", &[])
        .await
        .unwrap();
    assert_eq!(mine.get::<_, i64>(0), 1);
    let row = current_is(&c, &replica).await;
    assert_eq!(row[2], "2", "the promoted server's timeline: {row:?}");
    assert!(row[5].contains("timeline 2"), "why: {row:?}");

    stop.store(true, Ordering::SeqCst);
    let (n, errors) = reads.await.unwrap();
    println!("{n} reads during the switch");
    assert!(n >= 20, "{n} reads");
    assert!(
        errors.is_empty(),
        "reads failed during the switch: {errors:?}"
    );

    // The old primary comes back, writable, on timeline 1.
    tokio::task::block_in_place(|| s.cluster_mut().start_primary())
        .expect("the old primary starts");
    assert_eq!(on_primary(&s, "SELECT pg_is_in_recovery()"), "f");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = primaries(&c).await;
        let old = rows
            .iter()
            .find(|r| r[0] == tunnel)
            .expect("the old primary is listed");
        if old[1] == "primary" {
            assert_eq!(old[3], "no", "{rows:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old primary was never seen: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
    for k in 100..120 {
        c.batch_execute(&format!("INSERT INTO f VALUES ({k})"))
            .await
            .expect("writes go on to the promoted server");
    }
    let fresh = client(&s).await;
    fresh
        .batch_execute("BEGIN; INSERT INTO f VALUES (200); COMMIT")
        .await
        .unwrap();
    assert_eq!(on_primary(&s, "SELECT count(*) FROM f WHERE k >= 3"), "0");
    assert_eq!(
        psql_on(&s, Which::Replica, "SELECT count(*) FROM f WHERE k >= 100"),
        "21"
    );
    let (status, health) = get(admin, &request("/health")).await;
    println!("/health {status}: {health}");
    assert!(health.contains("several writable primaries"), "{health}");
    assert!(
        health.contains(&format!("writes go to {replica}")),
        "{health}"
    );
    let (_, metrics) = get(admin, &request("/metrics")).await;
    assert!(metrics.contains("pgsplit_primary_alarm 1"), "{metrics}");
    assert!(metrics.contains("pgsplit_primary_changes 1"), "{metrics}");
}

/// The first candidate is fenced read-only (`default_transaction_read_only`)
/// and the second promoted: writes follow, and a block left open on the
/// old primary ends as on a lost connection (08006, rolled back there)
/// instead of writing on to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_when_the_first_candidate_is_fenced_and_the_second_promoted() {
    let s = following_stack("CREATE TABLE f (k bigint PRIMARY KEY)", &[]);
    let tunnel = s.tunnel().addr().to_string();
    let replica = s.cluster().replica_addr().to_string();
    let c = client(&s).await;
    current_is(&c, &tunnel).await;
    let open = client(&s).await;
    open.batch_execute("BEGIN; INSERT INTO f VALUES (1)")
        .await
        .unwrap();

    on_primary(
        &s,
        "ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf()",
    );
    // Fenced and nothing promoted: writes are refused, reads go on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.batch_execute("INSERT INTO f VALUES (2)").await {
            Err(e) if code(&e) == "08001" => {
                assert!(format!("{e:?}").contains("writable"), "{e:?}");
                break;
            }
            // Until the monitor sees the fence, the server refuses itself.
            Err(e) if code(&e) == "25006" => {}
            other => panic!("a write to a fenced primary: {other:?}"),
        }
        assert!(Instant::now() < deadline, "the fence was never seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.simple_query("SELECT count(*) FROM f")
        .await
        .expect("reads go on");

    assert_eq!(psql_on(&s, Which::Replica, "SELECT pg_promote()"), "t");
    let promoted = Instant::now();
    loop {
        match c.batch_execute("INSERT INTO f VALUES (3)").await {
            Ok(()) => break,
            Err(e) => assert_eq!(code(&e), "08001", "{e:?}"),
        }
        assert!(
            promoted.elapsed() < GRACE + Duration::from_secs(2),
            "writes never followed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "promotion to first successful write: {:?}",
        promoted.elapsed()
    );
    current_is(&c, &replica).await;

    // The block open on the old primary: lost, as with a lost connection.
    let e = open
        .batch_execute("INSERT INTO f VALUES (4)")
        .await
        .expect_err("the block on the old primary is over");
    assert_eq!(code(&e), "08006", "{e:?}");
    open.batch_execute("ROLLBACK").await.unwrap();
    open.batch_execute("INSERT INTO f VALUES (5)")
        .await
        .unwrap();
    assert_eq!(on_primary(&s, "SELECT count(*) FROM f"), "0");
    assert_eq!(
        psql_on(
            &s,
            Which::Replica,
            "SELECT string_agg(k::text, ',' ORDER BY k) FROM f"
        ),
        "3,5"
    );
}

/// Four sessions write (autocommit and blocks, both protocols) while the
/// primary stops and the replica is promoted. Every write a client was
/// told succeeded is on the new primary (the old one, stopped cleanly,
/// sent all it had); nothing a client was told failed is on either; the
/// old primary, started again, has nothing the new one lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_load_through_a_promotion_are_where_clients_were_told() {
    let mut s = following_stack(
        "CREATE TABLE chaos (k bigint PRIMARY KEY); CREATE TABLE f (k bigint)",
        &[
            "timeouts.commit_resolution=all",
            "timeouts.commit_resolution_timeout=3s",
            "timeouts.connect_timeout=1s",
        ],
    );
    let replica = s.cluster().replica_addr().to_string();
    let c = client(&s).await;
    current_is(&c, &s.tunnel().addr().to_string()).await;
    let until = Instant::now() + Duration::from_secs(9);
    let writers: Vec<_> = (1..=4)
        .map(|i| tokio::spawn(writer(s.conn_string(), i, until)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| s.cluster_mut().stop_primary()).expect("the primary stops");
    assert_eq!(psql_on(&s, Which::Replica, "SELECT pg_promote()"), "t");
    let promoted = Instant::now();
    current_is(&c, &replica).await;
    println!("promotion to following: {:?}", promoted.elapsed());
    let told = gather(writers, Duration::from_secs(30)).await;

    let new = keys_on(&s, Which::Replica, "SELECT k FROM chaos");
    tokio::task::block_in_place(|| s.cluster_mut().start_primary())
        .expect("the old primary starts");
    let old = keys_on(&s, Which::Primary, "SELECT k FROM chaos");
    let missing: Vec<i64> = told.acked.iter().filter(|k| !new.contains(k)).collect();
    let phantom: Vec<i64> = told
        .absent
        .iter()
        .filter(|k| new.contains(k) || old.contains(k))
        .collect();
    let only_old: Vec<&i64> = old.difference(&new).collect();
    let after: usize = told.acked.iter().filter(|k| !old.contains(k)).count();
    println!(
        "{} acknowledged ({after} on the new primary only), {} failed for sure, {} unknown",
        told.acked.len(),
        told.absent.len(),
        told.unknown
    );
    assert!(after > 0, "no write was acknowledged after the switch");
    assert!(
        missing.is_empty(),
        "acknowledged but not on the new primary: {missing:?}"
    );
    assert!(
        phantom.is_empty(),
        "reported failed but present: {phantom:?}"
    );
    assert!(only_old.is_empty(), "on the old primary only: {only_old:?}");
}
