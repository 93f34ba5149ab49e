//! Writes under load while the tunnel to the primary is cut and restored
//! again and again: afterwards the primary holds exactly what clients were
//! told. Every acknowledged write is there; every write reported rolled
//! back (`08006`) or never sent (`08001`) is not; only `08007` may go
//! either way.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::PgBinaries;

use crate::common::*;

pub(crate) fn stack_set(set: &[&str]) -> Stack {
    stack_with(StackOptions {
        set: set.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
}

pub(crate) fn rows_on_primary(s: &Stack, sql: &str) -> Vec<String> {
    on_primary(s, sql)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Cuts the tunnel every `every`, restoring it `down` later, until
/// `stop`; returns how many cuts it made.
fn cutter(s: &Stack, every: Duration, down: Duration, stop: &AtomicBool, bound: Duration) -> usize {
    let started = Instant::now();
    let mut cuts = 0;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < bound {
        std::thread::sleep(every);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        s.tunnel().cut();
        cuts += 1;
        std::thread::sleep(down);
        s.tunnel().restore();
    }
    cuts
}

/// Keys as runs of consecutive values. A writer's keys are consecutive,
/// so a long run of one outcome costs one entry: the soak keeps hours of
/// them without its own memory growing.
#[derive(Default, Debug)]
pub(crate) struct Keys(Vec<(i64, i64)>);

impl Keys {
    pub(crate) fn push(&mut self, k: i64) {
        match self.0.last_mut() {
            Some(run) if run.1 + 1 == k => run.1 = k,
            _ => self.0.push((k, k)),
        }
    }

    pub(crate) fn extend(&mut self, other: Keys) {
        self.0.extend(other.0);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(|(a, b)| (b - a + 1) as usize).sum()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.iter().flat_map(|&(a, b)| a..=b)
    }
}

impl Told {
    /// Checks what was told against the primary's `chaos` table: the
    /// acknowledged keys missing there, and the keys reported failed that
    /// are there anyway.
    pub(crate) fn against_primary(&self, s: &Stack) -> (Vec<i64>, Vec<i64>) {
        let present: HashSet<i64> = rows_on_primary(s, "SELECT k FROM chaos")
            .iter()
            .map(|k| k.parse().unwrap())
            .collect();
        let missing = self.acked.iter().filter(|k| !present.contains(k)).collect();
        let phantom = self.absent.iter().filter(|k| present.contains(k)).collect();
        (missing, phantom)
    }
}

/// What all `writers` were told, each of them ending within `bound`.
pub(crate) async fn gather(writers: Vec<tokio::task::JoinHandle<Told>>, bound: Duration) -> Told {
    let mut told = Told::default();
    for w in writers {
        let t = tokio::time::timeout(bound, w)
            .await
            .expect("every session finishes: nothing hangs")
            .unwrap();
        told.acked.extend(t.acked);
        told.absent.extend(t.absent);
        told.unknown += t.unknown;
    }
    told
}

/// One session's record of what it was told.
#[derive(Default)]
pub(crate) struct Told {
    pub(crate) acked: Keys,
    /// 08006 (rolled back) and 08001 (never sent): must be absent.
    pub(crate) absent: Keys,
    pub(crate) unknown: usize,
}

pub(crate) async fn writer(conn: String, id: i64, until: Instant) -> Told {
    let c = connect(&conn).await.expect("connects");
    let mut told = Told::default();
    let mut n = 0i64;
    while Instant::now() < until {
        n += 1;
        let key = id * 1_000_000_000 + n;
        // In turn: an autocommit write and a block, each in the simple and
        // the extended protocol. Every step is bounded: a hang fails.
        let case = n % 4;
        let fut = async {
            match case {
                0 => c
                    .batch_execute(&format!("INSERT INTO chaos VALUES ({key})"))
                    .await
                    .map(drop),
                1 => c
                    .execute("INSERT INTO chaos VALUES ($1)", &[&key])
                    .await
                    .map(drop),
                2 => {
                    async {
                        c.batch_execute(&format!(
                            "BEGIN; INSERT INTO chaos VALUES ({key}); SELECT 1"
                        ))
                        .await?;
                        c.batch_execute("COMMIT").await
                    }
                    .await
                }
                _ => {
                    let r = async {
                        c.batch_execute("BEGIN").await?;
                        c.execute("INSERT INTO chaos VALUES ($1)", &[&key]).await?;
                        c.execute("COMMIT", &[]).await
                    }
                    .await;
                    r.map(drop)
                }
            }
        };
        let res = match tokio::time::timeout(Duration::from_secs(12), fut).await {
            Ok(r) => r,
            Err(_) => panic!("case {case} key {key} hung"),
        };
        match res {
            Ok(()) => told.acked.push(key),
            Err(e) => {
                let code = code(&e);
                match code.as_str() {
                    "08006" | "08001" => told.absent.push(key),
                    "08007" => told.unknown += 1,
                    // A block whose statement failed leaves the client in a
                    // failed block: 25P02 until it ends it.
                    "25P02" => told.absent.push(key),
                    // No server connection free in time (the pool's
                    // connections all stuck behind a black hole), or the
                    // proxy's statement timeout: never sent, or rolled back.
                    "53300" | "57014" => told.absent.push(key),
                    // A new server connection refused at login (the
                    // primary shutting down): never sent.
                    "57P03" => told.absent.push(key),
                    // The server shut down under a statement before any
                    // COMMIT (whose outcome is resolved, or 08007): the
                    // transaction is rolled back.
                    "57P01" => told.absent.push(key),
                    other => panic!("case {case} key {key}: unexpected {other}: {e:?}"),
                }
                // End whatever block the failure left open.
                let _ = c.batch_execute("ROLLBACK").await;
            }
        }
    }
    told
}

/// Four sessions write (autocommit and blocks, simple and extended
/// protocol) for eight seconds while the tunnel is cut every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_repeated_cuts_are_exactly_what_clients_were_told() {
    let s = stack_set(&[
        "timeouts.commit_resolution=all",
        "timeouts.commit_resolution_timeout=3s",
        "timeouts.connect_timeout=1s",
    ]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE chaos (k bigint PRIMARY KEY)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(8);
    let conn = s.conn_string();
    let writers: Vec<_> = (1..=4)
        .map(|i| tokio::spawn(writer(conn.clone(), i, until)))
        .collect();
    let cuts = tokio::task::block_in_place(|| {
        let stop2 = Arc::clone(&stop);
        std::thread::scope(|scope| {
            let h = scope.spawn(|| {
                cutter(
                    &s,
                    Duration::from_millis(1000),
                    Duration::from_millis(150),
                    &stop2,
                    Duration::from_secs(20),
                )
            });
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::SeqCst);
            h.join().unwrap()
        })
    });
    let told = gather(writers, Duration::from_secs(30)).await;
    let (missing, phantom) = told.against_primary(&s);
    let resolved: Vec<u64> = s
        .proxy()
        .shared()
        .stats
        .resolutions
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    println!(
        "{cuts} cuts: {} acknowledged, {} failed for sure, {} unknown; \
         lost commits resolved committed/aborted/unknown: {resolved:?}",
        told.acked.len(),
        told.absent.len(),
        told.unknown
    );
    assert!(cuts >= 5, "{cuts} cuts");
    assert!(!told.acked.is_empty());
    assert!(missing.is_empty(), "acknowledged but absent: {missing:?}");
    assert!(
        phantom.is_empty(),
        "reported failed but present: {phantom:?}"
    );
}

/// pgbench (blocks, extended protocol) with the tunnel cut every two
/// seconds: it finishes, every transaction it counts as processed is on
/// the primary, and nothing more than the transactions in flight when
/// clients gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_the_tunnel_cut_every_two_seconds_loses_nothing_acknowledged() {
    let s = stack_set(&[
        "timeouts.commit_resolution_timeout=3s",
        "timeouts.connect_timeout=1s",
    ]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE chaos (c int, v bigint)")
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("pgsplit-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("chaos.sql");
    std::fs::write(
        &script,
        "\\set v random(1, 1000000000000)\n\
         BEGIN;\n\
         INSERT INTO chaos VALUES (:client_id, :v);\n\
         END;\n",
    )
    .unwrap();
    let clients = 4;
    let bins = PgBinaries::locate().expect("PostgreSQL binaries");
    let mut child = Command::new(bins.tool("pgbench"))
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .args([
            "-n", "-M", "extended", "-c", "4", "-j", "2", "-T", "8", "-f",
        ])
        .arg(&script)
        .arg(s.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench runs");
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let h = scope.spawn(|| {
                cutter(
                    &s,
                    Duration::from_secs(2),
                    Duration::from_millis(200),
                    &stop,
                    Duration::from_secs(30),
                )
            });
            // Bounded: pgbench must end by itself.
            let deadline = started + Duration::from_secs(40);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("pgbench hung");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::SeqCst);
            h.join().unwrap();
            child.wait_with_output().unwrap()
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "number of transactions actually processed: N" or "N/M".
    let processed: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in pgbench output:\n{text}"));
    let aborted = text.matches("aborted in command").count() as i64;
    let rows: i64 = rows_on_primary(&s, "SELECT count(*) FROM chaos")[0]
        .parse()
        .unwrap();
    println!("pgbench: {processed} processed, {aborted} clients aborted, {rows} rows");
    // Every error pgbench met was a failure it reported (an aborted client),
    // never a hang; an aborted client had at most one transaction in flight.
    assert!(processed > 0, "{text}");
    assert!(rows >= processed, "acknowledged transactions lost:\n{text}");
    assert!(
        rows <= processed + aborted.min(clients),
        "{rows} rows for {processed} acknowledged:\n{text}"
    );
    for line in text.lines().filter(|l| l.contains("aborted in command")) {
        assert!(
            ["08006", "08007", "08001", "connection to the primary"]
                .iter()
                .any(|m| line.contains(m))
                || text.contains("connection to the primary"),
            "{line}"
        );
    }
}
