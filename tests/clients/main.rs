//! Client compatibility suite: real drivers and frameworks against pgsplit,
//! one test per language (see `tests/clients/README.md`).
//!
//! Each test runs `tests/clients/<lang>/setup`, starts its own lab stack,
//! then runs `tests/clients/<lang>/run` in one of four setups ([`Mode`]):
//! - transaction pooling on pools of two connections (`python`, `node`,
//!   `java`, `cli`) and session pooling (`…_session_mode`), each with
//!   read-your-writes routing off and replication made synchronous (a
//!   commit returns once the replica has applied it, so the cases read
//!   their own writes from the replica, and every read outside a block is
//!   expected there);
//! - under lag (`…_under_lag`): asynchronous replication, the replica
//!   replaying a second late, and pgsplit's defaults but for
//!   `read_your_writes_scope = "proxy"` (the cases check their writes from
//!   new connections, as connect-per-request apps do). A read may then run
//!   on the primary; what each client reads of its writes is checked;
//! - over TLS (`python_tls`, `java_tls`): as the first, with pgsplit given
//!   a certificate from a test CA and the URL asking for
//!   `sslmode=verify-full` against it, so psycopg, asyncpg and pgjdbc run
//!   every case through TLS, and a certificate from another CA is refused.
//!
//! Their
//! output is streamed as it comes and repeated in the failure message. A
//! step that takes too long is killed, with everything it started, and
//! fails.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pgsplit_lab::certs::Certs;
use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::Which;

/// How long `setup` may take, waiting for the other languages' included.
const SETUP_TIMEOUT: Duration = Duration::from_secs(900);

/// How long `run` may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the primary may take to report its replica as synchronous.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Replication is synchronous for the suite, so a commit has been applied
/// on the replica when it returns and reads need not follow writes to the
/// primary: every read outside a transaction block is expected on the
/// replica. (The read-your-writes modes have their own integration tests.)
const READ_YOUR_WRITES_OFF: &str = "routing.read_your_writes=\"off\"";

/// Every autocommit write runs as a one-statement block the proxy opens and
/// commits (`commit_resolution = "all"`), so the drivers are checked
/// against the proxy's most invasive relaying: the write's ReadyForQuery
/// held back, its COMMIT's sent instead. (The default mode has its own
/// integration tests.)
const WRAPPED_WRITES: &str = "timeouts.commit_resolution=\"all\"";

/// Lines of output kept for the failure message.
const KEPT_LINES: usize = 400;

/// How the proxy and the replication are set up for a run of the cases.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Transaction pooling (the default) on pools of two connections.
    SmallPool,
    /// `pool.mode = "session"`: a server connection per client.
    SessionPool,
    /// Asynchronous replication, the replica `LAG` behind.
    Lag,
    /// As `SmallPool`, with the clients reaching pgsplit over TLS: the URL
    /// asks for `sslmode=verify-full` against the test CA
    /// (`PGSPLIT_TLS_CA`; `PGSPLIT_TLS_OTHER_CA` signed nothing).
    Tls,
}

/// The replica's `recovery_min_apply_delay` in `Mode::Lag`.
const LAG: Duration = Duration::from_secs(1);

/// pgbench's seconds per run in the modes beyond the first (their cases
/// are about correctness, not throughput).
const SHORT_PGBENCH_SECONDS: &str = "3";

#[test]
fn python() {
    language("python", Mode::SmallPool);
}

#[test]
fn node() {
    language("node", Mode::SmallPool);
}

#[test]
fn java() {
    language("java", Mode::SmallPool);
}

#[test]
fn cli() {
    language("cli", Mode::SmallPool);
}

#[test]
fn python_session_mode() {
    language("python", Mode::SessionPool);
}

#[test]
fn node_session_mode() {
    language("node", Mode::SessionPool);
}

#[test]
fn java_session_mode() {
    language("java", Mode::SessionPool);
}

#[test]
fn cli_session_mode() {
    language("cli", Mode::SessionPool);
}

