//! Passwords from the server (`[auth] mode = "auth_query"`): users not in
//! the configuration log in against what PostgreSQL stores for them, read
//! by `auth_user` through the SECURITY DEFINER function the README gives,
//! and reach the servers without their password (SCRAM passthrough, or
//! the stored MD5 hash).

use std::time::Duration;

use pgsplit_lab::stack::{Stack, StackOptions};

use crate::common::*;

/// The function, role and grants the README documents, plus two users:
/// `alice` with a SCRAM verifier and `bob` with an MD5 hash.
const SETUP: &str = "
CREATE ROLE pgsplit_auth LOGIN PASSWORD 'auth-secret';
CREATE SCHEMA pgsplit;
CREATE FUNCTION pgsplit.user_lookup(i_username text, OUT uname text, OUT phash text)
RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
  SELECT rolname::text,
         CASE WHEN rolvaliduntil IS NULL OR rolvaliduntil > now() THEN rolpassword END
  FROM pg_authid WHERE rolname = i_username AND rolcanlogin
$$;
REVOKE ALL ON FUNCTION pgsplit.user_lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgsplit TO pgsplit_auth;
GRANT EXECUTE ON FUNCTION pgsplit.user_lookup(text) TO pgsplit_auth;
SET password_encryption = 'scram-sha-256';
CREATE ROLE alice LOGIN PASSWORD 'alice-pw';
SET password_encryption = 'md5';
CREATE ROLE bob LOGIN PASSWORD 'bob-pw';
GRANT ALL ON SCHEMA public TO alice, bob;
";

/// A lab whose servers accept MD5 (and SCRAM for SCRAM-stored roles), with
/// the setup above replayed on the replica before pgsplit asks it.
fn auth_query_stack(ttl: &str) -> Stack {
    let mut opts = StackOptions::default();
    opts.lab.auth = "md5".into();
    let mut s = stack_with(opts);
    on_primary(&s, SETUP);
    caught_up(&s);
    s.restart_proxy(&[
        "auth.mode=\"auth_query\"".into(),
        "auth.auth_user=\"pgsplit_auth\"".into(),
        "auth.auth_password=\"auth-secret\"".into(),
        format!("auth.cache_ttl=\"{ttl}\""),
    ])
    .unwrap();
    s
}

fn conn(s: &Stack, user: &str, password: &str) -> String {
    let a = s.proxy_addr();
    format!(
        "host={} port={} user={user} password={password} dbname=app",
        a.ip(),
        a.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_from_the_server_log_in_and_reach_both_servers_without_a_password() {
    let s = auth_query_stack("60s");
    for (user, pw) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
        let c = connect(&conn(&s, user, pw)).await.unwrap();
        // A write on the primary (through the tunnel) and a read on the
        // replica, both logged in as the user with the keys of its login.
        c.batch_execute(&format!(
            "CREATE TABLE {user}_t (x int); INSERT INTO {user}_t VALUES (1)"
        ))
        .await
        .unwrap();
        let who = text_rows(
            c.simple_query("/* pgsplit:primary */ SELECT current_user")
                .await
                .unwrap(),
        );
        assert_eq!(who[0][0], user);
        back_on_replica(&s, &c).await;
        let port = port_of(&c, "SELECT inet_server_port()").await;
        assert_eq!(port, replica_port(&s));
        let who = text_rows(c.simple_query("SELECT current_user").await.unwrap());
        assert_eq!(who[0][0], user);
        // Several at once: the pool opens more connections the same way.
        let more: Vec<_> = futures_join(&s, user, pw).await;
        assert_eq!(more.len(), 3);
    }
    // bob's stored hash is MD5: his client is challenged with MD5 (5).
    let mut raw = Raw::connect(&s).await;
    let mut b = bytes::BytesMut::new();
    pgsplit_protocol::encode::startup_message(&mut b, &[("user", "bob"), ("database", "app")]);
    raw.send(&b).await;
    let f = raw.frame().await.unwrap();
    assert_eq!(f.tag(), b'R');
    assert_eq!(i32::from_be_bytes(f.body()[..4].try_into().unwrap()), 5);
    // The auth_user's password is not shown.
    let admin = connect(&format!(
        "host={} port={} user=app password=app dbname=pgsplit",
        s.proxy_addr().ip(),
        s.proxy_addr().port()
    ))
    .await
    .unwrap();
    let config = format!(
        "{:?}",
        text_rows(admin.simple_query("SHOW CONFIG").await.unwrap())
    );
    assert!(config.contains("auth_query"), "{config}");
    assert!(!config.contains("auth-secret"), "{config}");
}

async fn futures_join(s: &Stack, user: &str, pw: &str) -> Vec<tokio_postgres::Client> {
    let mut out = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let c = conn(s, user, pw);
        tasks.push(tokio::spawn(async move {
            let c = connect(&c).await.unwrap();
            c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
            c
        }));
    }
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_unknown_and_expired_look_the_same_and_a_new_password_is_read_from_the_primary() {
    let s = auth_query_stack("60s");
    let wrong = connect(&conn(&s, "alice", "nope")).await.unwrap_err();
    let unknown = connect(&conn(&s, "ghost", "nope")).await.unwrap_err();
    assert_eq!(
        (code(&wrong), code(&unknown)),
        ("28P01".into(), "28P01".into())
    );
    let msg = |e: &tokio_postgres::Error, user: &str| {
        e.as_db_error().unwrap().message().replace(user, "USER")
    };
    assert_eq!(msg(&wrong, "alice"), msg(&unknown, "ghost"));
    for e in [&wrong, &unknown] {
        let text = e.as_db_error().unwrap().to_string();
        assert!(
            !text.contains("SCRAM-SHA-256$") && !text.contains("auth-secret"),
            "{text}"
        );
    }

    // alice logs in (her secret is now cached for 60 s), then her password
    // changes. The cached secret refuses the new password once, and that
    // failure reads the secret again from the primary: the next try works.
    connect(&conn(&s, "alice", "alice-pw")).await.unwrap();
    on_primary(&s, "ALTER ROLE alice PASSWORD 'alice-new'");
    let e = connect(&conn(&s, "alice", "alice-new")).await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    let c = connect(&conn(&s, "alice", "alice-new")).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    caught_up(&s);

    // An expired role has no secret: refused like an unknown user.
    on_primary(&s, "ALTER ROLE alice VALID UNTIL '2000-01-01'");
    caught_up(&s);
    let mut s = s;
    s.restart_proxy(&[
        "auth.mode=\"auth_query\"".into(),
        "auth.auth_user=\"pgsplit_auth\"".into(),
        "auth.auth_password=\"auth-secret\"".into(),
        "auth.cache_ttl=\"0s\"".into(),
    ])
    .unwrap();
    let e = connect(&conn(&s, "alice", "alice-new")).await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The configured users are untouched.
    client(&s).await.simple_query("SELECT 1").await.unwrap();
}
