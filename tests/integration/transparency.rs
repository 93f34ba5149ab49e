//! Transparency: what PostgreSQL's own regression suite found pgsplit
//! doing differently from one server, each case on its own, against a
//! replica that really lags (`recovery_min_apply_delay`).

use bytes::BytesMut;
use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::LabOptions;
use pgsplit_protocol::encode;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::common::*;

/// A stack whose replica applies WAL `delay` late, with the lab's user a
/// superuser (as the regression suite runs).
fn lagging_superuser_stack(delay: &str) -> Stack {
    let s = stack_with(StackOptions {
        lab: LabOptions {
            extra_conf: vec![("recovery_min_apply_delay".into(), delay.into())],
            ..Default::default()
        },
        ..Default::default()
    });
    on_primary(&s, "ALTER ROLE app SUPERUSER");
    caught_up(&s);
    s
}

/// The first row of `sql`, every column as text.
async fn row(c: &Client, sql: &str) -> Vec<String> {
    for m in c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        if let SimpleQueryMessage::Row(r) = m {
            return (0..r.len())
                .map(|i| r.get(i).unwrap_or("NULL").to_owned())
                .collect();
        }
    }
    panic!("no row from {sql}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_role_after_the_sessions_own_create_role_holds_on_every_server() {
    let s = lagging_superuser_stack("1500ms");
    let c = client(&s).await;
    // Opens the replica connection, as an app's first read does.
    row(&c, "SELECT 1").await;
    c.batch_execute("CREATE ROLE regress_r1").await.unwrap();
    c.batch_execute("SET ROLE regress_r1")
        .await
        .expect("SET ROLE of a role the session just created");
    assert_eq!(
        row(&c, "SELECT current_user, inet_server_port()").await,
        ["regress_r1".to_owned(), primary_port(&s).to_string()],
        "read behind the session's write, on the primary, as the new role"
    );
    // Once the replica has the role, reads return there, as that role.
    back_on_replica(&s, &c).await;
    assert_eq!(row(&c, "SELECT current_user").await, ["regress_r1"]);
    // Nothing the role may not do is done as the superuser.
    let e = c
        .batch_execute("CREATE ROLE regress_escalated SUPERUSER")
        .await
        .expect_err("a role without CREATEROLE cannot create a superuser");
    assert_eq!(code(&e), "42501");
    c.batch_execute("RESET ROLE").await.unwrap();
    assert_eq!(row(&c, "SELECT current_user").await, ["app"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_authorization_and_granted_roles_follow_the_sessions_writes() {
    let s = lagging_superuser_stack("1500ms");
    let c = client(&s).await;
    row(&c, "SELECT 1").await;
    c.batch_execute("CREATE ROLE regress_owner; CREATE ROLE regress_member")
        .await
        .unwrap();
    c.batch_execute("GRANT regress_owner TO regress_member")
        .await
        .unwrap();
    c.batch_execute("SET SESSION AUTHORIZATION regress_member")
        .await
        .expect("SET SESSION AUTHORIZATION of a role just created");
    assert_eq!(
        row(&c, "SELECT session_user, current_user").await,
        ["regress_member", "regress_member"]
    );
    c.batch_execute("SET ROLE regress_owner")
        .await
        .expect("SET ROLE of a role just granted");
    assert_eq!(
        row(&c, "SELECT session_user, current_user").await,
        ["regress_member", "regress_owner"]
    );
    back_on_replica(&s, &c).await;
    assert_eq!(
        row(&c, "SELECT session_user, current_user").await,
        ["regress_member", "regress_owner"]
    );
    c.batch_execute("RESET SESSION AUTHORIZATION")
        .await
        .unwrap();
    assert_eq!(
        row(&c, "SELECT session_user, current_user").await,
        ["app", "app"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_of_a_schema_created_a_moment_ago() {
    let s = lagging_superuser_stack("1500ms");
    let c = client(&s).await;
    row(&c, "SELECT 1").await;
    c.batch_execute("CREATE SCHEMA regress_s; SET search_path = regress_s")
        .await
        .unwrap();
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    assert_eq!(row(&c, "SELECT count(*) FROM t").await, ["1"]);
    back_on_replica(&s, &c).await;
    assert_eq!(
        row(&c, "SELECT count(*), current_schema() FROM t").await,
        ["1", "regress_s"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_the_replica_cannot_take_keeps_the_reads_on_the_primary() {
    let s = lagging_superuser_stack("2s");
    let c = client(&s).await;
    assert_eq!(
        row(&c, "SELECT inet_server_port()").await,
        [replica_port(&s).to_string()]
    );
    // Created by someone else: this session's read-your-writes knows
    // nothing of it, and the replica will not have it for 2 s.
    on_primary(&s, "CREATE ROLE regress_late");
    c.batch_execute("/* pgsplit:primary */ SET ROLE regress_late")
        .await
        .expect("the primary has the role");
    // The replica refuses to replay it: the read runs where it holds,
    // never on the replica as the superuser.
    assert_eq!(
        row(&c, "SELECT current_user, inet_server_port()").await,
        ["regress_late".to_owned(), primary_port(&s).to_string()]
    );
    assert_eq!(
        row(&c, "SHOW pgsplit.last_route").await[0],
        "primary (setting_not_on_replica)"
    );
    caught_up(&s);
    assert_eq!(
        row(&c, "SELECT current_user, inet_server_port()").await,
        ["regress_late".to_owned(), replica_port(&s).to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_that_fails_fails_for_the_client_and_changes_nothing() {
    let s = lagging_superuser_stack("0");
    let c = client(&s).await;
    let e = c
        .batch_execute("SET ROLE regress_nobody")
        .await
        .expect_err("no such role");
    assert_eq!(code(&e), "22023");
    assert_eq!(row(&c, "SELECT current_user").await, ["app"]);
    c.batch_execute("INSERT INTO pg_temp_nothing VALUES (1)")
        .await
        .expect_err("no such table");
    assert_eq!(row(&c, "SELECT current_user").await, ["app"]);
}

/// A CopyData message of `data`.
fn copy_data(b: &mut BytesMut, data: &[u8]) {
    encode::message(b, b'd', |w| w.extend_from_slice(data));
}

fn copy_done(b: &mut BytesMut) {
    encode::message(b, b'c', |_| {});
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_copies_in_one_query_each_get_their_data() {
    let s = stack_without_read_your_writes();
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE copies (x int)")
        .await
        .unwrap();
    let mut raw = Raw::login(&s).await;

    // As psql runs `copy t from stdin\; copy t from stdin;`: each COPY's
    // data after its CopyInResponse.
    let mut b = BytesMut::new();
    encode::query(&mut b, "copy copies from stdin; copy copies from stdin");
    raw.send(&b).await;
    for n in [b"1\n", b"2\n"] {
        let f = raw.frame().await.expect("CopyInResponse");
        assert_eq!(f.tag(), b'G');
        let mut b = BytesMut::new();
        copy_data(&mut b, n);
        copy_done(&mut b);
        raw.send(&b).await;
        let f = raw.frame().await.expect("CommandComplete");
        assert_eq!(f.tag(), b'C', "each COPY completes");
    }
    assert_eq!(raw.until_ready().await, [b'Z']);

    // All at once, in both directions, mixed with other statements.
    let mut b = BytesMut::new();
    encode::query(
        &mut b,
        "copy copies from stdin; select count(*) from copies; \
         copy copies to stdout; copy copies from stdin",
    );
    copy_data(&mut b, b"3\n");
    copy_done(&mut b);
    copy_data(&mut b, b"4\n5\n");
    copy_done(&mut b);
    raw.send(&b).await;
    let r = raw.replies(1).await;
    assert!(r.errors.is_empty(), "{:?}", r.messages);
    assert_eq!(r.values, ["3"]);
    assert_eq!(r.tags, ["COPY 1", "SELECT 1", "COPY 3", "COPY 2"]);

    // The session goes on, and every row is on the primary.
    let mut b = BytesMut::new();
    encode::query(&mut b, "select 1");
    raw.send(&b).await;
    assert_eq!(raw.replies(1).await.values, ["1"]);
    assert_eq!(on_primary(&s, "SELECT count(*) FROM copies"), "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_right_after_create_database_starts_on_the_primary() {
    let s = lagging_superuser_stack("1500ms");
    let c = client(&s).await;
    c.batch_execute("CREATE DATABASE regress_newdb")
        .await
        .unwrap();
    let url = s
        .conn_string()
        .replace("dbname=app", "dbname=regress_newdb");
    assert_ne!(
        url,
        s.conn_string(),
        "the connection string names the database"
    );
    let n = connect(&url)
        .await
        .expect("the replica has not replayed the database yet; the primary has it");
    assert_eq!(
        row(&n, "SELECT current_database(), inet_server_port()").await,
        ["regress_newdb".to_owned(), primary_port(&s).to_string()]
    );
    // Once the replica has it, the session's reads move there.
    back_on_replica(&s, &n).await;
    // A database that exists nowhere is still the client's error.
    let url = s
        .conn_string()
        .replace("dbname=app", "dbname=regress_nowhere");
    let Err(e) = connect(&url).await else {
        panic!("no such database, yet the login succeeded");
    };
    assert_eq!(code(&e), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_session_reads_server_state_as_the_primary() {
    let s = lagging_superuser_stack("0");
    let c = client(&s).await;
    for (sql, want) in [
        ("select count(*) = 0 from pg_stat_wal_receiver", "t"),
        ("SELECT pg_is_in_recovery()", "f"),
        ("SHOW transaction_read_only", "off"),
        ("SELECT current_setting('transaction_read_only')", "off"),
        ("SELECT count(*) > 0 FROM pg_stat_replication", "t"),
    ] {
        assert_eq!(row(&c, sql).await, [want], "{sql}");
    }
    assert_eq!(
        row(&c, "SELECT inet_server_port()").await,
        [replica_port(&s).to_string()],
        "other reads stay on the replica"
    );
    // A read-only block on the replica is read-only, and says so.
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(row(&c, "SHOW transaction_read_only").await, ["on"]);
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_failed_statement_committed_is_read_back() {
    let s = lagging_superuser_stack("1500ms");
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE dup (x int); INSERT INTO dup VALUES (1), (1)")
        .await
        .unwrap();
    caught_up(&s);
    // Fails on the duplicate after committing an invalid index.
    let e = c
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY dup_x ON dup (x)")
        .await
        .expect_err("duplicate keys");
    assert_eq!(code(&e), "23505");
    assert_eq!(
        row(
            &c,
            "SELECT count(*) FROM pg_class WHERE relname = 'dup_x' AND relkind = 'i'"
        )
        .await,
        ["1"],
        "the invalid index the failed statement left"
    );
    caught_up(&s);
    // A Query whose first part commits and whose last part fails.
    let e = c
        .batch_execute("CREATE TABLE half (x int); COMMIT; SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(code(&e), "22012");
    assert_eq!(
        row(&c, "SELECT count(*) FROM pg_class WHERE relname = 'half'").await,
        ["1"]
    );
}

/// What one client of the stress test below expects its session to be.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Role {
    App,
    A,
    B,
    Own,
}

/// Three clients on a pool of two connections per server, a replica 300 ms
/// behind, and a seeded random walk of role changes, writes, roles created
/// a moment ago, resets and pauses: after every step, the client's next
/// read (wherever it runs, on whichever pooled connection, after whatever
/// another session left on it) is run as the role the client set, and
/// never as anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_hold_across_lag_pooling_and_other_sessions_in_a_random_walk() {
    let s = stack_with(StackOptions {
        lab: LabOptions {
            extra_conf: vec![("recovery_min_apply_delay".into(), "300ms".into())],
            ..Default::default()
        },
        set: vec![
            "pool.mode=transaction".into(),
            "pool.size=2".into(),
            "pool.checkout_timeout=20s".into(),
        ],
        ..Default::default()
    });
    on_primary(
        &s,
        "ALTER ROLE app SUPERUSER; CREATE ROLE regress_a; CREATE ROLE regress_b; \
         CREATE TABLE walk (who text, n int); GRANT ALL ON walk TO PUBLIC",
    );
    caught_up(&s);
    let mut tasks = Vec::new();
    for client_no in 0..3u64 {
        let c = client(&s).await;
        tasks.push(tokio::spawn(async move {
            // A small xorshift: the walk is the same on every run.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (client_no + 1).wrapping_mul(0x2545_F491);
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut role = Role::App;
            let mut own = String::new();
            let mut log = Vec::new();
            for step in 0..60 {
                let mut fails = false;
                let sql = match next() % 9 {
                    0 => {
                        role = Role::A;
                        "SET ROLE regress_a".to_owned()
                    }
                    1 => {
                        role = Role::B;
                        "SET ROLE regress_b".to_owned()
                    }
                    2 => {
                        role = Role::App;
                        "RESET ROLE".to_owned()
                    }
                    3 => format!("INSERT INTO walk VALUES (current_user, {step})"),
                    4 if role == Role::App => {
                        // A role only the primary has for the next 300 ms.
                        own = format!("regress_w{client_no}_{step}");
                        role = Role::Own;
                        format!("CREATE ROLE {own}; SET ROLE {own}")
                    }
                    5 => {
                        tokio::time::sleep(std::time::Duration::from_millis(next() % 400)).await;
                        "SELECT 1".to_owned()
                    }
                    6 if role != Role::App => {
                        // Refused to the role, as on one server.
                        fails = true;
                        "CREATE ROLE regress_escalated SUPERUSER".to_owned()
                    }
                    7 => {
                        fails = true;
                        "SELECT 1/0".to_owned()
                    }
                    _ => "SELECT pg_sleep(0.01)".to_owned(),
                };
                log.push(sql.clone());
                match c.batch_execute(&sql).await {
                    Ok(_) if fails => panic!("client {client_no}: {sql} succeeded\n{log:#?}"),
                    Err(e) if !fails => panic!("client {client_no}: {sql}: {e}\n{log:#?}"),
                    _ => {}
                }
                let want = match role {
                    Role::App => "app".to_owned(),
                    Role::A => "regress_a".to_owned(),
                    Role::B => "regress_b".to_owned(),
                    Role::Own => own.clone(),
                };
                let got = row(&c, "SELECT current_user, inet_server_port()").await;
                assert_eq!(
                    got[0], want,
                    "client {client_no}, step {step}, on port {}: {log:#?}",
                    got[1]
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("client walk");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_set_reset_and_dropped_is_never_asked_of_a_new_connection() {
    // As PostgreSQL's misc_functions test does.
    let s = lagging_superuser_stack("0");
    let c = client(&s).await;
    c.batch_execute("CREATE ROLE regress_gone").await.unwrap();
    caught_up(&s);
    c.batch_execute("SET ROLE regress_gone").await.unwrap();
    c.batch_execute("RESET ROLE").await.unwrap();
    c.batch_execute("DROP ROLE regress_gone").await.unwrap();
    caught_up(&s);
    // Other sessions hold connections in blocks, so this one's next
    // statements get connections that never saw its settings.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let h = client(&s).await;
        h.batch_execute("BEGIN; SELECT 1").await.unwrap();
        h.batch_execute("BEGIN READ ONLY").await.ok();
        holders.push(h);
    }
    for sql in [
        "SELECT current_user",
        "/* pgsplit:primary */ SELECT current_user",
    ] {
        assert_eq!(row(&c, sql).await, ["app"], "{sql}");
    }
}
