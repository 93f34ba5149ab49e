//! Read-your-writes under replica lag: a write-then-read workload through
//! pgsplit in each `read_your_writes` mode, with the replica applying WAL
//! late and the primary behind a tunnel that adds latency, as in the
//! deployment pgsplit is for.
//!
//! ```text
//! cargo run --release -p pgsplit-benches --bin ryw-lag -- [--duration 5] [--lag-ms 500] [--tunnel-ms 10] [--sessions 4] [--reads-per-write 9]
//! ```
//!
//! Each session loops: insert a row, read it back at once, then run
//! `--reads-per-write` (9: 10 % of statements write) other reads. Printed
//! per configuration (`read_your_writes` mode, and for `lsn` its scope and
//! `max_wait_for_replica`): reads per second, the share of reads the
//! replica served, p50/p99 read latency, and how many read-backs missed
//! their own write (or, in `proxy` scope, any write before it).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::LabOptions;
use tokio_postgres::NoTls;

struct Args {
    duration: u64,
    lag_ms: u64,
    tunnel_ms: u64,
    sessions: usize,
    reads: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        duration: 5,
        lag_ms: 500,
        tunnel_ms: 10,
        sessions: 4,
        reads: 9,
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
            "--lag-ms" => a.lag_ms = num("--lag-ms"),
            "--tunnel-ms" => a.tunnel_ms = num("--tunnel-ms"),
            "--sessions" => a.sessions = num("--sessions") as usize,
            "--reads-per-write" => a.reads = num("--reads-per-write"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

struct Outcome {
    cycles: u64,
    missed: u64,
    /// Every read's latency, in µs.
    latencies: Vec<u32>,
}

async fn session(conn: String, mode: String, id: usize, reads: u64, until: Instant) -> Outcome {
    let (c, connection) = tokio_postgres::connect(&conn, NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let insert = c
        .prepare("INSERT INTO ryw_bench (id) VALUES ($1)")
        .await
        .unwrap();
    let own = c
        .prepare("SELECT count(*) FROM ryw_bench WHERE id = $1")
        .await
        .unwrap();
    let other = c
        .prepare("SELECT count(*) FROM pg_class WHERE relname = $1")
        .await
        .unwrap();
    let mut out = Outcome {
        cycles: 0,
        missed: 0,
        latencies: Vec::new(),
    };
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let key = format!("{mode}-{id}-{n}");
        c.execute(&insert, &[&key]).await.unwrap();
        let at = Instant::now();
        let seen: i64 = c.query_one(&own, &[&key]).await.unwrap().get(0);
        out.latencies.push(at.elapsed().as_micros() as u32);
        if seen != 1 {
            out.missed += 1;
        }
        for _ in 0..reads {
            let at = Instant::now();
            c.query_one(&other, &[&"pg_class"]).await.unwrap();
            out.latencies.push(at.elapsed().as_micros() as u32);
        }
        out.cycles += 1;
    }
    out
}

fn main() {
    let args = parse_args();
    let mut stack = Stack::start(StackOptions {
        lab: LabOptions {
            extra_conf: vec![(
                "recovery_min_apply_delay".into(),
                format!("{}ms", args.lag_ms),
            )],
            ..Default::default()
        },
        ..Default::default()
    })
    .expect("lab starts");
    stack
        .cluster()
        .psql(
            pgsplit_lab::Which::Primary,
            "CREATE TABLE ryw_bench (id text PRIMARY KEY); ALTER TABLE ryw_bench OWNER TO app",
        )
        .expect("table");
    stack
        .cluster()
        .wait_replica_caught_up(Duration::from_secs(30))
        .expect("caught up");
    stack.tunnel().delay(Duration::from_millis(args.tunnel_ms));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    println!(
        "write-then-read, {} sessions, {} s per mode, replica applies WAL {} ms late, tunnel +{} ms each way",
        args.sessions, args.duration, args.lag_ms, args.tunnel_ms
    );
    println!(
        "{:<24} {:>9} {:>14} {:>9} {:>9} {:>8}",
        "configuration", "reads/s", "reads replica", "p50 ms", "p99 ms", "missed"
    );
    let configurations: &[(&str, &[&str])] = &[
        ("off", &["routing.read_your_writes=off"]),
        (
            "lsn session wait 0",
            &[
                "routing.read_your_writes=lsn",
                "routing.read_your_writes_scope=session",
            ],
        ),
        (
            "lsn session wait 20ms",
            &[
                "routing.read_your_writes=lsn",
                "routing.read_your_writes_scope=session",
                "routing.max_wait_for_replica=20ms",
            ],
        ),
        (
            "lsn proxy wait 0",
            &[
                "routing.read_your_writes=lsn",
                "routing.read_your_writes_scope=proxy",
            ],
        ),
        (
            "lsn proxy wait 20ms",
            &[
                "routing.read_your_writes=lsn",
                "routing.read_your_writes_scope=proxy",
                "routing.max_wait_for_replica=20ms",
            ],
        ),
        ("session", &["routing.read_your_writes=session"]),
        ("window", &["routing.read_your_writes=window"]),
    ];
    for (label, sets) in configurations {
        let mode = label.split(' ').next().unwrap_or(label);
        let sets: Vec<String> = sets.iter().map(|s| (*s).to_owned()).collect();
        stack.restart_proxy(&sets).expect("proxy restarts");
        let conn = stack.conn_string();
        let shared = stack.proxy().shared().clone();
        let until = Instant::now() + Duration::from_secs(args.duration);
        let started = Instant::now();
        let outcomes = rt.block_on(async {
            let tasks: Vec<_> = (0..args.sessions)
                .map(|i| {
                    tokio::spawn(session(
                        conn.clone(),
                        format!("{label}-{mode}"),
                        i,
                        args.reads,
                        until,
                    ))
                })
                .collect();
            let mut v = Vec::new();
            for t in tasks {
                v.push(t.await.unwrap());
            }
            v
        });
        let secs = started.elapsed().as_secs_f64();
        let cycles: u64 = outcomes.iter().map(|o| o.cycles).sum();
        let missed: u64 = outcomes.iter().map(|o| o.missed).sum();
        // Reads are what did not write.
        let reads = cycles * (1 + args.reads);
        let replica = shared.stats.routed_replica.load(Relaxed);
        let share = if reads > 0 {
            100.0 * replica.min(reads) as f64 / reads as f64
        } else {
            0.0
        };
        let mut lat: Vec<u32> = outcomes
            .iter()
            .flat_map(|o| o.latencies.iter().copied())
            .collect();
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p) as usize).min(lat.len() - 1);
            f64::from(lat[i]) / 1000.0
        };
        println!(
            "{:<24} {:>9.0} {:>13.1}% {:>9.2} {:>9.2} {:>8}",
            label,
            reads as f64 / secs,
            share,
            pct(0.50),
            pct(0.99),
            missed
        );
    }
}
