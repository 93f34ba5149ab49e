//! TLS for clients: certificates made here with openssl (a CA, and a
//! server certificate for localhost and 127.0.0.1 signed by it); psql
//! connects with `sslmode=require` and `verify-full`, a wrong CA and a
//! wrong host name fail as they should, and `mode = "require"` refuses a
//! plaintext login with 28000.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgsplit_lab::stack::{Stack, StackOptions};

use crate::common::*;

/// A directory of PEM files: `ca.crt`, `server.crt`, `server.key`, and a
/// second, unrelated `other-ca.crt`.
struct Certs {
    dir: PathBuf,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn certs() -> Certs {
    let dir = std::env::temp_dir().join(format!("pgsplit-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", "/CN=pgsplit test CA"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt]);
        openssl(&dir, &args);
    }
    let mut args = vec![
        "req",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ];
    args.extend(ec);
    openssl(&dir, &args);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    );
    Certs { dir }
}

fn tls_stack(c: &Certs, mode: Option<&str>) -> Stack {
    let mut set = vec![
        format!("tls.cert={}", c.dir.join("server.crt").display()),
        format!("tls.key={}", c.dir.join("server.key").display()),
    ];
    if let Some(m) = mode {
        set.push(format!("tls.mode={m}"));
    }
    stack_with(StackOptions {
        set,
        ..Default::default()
    })
}

/// psql through pgsplit to the database `app`, with options `conn`.
fn psql(s: &Stack, conn: &str, sql: &str) -> (bool, String) {
    psql_through(s, &format!("dbname=app {conn}"), sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_tls_and_verification_fails_where_it_should() {
    let c = certs();
    let s = tls_stack(&c, None);
    let ca = c.dir.join("ca.crt");
    let other = c.dir.join("other-ca.crt");

    let (ok, out) = psql(&s, "host=127.0.0.1 sslmode=require", "\\conninfo");
    assert!(ok && out.contains("SSL connection"), "{out}");
    // Routing is untouched: a write and a read, through TLS.
    let (ok, out) = psql(
        &s,
        "host=127.0.0.1 sslmode=require",
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1); SELECT count(*) FROM t",
    );
    assert!(ok && out.trim().ends_with('1'), "{out}");
    let (ok, out) = psql(
        &s,
        &format!(
            "host=localhost sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
        "SELECT 1",
    );
    assert!(ok, "verify-full against the lab CA: {out}");
    let (ok, out) = psql(
        &s,
        &format!(
            "host=localhost sslmode=verify-ca sslrootcert={}",
            other.display()
        ),
        "SELECT 1",
    );
    assert!(!ok && out.contains("certificate verify failed"), "{out}");
    let (ok, out) = psql(
        &s,
        &format!(
            "host=db.example hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
        "SELECT 1",
    );
    assert!(!ok && out.contains("does not match host name"), "{out}");
    // TLS is allowed, not required: plaintext still works.
    let (ok, out) = psql(&s, "host=127.0.0.1 sslmode=disable", "\\conninfo");
    assert!(ok && !out.contains("SSL connection"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_a_plaintext_login_with_28000() {
    let c = certs();
    let s = tls_stack(&c, Some("require"));
    let (ok, out) = psql(&s, "host=127.0.0.1 sslmode=disable", "SELECT 1");
    assert!(!ok && out.contains("TLS required"), "{out}");
    let e = client_result(&s).await.expect_err("plaintext is refused");
    assert_eq!(code(&e), "28000", "{e:?}");
    let (ok, out) = psql(&s, "host=127.0.0.1 sslmode=require", "SELECT 1");
    assert!(ok, "{out}");
}

async fn client_result(s: &Stack) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect(&s.conn_string()).await
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_mismatched_certificate_stops_the_start_naming_the_file() {
    let c = certs();
    let mut s = stack();
    let e = tokio::task::block_in_place(|| {
        s.restart_proxy(&[
            "tls.cert=/nonexistent/server.crt".into(),
            format!("tls.key={}", c.dir.join("server.key").display()),
        ])
    })
    .expect_err("no certificate file");
    assert!(
        chain(&e).contains("tls.cert /nonexistent/server.crt"),
        "{}",
        chain(&e)
    );
    let e = tokio::task::block_in_place(|| {
        s.restart_proxy(&[
            format!("tls.cert={}", c.dir.join("server.crt").display()),
            format!("tls.key={}", c.dir.join("ca.key").display()),
        ])
    })
    .expect_err("the key is not the certificate's");
    assert!(chain(&e).contains("tls.cert and tls.key"), "{}", chain(&e));
    let e = tokio::task::block_in_place(|| s.restart_proxy(&["tls.mode=require".into()]))
        .expect_err("require without a certificate");
    assert!(chain(&e).contains("tls.mode"), "{}", chain(&e));
}
