//! Pooled server connections: many clients on few server connections,
//! every session's own settings kept, caps that answer 53300 in time.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::Which;
use pgsplit_protocol::encode;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::common::*;

/// A stack in transaction mode, with `set` on top.
fn stack_set(set: &[&str]) -> Stack {
    let mut all = vec!["pool.mode=transaction".to_owned()];
    all.extend(set.iter().map(|s| (*s).to_owned()));
    stack_with(StackOptions {
        set: all,
        ..Default::default()
    })
}

async fn value(c: &Client, sql: &str) -> String {
    for m in c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        if let SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_owned();
        }
    }
    panic!("no row from {sql}");
}

/// Client connections of the lab user on a server, counted there, but
/// for the proxy's monitor (its poll is its last query).
fn server_connections(s: &Stack, which: Which) -> usize {
    psql_on(
        s,
        which,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' \
         AND backend_type = 'client backend' \
         AND application_name <> 'pgsplit monitor'",
    )
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_a_small_pool() {
    let s = stack_set(&["pool.size=3", "pool.min_idle=0"]);
    let setup = client(&s).await;
    setup
        .batch_execute("CREATE TABLE pooled (n int)")
        .await
        .unwrap();
    drop(setup);
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(client(&s).await);
    }
    let mut tasks = Vec::new();
    for (n, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                c.execute("INSERT INTO pooled VALUES ($1)", &[&((n * 10 + i) as i32)])
                    .await
                    .expect("write through a pool of 3");
                c.query_one("SELECT count(*) FROM pooled", &[])
                    .await
                    .expect("read through a pool of 3");
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    // All 30 sessions are still open, on at most 3 connections per server.
    assert_eq!(on_primary(&s, "SELECT count(*) FROM pooled"), "150");
    assert!(server_connections(&s, Which::Primary) <= 3);
    assert!(server_connections(&s, Which::Replica) <= 3);
    for c in &clients {
        assert_eq!(value(c, "SELECT 1").await, "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_interleaved_on_one_connection_each_see_their_own_settings() {
    let s = stack_set(&["pool.size=1", "pool.min_idle=0"]);
    let a = client(&s).await;
    let b = client(&s).await;
    a.batch_execute("CREATE SCHEMA sa; CREATE SCHEMA sb")
        .await
        .unwrap();
    caught_up(&s);
    a.batch_execute("SET search_path = sa; SET application_name = 'client-a'")
        .await
        .unwrap();
    b.batch_execute("SET search_path = sb; SET application_name = 'client-b'")
        .await
        .unwrap();
    for _ in 0..3 {
        for (c, path, app) in [(&a, "sa", "client-a"), (&b, "sb", "client-b")] {
            assert_eq!(value(c, "SHOW search_path").await, path);
            assert_eq!(
                value(c, "SELECT current_setting('application_name')").await,
                app
            );
            // The same statement names in both sessions (tokio-postgres
            // calls them s0, s1, …): each runs its own.
            let st = c
                .prepare("SELECT current_setting('search_path')")
                .await
                .unwrap();
            let got: String = c.query_one(&st, &[]).await.unwrap().get(0);
            assert_eq!(got, path);
        }
    }
    assert_eq!(server_connections(&s, Which::Replica), 1);
    // A session that resets sees the server's defaults again.
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(value(&a, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(value(&b, "SHOW search_path").await, "sb");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_53300_in_time_and_the_session_goes_on() {
    let s = stack_set(&[
        "pool.size=1",
        "pool.min_idle=0",
        "pool.checkout_timeout=300ms",
    ]);
    let holder = client(&s).await;
    holder
        .batch_execute("CREATE TABLE held (n int)")
        .await
        .unwrap();
    // A block holds the only primary connection.
    holder
        .batch_execute("BEGIN; INSERT INTO held VALUES (1)")
        .await
        .unwrap();
    let other = client(&s).await;
    let started = Instant::now();
    let e = other
        .batch_execute("INSERT INTO held VALUES (2)")
        .await
        .expect_err("no primary connection is free");
    assert_eq!(code(&e), "53300", "{e}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Nothing of it was applied, and the session works once there is room.
    holder.batch_execute("COMMIT").await.unwrap();
    other
        .batch_execute("INSERT INTO held VALUES (3)")
        .await
        .unwrap();
    assert_eq!(
        on_primary(&s, "SELECT string_agg(n::text, ',' ORDER BY n) FROM held"),
        "1,3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_hold_the_connection_until_the_state_is_gone() {
    let s = stack_set(&[
        "pool.size=1",
        "pool.min_idle=0",
        "pool.checkout_timeout=300ms",
    ]);
    let a = client(&s).await;
    let b = client(&s).await;
    a.batch_execute("CREATE TEMP TABLE mine (x int)")
        .await
        .unwrap();
    // The temporary table pins a's primary connection: b cannot have it.
    let e = b
        .batch_execute("CREATE TABLE theirs (x int)")
        .await
        .expect_err("the only primary connection is pinned");
    assert_eq!(code(&e), "53300");
    a.batch_execute("INSERT INTO mine VALUES (1)")
        .await
        .unwrap();
    a.batch_execute("DROP TABLE mine").await.unwrap();
    // Released after the pin check, once a's reads are back on the
    // replica: b gets the connection.
    back_on_replica(&s, &a).await;
    b.batch_execute("CREATE TABLE theirs (x int)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_a_connection_per_client_and_reuses_it_after() {
    let s = stack_set(&["pool.mode=session", "pool.min_idle=0"]);
    let a = client(&s).await;
    let pid_a = value(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(value(&a, "SELECT pg_backend_pid()").await, pid_a);
    a.batch_execute("SET application_name = 'left-behind'")
        .await
        .unwrap();
    drop(a);
    // The next client gets the same server connection, with none of the
    // last one's settings.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = client(&s).await;
        if value(&b, "SELECT pg_backend_pid()").await == pid_a {
            assert_eq!(
                value(&b, "SELECT current_setting('application_name')").await,
                ""
            );
            break;
        }
        assert!(Instant::now() < deadline, "the connection was not reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_pool_keeps_idle_connections_open_once_used() {
    let s = stack_set(&["pool.primary.min_idle=2"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE warm (x int)").await.unwrap();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server_connections(&s, Which::Primary) < 2 {
        assert!(Instant::now() < deadline, "min_idle connections not opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_while_connections_sit_idle_in_the_pool_is_invisible() {
    let s = stack_set(&["pool.primary.min_idle=2"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE cut (x int)").await.unwrap();
    s.tunnel().cut();
    // While the tunnel is down the write is refused before it is sent: no
    // dead pooled connection is leased.
    let e = c
        .batch_execute("INSERT INTO cut VALUES (0)")
        .await
        .expect_err("the tunnel is cut");
    assert_eq!(code(&e), "08001", "{e}");
    s.tunnel().restore();
    // Every idle connection died with the tunnel: the next write gets a
    // fresh one, never a dead one.
    c.batch_execute("INSERT INTO cut VALUES (1)")
        .await
        .expect("a fresh connection through the restored tunnel");
    assert_eq!(on_primary(&s, "SELECT count(*) FROM cut"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_its_clients_left_can_be_dropped_at_once() {
    let s = stack_set(&["pool.primary.min_idle=2"]);
    let admin = client(&s).await;
    for (n, extended) in [(1, false), (2, true)] {
        let db = format!("pooled_drop_{n}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        caught_up(&s);
        let url = s
            .conn_string()
            .replace("dbname=app", &format!("dbname={db}"));
        let c = connect(&url).await.unwrap();
        c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        assert_eq!(value(&c, "SELECT count(*) FROM t").await, "1");
        drop(c);
        // Its server connections sit in the pools (and min_idle refills
        // the primary's): the DROP must not find them holding the database.
        let drop_it = format!("DROP DATABASE {db}");
        if extended {
            admin.execute(drop_it.as_str(), &[]).await.unwrap();
        } else {
            admin.batch_execute(&drop_it).await.unwrap();
        }
    }
}

/// Parse of `name` as `sql`, then Sync.
fn prepare(b: &mut BytesMut, name: &str, sql: &str) {
    encode::parse(b, name, sql, &[]);
    encode::sync(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_statement_names_in_two_sessions_on_one_connection_never_collide() {
    let s = stack_set(&["pool.size=1", "pool.min_idle=0"]);
    let mut a = Raw::login(&s).await;
    let mut b = Raw::login(&s).await;
    // pgbench calls its statements P_0, P_1…, in every client.
    let mut m = BytesMut::new();
    prepare(&mut m, "P_0", "SELECT 'a:' || inet_server_port()");
    a.send(&m).await;
    assert!(a.replies(1).await.errors.is_empty());
    let mut m = BytesMut::new();
    prepare(&mut m, "P_0", "SELECT 'b:' || inet_server_port()");
    b.send(&m).await;
    assert!(
        b.replies(1).await.errors.is_empty(),
        "same name, other session"
    );
    for _ in 0..3 {
        for (c, who) in [(&mut a, "a:"), (&mut b, "b:")] {
            let mut m = BytesMut::new();
            run_prepared(&mut m, "P_0");
            c.send(&m).await;
            let r = c.replies(1).await;
            assert!(r.errors.is_empty(), "{r:?}");
            assert!(r.values[0].starts_with(who), "{r:?}");
        }
    }
    // The client's Close acts on its own view: a's P_0 is gone for a, b's
    // still runs, and a may prepare P_0 again, as on one server.
    let mut m = BytesMut::new();
    encode::close(&mut m, b'S', "P_0");
    encode::sync(&mut m);
    run_prepared(&mut m, "P_0");
    a.send(&m).await;
    let r = a.replies(2).await;
    assert_eq!(r.errors, ["26000"], "{r:?}");
    assert!(
        r.messages[0].contains("\"P_0\""),
        "named as the client named it: {r:?}"
    );
    let mut m = BytesMut::new();
    run_prepared(&mut m, "P_0");
    b.send(&m).await;
    assert!(b.replies(1).await.values[0].starts_with("b:"));
    let mut m = BytesMut::new();
    prepare(&mut m, "P_0", "SELECT 'a again'");
    run_prepared(&mut m, "P_0");
    a.send(&m).await;
    assert_eq!(a.replies(2).await.values, ["a again"]);
    // A duplicate is refused as one server refuses it.
    let mut m = BytesMut::new();
    prepare(&mut m, "P_0", "SELECT 'dup'");
    run_prepared(&mut m, "P_0");
    a.send(&m).await;
    let r = a.replies(2).await;
    assert_eq!(r.errors, ["42P05"], "{r:?}");
    assert_eq!(r.values, ["a again"], "the first definition stays");
    assert_eq!(server_connections(&s, Which::Replica), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_with_more_clients_than_the_pool_holds_fails_nothing() {
    let s = stack_set(&["pool.size=4"]);
    pgbench(&s, &["-i", "-s", "1", "-q"]);
    caught_up(&s);
    for script in [&["-S"][..], &[][..]] {
        // A thread per client: pgbench prepares with a blocking call,
        // which would stall the other clients of its thread, and the
        // connections their open transactions hold, until it returns.
        let mut args = vec!["-M", "prepared", "-c", "16", "-j", "16", "-t", "30", "-n"];
        args.extend_from_slice(script);
        let out = pgbench(&s, &args);
        assert!(
            out.contains("number of failed transactions: 0"),
            "{args:?}:\n{out}"
        );
        assert!(
            out.contains("number of transactions actually processed: 480/480"),
            "{args:?}:\n{out}"
        );
    }
    assert!(server_connections(&s, Which::Primary) <= 4);
    assert!(server_connections(&s, Which::Replica) <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_statement_cache_stays_bounded_and_statements_still_run() {
    let s = stack_set(&["pool.size=1", "pool.min_idle=0"]);
    let c = client(&s).await;
    let mut kept = Vec::new();
    for i in 0..520 {
        let st = c
            .prepare(&format!("SELECT {i}::int + $1::int"))
            .await
            .unwrap();
        kept.push(st);
    }
    // Past the cache bound the connection was emptied; every statement the
    // client holds still runs, prepared again where it is missing.
    for (i, st) in kept.iter().enumerate().step_by(37) {
        let v: i32 = c.query_one(st, &[&1i32]).await.unwrap().get(0);
        assert_eq!(v, i as i32 + 1);
    }
    let on_server: i64 = c
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0);
    assert!(on_server <= 520, "{on_server}");
    assert!(on_server < 100, "emptied once past 500: {on_server}");
}

/// A client's cancel reaches its own statement, and never another
/// client's, even when it races the connection's return to the pool and
/// the other client's lease of it: on a pool of one, two clients take
/// turns on one server connection while the first one's cancels fire all
/// the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_a_lease_return_never_reaches_another_client() {
    use tokio_postgres::error::SqlState;
    let s = stack_set(&["pool.size=1", "pool.min_idle=0"]);
    let a = client(&s).await;
    let b = client(&s).await;

    // Its own long statement is cancelled.
    let token = a.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = a.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    canceller.await.unwrap();

    let stop = Instant::now() + Duration::from_secs(3);
    let token = a.cancel_token();
    let canceller = tokio::spawn(async move {
        let mut sent = 0u32;
        while Instant::now() < stop {
            if token.cancel_query(tokio_postgres::NoTls).await.is_ok() {
                sent += 1;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        sent
    });
    let a_loop = tokio::spawn(async move {
        let (mut ran, mut cancelled) = (0u32, 0u32);
        while Instant::now() < stop {
            match a.simple_query("SELECT pg_sleep(0.002)").await {
                Ok(_) => ran += 1,
                Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => cancelled += 1,
                Err(e) => panic!("the cancelling client's statement failed otherwise: {e}"),
            }
        }
        (ran, cancelled)
    });
    let mut b_ran = 0u32;
    while Instant::now() < stop {
        b.simple_query("SELECT pg_sleep(0.002)")
            .await
            .unwrap_or_else(|e| panic!("another client's cancel reached this client: {e}"));
        b_ran += 1;
    }
    let sent = canceller.await.unwrap();
    let (a_ran, a_cancelled) = a_loop.await.unwrap();
    assert!(sent > 200, "only {sent} cancels were sent");
    assert!(b_ran > 50, "the other client ran only {b_ran} statements");
    assert!(
        a_ran + a_cancelled > 50,
        "the cancelling client ran only {a_ran} statements ({a_cancelled} cancelled)"
    );
}

/// A client that pinned its primary connection and then released what
/// pinned it (asyncpg does `UNLISTEN *` and friends as it returns a
/// connection to its pool) and then sits idle does not keep that
/// connection out of the pool: the pin is checked when the client goes
/// quiet, not at its next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_pin_frees_the_connection_while_its_client_sits_idle() {
    let s = stack_set(&["pool.size=1", "pool.min_idle=0", "pool.checkout_timeout=2s"]);
    let setup = client(&s).await;
    setup
        .batch_execute("CREATE TABLE after_unpin (n int)")
        .await
        .unwrap();
    drop(setup);
    let idle = client(&s).await;
    idle.batch_execute("LISTEN pool_channel").await.unwrap();
    idle.batch_execute("UNLISTEN *").await.unwrap();
    // `idle` stays connected and says nothing more.
    let other = client(&s).await;
    let started = Instant::now();
    other
        .batch_execute("INSERT INTO after_unpin VALUES (1)")
        .await
        .unwrap_or_else(|e| panic!("the idle client's connection was never freed: {e}"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}

/// Objects a client creates in its temporary schema by name, beyond
/// tables (a statistics object, a function), pin its connection as a
/// temporary table does, through statements that may release pins: the
/// pin check counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_in_the_temporary_schema_keep_their_connection() {
    let s = stack_set(&[
        "pool.size=1",
        "pool.min_idle=0",
        "pool.checkout_timeout=300ms",
    ]);
    let a = client(&s).await;
    let b = client(&s).await;
    a.batch_execute("CREATE TABLE stats_base (x int, y int)")
        .await
        .unwrap();
    a.batch_execute("CREATE STATISTICS pg_temp.mine ON x, y FROM stats_base")
        .await
        .unwrap();
    a.batch_execute(
        "CREATE FUNCTION pg_temp.twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2'",
    )
    .await
    .unwrap();
    // A statement that may release a pin: the pin check finds the
    // temporary objects, so the connection stays `a`'s.
    a.batch_execute("DROP STATISTICS IF EXISTS not_there")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = b
        .batch_execute("CREATE TABLE elsewhere (x int)")
        .await
        .expect_err("the only primary connection is pinned");
    assert_eq!(code(&e), "53300");
    let v: i32 = a
        .query_one("SELECT pg_temp.twice(21)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
    a.batch_execute("DROP STATISTICS pg_temp.mine; DROP FUNCTION pg_temp.twice(int)")
        .await
        .unwrap();
    back_on_replica(&s, &a).await;
    b.batch_execute("CREATE TABLE elsewhere (x int)")
        .await
        .unwrap();
}

/// `SET datestyle TO ymd` keeps the output style an earlier `SET datestyle
/// TO iso` chose: a session's settings replayed on a connection that has
/// not seen them give the same DateStyle (PostgreSQL's `date` regression
/// test sets them so, after writes, on a connection that logged in with
/// `datestyle=Postgres, MDY`, as pg_regress logs in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datestyle_set_in_two_steps_is_replayed_whole() {
    let s = stack_with(StackOptions {
        set: vec!["pool.mode=transaction".into()],
        lab: pgsplit_lab::LabOptions {
            extra_conf: vec![
                ("datestyle".into(), "postgres, mdy".into()),
                // The replica lags: the settings after the write run on the
                // primary, and the replica's connection gets them later.
                ("recovery_min_apply_delay".into(), "300ms".into()),
            ],
            ..Default::default()
        },
        ..Default::default()
    });
    let mut a = Raw::login(&s).await;
    async fn one(r: &mut Raw, sql: &str) -> String {
        let mut m = BytesMut::new();
        encode::query(&mut m, sql);
        r.send(&m).await;
        let out = r.replies(1).await;
        assert!(out.errors.is_empty(), "{sql}: {:?}", out.errors);
        out.values.first().cloned().unwrap_or_default()
    }
    // A write first: the settings then run on the primary, and reach the
    // replica's connection only when a read goes there.
    one(&mut a, "CREATE TABLE date_style_probe (d date)").await;
    one(&mut a, "SET datestyle TO iso").await;
    one(&mut a, "SET datestyle TO ymd").await;
    caught_up(&s);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        one(&mut a, "SELECT inet_server_port()::text").await,
        replica_port(&s).to_string(),
        "the read runs on the replica"
    );
    assert_eq!(one(&mut a, "SHOW datestyle").await, "ISO, YMD");
    assert_eq!(
        one(&mut a, "SELECT date '1999-01-08'::text").await,
        "1999-01-08"
    );
}
