//! Pipelines: several batches sent before any reply is read. Decisions that
//! depend on replies still in flight (a block opened, a statement prepared)
//! must come out as on one server.

use bytes::BytesMut;
use pgsplit_protocol::encode;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_block_commits_on_the_primary() {
    let s = stack();
    client(&s)
        .await
        .batch_execute("CREATE TABLE pb (x int)")
        .await
        .unwrap();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    extended(&mut b, "BEGIN");
    extended(&mut b, "SELECT inet_server_port()");
    extended(&mut b, "INSERT INTO pb VALUES (1)");
    extended(&mut b, "COMMIT");
    raw.send(&b).await;
    let r = raw.replies(4).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(
        r.values,
        vec![primary_port(&s).to_string()],
        "the read inside the block ran on the primary"
    );
    assert_eq!(r.ready, b"TTTI".to_vec());
    let n = tokio::task::block_in_place(|| {
        s.cluster()
            .psql(pgsplit_lab::Which::Primary, "SELECT count(*) FROM pb")
    })
    .unwrap();
    assert_eq!(n.trim(), "1", "the commit reached the primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_in_the_same_pipeline_is_routed_by_its_class() {
    let s = stack();
    client(&s)
        .await
        .batch_execute("CREATE TABLE pp (x int)")
        .await
        .unwrap();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::parse(
        &mut b,
        "ins",
        "INSERT INTO pp VALUES (1) RETURNING inet_server_port()",
        &[],
    );
    encode::sync(&mut b);
    run_prepared(&mut b, "ins");
    raw.send(&b).await;
    let r = raw.replies(2).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values, vec![primary_port(&s).to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_move_between_backends_without_duplicates() {
    let s = stack_without_read_your_writes();
    let mut raw = Raw::login(&s).await;
    // s1 prepared inside a block (on the primary).
    let mut b = BytesMut::new();
    extended(&mut b, "BEGIN");
    encode::parse(&mut b, "s1", "SELECT inet_server_port()", &[]);
    encode::sync(&mut b);
    extended(&mut b, "COMMIT");
    raw.send(&b).await;
    let r = raw.replies(3).await;
    assert!(r.errors.is_empty(), "{r:?}");
    // Two pipelined executions on the replica: it is created there once.
    let mut b = BytesMut::new();
    for _ in 0..2 {
        run_prepared(&mut b, "s1");
    }
    raw.send(&b).await;
    let r = raw.replies(2).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values, vec![replica_port(&s).to_string(); 2]);
    // A duplicate name is refused as by one server, wherever it lives.
    let mut b = BytesMut::new();
    encode::parse(&mut b, "s1", "SELECT 2", &[]);
    encode::sync(&mut b);
    raw.send(&b).await;
    let r = raw.replies(1).await;
    assert_eq!(r.errors, vec!["42P05".to_owned()]);
    // Closing it ends it everywhere; the name can be reused.
    let mut b = BytesMut::new();
    encode::close(&mut b, b'S', "s1");
    encode::sync(&mut b);
    encode::parse(&mut b, "s1", "SELECT 'again'", &[]);
    run_prepared(&mut b, "s1");
    raw.send(&b).await;
    let r = raw.replies(2).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values, vec!["again".to_owned()]);
    // And on the primary too (a block), where the old s1 was closed lazily.
    let mut b = BytesMut::new();
    extended(&mut b, "BEGIN");
    run_prepared(&mut b, "s1");
    extended(&mut b, "COMMIT");
    raw.send(&b).await;
    let r = raw.replies(3).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values, vec!["again".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_flushed_before_sync_may_write_later() {
    let s = stack();
    client(&s)
        .await
        .batch_execute("CREATE TABLE fl (x int)")
        .await
        .unwrap();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::parse(&mut b, "", "SELECT inet_server_port()", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::execute(&mut b, "", 0);
    encode::flush(&mut b);
    raw.send(&b).await;
    let mut b = BytesMut::new();
    encode::parse(&mut b, "", "INSERT INTO fl VALUES (1)", &[]);
    run_prepared(&mut b, "");
    raw.send(&b).await;
    let r = raw.replies(1).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values, vec![primary_port(&s).to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_parse_leaves_no_statement_behind() {
    let s = stack();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::parse(&mut b, "bad", "SELECT * FROM missing_table", &[]);
    encode::sync(&mut b);
    run_prepared(&mut b, "bad");
    encode::parse(&mut b, "bad", "SELECT 1", &[]);
    run_prepared(&mut b, "bad");
    raw.send(&b).await;
    let r = raw.replies(3).await;
    assert_eq!(
        r.errors,
        vec!["42P01".to_owned(), "26000".to_owned()],
        "{r:?}"
    );
    assert_eq!(r.values, vec!["1".to_owned()]);
}

/// A long pipeline (20 000 batches, 40 MB of replies, written before any
/// reply is read) is answered completely and in order, with no error and
/// no stall while requests and replies cross in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipeline_is_answered_completely() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = stack();
    let raw = Raw::login(&s).await;
    let (mut rd, mut wr) = raw.stream.into_split();
    let n = 20_000;
    let writer = tokio::spawn(async move {
        let mut b = BytesMut::new();
        for _ in 0..n {
            extended(&mut b, "SELECT repeat('x', 2000)");
        }
        wr.write_all(&b).await.unwrap();
        wr
    });
    let mut buf = BytesMut::new();
    let mut ready = 0;
    let read = async {
        while ready < n {
            while let Some(f) = pgsplit_protocol::decode(&mut buf, 1 << 30).unwrap() {
                assert_ne!(f.tag(), b'E', "no errors");
                if f.tag() == b'Z' {
                    ready += 1;
                }
            }
            if ready < n {
                assert!(
                    rd.read_buf(&mut buf).await.unwrap() > 0,
                    "connection stays open"
                );
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("every reply arrives");
    writer.await.unwrap();
}

/// Reads held for their Sync go where reads go; a batch that grows past
/// `routing.batch_buffer_bytes` is sent before its Sync, and so runs on
/// the primary (its rest could write in the same implicit transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_the_buffer_cap_runs_on_the_primary() {
    let s = stack_with(pgsplit_lab::stack::StackOptions {
        set: vec!["routing.batch_buffer_bytes=512".into()],
        ..Default::default()
    });
    let mut raw = Raw::login(&s).await;
    let batch = |executes: usize| {
        let mut b = BytesMut::new();
        encode::parse(&mut b, "", "SELECT inet_server_port()", &[]);
        for _ in 0..executes {
            encode::bind(&mut b, "", "", &[]);
            encode::execute(&mut b, "", 0);
        }
        encode::sync(&mut b);
        b
    };
    let small = batch(4);
    assert!(small.len() < 512);
    raw.send(&small).await;
    let r = raw.replies(1).await;
    assert!(r.errors.is_empty(), "{:?}", r.messages);
    let replica = replica_port(&s).to_string();
    assert_eq!(r.values, vec![replica; 4]);

    let big = batch(40);
    assert!(big.len() > 512);
    raw.send(&big).await;
    let r = raw.replies(1).await;
    assert!(r.errors.is_empty(), "{:?}", r.messages);
    let primary = primary_port(&s).to_string();
    assert_eq!(r.values, vec![primary; 40]);
}

/// Sends `b` and reads the answers to its `n` cycles.
async fn cycle(raw: &mut Raw, b: &BytesMut, n: usize) -> Replies {
    raw.send(b).await;
    raw.replies(n).await
}

/// One read cycle per send on a quiet session is the proxy's shortest path
/// (no batch is held). Statements it prepares that way must exist wherever
/// the session needs them later, and fail as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_single_read_cycles_follow_the_session() {
    let s = stack_without_read_your_writes();
    let (p, r) = (
        vec![primary_port(&s).to_string()],
        vec![replica_port(&s).to_string()],
    );
    let mut raw = Raw::login(&s).await;
    // Prepared and described in one cycle, as drivers prepare, then run.
    let mut b = BytesMut::new();
    encode::parse(&mut b, "s", "SELECT inet_server_port()", &[]);
    encode::describe(&mut b, b'S', "s");
    encode::sync(&mut b);
    let got = cycle(&mut raw, &b, 1).await;
    assert!(got.errors.is_empty(), "{got:?}");
    let mut run = BytesMut::new();
    run_prepared(&mut run, "s");
    assert_eq!(cycle(&mut raw, &run, 1).await.values, r);
    // The same name parsed again: refused as by one server, and the
    // statement is unchanged.
    let mut b = BytesMut::new();
    encode::parse(&mut b, "s", "SELECT 'other'", &[]);
    encode::sync(&mut b);
    assert_eq!(cycle(&mut raw, &b, 1).await.errors, ["42P05"]);
    assert_eq!(cycle(&mut raw, &run, 1).await.values, r);
    // In a block it runs on the primary, created there from the client's
    // own Parse; after the block, on the replica again.
    let mut b = BytesMut::new();
    extended(&mut b, "BEGIN");
    let got = cycle(&mut raw, &b, 1).await;
    assert_eq!(got.ready, [b'T']);
    assert_eq!(cycle(&mut raw, &run, 1).await.values, p);
    let mut b = BytesMut::new();
    extended(&mut b, "COMMIT");
    assert_eq!(cycle(&mut raw, &b, 1).await.ready, [b'I']);
    assert_eq!(cycle(&mut raw, &run, 1).await.values, r);
    // Unnamed statements and simple queries take the same path.
    let mut b = BytesMut::new();
    extended(&mut b, "SELECT inet_server_port()");
    assert_eq!(cycle(&mut raw, &b, 1).await.values, r);
    let mut b = BytesMut::new();
    encode::query(&mut b, "SELECT inet_server_port()");
    assert_eq!(cycle(&mut raw, &b, 1).await.values, r);
    // Closed, it is gone everywhere.
    let mut b = BytesMut::new();
    encode::close(&mut b, b'S', "s");
    encode::sync(&mut b);
    assert!(cycle(&mut raw, &b, 1).await.errors.is_empty());
    assert_eq!(cycle(&mut raw, &run, 1).await.errors, ["26000"]);
}
