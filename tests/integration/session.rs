//! The virtual session: state the client creates behaves as on one server,
//! whichever backend runs the next statement.

use bytes::BytesMut;
use pgsplit_protocol::encode;

use crate::common::*;

/// The first value of a simple query's first row.
async fn value(c: &tokio_postgres::Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.expect(sql) {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_owned();
        }
    }
    panic!("no row from {sql}");
}

const PORT: &str = "SELECT inet_server_port()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_are_released_when_their_state_is_gone() {
    let s = stack_without_read_your_writes();
    let (p, r) = (primary_port(&s), replica_port(&s));
    let c = client(&s).await;

    // LISTEN pins; UNLISTEN releases.
    c.batch_execute("LISTEN ch").await.unwrap();
    assert_eq!(port_of(&c, PORT).await, p, "LISTEN pins");
    c.batch_execute("UNLISTEN ch").await.unwrap();
    assert_eq!(port_of(&c, PORT).await, r, "UNLISTEN releases");

    // A temporary table pins until it is dropped.
    c.batch_execute("CREATE TEMP TABLE tmp (x int)")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, p);
    c.batch_execute("SELECT 1").await.unwrap(); // nothing released yet
    assert_eq!(port_of(&c, PORT).await, p);
    c.batch_execute("DROP TABLE tmp").await.unwrap();
    assert_eq!(port_of(&c, PORT).await, r);

    // Two session locks: releasing one keeps the pin, the second ends it.
    c.batch_execute("SELECT pg_advisory_lock(1), pg_advisory_lock(2)")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, p);
    c.batch_execute("SELECT pg_advisory_unlock(1)")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, p, "one lock is still held");
    c.batch_execute("SELECT pg_advisory_unlock(2)")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, r);

    // A cursor WITH HOLD pins until closed.
    c.batch_execute("DECLARE cur CURSOR WITH HOLD FOR SELECT 1")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, p);
    c.batch_execute("CLOSE cur").await.unwrap();
    assert_eq!(port_of(&c, PORT).await, r);

    // DISCARD ALL releases everything at once.
    c.batch_execute("LISTEN a; CREATE TEMP TABLE t2 (x int)")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, p);
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(port_of(&c, PORT).await, r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_still_arrive_after_a_pin_check() {
    let s = stack();
    let c = client(&s).await;
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::query(&mut b, "LISTEN one; LISTEN two");
    raw.send(&b).await;
    raw.until_ready().await;
    b.clear();
    // Still listening on "two": the check keeps the pin, and a
    // notification sent meanwhile is not lost.
    encode::query(&mut b, "UNLISTEN one");
    raw.send(&b).await;
    raw.until_ready().await;
    c.batch_execute("NOTIFY two, 'hello'").await.unwrap();
    b.clear();
    encode::query(&mut b, PORT);
    raw.send(&b).await;
    let mut saw_notification = false;
    let mut port = None;
    loop {
        let f = raw.frame().await.expect("open");
        match f.tag() {
            b'A' => saw_notification = true,
            b'D' => {
                let body = f.body();
                port = Some(String::from_utf8_lossy(&body[6..]).into_owned());
            }
            b'Z' => break,
            _ => {}
        }
    }
    if !saw_notification {
        // It may come right after, while the client is idle.
        let f = raw.frame().await.expect("notification");
        assert_eq!(f.tag(), b'A');
    }
    assert_eq!(port.unwrap(), primary_port(&s).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_clears_the_virtual_session() {
    let s = stack_without_read_your_writes();
    let (p, r) = (primary_port(&s), replica_port(&s));
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    // A named statement that exists on both backends, and a setting.
    encode::query(&mut b, "SET application_name = 'before'");
    encode::parse(&mut b, "s1", PORT, &[]);
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "BEGIN");
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "COMMIT");
    raw.send(&b).await;
    let got = raw.replies(5).await;
    assert!(got.errors.is_empty(), "{got:?}");
    assert_eq!(got.values, [r.to_string(), p.to_string()]);

    b.clear();
    encode::query(&mut b, "DISCARD ALL");
    raw.send(&b).await;
    assert!(raw.replies(1).await.errors.is_empty());

    // The name is free again on both servers, and the setting is gone.
    b.clear();
    encode::parse(
        &mut b,
        "s1",
        "SELECT current_setting('application_name')",
        &[],
    );
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "BEGIN");
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "COMMIT");
    raw.send(&b).await;
    let got = raw.replies(4).await;
    assert!(got.errors.is_empty(), "{got:?}");
    assert_eq!(got.values, ["", ""], "reset on the replica and the primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_of_a_protocol_statement_works_wherever_it_lives() {
    let s = stack_without_read_your_writes();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    // Prepared (and run) on the replica only.
    encode::parse(&mut b, "s1", PORT, &[]);
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "DEALLOCATE s1");
    raw.send(&b).await;
    let got = raw.replies(2).await;
    assert!(got.errors.is_empty(), "{got:?}");

    // Gone for the client, on every backend.
    b.clear();
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "BEGIN");
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "ROLLBACK");
    raw.send(&b).await;
    let got = raw.replies(4).await;
    assert_eq!(got.errors, ["26000", "26000"], "{got:?}");

    // And the name can be used again.
    b.clear();
    encode::parse(&mut b, "s1", "SELECT 42", &[]);
    run_prepared(&mut b, "s1");
    encode::query(&mut b, "DEALLOCATE ALL");
    run_prepared(&mut b, "s1");
    raw.send(&b).await;
    let got = raw.replies(3).await;
    assert_eq!(got.values, ["42"]);
    assert_eq!(got.errors, ["26000"], "DEALLOCATE ALL removed it");

    // A DEALLOCATE of an unknown name fails as on one server.
    b.clear();
    encode::query(&mut b, "DEALLOCATE nope");
    raw.send(&b).await;
    assert_eq!(raw.replies(1).await.errors, ["26000"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_inside_a_writing_string_are_replayed() {
    let s = stack_without_read_your_writes();
    let r = replica_port(&s);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE mixed (x int)").await.unwrap();
    caught_up(&s);
    c.batch_execute("SET application_name = 'mixed'; INSERT INTO mixed VALUES (1)")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, r);
    assert_eq!(value(&c, "SHOW application_name").await, "mixed");
    // A pool's reset string: RESET ALL among statements that write.
    c.batch_execute(
        "SELECT pg_advisory_unlock_all(); CLOSE ALL; \
         DO $$ BEGIN PERFORM 1; END $$; RESET ALL;",
    )
    .await
    .unwrap();
    assert_eq!(port_of(&c, PORT).await, r);
    assert_eq!(value(&c, "SHOW application_name").await, "");
    let tx = "BEGIN; SELECT current_setting('application_name'); COMMIT";
    assert_eq!(value(&c, tx).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_sent_before_the_servers_answer_arrives() {
    // Read-your-writes on: the read right after the copy must see it.
    let s = stack();
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE cp (x int)").await.unwrap();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    // All in one write, as asyncpg sends it.
    encode::query(&mut b, "COPY cp FROM STDIN");
    encode::message(&mut b, b'd', |w| w.extend_from_slice(b"1\n2\n"));
    encode::message(&mut b, b'c', |_| {});
    encode::query(&mut b, "SELECT count(*) FROM cp");
    raw.send(&b).await;
    let got = raw.replies(2).await;
    assert!(got.errors.is_empty(), "{got:?}");
    assert_eq!(got.values, ["2"], "read in the same session after the copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_described_ahead_runs_where_its_class_says() {
    let s = stack_without_read_your_writes();
    let (p, r) = (primary_port(&s), replica_port(&s));
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE da (x int)").await.unwrap();
    caught_up(&s);
    let mut raw = Raw::login(&s).await;
    // asyncpg's first run: Parse + Describe + Flush, then Bind/Execute/Sync.
    for (sql, want) in [
        ("SELECT inet_server_port()", r),
        ("INSERT INTO da VALUES (1) RETURNING inet_server_port()", p),
    ] {
        let mut b = BytesMut::new();
        encode::parse(&mut b, "", sql, &[]);
        encode::describe(&mut b, b'S', "");
        encode::flush(&mut b);
        raw.send(&b).await;
        // ParseComplete, ParameterDescription, RowDescription.
        for tag in [b'1', b't', b'T'] {
            assert_eq!(raw.frame().await.unwrap().tag(), tag);
        }
        b.clear();
        encode::bind(&mut b, "", "", &[]);
        encode::execute(&mut b, "", 0);
        encode::sync(&mut b);
        raw.send(&b).await;
        let got = raw.replies(1).await;
        assert!(got.errors.is_empty(), "{sql}: {got:?}");
        assert_eq!(got.values, [want.to_string()], "{sql}");
    }
    // A read whose Parse went to the replica but whose rest writes: the
    // rest moves to the primary.
    let mut b = BytesMut::new();
    encode::parse(&mut b, "", "SELECT inet_server_port()", &[]);
    encode::describe(&mut b, b'S', "");
    encode::flush(&mut b);
    raw.send(&b).await;
    for tag in [b'1', b't', b'T'] {
        assert_eq!(raw.frame().await.unwrap().tag(), tag);
    }
    b.clear();
    encode::parse(
        &mut b,
        "w",
        "INSERT INTO da VALUES (2) RETURNING inet_server_port()",
        &[],
    );
    encode::bind(&mut b, "", "w", &[]);
    encode::execute(&mut b, "", 0);
    encode::bind(&mut b, "", "", &[]);
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    raw.send(&b).await;
    let got = raw.replies(1).await;
    assert!(got.errors.is_empty(), "{got:?}");
    assert_eq!(got.values, [p.to_string(), p.to_string()]);
    // And the replica's side of it was closed: a later read is fine there.
    b.clear();
    extended(&mut b, "SELECT inet_server_port()");
    raw.send(&b).await;
    assert_eq!(raw.replies(1).await.values, [r.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_flush_binds_nothing() {
    let s = stack_without_read_your_writes();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    // Leaving psycopg's pipeline mode: Sync, then a lone Flush.
    extended(&mut b, "SELECT 1");
    encode::flush(&mut b);
    raw.send(&b).await;
    raw.replies(1).await;
    b.clear();
    encode::query(&mut b, PORT);
    raw.send(&b).await;
    assert_eq!(raw.replies(1).await.values, [replica_port(&s).to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_is_a_setting_when_it_can_be_replayed() {
    let s = stack_without_read_your_writes();
    let (p, r) = (primary_port(&s), replica_port(&s));
    let c = client(&s).await;
    // As Django sends it on every connection.
    c.batch_execute("SELECT set_config('TimeZone', 'America/Lima', false)")
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, r, "not pinned");
    assert_eq!(value(&c, "SHOW TimeZone").await, "America/Lima");
    let tx = "BEGIN; SELECT current_setting('TimeZone'); COMMIT";
    assert_eq!(
        value(&c, tx).await,
        "America/Lima",
        "replayed on the primary"
    );

    // With the value as a parameter (asyncpg restores jit this way): replayed
    // with the value bound.
    c.query(
        "SELECT set_config('application_name', $1, false)",
        &[&"bound"],
    )
    .await
    .unwrap();
    assert_eq!(port_of(&c, PORT).await, r, "not pinned");
    assert_eq!(value(&c, "SHOW application_name").await, "bound");
    let tx = "BEGIN; SELECT current_setting('application_name'); COMMIT";
    assert_eq!(value(&c, tx).await, "bound", "replayed on the primary");

    // With the name as a parameter it cannot be replayed: the session stays
    // on the primary, even across blocks, until DISCARD ALL.
    c.query("SELECT set_config($1, 'public', false)", &[&"search_path"])
        .await
        .unwrap();
    assert_eq!(port_of(&c, PORT).await, p);
    c.batch_execute("BEGIN; COMMIT").await.unwrap();
    assert_eq!(port_of(&c, PORT).await, p, "still pinned");
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(port_of(&c, PORT).await, r);
}
