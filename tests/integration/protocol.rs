//! Protocol edge cases at startup and after: encryption requests, version
//! negotiation, garbage, oversized messages, cancel.

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pgsplit_protocol::encode;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_startup_is_08p01_and_others_are_served() {
    let s = stack();
    let mut raw = Raw::connect(&s).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (sev, code, _) = raw.error().await;
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "08P01"));
    assert!(raw.frame().await.is_none(), "connection closed");
    // A length beyond the 10 000-byte startup cap.
    let mut raw = Raw::connect(&s).await;
    let mut b = BytesMut::new();
    b.put_i32(1_000_000);
    b.put_i32(3 << 16);
    raw.send(&b).await;
    assert_eq!(raw.error().await.1, "08P01");
    client(&s).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_refused_then_startup_proceeds() {
    let s = stack();
    let mut raw = Raw::connect(&s).await;
    for code in [80_877_103i32, 80_877_104] {
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(code);
        raw.send(&b).await;
        let mut one = [0u8; 1];
        use tokio::io::AsyncReadExt;
        raw.stream.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"N");
    }
    let mut b = BytesMut::new();
    encode::startup_message(&mut b, &[("user", "app"), ("database", "app")]);
    raw.send(&b).await;
    let f = raw.frame().await.unwrap();
    assert_eq!(f.tag(), b'R', "authentication request follows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_versions_are_negotiated() {
    let s = stack();
    // 3.2 with an unknown protocol option: NegotiateProtocolVersion (3.0).
    let mut raw = Raw::connect(&s).await;
    let mut b = BytesMut::new();
    let at = b.len();
    b.put_i32(0);
    b.put_i32((3 << 16) | 2);
    for (k, v) in [("user", "app"), ("database", "app"), ("_pq_.future", "1")] {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = (b.len() - at) as i32;
    b[at..at + 4].copy_from_slice(&len.to_be_bytes());
    raw.send(&b).await;
    let f = raw.frame().await.unwrap();
    assert_eq!(f.tag(), b'v');
    assert_eq!(&f.body()[..4], &(3i32 << 16).to_be_bytes());
    assert_eq!(&f.body()[4..8], &1i32.to_be_bytes());
    assert!(f.body().ends_with(b"_pq_.future\0"));
    // Another major version: FATAL with a clear message.
    let mut raw = Raw::connect(&s).await;
    let mut b = BytesMut::new();
    b.put_i32(8 + 9);
    b.put_i32(4 << 16);
    b.put_slice(b"user\0app\0\0");
    raw.send(&b).await;
    let (sev, code, msg) = raw.error().await;
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "0A000"));
    assert!(msg.contains("unsupported frontend protocol 4.0"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_fatal_08p01_without_harm() {
    let s = stack();
    let proxy_cfg = ["max_message_bytes=65536".to_string()];
    let mut s = s;
    tokio::task::block_in_place(|| s.restart_proxy(&proxy_cfg)).unwrap();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    b.put_u8(b'Q');
    b.put_i32(10_000_000);
    raw.send(&b).await;
    let (sev, code, _) = raw.error().await;
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "08P01"));
    assert!(raw.frame().await.is_none());
    // A big but allowed query is fine.
    let c = client(&s).await;
    let big = format!("SELECT length('{}')", "x".repeat(60_000));
    let r = c.simple_query(&big).await.unwrap();
    assert!(!r.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_type_is_08p01() {
    let s = stack();
    let mut raw = Raw::login(&s).await;
    raw.send(&[b'@', 0, 0, 0, 4]).await;
    assert_eq!(raw.error().await.1, "08P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_statement() {
    let s = stack();
    let c = client(&s).await;
    let token = c.cancel_token();
    // A cancel for an idle session does nothing.
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    for sql in [
        "SELECT pg_sleep(30)",
        "/* pgsplit:primary */ SELECT pg_sleep(30)",
    ] {
        let t = token.clone();
        let start = Instant::now();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            t.cancel_query(tokio_postgres::NoTls).await.unwrap();
        });
        let e = c.simple_query(sql).await.unwrap_err();
        canceller.await.unwrap();
        assert_eq!(code(&e), "57014", "{sql}");
        assert!(start.elapsed() < Duration::from_secs(10));
        c.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_batches_and_flush() {
    let s = stack_without_read_your_writes();
    let mut raw = Raw::login(&s).await;
    // Parse + Describe + Flush of a read, answered before any Sync.
    let mut b = BytesMut::new();
    encode::parse(&mut b, "s1", "SELECT inet_server_port()", &[]);
    encode::describe(&mut b, b'S', "s1");
    encode::flush(&mut b);
    raw.send(&b).await;
    assert_eq!(raw.frame().await.unwrap().tag(), b'1');
    assert_eq!(raw.frame().await.unwrap().tag(), b't');
    assert_eq!(raw.frame().await.unwrap().tag(), b'T');
    // The rest of the batch, then two more batches pipelined before reading.
    let mut b = BytesMut::new();
    encode::bind(&mut b, "", "s1", &[]);
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    encode::parse(&mut b, "", "CREATE TABLE pl (x int)", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    encode::bind(&mut b, "", "s1", &[]);
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    raw.send(&b).await;
    let mut ports = Vec::new();
    let mut ready = 0;
    while ready < 3 {
        let f = raw.frame().await.unwrap();
        match f.tag() {
            b'D' => {
                let v = &f.body()[6..];
                ports.push(std::str::from_utf8(v).unwrap().parse::<i32>().unwrap());
            }
            b'Z' => ready += 1,
            b'E' => panic!("unexpected error"),
            _ => {}
        }
    }
    // A batch whose first part (Parse/Describe, then Flush) did nothing yet
    // runs where its class says: both reads on the replica.
    assert_eq!(ports, vec![replica_port(&s), replica_port(&s)]);
    // Unknown statement: 26000, as from one server.
    let mut b = BytesMut::new();
    encode::bind(&mut b, "", "nope", &[]);
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    raw.send(&b).await;
    assert_eq!(raw.error().await.1, "26000");
    assert_eq!(raw.until_ready().await.last(), Some(&b'Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_blocks_finish_then_sends_57p01() {
    use std::sync::Arc;
    let s = Arc::new(std::sync::Mutex::new(stack_with(
        pgsplit_lab::stack::StackOptions {
            set: vec!["timeouts.shutdown_grace=5s".into()],
            ..Default::default()
        },
    )));
    let (addr, conn) = {
        let g = s.lock().unwrap();
        (g.proxy_addr(), g.conn_string())
    };
    let mut idle = Raw::login_at(addr).await;
    let busy = connect(&conn).await.unwrap();
    busy.batch_execute("CREATE TABLE sd (x int)").await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO sd VALUES (1)")
        .await
        .unwrap();
    // Stop the proxy (restarting it drops the old one) in the background.
    let s2 = s.clone();
    let stopper =
        tokio::task::spawn_blocking(move || s2.lock().unwrap().restart_proxy(&[]).unwrap());
    // The idle session is told at once.
    let (sev, code, _) = idle.error().await;
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "57P01"));
    // The one inside a block may still finish it.
    busy.batch_execute("INSERT INTO sd VALUES (2); COMMIT")
        .await
        .unwrap();
    stopper.await.unwrap();
    let g = s.lock().unwrap();
    let n = g
        .cluster()
        .psql(pgsplit_lab::Which::Primary, "SELECT count(*) FROM sd")
        .unwrap();
    assert_eq!(n.trim(), "2");
}
