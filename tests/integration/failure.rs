//! Failures: the primary unreachable or lost, the replica gone, backend
//! connections killed. The client always gets a defined SQLSTATE and a
//! usable session.

use std::time::{Duration, Instant};

use pgsplit_lab::stack::StackOptions;
use pgsplit_lab::Which;

use crate::common::*;

fn fast_connect() -> StackOptions {
    StackOptions {
        set: vec!["timeouts.connect_timeout=2s".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_stopped_reads_continue_and_writes_get_08001() {
    let mut s = stack_with(fast_connect());
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE w (x int)").await.unwrap();
    caught_up(&s);
    tokio::task::block_in_place(|| s.cluster_mut().stop_primary()).unwrap();
    // A new client can still connect (the handshake needs only the replica).
    let c2 = client(&s).await;
    for c in [&c, &c2] {
        assert_eq!(
            port_of(c, "SELECT inet_server_port()").await,
            replica_port(&s)
        );
        let start = Instant::now();
        let e = c
            .batch_execute("INSERT INTO w VALUES (1)")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "08001");
        assert!(e
            .as_db_error()
            .unwrap()
            .message()
            .contains("reads continue"));
        let took = start.elapsed();
        println!("time-to-error: primary stopped, write -> 08001 in {took:?}");
        assert!(
            took < Duration::from_secs(3),
            "within connect_timeout + 1 s"
        );
        // Extended protocol too, and the session stays usable.
        let e = c
            .execute("INSERT INTO w VALUES ($1)", &[&2i32])
            .await
            .unwrap_err();
        assert_eq!(code(&e), "08001");
        let n: i64 = c
            .query_one("SELECT count(*) FROM w", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
    tokio::task::block_in_place(|| s.cluster_mut().start_primary()).unwrap();
    // Writes work again without reconnecting the client.
    c.batch_execute("INSERT INTO w VALUES (3)").await.unwrap();
    assert_eq!(
        port_of(&c, "INSERT INTO w VALUES (4) RETURNING inet_server_port()").await,
        primary_port(&s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_tunnel_fails_writes_within_connect_timeout() {
    let s = stack_with(fast_connect());
    let c = client(&s).await;
    s.tunnel().blackhole();
    let start = Instant::now();
    let e = c
        .batch_execute("CREATE TABLE bh (x int)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08001");
    let took = start.elapsed();
    println!("time-to-error: black-holed tunnel, new write -> 08001 in {took:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    // Back: writes work again without a restart, once the heartbeat has
    // seen the link answer (within a poll or two).
    s.tunnel().restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = c.batch_execute("CREATE TABLE bh (x int)").await {
        assert_eq!(code(&e), "08001");
        assert!(Instant::now() < deadline, "writes did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_lost_inside_a_block_is_08006_then_25p02_until_rollback() {
    let s = stack_with(fast_connect());
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE lost (x int)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO lost VALUES (1)")
        .await
        .unwrap();
    s.tunnel().cut();
    let e = c
        .batch_execute("INSERT INTO lost VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08006");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    // Reads work; the insert never happened.
    s.tunnel().restore();
    back_on_replica(&s, &c).await;
    let n: i64 = c
        .query_one("/* pgsplit:primary */ SELECT count(*) FROM lost", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing half-applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_idle_backends_are_replaced_transparently() {
    let s = stack_without_read_your_writes();
    let c = client(&s).await;
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    c.batch_execute("CREATE TABLE k (x int)").await.unwrap();
    let kill = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                WHERE usename = 'app' AND backend_type = 'client backend' AND pid <> pg_backend_pid()";
    tokio::task::block_in_place(|| {
        s.cluster().psql(Which::Replica, kill).unwrap();
        s.cluster().psql(Which::Primary, kill).unwrap();
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    c.batch_execute("INSERT INTO k VALUES (1)").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_down_reads_go_to_the_primary() {
    let mut s = stack();
    let c = client(&s).await;
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    tokio::task::block_in_place(|| s.cluster_mut().stop_replica()).unwrap();
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        primary_port(&s)
    );
    // New clients too (the handshake falls back to the primary).
    let c2 = client(&s).await;
    assert_eq!(
        port_of(&c2, "SELECT inet_server_port()").await,
        primary_port(&s)
    );
    tokio::task::block_in_place(|| s.cluster_mut().start_replica()).unwrap();
    // After the retry interval, reads return to the replica.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        port_of(&c2, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
}

/// A backend that dies with FATAL while running the client's statement ends
/// that connection only: the client gets an ERROR with the server's code
/// and its session goes on (a fresh replica connection serves the next read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_fatal_mid_statement_is_an_error_not_the_end() {
    let s = stack();
    let c = client(&s).await;
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    let killer = {
        let kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                    WHERE usename = 'app' AND query LIKE '%pg_sleep(20)%' AND pid <> pg_backend_pid()";
        let cluster = s.cluster();
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tokio::task::block_in_place(|| cluster.psql(Which::Replica, kill)).unwrap()
        }
    };
    let (res, _) = tokio::join!(c.simple_query("SELECT pg_sleep(20)"), killer);
    let e = res.unwrap_err();
    let db = e
        .as_db_error()
        .expect("an ErrorResponse, not a closed connection");
    assert_eq!(db.code().code(), "57P01");
    assert_eq!(db.severity(), "ERROR", "the client's session is not ended");
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_block_is_answered_by_the_proxy_in_every_protocol() {
    use bytes::BytesMut;
    use pgsplit_protocol::encode;
    let s = stack_with(fast_connect());
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE lb (x int)").await.unwrap();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::query(&mut b, "BEGIN; INSERT INTO lb VALUES (1)");
    raw.send(&b).await;
    raw.replies(1).await;
    s.tunnel().cut();
    // Extended protocol, pipelined: the statement that hits the lost
    // connection gets 08006, the next batch 25P02 (status E), and an
    // extended ROLLBACK is answered message by message.
    b.clear();
    extended(&mut b, "INSERT INTO lb VALUES (2)");
    extended(&mut b, "SELECT 1");
    encode::parse(&mut b, "", "ROLLBACK", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::describe(&mut b, b'P', "");
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    raw.send(&b).await;
    let mut tags = Vec::new();
    let mut codes = Vec::new();
    let mut ready = Vec::new();
    while ready.len() < 3 {
        let f = raw.frame().await.expect("open");
        match f.tag() {
            b'E' => codes.push(
                pgsplit_protocol::backend::ErrorFields::parse(f.body())
                    .unwrap()
                    .code
                    .to_owned(),
            ),
            b'Z' => ready.push(f.body()[0]),
            t => tags.push(t),
        }
    }
    assert_eq!(codes, ["08006", "25P02"]);
    assert_eq!(ready, [b'E', b'E', b'I']);
    // ParseComplete, BindComplete, NoData, CommandComplete for the ROLLBACK.
    assert_eq!(tags, [b'1', b'2', b'n', b'C']);
    // The same in the simple protocol, on a new block.
    s.tunnel().restore();
    b.clear();
    encode::query(&mut b, "BEGIN; INSERT INTO lb VALUES (3)");
    raw.send(&b).await;
    raw.replies(1).await;
    s.tunnel().cut();
    b.clear();
    encode::query(&mut b, "INSERT INTO lb VALUES (4)");
    encode::query(&mut b, "SELECT 1");
    encode::query(&mut b, "ROLLBACK");
    raw.send(&b).await;
    let r = raw.replies(3).await;
    assert_eq!(r.errors, ["08006", "25P02"]);
    assert_eq!(r.ready, [b'E', b'E', b'I']);
    s.tunnel().restore();
    let n =
        tokio::task::block_in_place(|| s.cluster().psql(Which::Primary, "SELECT count(*) FROM lb"))
            .unwrap();
    assert_eq!(n.trim(), "0", "nothing of either block committed");
    // A driver that prepares its ROLLBACK (Describe of the statement wants
    // ParameterDescription, then NoData) after a block it knows failed.
    c.batch_execute("BEGIN; INSERT INTO lb VALUES (5)")
        .await
        .unwrap();
    s.tunnel().cut();
    let e = c
        .execute("INSERT INTO lb VALUES (6)", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08006", "{e}");
    c.execute("ROLLBACK", &[]).await.unwrap();
    s.tunnel().restore();
    c.execute("INSERT INTO lb VALUES (7)", &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_unreachable_is_08001_and_the_session_survives() {
    let mut s = stack_with(fast_connect());
    let c = client(&s).await;
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    tokio::task::block_in_place(|| s.cluster_mut().stop_replica()).unwrap();
    s.tunnel().cut();
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "08001");
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("no server reachable"),
        "{e}"
    );
    // The primary back: the same session reads from it.
    s.tunnel().restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.simple_query("SELECT inet_server_port()").await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(code(&e), "08001");
                assert!(Instant::now() < deadline, "reads did not come back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        primary_port(&s)
    );
}
