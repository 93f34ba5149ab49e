//! A commit whose answer is lost on the way back through the tunnel: the
//! proxy learns what happened from the primary (`pg_xact_status` of the
//! transaction id it asked for before the COMMIT) and tells the client the
//! truth — the success it would have got, `08006` "rolled back", or
//! `08007` when the primary stays out of reach. Each case runs in the
//! simple and the extended protocol, for a transaction block and for an
//! autocommit write, and checks the primary's data against the answer.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_protocol::encode;

use crate::common::*;

#[derive(Clone, Copy, Debug)]
enum Proto {
    Simple,
    Extended,
}

const PROTOCOLS: [Proto; 2] = [Proto::Simple, Proto::Extended];

fn stack_set(set: &[&str]) -> Stack {
    stack_with(StackOptions {
        set: set.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
}

/// Sends `sql` in protocol `p` without waiting for the answer.
async fn send(raw: &mut Raw, p: Proto, sql: &str) {
    let mut b = BytesMut::new();
    match p {
        Proto::Simple => encode::query(&mut b, sql),
        Proto::Extended => extended(&mut b, sql),
    }
    raw.send(&b).await;
}

/// Runs `sql` and returns its answer.
async fn run(raw: &mut Raw, p: Proto, sql: &str) -> Replies {
    send(raw, p, sql).await;
    raw.replies(1).await
}

/// Runs `sql`, which must succeed.
async fn ok(raw: &mut Raw, p: Proto, sql: &str) {
    let r = run(raw, p, sql).await;
    assert!(r.errors.is_empty(), "{sql}: {:?}", r.messages);
}

/// Creates `table`, opens a block and writes a row in it; returns once the
/// proxy knows the block's transaction id.
async fn open_block_with_a_write(raw: &mut Raw, p: Proto, table: &str) {
    ok(raw, p, &format!("CREATE TABLE {table} (x int)")).await;
    ok(raw, p, "BEGIN").await;
    ok(raw, p, &format!("INSERT INTO {table} VALUES (1)")).await;
    settle(raw, p).await;
}

/// One more statement in the block: the proxy's own query, pipelined
/// behind the write, has been answered once this one is (the test switches
/// the tunnel's mode right after, faster than any real fault).
async fn settle(raw: &mut Raw, p: Proto) {
    ok(raw, p, "SELECT 1").await;
}

/// Rows of `table` on the primary.
fn rows(s: &Stack, table: &str) -> i64 {
    on_primary(s, &format!("SELECT count(*) FROM {table}"))
        .parse()
        .unwrap()
}

/// Waits (bounded) until `table` has `n` rows on the primary.
async fn until_rows(s: &Stack, table: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows(s, table) != n {
        assert!(Instant::now() < deadline, "{table} never reached {n} rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until a COMMIT runs on the primary: the proxy has had
/// the wrapped write's answer and sent its own COMMIT.
async fn until_committing(s: &Stack) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'COMMIT'";
    while on_primary(s, sql) != "1" {
        assert!(Instant::now() < deadline, "no COMMIT ever ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A table whose commits are slow (a deferred trigger sleeps at COMMIT),
/// so the test can lose the COMMIT's answer while the server is still
/// committing. A negative value makes the commit fail instead.
async fn slow_commit_table(raw: &mut Raw, table: &str) {
    let sql = format!(
        "CREATE TABLE {table} (x int);
         CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_sleep(1.2);
           IF NEW.x < 0 THEN RAISE EXCEPTION 'refused at commit'; END IF;
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER {table}_slow AFTER INSERT ON {table}
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_slow();"
    );
    ok(raw, Proto::Simple, &sql).await;
}

/// The stack for cut-and-restore cases: the heartbeat stays out of the way
/// (the cut is what ends the connection), and resolution may take 5 s.
fn cut_stack() -> Stack {
    stack_set(&[
        "timeouts.commit_resolution_timeout=5s",
        "timeouts.connect_timeout=1s",
        "monitor.heartbeat_timeout=30s",
    ])
}

/// Loses the answer to a COMMIT that commits: the reply is dropped, the
/// commit happens, then the tunnel is cut and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_that_committed_is_reported_committed() {
    let s = cut_stack();
    let mut raw = Raw::login(&s).await;
    for p in PROTOCOLS {
        let table = format!("lc_{p:?}").to_lowercase();
        open_block_with_a_write(&mut raw, p, &table).await;
        s.tunnel().drop_replies();
        send(&mut raw, p, "COMMIT").await;
        until_rows(&s, &table, 1).await;
        let lost = Instant::now();
        tokio::task::block_in_place(|| s.tunnel().cut());
        s.tunnel().restore();
        let r = raw.replies(1).await;
        assert!(r.errors.is_empty(), "{p:?}: {:?}", r.messages);
        assert_eq!(r.tags, ["COMMIT"], "{p:?}");
        assert_eq!(r.ready, b"I", "{p:?}");
        println!(
            "{p:?}: committed, answered {:?} after the cut",
            lost.elapsed()
        );
        // The session goes on, on a new connection.
        ok(&mut raw, p, &format!("INSERT INTO {table} VALUES (2)")).await;
        assert_eq!(rows(&s, &table), 2);
    }
}

/// Loses a COMMIT before it reaches the server: it sits in a stalled
/// tunnel that is then cut, so the server rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_that_aborted_is_reported_rolled_back() {
    let s = cut_stack();
    let mut raw = Raw::login(&s).await;
    for p in PROTOCOLS {
        let table = format!("la_{p:?}").to_lowercase();
        open_block_with_a_write(&mut raw, p, &table).await;
        s.tunnel().blackhole();
        send(&mut raw, p, "COMMIT").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let lost = Instant::now();
        tokio::task::block_in_place(|| s.tunnel().cut());
        s.tunnel().restore();
        let r = raw.replies(1).await;
        println!(
            "time-to-error: {p:?} lost COMMIT, aborted -> 08006 {:?} after the cut",
            lost.elapsed()
        );
        assert_eq!(
            r.errors,
            ["08006"],
            "{p:?}: {r:?}, rows {}",
            rows(&s, &table)
        );
        assert!(r.messages[0].contains("rolled back"), "{:?}", r.messages);
        assert_eq!(r.ready, b"I");
        assert_eq!(rows(&s, &table), 0, "{p:?}: told rolled back, and it was");
        ok(&mut raw, p, &format!("INSERT INTO {table} VALUES (2)")).await;
        assert_eq!(rows(&s, &table), 1);
    }
}

/// The primary stays unreachable past `commit_resolution_timeout`: the
/// outcome is unknown (`08007`), never "rolled back" — and here it did
/// commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_that_cannot_be_resolved_is_08007() {
    let s = stack_set(&[
        "timeouts.commit_resolution_timeout=1s",
        "timeouts.connect_timeout=1s",
        "monitor.heartbeat_timeout=30s",
    ]);
    let mut raw = Raw::login(&s).await;
    for p in PROTOCOLS {
        let table = format!("lu_{p:?}").to_lowercase();
        open_block_with_a_write(&mut raw, p, &table).await;
        s.tunnel().drop_replies();
        send(&mut raw, p, "COMMIT").await;
        until_rows(&s, &table, 1).await;
        let lost = Instant::now();
        tokio::task::block_in_place(|| s.tunnel().cut());
        let r = raw.replies(1).await;
        let took = lost.elapsed();
        println!("time-to-error: {p:?} lost COMMIT, unreachable -> 08007 {took:?} after the cut (bound 1 s)");
        assert_eq!(r.errors, ["08007"], "{p:?}: {:?}", r.messages);
        assert!(took < Duration::from_secs(4), "{p:?}: {took:?}");
        s.tunnel().restore();
        ok(&mut raw, p, &format!("INSERT INTO {table} VALUES (2)")).await;
        assert_eq!(rows(&s, &table), 2);
    }
}

/// With `commit_resolution = "all"` an autocommit write runs as a block of
/// one statement, so its commit is resolved too: committed, aborted at
/// commit, and unresolvable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_autocommit_write_gets_its_true_outcome() {
    let s = stack_set(&[
        "timeouts.commit_resolution=all",
        "timeouts.commit_resolution_timeout=3s",
        "timeouts.connect_timeout=1s",
        "monitor.heartbeat_timeout=30s",
    ]);
    let mut raw = Raw::login(&s).await;
    for p in PROTOCOLS {
        let table = format!("aw_{p:?}").to_lowercase();
        slow_commit_table(&mut raw, &table).await;

        // Committed: the write's answer came back, the COMMIT's is lost.
        send(&mut raw, p, &format!("INSERT INTO {table} VALUES (1)")).await;
        until_committing(&s).await;
        s.tunnel().drop_replies();
        until_rows(&s, &table, 1).await;
        tokio::task::block_in_place(|| s.tunnel().cut());
        s.tunnel().restore();
        let r = raw.replies(1).await;
        assert!(r.errors.is_empty(), "{p:?}: {:?}", r.messages);
        assert_eq!(r.tags, ["INSERT 0 1"], "{p:?}");
        assert_eq!(r.ready, b"I");

        // Aborted: the commit fails on the server, its answer is lost.
        send(&mut raw, p, &format!("INSERT INTO {table} VALUES (-1)")).await;
        until_committing(&s).await;
        s.tunnel().drop_replies();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| s.tunnel().cut());
        s.tunnel().restore();
        let r = raw.replies(1).await;
        assert_eq!(r.errors, ["08006"], "{p:?}: {:?}", r.messages);
        assert!(r.messages[0].contains("rolled back"), "{:?}", r.messages);
        assert_eq!(rows(&s, &table), 1, "{p:?}: the refused row is absent");

        // Unresolvable: the primary stays out of reach.
        send(&mut raw, p, &format!("INSERT INTO {table} VALUES (3)")).await;
        until_committing(&s).await;
        s.tunnel().drop_replies();
        until_rows(&s, &table, 2).await;
        tokio::task::block_in_place(|| s.tunnel().cut());
        let r = raw.replies(1).await;
        assert_eq!(r.errors, ["08007"], "{p:?}: {:?}", r.messages);
        s.tunnel().restore();
        ok(&mut raw, p, &format!("DELETE FROM {table}")).await;
        assert_eq!(rows(&s, &table), 0);
    }
}

/// A write lost before the proxy sent its COMMIT committed nothing, and
/// the client is told so (`08006`, rolled back), at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autocommit_write_lost_before_its_commit_is_rolled_back() {
    let s = stack_set(&[
        "timeouts.commit_resolution=all",
        "timeouts.connect_timeout=1s",
        "monitor.heartbeat_timeout=30s",
    ]);
    let mut raw = Raw::login(&s).await;
    for p in PROTOCOLS {
        let table = format!("ab_{p:?}").to_lowercase();
        ok(&mut raw, p, &format!("CREATE TABLE {table} (x int)")).await;
        s.tunnel().drop_replies();
        send(&mut raw, p, &format!("INSERT INTO {table} VALUES (1)")).await;
        // The write ran on the server, its block open: the proxy waits
        // for the answers and has not sent COMMIT.
        let open = "SELECT count(*) FROM pg_stat_activity \
                    WHERE state = 'idle in transaction' AND backend_xid IS NOT NULL";
        let deadline = Instant::now() + Duration::from_secs(10);
        while on_primary(&s, open) != "1" {
            assert!(Instant::now() < deadline, "the write never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::task::block_in_place(|| s.tunnel().cut());
        s.tunnel().restore();
        let r = raw.replies(1).await;
        assert_eq!(r.errors, ["08006"], "{p:?}: {:?}", r.messages);
        assert!(r.messages[0].contains("rolled back"), "{:?}", r.messages);
        assert_eq!(rows(&s, &table), 0);
        ok(&mut raw, p, &format!("INSERT INTO {table} VALUES (2)")).await;
        assert_eq!(rows(&s, &table), 1);
    }
}

/// A COMMIT sent into a black-holed tunnel: the heartbeat declares the
/// link down and the proxy starts resolving; the tunnel comes back, the
/// held COMMIT reaches the server late and commits. Whatever the race, the
/// client is never told "rolled back" for a transaction that committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_in_a_black_hole_that_commits_late_is_never_reported_rolled_back() {
    let s = stack_set(&[
        "timeouts.commit_resolution_timeout=8s",
        "timeouts.connect_timeout=1s",
        "monitor.heartbeat_timeout=1s",
    ]);
    let mut raw = Raw::login(&s).await;
    for p in PROTOCOLS {
        let table = format!("bh_{p:?}").to_lowercase();
        open_block_with_a_write(&mut raw, p, &table).await;
        s.tunnel().blackhole();
        send(&mut raw, p, "COMMIT").await;
        // Past the heartbeat's bound: the proxy has given the link up.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        s.tunnel().restore();
        let r = raw.replies(1).await;
        let n = rows(&s, &table);
        match r.errors.first().map(String::as_str) {
            None => assert_eq!(n, 1, "{p:?}: told committed"),
            Some("08006") => assert_eq!(n, 0, "{p:?}: told rolled back"),
            Some("08007") => {}
            other => panic!("{p:?}: unexpected {other:?} {:?}", r.messages),
        }
        println!("{p:?}: {:?} with {n} row(s)", r.errors);
        assert_eq!(r.ready, b"I");
        // Wait until the monitor sees the link again, then go on.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = run(&mut raw, p, &format!("INSERT INTO {table} VALUES (2)")).await;
            if r.errors.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{:?}", r.messages);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
