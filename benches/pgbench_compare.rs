//! pgbench through pgsplit, against direct PostgreSQL and PgBouncer, in one
//! run on the same machine, interleaved so drift hits every target alike.
//!
//! ```text
//! cargo run --release -p pgsplit-benches --bin pgbench-compare -- [--duration 10] [--rounds 1] [--scale 10] [--quick]
//! ```
//!
//! Reads (`-S`) are compared with the replica, which is where pgsplit sends
//! them; TPC-B with the primary. pgsplit and PgBouncer reach the local
//! replica through its unix socket, as a node-local deployment would
//! (`PGSPLIT_BENCH_TCP=1` makes them use TCP); pgbench always uses TCP. pgsplit reaches the primary directly here
//! (no fault tunnel) so the figure is the proxy's own cost. PgBouncer runs
//! in transaction mode, as pgsplit pools by default, both with pools of
//! `POOL_SIZE`; it is skipped with a note when it is not installed. A
//! pgbench run that fails outright shows as "fails" (PgBouncer before 1.21
//! cannot run `-M prepared` in transaction mode). Prints a table of TPS,
//! latency, ratios and failed transactions.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::PgBinaries;

/// Server connections per pool in both proxies (pgsplit's `pool.size`,
/// PgBouncer's `default_pool_size`): the `-c 50` cases have five clients per
/// connection.
const POOL_SIZE: u32 = 10;

struct Args {
    duration: u32,
    rounds: u32,
    scale: u32,
    quick: bool,
}

const USAGE: &str = "usage: pgbench-compare [--duration SECONDS] [--rounds N] [--scale N] [--quick]
  --duration  seconds per pgbench run (10)
  --rounds    interleaved rounds; the table shows their means (1)
  --scale     pgbench scale factor (10)
  --quick     only -S with 8 clients, in each -M mode
env: PGSPLIT_BENCH_TCP=1 (replica over TCP), PGSPLIT_BENCH_SET=\"key=value ...\" (pgsplit settings)";

fn parse_args() -> Args {
    let mut a = Args {
        duration: 10,
        rounds: 1,
        scale: 10,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut num = |name: &str| -> u32 {
            it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("pgbench-compare: {name} needs a number\n{USAGE}");
                std::process::exit(2)
            })
        };
        match k.as_str() {
            "--duration" => a.duration = num("--duration"),
            "--rounds" => a.rounds = num("--rounds"),
            "--scale" => a.scale = num("--scale"),
            "--quick" => a.quick = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("pgbench-compare: unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    a
}

#[derive(Clone, Copy)]
struct Case {
    select_only: bool,
    mode: &'static str,
    clients: u32,
    /// A new connection per transaction (`-C`).
    connect: bool,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "{}{} -M {} -c{}",
            if self.select_only { "-S   " } else { "tpcb " },
            if self.connect { "-C " } else { "" },
            self.mode,
            self.clients
        )
    }
}

#[derive(Default, Clone, Copy)]
struct Sample {
    tps: f64,
    latency_ms: f64,
    failed: u64,
    /// CPU the proxy process used per transaction (µs), when measured.
    cpu_us: f64,
    /// The part of it spent in the proxy's own code rather than the
    /// kernel (utime): what a proxy's design decides; the kernel's share is
    /// mostly the sockets of the extra hop, about the same for any proxy.
    user_us: f64,
    /// Context switches of the proxy per transaction.
    switches: f64,
    /// pgbench itself failed (exit status), e.g. a proxy that cannot run
    /// the mode.
    broken: bool,
}

/// utime and utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / 100.0, (ticks(11) + ticks(12)) / 100.0)
}

/// Voluntary plus involuntary context switches of all of a process's threads.
fn context_switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut n = 0.0;
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if line.contains("ctxt_switches:") {
                n += line
                    .split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    n
}

/// Runs pgbench and charges the CPU time of `proxy_pid` to it.
fn measured(
    bins: &PgBinaries,
    url: &str,
    case: Case,
    duration: u32,
    proxy_pid: Option<u32>,
) -> Sample {
    let before = proxy_pid.map(|p| (cpu_seconds(p), context_switches(p)));
    let mut s = run_pgbench(bins, url, case, duration);
    if let (Some(pid), Some((b, cs))) = (proxy_pid, before) {
        let tx = s.tps * f64::from(duration);
        if tx > 0.0 {
            let (user, total) = cpu_seconds(pid);
            s.cpu_us = (total - b.1) * 1e6 / tx;
            s.user_us = (user - b.0) * 1e6 / tx;
            s.switches = (context_switches(pid) - cs) / tx;
        }
    }
    s
}