#[test]
fn python_tls() {
    language("python", Mode::Tls);
}

#[test]
fn java_tls() {
    language("java", Mode::Tls);
}

#[test]
fn python_under_lag() {
    language("python", Mode::Lag);
}

#[test]
fn node_under_lag() {
    language("node", Mode::Lag);
}

#[test]
fn cli_under_lag() {
    language("cli", Mode::Lag);
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

fn language(lang: &str, mode: Mode) {
    let dir = repo_root().join("tests/clients").join(lang);
    let setup = dir.join("setup");
    let run = dir.join("run");
    for path in [&setup, &run] {
        assert!(
            path.is_file(),
            "{} does not exist: the {lang} client cases are missing",
            path.display()
        );
    }

    // Relative to the repository root, where the scripts run.
    let cache = repo_root().join(
        std::env::var_os("PGSPLIT_CLIENTS_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| "target/clients".into()),
    );
    let mut env = vec![(
        "PGSPLIT_CLIENTS_CACHE".to_owned(),
        cache.display().to_string(),
    )];
    // One setup at a time: they may install system packages, and package
    // managers refuse to run concurrently.
    std::fs::create_dir_all(&cache).expect("client cache directory");
    let lock = cache.join(".setup.lock");
    if have_flock() {
        let mut cmd = Command::new("flock");
        cmd.arg(&lock).arg(&setup);
        step(lang, "setup", cmd, &env, SETUP_TIMEOUT);
    } else {
        step(lang, "setup", Command::new(&setup), &env, SETUP_TIMEOUT);
    }

    let mut opts = StackOptions::default();
    match mode {
        Mode::SmallPool | Mode::SessionPool | Mode::Tls => {
            opts.set = vec![READ_YOUR_WRITES_OFF.to_owned(), WRAPPED_WRITES.to_owned()];
            opts.set.push(if mode != Mode::SessionPool {
                "pool.size=2".to_owned()
            } else {
                "pool.mode=\"session\"".to_owned()
            });
        }
        Mode::Lag => {
            opts.set = vec!["routing.read_your_writes_scope=\"proxy\"".to_owned()];
            opts.lab.extra_conf.push((
                "recovery_min_apply_delay".into(),
                format!("{}ms", LAG.as_millis()),
            ));
            env.push((
                "PGSPLIT_CLIENTS_LAG_MS".to_owned(),
                LAG.as_millis().to_string(),
            ));
        }
    }
    if mode == Mode::SmallPool {
        // pgbench -M prepared on a pool smaller than its clients needs a
        // thread per client (see `cli/run`).
        env.push(("PGSPLIT_PGBENCH_THREADS".to_owned(), "8".to_owned()));
    } else {
        env.push((
            "PGSPLIT_PGBENCH_SECONDS".to_owned(),
            SHORT_PGBENCH_SECONDS.to_owned(),
        ));
    }
    // TLS: "allow", so what builds its own connection (Django's settings)
    // may still come in plaintext; the URL's clients verify the server.
    let certs = (mode == Mode::Tls).then(|| Certs::make("DNS:localhost,IP:127.0.0.1"));
    if let Some(c) = &certs {
        opts.set.extend(c.proxy_set(Some("allow")));
        env.push(("PGSPLIT_TLS_CA".to_owned(), c.ca().display().to_string()));
        env.push((
            "PGSPLIT_TLS_OTHER_CA".to_owned(),
            c.other_ca().display().to_string(),
        ));
    }
    let stack = Stack::start(opts).expect("lab stack starts");
    if mode != Mode::Lag {
        make_synchronous(&stack);
    }
    let lab = &stack.options().lab;
    let primary = stack.cluster().primary_addr();
    let url = match &certs {
        Some(c) => format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            stack.url(),
            encode(&c.ca().display().to_string())
        ),
        None => stack.url(),
    };
    env.extend([
        ("PGSPLIT_URL".to_owned(), url),
        (
            "PGSPLIT_PRIMARY_PORT".to_owned(),
            primary.port().to_string(),
        ),
        (
            "PGSPLIT_REPLICA_PORT".to_owned(),
            stack.cluster().replica_addr().port().to_string(),
        ),
        (
            "PGSPLIT_DIRECT_PRIMARY_URL".to_owned(),
            format!(
                "postgres://postgres:{}@{primary}/{}",
                encode(&lab.password),
                encode(&lab.database)
            ),
        ),
    ]);
    let mut cmd = Command::new(&run);
    // For a developer: run only some cases (the runner's own arguments).
    if let Ok(only) = std::env::var("PGSPLIT_CLIENTS_ONLY") {
        cmd.args(only.split_whitespace());
    }
    step(lang, "run", cmd, &env, RUN_TIMEOUT);
    drop(stack);
    drop(certs);
}

/// Commits wait until the replica has applied them, for the rest of the
/// lab's life.
fn make_synchronous(stack: &Stack) {
    let c = stack.cluster();
    // psql runs each statement on its own (ALTER SYSTEM refuses a block).
    c.psql(
        Which::Primary,
        "ALTER SYSTEM SET synchronous_standby_names = '*';\n\
         ALTER SYSTEM SET synchronous_commit = 'remote_apply';\n\
         SELECT pg_reload_conf();",
    )
    .expect("replication made synchronous");
    // The reload reaches the backends and the walsender a moment later.
    let check = "SELECT current_setting('synchronous_commit') = 'remote_apply' \
                 AND (SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync') > 0";
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let state = c.psql(Which::Primary, check).expect("primary answers");
        if state == "t" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not become synchronous within {SYNC_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Percent-encodes a URL component (user info or path segment).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn have_flock() -> bool {
    Command::new("flock")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` (`tests/clients/<lang>/<what>`), streaming its output; panics
/// with the output when it fails or outlives `timeout`.
fn step(lang: &str, what: &str, mut cmd: Command, env: &[(String, String)], timeout: Duration) {
    eprintln!("== {lang} {what}");
    let started = Instant::now();
    cmd.current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
        "PGSERVICE",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // Its own process group, so a timeout kills everything it started.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{lang} {what}: cannot start {cmd:?}: {e}"));
    let group = child.id();

    let output = Arc::new(Mutex::new(VecDeque::new()));
    let readers = [
        pump(child.stdout.take().expect("piped"), &output),
        pump(child.stderr.take().expect("piped"), &output),
    ];

    let deadline = started + timeout;
    let status: Option<ExitStatus> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("{lang} {what}: waiting for it failed: {e}"),
        }
    };
    // Whatever it left running (on a timeout: all of it) would hold the
    // pipes open.
    kill_group(group);
    if status.is_none() {
        let _ = child.wait();
    }
    for r in readers {
        let _ = r.join();
    }
    let elapsed = started.elapsed();
    let text = {
        let lines = output.lock().expect("output lock");
        lines.iter().cloned().collect::<Vec<String>>().join("\n")
    };
    match status {
        None => panic!(
            "{lang} {what} did not finish within {timeout:?} and was killed; \
             its output (at most the last {KEPT_LINES} lines):\n{text}"
        ),
        Some(s) if !s.success() => panic!(
            "{lang} {what} failed ({s}) after {:.1} s; \
             its output (at most the last {KEPT_LINES} lines):\n{text}",
            elapsed.as_secs_f64()
        ),
        Some(_) => eprintln!("== {lang} {what}: ok in {:.1} s", elapsed.as_secs_f64()),
    }
}

/// Echoes a child's output line by line and keeps the last lines.
fn pump(
    from: impl Read + Send + 'static,
    into: &Arc<Mutex<VecDeque<String>>>,
) -> thread::JoinHandle<()> {
    let into = Arc::clone(into);
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            eprintln!("{line}");
            let mut lines = into.lock().expect("output lock");
            if lines.len() == KEPT_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    })
}

/// SIGKILL to the process group `pgid` (ours: started with
/// `process_group(0)`); quiet when it is already gone.
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
