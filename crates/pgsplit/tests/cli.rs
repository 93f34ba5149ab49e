//! The binary as an operator runs it: configuration errors, `--check-config`,
//! and `pgsplit lab` end to end (start, serve a query, Ctrl-C cleans up).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pgsplit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgsplit"))
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
