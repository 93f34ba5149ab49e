//! Idle clients: what a thousand connected, idle clients cost pgsplit, and
//! what they do to the latency of the busy ones.
//!
//! ```text
//! cargo run --release -p pgsplit-benches --bin idle-clients -- [--idle 1000] [--active 50] [--seconds 5]
//! ```
//!
//! pgsplit runs in this process, on a lab (primary + replica). The idle
//! clients are held by a child process (this program, re-run with
//! `--hold`), so their own memory is not counted: each logs in, runs one
//! read and then sits idle. Printed: pgsplit's resident memory and open
//! file descriptors before and with the idle clients (and the difference
//! per client), and the p50/p99 latency of `--active` clients running
//! `SELECT 1` in a loop, alone and beside the idle ones.

use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgsplit_lab::stack::{Stack, StackOptions};
use tokio_postgres::NoTls;

struct Args {
    idle: usize,
    active: usize,
    seconds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        idle: 1000,
        active: 50,
        seconds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut num = || -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{k} needs a number"))
        };
        match k.as_str() {
            "--idle" => a.idle = num()? as usize,
            "--active" => a.active = num()? as usize,
            "--seconds" => a.seconds = num()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The child: `n` clients that log in, read once and wait for stdin to close.
fn hold(url: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let (c, conn) = tokio_postgres::connect(url, NoTls)
                .await
                .unwrap_or_else(|e| panic!("idle client {i}: {e}"));
            tokio::spawn(conn);
            c.simple_query("SELECT 1").await.expect("first read");
            clients.push(c);
        }
        println!("ready");
        std::io::stdout().flush().ok();
        // Until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await
        .ok();
        drop(clients);
    });
}

async fn active_latencies(url: &str, clients: usize, seconds: u64) -> Vec<u32> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
            tokio::spawn(conn);
            let mut lat = Vec::new();
            while Instant::now() < until {
                let at = Instant::now();
                c.simple_query("SELECT 1").await.expect("read");
                lat.push(at.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all.sort_unstable();
    all
}

fn pct(v: &[u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    f64::from(v[((v.len() as f64 * p) as usize).min(v.len() - 1)]) / 1000.0
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--hold") {
        let n = argv.get(3).and_then(|v| v.parse().ok()).unwrap_or(0);
        hold(&argv[2], n);
        return;
    }
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("idle-clients: {e}\nusage: idle-clients [--idle N] [--active N] [--seconds S]");
        std::process::exit(2)
    });
    let stack = Stack::start(StackOptions {
        primary_through_tunnel: false,
        set: vec![format!(
            "max_client_connections={}",
            args.idle + args.active + 100
        )],
        ..Default::default()
    })
    .expect("lab starts");
    let url = stack.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let alone = rt.block_on(active_latencies(&url, args.active, args.seconds));
    std::thread::sleep(Duration::from_millis(500));
    let (rss0, fds0) = (rss_kib(), open_fds());
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(["--hold", &url, &args.idle.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("holder answers");
    assert_eq!(line.trim(), "ready", "the idle clients did not all log in");
    std::thread::sleep(Duration::from_secs(1));
    let (rss1, fds1) = (rss_kib(), open_fds());
    let beside = rt.block_on(active_latencies(&url, args.active, args.seconds));
    drop(child.stdin.take());
    let _ = child.wait();
    println!(
        "{} idle clients: pgsplit RSS {} KiB -> {} KiB ({:.1} KiB per idle client), open fds {} -> {}",
        args.idle,
        rss0,
        rss1,
        (rss1.saturating_sub(rss0)) as f64 / args.idle.max(1) as f64,
        fds0,
        fds1
    );
    println!(
        "{} active clients, SELECT 1 for {} s: alone p50 {:.3} ms p99 {:.3} ms ({} reads); beside the idle ones p50 {:.3} ms p99 {:.3} ms ({} reads)",
        args.active,
        args.seconds,
        pct(&alone, 0.5),
        pct(&alone, 0.99),
        alone.len(),
        pct(&beside, 0.5),
        pct(&beside, 0.99),
        beside.len()
    );
}
