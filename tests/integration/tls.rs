//! TLS for clients: certificates made here with openssl (a CA, and a
//! server certificate for localhost and 127.0.0.1 signed by it); psql
//! connects with `sslmode=require` and `verify-full`, a wrong CA and a
//! wrong host name fail as they should, and `mode = "require"` refuses a
//! plaintext login with 28000.
//!
//! TLS to the servers: the lab's servers with `ssl = on` and such a
//! certificate; `sslmode` verify-full, verify-ca, require and prefer from
//! pgsplit, with the server's `pg_stat_ssl` saying what was used.

use std::path::Path;
use std::process::Command;

use pgsplit_lab::stack::{Stack, StackOptions};

use crate::common::*;

use pgsplit_lab::certs::Certs;

fn certs() -> Certs {
    Certs::make("DNS:localhost,IP:127.0.0.1")
}

fn certs_for(san: &str) -> Certs {
    Certs::make(san)
}

fn tls_stack(c: &Certs, mode: Option<&str>) -> Stack {
    stack_with(StackOptions {
        set: c.proxy_set(mode),
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

/// The lab's servers with `ssl = on` and the certificate of `c` (the key
/// made readable to the servers' account only, as PostgreSQL demands).
fn ssl_servers(c: &Certs, set: Vec<String>) -> Stack {
    let (crt, key) = (c.dir.join("server.crt"), c.dir.join("server.key"));
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if root {
        let ok = Command::new("chown")
            .args(["postgres", key.to_str().unwrap(), crt.to_str().unwrap()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown postgres");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut opts = StackOptions {
        set,
        ..Default::default()
    };
    opts.lab.extra_conf = vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), crt.display().to_string()),
        ("ssl_key_file".into(), key.display().to_string()),
    ];
    stack_with(opts)
}

fn server_tls(which: &str, mode: &str, root: Option<&Path>) -> Vec<String> {
    let mut v = vec![format!("{which}.sslmode={mode}")];
    if let Some(r) = root {
        v.push(format!("{which}.sslrootcert={}", r.display()));
    }
    v
}

/// Whether the server connection that answers `sql` (a read, or a write
/// when `primary`) uses TLS, from the server's own `pg_stat_ssl`.
async fn server_side_ssl(c: &tokio_postgres::Client, primary: bool) -> String {
    let hint = if primary {
        "/* pgsplit:primary */ "
    } else {
        ""
    };
    let q = format!("{hint}SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    text_rows(c.simple_query(&q).await.unwrap())[0][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_to_both_servers_against_the_lab_ca() {
    let c = certs();
    let ca = c.dir.join("ca.crt");
    let mut set = server_tls("primary", "verify-full", Some(&ca));
    set.extend(server_tls("replica", "verify-full", Some(&ca)));
    let s = ssl_servers(&c, set);
    let app = client(&s).await;
    app.batch_execute("CREATE TABLE st (x int); INSERT INTO st VALUES (1)")
        .await
        .unwrap();
    assert_eq!(server_side_ssl(&app, true).await, "true");
    back_on_replica(&s, &app).await;
    assert_eq!(server_side_ssl(&app, false).await, "true");
    // disable (the default) is plaintext, to a server that offers TLS.
    let mut s = s;
    s.restart_proxy(&server_tls("primary", "disable", None))
        .unwrap();
    let app = client(&s).await;
    assert_eq!(server_side_ssl(&app, true).await, "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_fails_verification_is_08001_naming_the_reason() {
    // A server certificate for another name than the address dialled.
    let c = certs_for("DNS:db.example");
    let (ca, other) = (c.dir.join("ca.crt"), c.dir.join("other-ca.crt"));
    let mut s = ssl_servers(&c, server_tls("primary", "verify-full", Some(&ca)));
    let write = |s: &Stack| {
        let s = s.proxy_addr();
        async move {
            let app = connect(&format!(
                "host={} port={} user=app password=app dbname=app",
                s.ip(),
                s.port()
            ))
            .await
            .unwrap();
            app.batch_execute("CREATE TABLE IF NOT EXISTS sv (x int)")
                .await
                .map(|_| ())
        }
    };
    let e = write(&s).await.unwrap_err();
    assert_eq!(code(&e), "08001", "{e:?}");
    let msg = said(&e);
    assert!(
        msg.contains("TLS") && msg.contains("not valid for name"),
        "{msg}"
    );
    // verify-ca checks the chain only; require with a root file is verify-ca.
    for mode in ["verify-ca", "require"] {
        s.restart_proxy(&server_tls("primary", mode, Some(&ca)))
            .unwrap();
        write(&s).await.unwrap_or_else(|e| panic!("{mode}: {e:?}"));
    }
    // A CA that did not sign it: refused, whatever the name.
    s.restart_proxy(&server_tls("primary", "verify-ca", Some(&other)))
        .unwrap();
    let e = write(&s).await.unwrap_err();
    assert_eq!(code(&e), "08001", "{e:?}");
    let msg = said(&e);
    // (Both test CAs have one name: the signature is what fails.)
    assert!(msg.contains("invalid peer certificate"), "{msg}");
    // require without a root file: encrypted, not verified (libpq's rule).
    s.restart_proxy(&server_tls("primary", "require", None))
        .unwrap();
    write(&s).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_falls_back_to_plaintext_and_require_does_not() {
    let mut s = stack();
    s.restart_proxy(&server_tls("primary", "prefer", None))
        .unwrap();
    let app = client(&s).await;
    app.batch_execute("CREATE TABLE pf (x int)").await.unwrap();
    assert_eq!(server_side_ssl(&app, true).await, "false");
    s.restart_proxy(&server_tls("primary", "require", None))
        .unwrap();
    let app = client(&s).await;
    let e = app
        .batch_execute("INSERT INTO pf VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08001", "{e:?}");
    let msg = said(&e);
    assert!(msg.contains("does not support TLS"), "{msg}");
    // Reads go on from the replica.
    app.simple_query("SELECT 1").await.unwrap();
}

/// The error's message and hint (where the cause is named).
fn said(e: &tokio_postgres::Error) -> String {
    let d = e.as_db_error().expect("a server error");
    format!("{} ({})", d.message(), d.hint().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_a_renewed_certificate() {
    let old = certs();
    let s = tls_stack(&old, Some("require"));
    let verify = |ca: &Path| {
        psql(
            &s,
            &format!(
                "host=localhost sslmode=verify-full sslrootcert={}",
                ca.display()
            ),
            "SELECT 1",
        )
    };
    let (ok, out) = verify(&old.ca());
    assert!(ok, "{out}");
    // A certificate from another CA is put in place of the files, as a
    // renewal does, and the console reloads.
    let new = certs();
    std::fs::copy(new.cert(), old.cert()).unwrap();
    std::fs::copy(new.key(), old.key()).unwrap();
    let (ok, out) = psql_through(
        &s,
        "host=127.0.0.1 sslmode=require dbname=pgsplit",
        "RELOAD",
    );
    assert!(ok, "{out}");
    let (ok, out) = verify(&new.ca());
    assert!(ok, "the renewed certificate is served: {out}");
    let (ok, _) = verify(&old.ca());
    assert!(!ok, "the old CA no longer verifies it");
}
