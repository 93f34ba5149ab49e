//! Connect-per-request over the tunnel: what an app that opens a connection
//! per request (PHP, Django with `CONN_MAX_AGE = 0`) pays for its first
//! write when the primary is far away.
//!
//! ```text
//! cargo run --release -p pgsplit-benches --bin connect-per-request -- [--requests 200] [--tunnel-ms 20]
//! ```
//!
//! The lab's tunnel adds `--tunnel-ms` each way between pgsplit and the
//! primary. Each request connects, inserts one row (a simple Query, as
//! psycopg2 and PHP send it), and disconnects:
//! directly through the tunnel (TCP connect, startup and SCRAM, then the
//! INSERT: every round trip crosses the tunnel), and through pgsplit (the
//! client's login is answered on the node; the INSERT runs on a pooled
//! primary connection, so only its own round trip crosses). Requests
//! alternate between the two so drift hits both alike. Prints the median
//! and p99 of each, and the ratio.

use std::time::{Duration, Instant};

use pgsplit_lab::stack::{Stack, StackOptions};
use tokio_postgres::NoTls;

fn parse_args() -> (usize, u64) {
    let (mut requests, mut tunnel_ms) = (200usize, 20u64);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().and_then(|v| v.parse::<u64>().ok());
        match (k.as_str(), v) {
            ("--requests", Some(v)) => requests = v as usize,
            ("--tunnel-ms", Some(v)) => tunnel_ms = v,
            _ => {
                eprintln!(
                    "usage: connect-per-request [--requests N] [--tunnel-ms MS] (bad argument {k})"
                );
                std::process::exit(2);
            }
        }
    }
    (requests, tunnel_ms)
}

async fn request(conn: &str, key: &str) -> Duration {
    let at = Instant::now();
    let (c, connection) = tokio_postgres::connect(conn, NoTls).await.expect("connect");
    let task = tokio::spawn(connection);
    // One simple Query, as psycopg2 (Django's default driver) and PHP send
    // a write: the statement's one round trip.
    c.batch_execute(&format!("INSERT INTO per_request (k) VALUES ('{key}')"))
        .await
        .expect("insert");
    drop(c);
    let _ = task.await;
    at.elapsed()
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn main() {
    let (requests, tunnel_ms) = parse_args();
    let stack = Stack::start(StackOptions::default()).expect("lab starts");
    let o = &stack.options().lab;
    stack
        .cluster()
        .psql(
            pgsplit_lab::Which::Primary,
            &format!(
                "CREATE TABLE per_request (k text PRIMARY KEY); ALTER TABLE per_request OWNER TO {}",
                o.user
            ),
        )
        .expect("table");
    let direct = format!(
        "host={} port={} user={} password={} dbname={}",
        stack.tunnel().addr().ip(),
        stack.tunnel().addr().port(),
        o.user,
        o.password,
        o.database
    );
    let proxy = stack.conn_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Warm both paths (the pool's idle primary connections are opened at
    // start; this waits for them) before the tunnel slows down.
    rt.block_on(async {
        request(&direct, "warm-direct").await;
        request(&proxy, "warm-proxy").await;
    });
    stack.tunnel().delay(Duration::from_millis(tunnel_ms));
    std::thread::sleep(Duration::from_millis(200));
    let (mut d, mut p) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for i in 0..requests {
            let (first, second) = if i % 2 == 0 {
                (&direct, &proxy)
            } else {
                (&proxy, &direct)
            };
            let a = request(first, &format!("{i}-a")).await;
            let b = request(second, &format!("{i}-b")).await;
            if i % 2 == 0 {
                d.push(a);
                p.push(b);
            } else {
                p.push(a);
                d.push(b);
            }
        }
    });
    let (dm, d99) = (percentile(&mut d, 0.5), percentile(&mut d, 0.99));
    let (pm, p99) = (percentile(&mut p, 0.5), percentile(&mut p, 0.99));
    println!(
        "connect, INSERT one row, disconnect; {requests} requests each; tunnel +{tunnel_ms} ms each way"
    );
    println!("{:<10} {:>10} {:>10}", "", "median ms", "p99 ms");
    println!("{:<10} {:>10.1} {:>10.1}", "direct", dm, d99);
    println!("{:<10} {:>10.1} {:>10.1}", "pgsplit", pm, p99);
    println!(
        "pgsplit / direct: median {:.2}×, p99 {:.2}×",
        pm / dm.max(f64::MIN_POSITIVE),
        p99 / d99.max(f64::MIN_POSITIVE)
    );
}
