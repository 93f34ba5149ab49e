//! Hostile and slow clients at login: a client that sends nothing, half a
//! startup packet, or its password a byte at a time is closed when
//! `client_auth_timeout` runs out, and a thousand of them do not keep
//! anyone else from logging in. Logged-in clients that stop reading, or
//! send without reading, are held back by backpressure, not buffered.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgsplit_lab::stack::StackOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Reads until the proxy closes; returns the bytes it sent and when it
/// closed.
async fn until_closed(s: &mut TcpStream, bound: Duration) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after {bound:?}; got {got:?}"),
        }
    }
}

/// The SQLSTATE of the first ErrorResponse in `bytes`.
fn sqlstate(bytes: &[u8]) -> Option<String> {
    let mut b = BytesMut::from(bytes);
    while let Ok(Some(f)) = pgsplit_protocol::decode(&mut b, 1 << 20) {
        if f.tag() == b'E' {
            let body = f.body();
            let mut at = 0;
            while at < body.len() && body[at] != 0 {
                let field = body[at];
                let end = body[at + 1..].iter().position(|c| *c == 0)? + at + 1;
                if field == b'C' {
                    return Some(String::from_utf8_lossy(&body[at + 1..end]).into_owned());
                }
                at = end + 1;
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_half_sent_or_slow_login_is_closed_at_the_auth_timeout() {
    let s = stack_with(StackOptions {
        set: vec!["timeouts.client_auth_timeout=1s".into()],
        ..Default::default()
    });
    let addr = s.proxy_addr();
    let opts = pgsplit_lab::LabOptions::default();

    // Nothing at all.
    let started = Instant::now();
    let silent = TcpStream::connect(addr).await.unwrap();
    // Half a startup packet.
    let mut half = TcpStream::connect(addr).await.unwrap();
    let mut startup = BytesMut::new();
    pgsplit_protocol::encode::startup_message(
        &mut startup,
        &[
            ("user", opts.user.as_str()),
            ("database", opts.database.as_str()),
        ],
    );
    half.write_all(&startup[..startup.len() / 2]).await.unwrap();
    // A whole startup packet, then the SCRAM answer one byte at a time,
    // each a little before the last would have been too late alone.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(&startup).await.unwrap();
    let slow_task = tokio::spawn(async move {
        let mut b = [0u8; 256];
        let _ = slow.read(&mut b).await; // AuthenticationSASL
        let c = postgres_protocol_scram::Client::new(opts.password.as_bytes());
        let mut w = BytesMut::new();
        pgsplit_protocol::encode::sasl_initial_response(&mut w, "SCRAM-SHA-256", c.message());
        for byte in w.iter() {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        until_closed(&mut slow, Duration::from_secs(5)).await
    });

    for (what, mut sock) in [("silent", silent), ("half a startup packet", half)] {
        let (got, at) = until_closed(&mut sock, Duration::from_secs(5)).await;
        let waited = at - started;
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
            "{what}: closed after {waited:?}"
        );
        assert_eq!(sqlstate(&got).as_deref(), Some("57014"), "{what}: {got:?}");
    }
    let (got, at) = slow_task.await.unwrap();
    let waited = at - started;
    assert!(
        waited < Duration::from_secs(3),
        "a byte-a-time password kept the login open {waited:?}"
    );
    assert_eq!(sqlstate(&got).as_deref(), Some("57014"), "slow: {got:?}");
}

/// A thousand connections that never log in do not keep a real client out,
/// and its login stays quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_logins_do_not_slow_a_real_one() {
    // Both ends of every connection live in this process.
    let limit = pgsplit_lab::raise_open_files(4096).unwrap();
    assert!(
        limit >= 2300,
        "the open-file limit {limit} is too low for this test"
    );
    let s = stack_with(StackOptions {
        set: vec![
            "timeouts.client_auth_timeout=30s".into(),
            "max_client_connections=2000".into(),
        ],
        ..Default::default()
    });
    let addr = s.proxy_addr();
    let before = Instant::now();
    let c = client(&s).await;
    c.simple_query("SELECT 1").await.unwrap();
    let alone = before.elapsed();
    drop(c);
    let mut stalled = Vec::new();
    for i in 0..1000 {
        let mut sock = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("stalled connection {i}: {e}"));
        if i % 2 == 0 {
            // Half of them send the start of a startup packet.
            sock.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
        }
        stalled.push(sock);
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let at = Instant::now();
        let c = client(&s).await;
        c.simple_query("SELECT 1").await.unwrap();
        slowest = slowest.max(at.elapsed());
    }
    eprintln!("login + SELECT 1: alone {alone:?}, beside 1,000 stalled logins at most {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "a login beside 1,000 stalled ones took {slowest:?} (alone {alone:?})"
    );
    drop(stalled);
}

/// What the replica's backend running the statement marked `marker` (in
/// a comment) waits for, if one runs.
fn replica_wait(s: &pgsplit_lab::stack::Stack, marker: &str) -> String {
    psql_on(
        s,
        pgsplit_lab::Which::Replica,
        &format!(
            "SELECT coalesce(wait_event, 'none') FROM pg_stat_activity \
             WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE '%{marker}%'"
        ),
    )
    .trim()
    .to_owned()
}

/// A client that asks for a gigabyte and then reads nothing: the proxy
/// holds a bounded amount and the server waits to write (backpressure),
/// and when the client goes, the server's statement ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_the_server_back_not_memory() {
    let s = stack();
    let mut raw = Raw::login(&s).await;
    let before = rss_and_fds().0;
    let mut q = BytesMut::new();
    pgsplit_protocol::encode::query(
        &mut q,
        "SELECT repeat('x', 1000) FROM generate_series(1, 1000000) /* stalled reader */",
    );
    raw.send(&q).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let wait = replica_wait(&s, "stalled reader");
    let grown = rss_and_fds().0.saturating_sub(before);
    eprintln!("a stalled reader of 1 GB: proxy grew {grown} KiB; the server waits on {wait:?}");
    assert_eq!(wait, "ClientWrite", "the server is not held back");
    assert!(
        grown < 64 * 1024,
        "the proxy buffered {grown} KiB for a client that reads nothing"
    );
    // The client goes: the statement on the server ends soon after.
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !replica_wait(&s, "stalled reader").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the statement outlived its client by 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client that pipelines queries without ever reading the answers is
/// held back too: the proxy stops reading it once the server stops
/// reading the proxy, so the client's writes block instead of the proxy's
/// memory growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_without_reading_is_held_back() {
    let s = stack();
    let raw = Raw::login(&s).await;
    let Raw { stream, .. } = raw;
    let (_read_half, mut write_half) = stream.into_split();
    let before = rss_and_fds().0;
    let mut one = BytesMut::new();
    pgsplit_protocol::encode::query(&mut one, "SELECT repeat('y', 4000) /* flood */");
    let mut chunk = BytesMut::new();
    for _ in 0..1000 {
        chunk.extend_from_slice(&one);
    }
    let total_chunks = 2000; // 2,000,000 queries, 8 GB of answers
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..total_chunks {
            if write_half.write_all(&chunk).await.is_err() {
                break;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        write_half
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let at_3s = sent.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_5s = sent.load(std::sync::atomic::Ordering::SeqCst);
    let grown = rss_and_fds().0.saturating_sub(before);
    eprintln!(
        "a flooding client: {at_5s} of {total_chunks} chunks of 1,000 queries sent in 5 s \
         ({at_3s} at 3 s); proxy grew {grown} KiB"
    );
    assert!(
        at_5s < total_chunks,
        "nothing held the flooding client back"
    );
    assert_eq!(
        at_3s, at_5s,
        "the client kept sending while nobody read the answers"
    );
    assert!(
        grown < 64 * 1024,
        "the proxy buffered {grown} KiB for a flooding client"
    );
    writer.abort();
}
