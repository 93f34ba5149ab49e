//! What resolving lost commits costs: write throughput through pgsplit
//! with `timeouts.commit_resolution` = `off`, `blocks` and `all`, for
//! autocommit writes and for writes in a transaction block, with the
//! primary behind the lab's tunnel (optionally with added latency).
//!
//! ```text
//! cargo run --release -p pgsplit-benches --bin commit-cost -- [--duration 5] [--sessions 4] [--tunnel-ms 0]
//! ```
//!
//! `blocks` adds the transaction-id query behind a block's first write (no
//! extra round trip); `all` also runs every autocommit write as a
//! one-statement block, which costs one more round trip to the primary.

use std::time::{Duration, Instant};

use pgsplit_lab::stack::{Stack, StackOptions};
use tokio_postgres::NoTls;

struct Args {
    duration: u64,
    sessions: usize,
    tunnel_ms: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        duration: 5,
        sessions: 4,
        tunnel_ms: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut num = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match k.as_str() {
            "--duration" => a.duration = num("--duration"),
            "--sessions" => a.sessions = num("--sessions") as usize,
            "--tunnel-ms" => a.tunnel_ms = num("--tunnel-ms"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Transactions one session commits until `until`.
async fn session(conn: String, block: bool, id: i32, until: Instant) -> u64 {
    let (c, connection) = tokio_postgres::connect(&conn, NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let update = c
        .prepare("UPDATE commit_bench SET n = n + 1 WHERE id = $1")
        .await
        .unwrap();
    let mut done = 0;
    while Instant::now() < until {
        if block {
            c.batch_execute("BEGIN").await.unwrap();
            c.execute(&update, &[&id]).await.unwrap();
            c.batch_execute("COMMIT").await.unwrap();
        } else {
            c.execute(&update, &[&id]).await.unwrap();
        }
        done += 1;
    }
    done
}

fn main() {
    let args = parse_args();
    let mut stack = Stack::start(StackOptions::default()).expect("lab starts");
    stack
        .cluster()
        .psql(
            pgsplit_lab::Which::Primary,
            "CREATE TABLE commit_bench (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
             INSERT INTO commit_bench (id) SELECT generate_series(0, 255);
             ALTER TABLE commit_bench OWNER TO app",
        )
        .expect("table");
    if args.tunnel_ms > 0 {
        stack.tunnel().delay(Duration::from_millis(args.tunnel_ms));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "one UPDATE per transaction, {} sessions, {} s per case, tunnel +{} ms each way",
        args.sessions, args.duration, args.tunnel_ms
    );
    println!(
        "{:<11} {:<8} {:>10} {:>12} {:>14}",
        "workload", "mode", "tx/s", "× off", "µs/tx vs off"
    );
    for block in [false, true] {
        let workload = if block { "block" } else { "autocommit" };
        let mut base = None;
        for mode in ["off", "blocks", "all"] {
            stack
                .restart_proxy(&[format!("timeouts.commit_resolution={mode}")])
                .expect("proxy restarts");
            let conn = stack.conn_string();
            let until = Instant::now() + Duration::from_secs(args.duration);
            let started = Instant::now();
            let total: u64 = rt.block_on(async {
                let tasks: Vec<_> = (0..args.sessions)
                    .map(|i| tokio::spawn(session(conn.clone(), block, i as i32, until)))
                    .collect();
                let mut sum = 0;
                for t in tasks {
                    sum += t.await.unwrap();
                }
                sum
            });
            let tps = total as f64 / started.elapsed().as_secs_f64();
            let off = *base.get_or_insert(tps);
            // Per session: how much longer each transaction took.
            let delta_us = (1.0 / tps - 1.0 / off) * 1e6 * args.sessions as f64;
            println!(
                "{workload:<11} {mode:<8} {tps:>10.0} {:>12.2} {delta_us:>14.0}",
                tps / off
            );
        }
    }
}
