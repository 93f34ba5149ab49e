//! The binary as an operator runs it: configuration errors, `--check-config`,
//! and `pgsplit lab` end to end (start, serve a query, Ctrl-C cleans up).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pgsplit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgsplit"))
}

/// A log filter that does not parse is said once on stderr, and pgsplit
/// logs at info; target and level specs (the static filter) and span
/// directives (the dynamic one) are taken without a word.
#[test]
fn an_unparsable_log_filter_is_reported_and_info_is_used() {
    let run = |spec: &str| {
        let out = pgsplit()
            .env("PGSPLIT_LOG", spec)
            .args(["--primary", "postgres://a:b@127.0.0.1:1/x"])
            .args([
                "--replica",
                "postgres://a:b@127.0.0.1:2/x",
                "--check-config",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{spec}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("[bad");
    assert!(
        err.contains("PGSPLIT_LOG=\"[bad\" is not a log filter"),
        "{err}"
    );
    for ok in [
        "debug",
        "pgsplit_server=debug,warn",
        "[client{user=app}]=debug",
    ] {
        assert!(!run(ok).contains("not a log filter"), "{ok}");
    }
}

#[test]
fn invalid_configuration_is_one_line_naming_the_key_and_exit_2() {
    let out = pgsplit()
        .args(["--set", "timeouts.conect_timeout=1s", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("conect_timeout"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = pgsplit()
        .args(["--set", "timeouts.connect_timeout=soon", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect_timeout"));
    let out = pgsplit()
        .args(["--config", "/nonexistent/proxy.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_example_configuration_is_valid() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proxy.toml");
    let out = pgsplit()
        .args(["--config", file, "--check-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pgsplit()
        .args([
            "--config",
            file,
            "--set",
            "listen=127.0.0.1:7000",
            "--set",
            "routing.write_functions=[\"app.touch_*\"]",
        ])
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lab_starts_serves_and_cleans_up_on_ctrl_c() {
    let mut child = pgsplit()
        .args(["lab", "--listen", "127.0.0.1:0"])
        .env("PGSPLIT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut url = None;
    let mut dir = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(u) = line.trim().strip_prefix("DATABASE_URL=") {
            url = Some(u.to_owned());
        }
        if let Some(d) = line.split("removes the data (").nth(1) {
            dir = Some(d.trim_end_matches(").").to_owned());
            break;
        }
        assert!(Instant::now() < deadline, "lab did not start");
    }
    let (url, dir) = (
        url.expect("lab prints DATABASE_URL"),
        dir.expect("lab prints its directory"),
    );
    let bins = pgsplit_lab::PgBinaries::locate().unwrap();
    let out = Command::new(bins.tool("psql"))
        .args([
            url.as_str(),
            "-XAt",
            "-c",
            "/* pgsplit:replica */ SELECT pg_is_in_recovery()",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "a read runs on the replica"
    );
    let out = Command::new(bins.tool("psql"))
        .args([
            url.as_str(),
            "-XAt",
            "-c",
            "CREATE TABLE lab_t (x int); INSERT INTO lab_t VALUES (1) RETURNING x",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ctrl-C.
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "lab did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    assert!(
        !std::path::Path::new(&dir).exists(),
        "lab directory {dir} removed"
    );
}

/// pgsplit itself (not `lab`) on a fresh lab, with a long grace period.
struct Running {
    child: std::process::Child,
    port: u16,
    lab: pgsplit_lab::Cluster,
    psql: std::path::PathBuf,
    log: Option<std::sync::mpsc::Receiver<String>>,
}

fn run_on_lab() -> Running {
    run_on_lab_with(&[])
}

fn run_on_lab_with(extra: &[&str]) -> Running {
    let lab = pgsplit_lab::Cluster::start(pgsplit_lab::LabOptions::default()).expect("lab starts");
    let url = |a: std::net::SocketAddr| format!("postgres://app:app@{a}/app");
    // Port 0: the address is read from the log, so no port can be taken
    // between picking it and binding it.
    let mut child = pgsplit()
        .args(["--listen", "127.0.0.1:0"])
        .args(["--primary", &url(lab.primary_addr())])
        .args(["--replica", &url(lab.replica_addr())])
        .args([
            "--set",
            "timeouts.shutdown_grace=30s",
            "--set",
            "admin.listen=off",
        ])
        .args(extra)
        .env("PGSPLIT_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = child.stdout.take().unwrap();
    let psql = pgsplit_lab::PgBinaries::locate().unwrap().tool("psql");
    // Owned (and so killed on drop) before anything here can panic.
    let mut r = Running {
        child,
        port: 0,
        lab,
        psql,
        log: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    r.port = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("pgsplit never said where it listens; its log: {seen:?}");
        };
        if line.contains("pgsplit listening") {
            // Text (`addr=…`) or JSON (`"addr":"…"`).
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .or_else(|| line.split("\"addr\":\"").nth(1)?.split('"').next())
                .expect("addr in the line");
            break addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        }
        seen.push(line);
    };
    // The log goes on draining in its thread, kept for tests that read it.
    r.log = Some(rx);
    r
}

impl Running {
    /// psql through pgsplit, running `script` from its standard input.
    fn psql(&self, script: &str) -> std::process::Child {
        let mut c = Command::new(&self.psql)
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "app",
                "-d",
                "app",
            ])
            .args(["-p", &self.port.to_string()])
            .env("PGPASSWORD", "app")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        c
    }

    /// One console command through psql (`-At`): its output, or the error.
    fn console(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(&self.psql)
            .args(["-X", "-At", "-h", "127.0.0.1", "-U", "app", "-d", "pgsplit"])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .env("PGPASSWORD", "app")
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits for pgsplit to exit, within `bound`; returns how long it took.
    fn exits_within(&mut self, bound: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}");
                return start.elapsed();
            }
            assert!(
                start.elapsed() < bound,
                "pgsplit still running after {bound:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A transaction that is open for three seconds, then commits.
const SLOW_BLOCK: &str = "CREATE TABLE IF NOT EXISTS sig (x int);\n\
    BEGIN;\nINSERT INTO sig VALUES (1);\n\\! sleep 3\nCOMMIT;\n";

#[test]
fn sigterm_lets_the_transaction_in_flight_finish_and_refuses_new_clients() {
    let mut p = run_on_lab();
    let busy = p.psql(SLOW_BLOCK);
    std::thread::sleep(Duration::from_millis(1000));
    p.signal("-TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p.port)).is_err(),
        "new clients are refused once shutting down"
    );
    let out = busy.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the block in flight committed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It exits once that transaction is over, well inside the 30 s grace.
    let took = p.exits_within(Duration::from_secs(10));
    println!("exited {took:?} after the block ended");
    assert_eq!(
        p.lab
            .psql(pgsplit_lab::Which::Primary, "SELECT count(*) FROM sig")
            .unwrap(),
        "1"
    );
}

#[test]
fn a_second_signal_or_sigquit_closes_at_once() {
    for second in [Some("-TERM"), None] {
        let mut p = run_on_lab();
        let busy = p.psql(SLOW_BLOCK);
        std::thread::sleep(Duration::from_millis(1000));
        match second {
            Some(sig) => {
                p.signal("-TERM");
                std::thread::sleep(Duration::from_millis(200));
                p.signal(sig);
            }
            None => p.signal("-QUIT"),
        }
        let took = p.exits_within(Duration::from_secs(2));
        println!("{second:?}: exited {took:?} after the last signal");
        let out = busy.wait_with_output().unwrap();
        assert!(!out.status.success(), "the block was cut off");
        // Nothing of it committed.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            p.lab
                .psql(pgsplit_lab::Which::Primary, "SELECT count(*) FROM sig")
                .unwrap(),
            "0"
        );
    }
}

#[test]
fn sighup_reloads_while_a_session_stays_inside_a_block() {
    let dir = std::env::temp_dir().join(format!("pgsplit-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    std::fs::write(&file, "[routing]\nmax_replica_lag = \"2s\"\n").unwrap();
    let p = run_on_lab_with(&["--config", file.to_str().unwrap()]);
    let shown = |p: &Running| {
        p.console("SHOW CONFIG")
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("routing.max_replica_lag|")
                    .map(str::to_owned)
            })
            .unwrap()
    };
    assert_eq!(shown(&p), "2s");
    let busy = p.psql(
        "CREATE TABLE IF NOT EXISTS hup (x int);\n\
         BEGIN;\nINSERT INTO hup VALUES (1);\n\\! sleep 3\n\
         INSERT INTO hup VALUES (2);\nCOMMIT;\n",
    );
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&file, "[routing]\nmax_replica_lag = \"9s\"\n").unwrap();
    p.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while shown(&p) != "9s" {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A file that does not load on SIGHUP: still running, nothing changed.
    std::fs::write(&file, "[routing]\nmax_replica_lag = 5\n").unwrap();
    p.signal("-HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(shown(&p), "9s");
    let stats = p.console("SHOW STATS").unwrap();
    assert!(stats.contains("config_reload_failures|1"), "{stats}");
    // The session went on in its block through both, and committed.
    let out = busy.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        p.lab
            .psql(pgsplit_lab::Which::Primary, "SELECT count(*) FROM hup")
            .unwrap(),
        "2"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_carry_the_clients_span() {
    let p = run_on_lab_with(&["--log-format", "json"]);
    let out = p.psql("SELECT 1;\n").wait_with_output().unwrap();
    assert!(out.status.success());
    let log = p.log.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log.recv_timeout(left).expect("a session started line");
        if line.contains("session started") {
            break line;
        }
    };
    // One JSON object, with the client's span: conn id, peer, user, db.
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    for field in [
        "\"conn_id\":",
        "\"peer\":\"127.0.0.1:",
        "\"user\":\"app\"",
        "\"db\":\"app\"",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

#[test]
fn no_password_reaches_the_log() {
    let dir = std::env::temp_dir().join(format!("pgsplit-nolog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        "[[users]]\nname = \"carol\"\npassword = \"Carol-Secret-123\"\n\
         server_user = \"app\"\nserver_password = \"app\"\n",
    )
    .unwrap();
    let p = run_on_lab_with(&["--config", file.to_str().unwrap(), "--log-format", "json"]);
    let login = |password: &str| {
        Command::new(&p.psql)
            .args(["-X", "-At", "-h", "127.0.0.1", "-U", "carol", "-d", "app"])
            .args(["-p", &p.port.to_string(), "-c", "SELECT 1"])
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(!login("Wrong-Secret-456"));
    assert!(login("Carol-Secret-123"));
    assert!(p.console("SHOW CONFIG").is_ok());
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<String> = p.log.as_ref().unwrap().try_iter().collect();
    assert!(
        lines.iter().any(|l| l.contains("carol")),
        "the logins were logged: {lines:?}"
    );
    for secret in ["Carol-Secret-123", "Wrong-Secret-456"] {
        assert!(
            !lines.iter().any(|l| l.contains(secret)),
            "{secret} in the log: {lines:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
