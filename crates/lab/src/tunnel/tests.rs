//! Tunnel behaviour against a small echo server, driven from plain threads as sync callers
//! (the proxy's test set-up) would, plus one check from inside a tokio runtime.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// Echoes every connection until it closes; lives as long as the test process.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut writer) = stream else { continue };
            thread::spawn(move || {
                let mut reader = writer.try_clone().unwrap();
                let _ = io::copy(&mut reader, &mut writer);
            });
        }
    });
    addr
}

fn connect(tunnel: &Tunnel) -> TcpStream {
    let stream = TcpStream::connect(tunnel.addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Sends `message` and reads the echo; returns how long that took.
fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Duration> {
    let started = Instant::now();
    stream.write_all(message)?;
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed)?;
    assert_eq!(echoed, message);
    Ok(started.elapsed())
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a read shows the connection was torn down (reset or closed).
fn is_torn_down(result: io::Result<usize>) -> bool {
    match result {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ),
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[test]
fn tunnel_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tunnel>();
}

#[test]
fn passes_traffic_both_ways_and_counts_connections() {
    let tunnel = Tunnel::start(echo_server()).unwrap();
    assert_eq!(tunnel.mode(), TunnelMode::Pass);
    let mut stream = connect(&tunnel);
    round_trip(&mut stream, b"hello").unwrap();
    assert_eq!(tunnel.connections(), 1);

    // A payload much larger than a chunk and the socket buffers, written while reading.
    let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut writer = stream.try_clone().unwrap();
    let sent = payload.clone();
    let sender = thread::spawn(move || writer.write_all(&sent));
    let mut echoed = vec![0; payload.len()];
    stream.read_exact(&mut echoed).unwrap();
    sender.join().unwrap().unwrap();
    assert!(echoed == payload, "payload corrupted in transit");

    drop(stream);
    eventually("the connection to close", || tunnel.connections() == 0);
}

#[test]
fn delay_adds_latency_in_each_direction() {
    let tunnel = Tunnel::start(echo_server()).unwrap();
    let mut stream = connect(&tunnel);
    round_trip(&mut stream, b"ping").unwrap();

    // Each chunk is due `latency` after the tunnel read it, and timers never fire early, so a
    // round trip takes at least twice the latency however loaded the machine is.
    let latency = Duration::from_millis(100);
    tunnel.delay(latency);
    assert_eq!(tunnel.mode(), TunnelMode::Delay(latency));
    let delayed = round_trip(&mut stream, b"ping").unwrap();
    assert!(
        delayed >= 2 * latency,
        "round trip {delayed:?} with {latency:?} each way"
    );

    // Back-to-back chunks are queued, not serialised: ten writes cost one delay, not ten.
    let started = Instant::now();
    for _ in 0..10 {
        stream.write_all(b"x").unwrap();
    }
    let mut echoed = [0; 10];
    stream.read_exact(&mut echoed).unwrap();
    assert!(
        started.elapsed() < 5 * latency,
        "pipelined writes took {:?}",
        started.elapsed()
    );

    tunnel.restore();
    let restored = round_trip(&mut stream, b"ping").unwrap();
    assert!(restored < latency, "still slow after restore: {restored:?}");
}

#[test]
fn drop_replies_delivers_requests_and_loses_their_answers() {
    // An echo upstream that also reports what it received.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = mpsc::channel::<Vec<u8>>();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let tx = seen_tx.clone();
            thread::spawn(move || {
                let mut buf = [0; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                    let _ = s.write_all(&buf[..n]);
                }
            });
        }
    });
    let tunnel = Tunnel::start(addr).unwrap();
    let mut stream = connect(&tunnel);
    round_trip(&mut stream, b"before").unwrap();
    let wait = Duration::from_secs(5);
    assert_eq!(seen.recv_timeout(wait).unwrap(), b"before");

    tunnel.drop_replies();
    assert_eq!(tunnel.mode(), TunnelMode::DropReplies);
    stream.write_all(b"lost").unwrap();
    assert_eq!(
        seen.recv_timeout(wait).unwrap(),
        b"lost",
        "the request arrives"
    );
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let err = stream.read(&mut [0; 4]).unwrap_err();
    assert!(is_timeout(&err), "the answer must be lost, got {err:?}");

    tunnel.restore();
    stream.set_read_timeout(Some(wait)).unwrap();
    round_trip(&mut stream, b"after").unwrap();
}

