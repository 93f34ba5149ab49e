//! The soak: pgbench TPC-B and the chaos tests' write-and-verify sessions
//! run together for a while (`PGSPLIT_SOAK_SECS`, 120 by default) while
//! the tunnel to the primary flaps every `PGSPLIT_SOAK_FLAP_SECS` (30):
//! cut, then black-holed, then 200 ms slower, then restored. At the end
//! every write a client was told succeeded is on the primary, nothing it
//! was told failed is, the proxy's memory and descriptors are back within
//! 10 % of their level after warm-up, and no client session or leased
//! server connection is left behind. `scripts/soak` runs it for longer.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgsplit_lab::stack::Stack;
use pgsplit_lab::PgBinaries;
use pgsplit_router::Target;

use crate::chaos::{gather, rows_on_primary, stack_set, writer};
use crate::common::*;

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Flaps the tunnel every `every` until `stop`: cut for 2 s, black hole
/// for 3 s, +200 ms for 5 s, in turn. Returns the flaps made.
fn flapper(s: &Stack, every: Duration, stop: &AtomicBool) -> usize {
    let mut flaps = 0;
    let nap = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    loop {
        nap(every);
        if stop.load(Ordering::SeqCst) {
            return flaps;
        }
        match flaps % 3 {
            0 => {
                s.tunnel().cut();
                nap(Duration::from_secs(2));
            }
            1 => {
                s.tunnel().blackhole();
                nap(Duration::from_secs(3));
            }
            _ => {
                s.tunnel().delay(Duration::from_millis(200));
                nap(Duration::from_secs(5));
            }
        }
        s.tunnel().restore();
        flaps += 1;
    }
}

/// pgbench TPC-B rounds until `until` (a round ends early when all its
/// clients aborted); returns (processed, aborted clients, rounds).
fn pgbench_rounds(s: &Stack, until: Instant) -> (i64, i64, usize) {
    let bins = PgBinaries::locate().expect("PostgreSQL binaries");
    let (mut processed, mut aborted, mut rounds) = (0, 0, 0);
    loop {
        let left = until.saturating_duration_since(Instant::now()).as_secs();
        if left < 2 {
            return (processed, aborted, rounds);
        }
        rounds += 1;
        let mut child = Command::new(bins.tool("pgbench"))
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .args(["-n", "-M", "extended", "-c", "4", "-j", "2", "-T"])
            .arg(left.to_string())
            .arg(s.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgbench runs");
        // Bounded: pgbench must end by itself.
        let deadline = Instant::now() + Duration::from_secs(left + 60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("pgbench hung");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        processed += text
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or_else(|| panic!("no count in pgbench output:\n{text}"));
        aborted += text.matches("aborted in command").count() as i64;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_tunnel_flaps_loses_nothing_and_leaks_nothing() {
    let length = env_secs("PGSPLIT_SOAK_SECS", 120);
    let every = env_secs("PGSPLIT_SOAK_FLAP_SECS", 30);
    let s = stack_set(&[
        "timeouts.commit_resolution=all",
        "timeouts.commit_resolution_timeout=3s",
        "timeouts.connect_timeout=1s",
        "timeouts.primary.statement_timeout=5s",
    ]);
    pgbench(&s, &["-i", "-s", "1", "-q"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE chaos (k bigint PRIMARY KEY)")
        .await
        .unwrap();
    drop(c);
    let started = Instant::now();
    let until = started + length;
    let conn = s.conn_string();
    let writers: Vec<_> = (1..=4)
        .map(|i| tokio::spawn(writer(conn.clone(), i, until)))
        .collect();
    // Warm-up: the first flap and its recovery.
    let warm_at = (every + Duration::from_secs(12)).min(length / 2);
    let stop = AtomicBool::new(false);
    let (flaps, (processed, aborted, rounds), warm) = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let f = scope.spawn(|| flapper(&s, every, &stop));
            let b = scope.spawn(|| pgbench_rounds(&s, until));
            while started.elapsed() < warm_at {
                std::thread::sleep(Duration::from_millis(100));
            }
            let warm = rss_and_fds();
            let bench = b.join().unwrap();
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, Ordering::SeqCst);
            (f.join().unwrap(), bench, warm)
        })
    });
    s.tunnel().restore();
    let told = gather(writers, Duration::from_secs(60)).await;

    // Nothing left behind: no client, no leased or pinned connection.
    let shared = s.proxy().shared();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (clients, leased) = loop {
        let clients = shared.stats.clients_connected.load(Ordering::SeqCst);
        let leased: usize = [Target::Primary, Target::Replica]
            .iter()
            .flat_map(|t| shared.pools.get(*t).rows())
            .map(|r| r.leased)
            .sum();
        if (clients == 0 && leased == 0) || Instant::now() > deadline {
            break (clients, leased);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let pinned = pgsplit_server::pool::STATS.pinned.load(Ordering::SeqCst);
    // Measured before the checks below read every row into this process.
    let end = rss_and_fds();

    // What clients were told is what the primary holds.
    let (missing, phantom) = told.against_primary(&s);
    let history: i64 = rows_on_primary(&s, "SELECT count(*) FROM pgbench_history")[0]
        .parse()
        .unwrap();

    let rss_ratio = end.0 as f64 / warm.0 as f64;
    println!(
        "soak {length:?}, {flaps} flaps: {} writes acknowledged, {} failed for sure, {} unknown; \
         pgbench {processed} transactions in {rounds} rounds, {aborted} clients aborted, \
         {history} history rows; RSS {} KiB after warm-up, {} KiB at the end ({rss_ratio:.3}); \
         descriptors {} then {}; clients {clients}, leased {leased}, pinned {pinned}",
        told.acked.len(),
        told.absent.len(),
        told.unknown,
        warm.0,
        end.0,
        warm.1,
        end.1,
    );
    assert!(flaps >= 2, "{flaps} flaps");
    assert!(!told.acked.is_empty() && processed > 0);
    assert!(missing.is_empty(), "acknowledged but absent: {missing:?}");
    assert!(
        phantom.is_empty(),
        "reported failed but present: {phantom:?}"
    );
    assert!(
        history >= processed,
        "{history} history rows for {processed} acknowledged"
    );
    assert!(
        history <= processed + aborted,
        "{history} history rows for {processed} acknowledged and {aborted} aborted"
    );
    assert_eq!(
        (clients, leased, pinned),
        (0, 0, 0),
        "sessions or connections left behind"
    );
    assert!(rss_ratio <= 1.10, "RSS grew {rss_ratio:.3}× after warm-up");
    assert!(
        end.1 as f64 <= warm.1 as f64 * 1.10,
        "descriptors {} after warm-up, {} at the end",
        warm.1,
        end.1
    );
}
