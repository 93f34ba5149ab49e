//! The fault suite's remaining cases, each in the simple and the extended
//! protocol: a tunnel cut while idle, a slow tunnel against
//! `statement_timeout`, a throttled tunnel, and servers stopped under a
//! parallel read load that must see no errors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgsplit_lab::stack::{Stack, StackOptions};
use tokio_postgres::Client;

use crate::common::*;

fn stack_set(set: &[&str]) -> Stack {
    stack_with(StackOptions {
        set: set.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
}

/// Runs `sql` in the simple protocol (`extended = false`) or the extended
/// one (prepared, with no parameters).
async fn exec(c: &Client, extended: bool, sql: &str) -> Result<(), tokio_postgres::Error> {
    if extended {
        c.execute(sql, &[]).await.map(drop)
    } else {
        c.batch_execute(sql).await
    }
}

fn count_on_primary(s: &Stack, sql: &str) -> i64 {
    on_primary(s, sql).parse().unwrap()
}

/// A tunnel cut while the session is idle: the next write reconnects and
/// works, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_while_idle_is_invisible_to_the_next_write() {
    let s = stack_set(&["timeouts.connect_timeout=2s"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE ci (x int)").await.unwrap();
    for (i, extended) in [false, true].into_iter().enumerate() {
        exec(&c, extended, "INSERT INTO ci VALUES (1)")
            .await
            .unwrap();
        tokio::task::block_in_place(|| s.tunnel().cut());
        s.tunnel().restore();
        exec(&c, extended, "INSERT INTO ci VALUES (2)")
            .await
            .unwrap();
        // A block, too.
        exec(&c, extended, "BEGIN").await.unwrap();
        exec(&c, extended, "INSERT INTO ci VALUES (3)")
            .await
            .unwrap();
        exec(&c, extended, "COMMIT").await.unwrap();
        assert_eq!(
            count_on_primary(&s, "SELECT count(*) FROM ci"),
            3 * (i as i64 + 1)
        );
    }
}

/// +300 ms each way on the tunnel, `statement_timeout` 200 ms: the client
/// gets 57014 at the deadline, and the statement really stops on the
/// primary (the cancel crossed the slow tunnel after the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tunnel_times_out_at_the_deadline_and_the_statement_is_cancelled() {
    // Session mode: each session keeps the connections it opened.
    let s = stack_set(&["timeouts.statement_timeout=200ms", "pool.mode=session"]);
    // One session per protocol, each with its primary connection opened
    // (and the extended one's statement prepared) before the tunnel slows
    // down: connecting through it is not part of a statement's time.
    let simple = client(&s).await;
    let ext = client(&s).await;
    simple
        .batch_execute("CREATE TABLE st (x int)")
        .await
        .unwrap();
    let sleep = "/* pgsplit:primary */ SELECT pg_sleep(7)";
    let statement = ext.prepare(sleep).await.unwrap();
    back_on_replica(&s, &simple).await;
    s.tunnel().delay(Duration::from_millis(300));
    for extended in [false, true] {
        let c = if extended { &ext } else { &simple };
        let prepared = extended.then_some(&statement);
        let started = Instant::now();
        let e = match prepared {
            Some(st) => c.execute(st, &[]).await.map(drop),
            None => c.batch_execute(sleep).await,
        }
        .unwrap_err();
        let took = started.elapsed();
        assert_eq!(code(&e), "57014", "{e}");
        println!("time-to-error: +300 ms tunnel, extended={extended} -> 57014 in {took:?}");
        assert!(took < Duration::from_millis(600), "{extended}: {took:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let gone = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                    AND query LIKE '%pg_sleep(7)%' AND query NOT LIKE '%pg_stat_activity%'";
        while count_on_primary(&s, gone) != 0 {
            assert!(Instant::now() < deadline, "the statement still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Reads on the replica go on, promptly.
        let started = Instant::now();
        assert_eq!(
            port_of(c, "SELECT inet_server_port()").await,
            replica_port(&s)
        );
        // (Bounded loosely: the suite runs tests side by side on 2 cores.)
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    s.tunnel().restore();
    simple
        .batch_execute("INSERT INTO st VALUES (1)")
        .await
        .unwrap();
    ext.execute("INSERT INTO st VALUES (2)", &[]).await.unwrap();
}

/// A throttled tunnel (16 KB/s): eight clients each pulling 64 KB from the
/// primary time out at `statement_timeout` instead of piling up, and reads
/// from the replica stay prompt meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_tunnel_does_not_pile_up_or_slow_the_reads() {
    // Each client keeps the primary connection it opened before the
    // throttle (session pooling): in transaction mode the pulls would
    // share a few and open the rest through the throttle, which is not
    // what this measures.
    let s = stack_set(&["timeouts.statement_timeout=500ms", "pool.mode=session"]);
    let reader = client(&s).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let c = client(&s).await;
        // Open each primary connection before the throttle.
        c.batch_execute("/* pgsplit:primary */ SELECT 1")
            .await
            .unwrap();
        clients.push(c);
    }
    s.tunnel().throttle(16 * 1024);
    let started = Instant::now();
    let pulls: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(async move {
                let e = exec(
                    &c,
                    i % 2 == 1,
                    "/* pgsplit:primary */ SELECT repeat('x', 65536)",
                )
                .await
                .unwrap_err();
                (code(&e), c)
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(800) {
        let t = Instant::now();
        assert_eq!(
            port_of(&reader, "SELECT inet_server_port()").await,
            replica_port(&s)
        );
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Far below the pulls' time through the throttle (seconds), with room
    // for a loaded machine.
    assert!(worst < Duration::from_secs(1), "a read took {worst:?}");
    for p in pulls {
        let (code, _c) = tokio::time::timeout(Duration::from_secs(5), p)
            .await
            .expect("every pull ends at its deadline")
            .unwrap();
        assert_eq!(code, "57014");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    s.tunnel().restore();
}

/// Read loops on their own sessions until `stop`; returns (reads, errors).
fn read_load(
    s: &Stack,
    sessions: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    let conn = s.conn_string();
    (0..sessions)
        .map(|i| {
            let conn = conn.clone();
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let c = connect(&conn).await.expect("connects");
                let mut reads = 0;
                let mut errors = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let r = if i % 2 == 0 {
                        c.simple_query("SELECT count(*) FROM pg_class")
                            .await
                            .map(drop)
                    } else {
                        c.query_one("SELECT count(*) FROM pg_class", &[])
                            .await
                            .map(drop)
                    };
                    match r {
                        Ok(()) => reads += 1,
                        Err(e) => {
                            errors.push(format!("{}: {e}", code(&e)));
                            // A closed connection fails every call at once:
                            // stop rather than spin (the test then fails).
                            if c.is_closed() || errors.len() > 100 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (reads, errors)
            })
        })
        .collect()
}

/// The primary stopped under a parallel read load: writes get 08001 within
/// connect_timeout + 1 s in both protocols, the reads see no error at all,
/// and writes work again once the primary is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_stopped_under_read_load_reads_see_no_error() {
    let mut s = stack_set(&["timeouts.connect_timeout=2s"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE pl (x int)").await.unwrap();
    caught_up(&s);
    let stop = Arc::new(AtomicBool::new(false));
    let load = read_load(&s, 4, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| s.cluster_mut().stop_primary()).unwrap();
    for extended in [false, true] {
        let started = Instant::now();
        let e = exec(&c, extended, "INSERT INTO pl VALUES (1)")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "08001", "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| s.cluster_mut().start_primary()).unwrap();
    for extended in [false, true] {
        exec(&c, extended, "INSERT INTO pl VALUES (2)")
            .await
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let reads = AtomicU64::new(0);
    for l in load {
        let (n, errors) = l.await.unwrap();
        assert!(errors.is_empty(), "reads failed: {errors:?}");
        reads.fetch_add(n, Ordering::Relaxed);
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(count_on_primary(&s, "SELECT count(*) FROM pl"), 2);
}

/// The replica stopped under a parallel read load: reads move to the
/// primary; only a read already running on the replica when it stopped
/// may fail, with the server's 57P01 as an ERROR, and reads return to the
/// replica once it is back. In transaction mode a session's next read may
/// lease another pooled replica connection the shutdown has not reached
/// yet, so a session may see that twice, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_stopped_under_read_load_reads_move_to_the_primary() {
    let mut s = stack();
    let stop = Arc::new(AtomicBool::new(false));
    let load = read_load(&s, 4, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| s.cluster_mut().stop_replica()).unwrap();
    let c = client(&s).await;
    for extended in [false, true] {
        let port: i32 = if extended {
            c.query_one("SELECT inet_server_port()", &[])
                .await
                .unwrap()
                .get(0)
        } else {
            port_of(&c, "SELECT inet_server_port()").await
        };
        assert_eq!(port, primary_port(&s));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| s.cluster_mut().start_replica()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        let (n, errors) = l.await.unwrap();
        println!("{n} reads, errors: {errors:?}");
        assert!(n > 0);
        assert!(
            errors.len() <= 2 && errors.iter().all(|e| e.starts_with("57P01")),
            "more than the reads in flight failed: {errors:?}"
        );
    }
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
}