#[test]
fn throttle_limits_the_byte_rate() {
    let tunnel = Tunnel::start(echo_server()).unwrap();
    let mut stream = connect(&tunnel);
    round_trip(&mut stream, b"ping").unwrap();
    // 4 KB at 16 KB/s: a quarter of a second each way.
    tunnel.throttle(16 * 1024);
    let slow = round_trip(&mut stream, &[7; 4096]).unwrap();
    assert!(
        slow >= Duration::from_millis(450),
        "throttled round trip {slow:?}"
    );
    tunnel.restore();
    let fast = round_trip(&mut stream, &[7; 4096]).unwrap();
    assert!(fast < Duration::from_millis(200), "after restore {fast:?}");
}

#[test]
fn blackhole_holds_traffic_but_keeps_connections_open() {
    let tunnel = Tunnel::start(echo_server()).unwrap();
    let mut old = connect(&tunnel);
    round_trip(&mut old, b"before").unwrap();

    tunnel.blackhole();
    assert_eq!(tunnel.mode(), TunnelMode::Blackhole);
    let short = Some(Duration::from_millis(300));
    old.set_read_timeout(short).unwrap();
    old.write_all(b"during").unwrap();
    let mut buf = [0; 6];
    let err = old.read(&mut buf).unwrap_err();
    assert!(is_timeout(&err), "expected a read timeout, got {err:?}");

    // New connections are accepted too, and go nowhere.
    let mut new = connect(&tunnel);
    new.set_read_timeout(short).unwrap();
    new.write_all(b"hello?").unwrap();
    let err = new.read(&mut buf).unwrap_err();
    assert!(is_timeout(&err), "expected a read timeout, got {err:?}");
    assert_eq!(tunnel.connections(), 2);

    // Nothing was lost: what was held flows once restored.
    tunnel.restore();
    for (stream, expected) in [(&mut old, b"during"), (&mut new, b"hello?")] {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, expected);
    }
}

#[test]
fn cut_resets_both_sides_and_refuses_new_connections_until_restored() {
    // An upstream that reports how its side of the connection ended.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (ended, upstream_saw) = mpsc::channel();
    thread::spawn(move || {
        let (mut conn, _) = upstream.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0; 16];
        let _ = conn.read(&mut buf); // "hello"
        conn.write_all(b"hi").unwrap();
        let _ = ended.send(conn.read(&mut buf));
        for conn in upstream.incoming().flatten() {
            let _ = io::copy(&mut conn.try_clone().unwrap(), &mut &conn);
        }
    });

    let tunnel = Tunnel::start(upstream_addr).unwrap();
    let mut stream = connect(&tunnel);
    stream.write_all(b"hello").unwrap();
    let mut buf = [0; 2];
    stream.read_exact(&mut buf).unwrap();

    tunnel.cut();
    assert_eq!(tunnel.mode(), TunnelMode::Cut);
    assert_eq!(tunnel.connections(), 0);
    let mut rest = [0; 1];
    let client_end = stream.read(&mut rest);
    assert!(
        matches!(&client_end, Err(err) if err.kind() == io::ErrorKind::ConnectionReset),
        "client side should see a reset, got {client_end:?}"
    );
    let upstream_end = upstream_saw.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(&upstream_end, Err(err) if err.kind() == io::ErrorKind::ConnectionReset),
        "upstream side should see a reset, got {upstream_end:?}"
    );

    // New connections are accepted by the kernel and reset at once.
    if let Ok(mut fresh) = TcpStream::connect(tunnel.addr()) {
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = fresh.write_all(b"anyone?");
        assert!(
            is_torn_down(fresh.read(&mut rest)),
            "new connection was not refused"
        );
    }

    tunnel.restore();
    let mut after = connect(&tunnel);
    round_trip(&mut after, b"back").unwrap();
}

#[test]
fn closes_the_client_when_upstream_refuses() {
    let refusing = crate::ports::loopback(crate::ports::free_port().unwrap());
    let tunnel = Tunnel::start(refusing).unwrap();
    let mut stream = connect(&tunnel);
    let mut buf = [0; 1];
    assert!(is_torn_down(stream.read(&mut buf)));
}

#[tokio::test]
async fn works_from_inside_a_tokio_runtime_and_drops_there() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let tunnel = Tunnel::start(echo_server()).unwrap();
    let mut stream = tokio::net::TcpStream::connect(tunnel.addr()).await.unwrap();
    stream.write_all(b"async").await.unwrap();
    let mut buf = [0; 5];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"async");
    drop(tunnel);
    // The tunnel closed its side: the client sees EOF or a reset.
    let end = stream.read(&mut buf).await;
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
}