fn run_pgbench(bins: &PgBinaries, url: &str, case: Case, duration: u32) -> Sample {
    let mut c = Command::new(bins.tool("pgbench"));
    // More clients than a pool holds need a thread each: pgbench's
    // prepare step blocks its thread, and the open transactions of the
    // thread's other clients hold their connections meanwhile.
    let threads = if case.clients > POOL_SIZE {
        case.clients
    } else {
        case.clients.min(2)
    };
    c.args(["-n", "-M", case.mode, "-T", &duration.to_string()])
        .args(["-c", &case.clients.to_string(), "-j", &threads.to_string()]);
    if case.select_only {
        c.arg("-S");
    }
    if case.connect {
        c.arg("-C");
    }
    c.arg(url);
    let out = c.output().expect("pgbench runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("pgbench failed for {}:\n{text}", case.label());
        return Sample {
            broken: true,
            ..Sample::default()
        };
    }
    let find = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Sample {
        tps: find("tps = ").unwrap_or(0.0),
        latency_ms: find("latency average = ").unwrap_or(0.0),
        failed: find("number of failed transactions: ").unwrap_or(0.0) as u64,
        cpu_us: 0.0,
        user_us: 0.0,
        switches: 0.0,
        broken: false,
    }
}

/// A PgBouncer in transaction mode with one database per backend.
struct Bouncer {
    child: Child,
    port: u16,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_pgbouncer(
    primary: SocketAddr,
    replica: (String, u16),
    user: &str,
    password: &str,
) -> Option<Bouncer> {
    let exe = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let port = pgsplit_lab::ports::free_port().ok()?;
    let dir =
        TempDir(std::env::temp_dir().join(format!("pgsplit-bench-bouncer-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).ok()?;
    let ini = format!(
        "[databases]\nreplica = host={} port={} dbname=app\nprimary = host={} port={} dbname=app\n\
         [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
         auth_type = scram-sha-256\nauth_file = {}/users.txt\npool_mode = transaction\n\
         max_client_conn = 200\ndefault_pool_size = {POOL_SIZE}\nlogfile = {}/pgbouncer.log\n",
        replica.0,
        replica.1,
        primary.ip(),
        primary.port(),
        dir.0.display(),
        dir.0.display()
    );
    std::fs::write(dir.0.join("pgbouncer.ini"), ini).ok()?;
    std::fs::write(
        dir.0.join("users.txt"),
        format!("\"{user}\" \"{password}\"\n"),
    )
    .ok()?;
    let root = unsafe_free_is_root();
    let mut cmd = if root {
        let _ = Command::new("chown")
            .args(["-R", "postgres:", &dir.0.display().to_string()])
            .status();
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", exe]);
        c
    } else {
        Command::new(exe)
    };
    cmd.arg(dir.0.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().ok()?;
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(Bouncer {
                child,
                port,
                _dir: dir,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn unsafe_free_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Bouncer {
    /// The pgbouncer process itself (under runuser when started as root).
    fn pid(&self) -> Option<u32> {
        let out = Command::new("pgrep")
            .args(["-x", "pgbouncer"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .find(|p: &u32| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains(&self._dir.0.display().to_string()))
            })
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn main() {
    let args = parse_args();
    let bins = PgBinaries::locate().expect("PostgreSQL binaries");
    let mut set = vec![format!("pool.size={POOL_SIZE}")];
    set.extend(
        std::env::var("PGSPLIT_BENCH_SET")
            .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default(),
    );
    let stack = Stack::start(StackOptions {
        primary_through_tunnel: false,
        replica_via_unix_socket: std::env::var("PGSPLIT_BENCH_TCP").is_err(),
        set,
        lab: pgsplit_lab::LabOptions {
            extra_conf: vec![("max_connections".into(), "200".into())],
            ..Default::default()
        },
        ..Default::default()
    })
    .expect("lab starts");
    let o = &stack.options().lab;
    let (user, pw, db) = (o.user.clone(), o.password.clone(), o.database.clone());
    let c = stack.cluster();
    let direct_primary = format!("postgres://{user}:{pw}@{}/{db}", c.primary_addr());
    let direct_replica = format!("postgres://{user}:{pw}@{}/{db}", c.replica_addr());
    let proxy = stack.url();
    eprintln!("initialising pgbench tables (scale {})…", args.scale);
    let st = Command::new(bins.tool("pgbench"))
        .args(["-i", "-q", "-s", &args.scale.to_string(), &direct_primary])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("pgbench -i");
    assert!(st.success(), "pgbench -i failed");
    c.wait_replica_caught_up(Duration::from_secs(120))
        .expect("replica catches up");
    // PgBouncer reaches the replica the same way pgsplit does.
    let replica_host = if stack.options().replica_via_unix_socket {
        c.server(pgsplit_lab::Which::Replica)
            .socket_dir()
            .display()
            .to_string()
    } else {
        c.replica_addr().ip().to_string()
    };
    let bouncer = start_pgbouncer(
        c.primary_addr(),
        (replica_host, c.replica_addr().port()),
        &user,
        &pw,
    );
    let bouncer_version = bouncer.as_ref().map(|_| {
        ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find_map(|p| Command::new(p).arg("--version").output().ok())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    });
    if bouncer.is_none() {
        eprintln!(
            "note: pgbouncer not installed (apt-get install pgbouncer); its column is skipped"
        );
    }
    let case = |select_only, mode, clients, connect| Case {
        select_only,
        mode,
        clients,
        connect,
    };
    let mut cases = Vec::new();
    for mode in ["simple", "extended", "prepared"] {
        cases.push(case(true, mode, 8, false));
        if !args.quick {
            cases.push(case(false, mode, 8, false));
            cases.push(case(true, mode, 1, false));
        }
    }
    if !args.quick {
        // A new connection per transaction (SCRAM each time).
        cases.push(case(true, "simple", 8, true));
        // More clients than the pool holds.
        for mode in ["simple", "extended", "prepared"] {
            cases.push(case(false, mode, 50, false));
        }
    }
    let n = cases.len();
    let mut direct = vec![Vec::new(); n];
    let mut split = vec![Vec::new(); n];
    let mut bounce = vec![Vec::new(); n];
    for round in 0..args.rounds {
        for (i, case) in cases.iter().enumerate() {
            eprintln!("round {} {}", round + 1, case.label());
            let d = if case.select_only {
                &direct_replica
            } else {
                &direct_primary
            };
            // Each round starts with another target, so whatever the
            // machine does in a rhythm (a neighbour, a checkpoint) does not
            // always land on the same one.
            for k in 0..3 {
                match (k + round as usize + i) % 3 {
                    0 => direct[i].push(run_pgbench(&bins, d, *case, args.duration)),
                    1 => split[i].push(measured(
                        &bins,
                        &proxy,
                        *case,
                        args.duration,
                        Some(std::process::id()),
                    )),
                    _ => {
                        if let Some(b) = &bouncer {
                            let dbname = if case.select_only {
                                "replica"
                            } else {
                                "primary"
                            };
                            let url =
                                format!("postgres://{user}:{pw}@127.0.0.1:{}/{dbname}", b.port);
                            bounce[i].push(measured(&bins, &url, *case, args.duration, b.pid()));
                        }
                    }
                }
            }
        }
    }
    let mean = |v: &[Sample], f: fn(&Sample) -> f64| -> f64 {
        if v.is_empty() {
            0.0
        } else {
            v.iter().map(f).sum::<f64>() / v.len() as f64
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<26} {:>10} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>7} {:>7}",
        "case",
        "direct",
        "pgsplit",
        "pgbouncer",
        "split×",
        "bouncer×",
        "lat dir",
        "lat split",
        "cpu/tx sp",
        "cpu/tx bo",
        "usr/tx sp",
        "usr/tx bo",
        "cs/tx sp",
        "cs/tx bo",
        "fail sp",
        "fail bo"
    );
    for (i, case) in cases.iter().enumerate() {
        let (dt, st, bt) = (
            mean(&direct[i], |s| s.tps),
            mean(&split[i], |s| s.tps),
            mean(&bounce[i], |s| s.tps),
        );
        let failed = |v: &[Sample]| -> String {
            if v.iter().any(|s| s.broken) {
                "fails".into()
            } else {
                v.iter().map(|s| s.failed).sum::<u64>().to_string()
            }
        };
        let ratio = |x: f64| {
            if dt > 0.0 {
                format!("{:.2}", x / dt)
            } else {
                "-".into()
            }
        };
        let _ = writeln!(
            out,
            "{:<26} {:>10.0} {:>10.0} {:>10} {:>8} {:>9} {:>7.3}ms {:>7.3}ms {:>7.1}µs {:>7.1}µs {:>7.1}µs {:>7.1}µs {:>6.2} {:>6.2} {:>7} {:>7}",
            case.label(),
            dt,
            st,
            if bouncer.is_some() { format!("{bt:.0}") } else { "-".into() },
            ratio(st),
            if bouncer.is_some() { ratio(bt) } else { "-".into() },
            mean(&direct[i], |s| s.latency_ms),
            mean(&split[i], |s| s.latency_ms),
            mean(&split[i], |s| s.cpu_us),
            mean(&bounce[i], |s| s.cpu_us),
            mean(&split[i], |s| s.user_us),
            mean(&bounce[i], |s| s.user_us),
            mean(&split[i], |s| s.switches),
            mean(&bounce[i], |s| s.switches),
            failed(&split[i]),
            if bouncer.is_some() { failed(&bounce[i]) } else { "-".into() },
        );
    }
    println!("{out}");
    println!(
        "{} s per run, {} round(s), scale {}, reads vs the replica, TPC-B vs the primary; ratios are TPS / direct TPS",
        args.duration, args.rounds, args.scale
    );
    println!(
        "pools of {POOL_SIZE} server connections; pgsplit in its default transaction pooling; {}",
        match &bouncer_version {
            Some(v) => format!("{v} in transaction mode (pool_mode = transaction)"),
            None => "PgBouncer not installed".into(),
        }
    );
}
