//! Read-your-writes, bounded staleness and what a session can see of both,
//! against a replica that really lags (`recovery_min_apply_delay`).

use std::time::Duration;

use bytes::BytesMut;
use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::LabOptions;
use pgsplit_protocol::encode;
use tokio_postgres::Client;

use crate::common::*;

/// A stack whose replica applies WAL `delay` late.
fn lagging_stack(delay: &str, set: &[&str]) -> Stack {
    stack_with(StackOptions {
        lab: LabOptions {
            extra_conf: vec![("recovery_min_apply_delay".into(), delay.into())],
            ..Default::default()
        },
        set: set.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
}

async fn show(c: &Client, name: &str) -> String {
    for m in c.simple_query(&format!("SHOW {name}")).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap().to_owned();
        }
    }
    panic!("SHOW {name} returned no row");
}

/// `sessions` clients, each `cycles` times: insert a row, read it back at
/// once. Returns how many reads missed their own write.
async fn write_then_read(stack: &Stack, mode: &str, sessions: usize, cycles: usize) -> usize {
    let mut tasks = Vec::new();
    for n in 0..sessions {
        let c = client(stack).await;
        let mode = mode.to_owned();
        tasks.push(tokio::spawn(async move {
            c.batch_execute(&format!("SET pgsplit.read_your_writes = '{mode}'"))
                .await
                .unwrap();
            let mut missed = 0;
            for i in 0..cycles {
                let id = format!("{mode}-{n}-{i}");
                c.execute("INSERT INTO ryw (id) VALUES ($1)", &[&id])
                    .await
                    .unwrap();
                let seen: i64 = c
                    .query_one("SELECT count(*) FROM ryw WHERE id = $1", &[&id])
                    .await
                    .unwrap()
                    .get(0);
                if seen != 1 {
                    missed += 1;
                }
            }
            missed
        }));
    }
    let mut missed = 0;
    for t in tasks {
        missed += t.await.unwrap();
    }
    missed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_own_writes_despite_replica_lag() {
    // The window must outlast the lag for `window` mode to be safe.
    let s = lagging_stack("1s", &["routing.read_your_writes_window=3s"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE ryw (id text PRIMARY KEY)")
        .await
        .unwrap();
    caught_up(&s);
    for mode in ["lsn", "session", "window"] {
        let missed = write_then_read(&s, mode, 4, 50).await;
        assert_eq!(missed, 0, "{mode}: reads missed their own writes");
    }
    // Without it, the lagging replica is visible: proof the test can fail.
    let missed = write_then_read(&s, "off", 4, 10).await;
    assert!(missed > 0, "off: expected stale reads from a 1 s replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_lsn_mode_reads_return_to_the_replica_once_it_caught_up() {
    let s = stack();
    let (p, r) = (primary_port(&s), replica_port(&s));
    let writer = client(&s).await;
    let other = client(&s).await;
    writer
        .batch_execute("CREATE TABLE back (x int)")
        .await
        .unwrap();
    // A session that wrote nothing is never held back.
    for _ in 0..20 {
        writer
            .batch_execute("INSERT INTO back VALUES (1)")
            .await
            .unwrap();
        assert_eq!(port_of(&other, "SELECT inet_server_port()").await, r);
    }
    caught_up(&s);
    tokio::time::sleep(Duration::from_millis(300)).await; // a monitor poll
    let mut on_replica = 0;
    for _ in 0..50 {
        if port_of(&writer, "SELECT inet_server_port()").await == r {
            on_replica += 1;
        }
    }
    assert!(on_replica >= 45, "{on_replica}/50 reads on the replica");
    assert_eq!(show(&writer, "pgsplit.last_route").await, "replica (read)");

    // `session` mode, by contrast, keeps them on the primary for good.
    writer
        .batch_execute("SET pgsplit.read_your_writes = session")
        .await
        .unwrap();
    writer
        .batch_execute("INSERT INTO back VALUES (2)")
        .await
        .unwrap();
    caught_up(&s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(port_of(&writer, "SELECT inet_server_port()").await, p);
    assert_eq!(
        show(&writer, "pgsplit.last_route").await,
        "primary (read_your_writes)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_its_own_variables() {
    let mut s = stack();
    let c = client(&s).await;
    assert_eq!(show(&c, "pgsplit.read_your_writes").await, "lsn");
    assert_eq!(show(&c, "pgsplit.max_staleness").await, "5s");
    assert_eq!(show(&c, "pgsplit.write_lsn").await, "0/0");
    c.batch_execute("CREATE TABLE v (x int)").await.unwrap();
    assert_eq!(show(&c, "pgsplit.last_route").await, "primary (write)");
    let token = show(&c, "pgsplit.write_lsn").await;
    assert_ne!(token, "0/0");
    // At or after the commit, and no further than the primary has written.
    let ok: bool = c
        .query_one(
            "/* pgsplit:primary */ SELECT $1::text::pg_lsn <= pg_current_wal_insert_lsn()",
            &[&token],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ok, "write_lsn {token} is beyond the primary's WAL");

    c.batch_execute("SET pgsplit.max_staleness = '750ms'")
        .await
        .unwrap();
    assert_eq!(show(&c, "pgsplit.max_staleness").await, "750ms");
    c.batch_execute("RESET pgsplit.max_staleness")
        .await
        .unwrap();
    assert_eq!(show(&c, "pgsplit.max_staleness").await, "5s");
    // Unknown only until the monitor has polled both servers once.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut lag = show(&c, "pgsplit.replica_lag").await;
    while lag == "unknown" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        lag = show(&c, "pgsplit.replica_lag").await;
    }
    assert!(lag.ends_with("ms"), "{lag}");

    for (sql, want) in [
        ("SET pgsplit.read_your_writes = 'sometimes'", "22023"),
        ("SET pgsplit.max_staleness = 'soon'", "22023"),
        ("SET pgsplit.write_lsn = '0/1'", "55P02"),
        ("SHOW pgsplit.nope", "42704"),
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), want, "{sql}");
    }
    // Answered without a server: works with both of them unreachable.
    s.tunnel().cut();
    tokio::task::block_in_place(|| s.cluster_mut().stop_replica()).unwrap();
    assert_eq!(show(&c, "pgsplit.read_your_writes").await, "lsn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_primary_is_not_a_lagging_replica() {
    let s = stack();
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE idle (x int); INSERT INTO idle VALUES (1)")
        .await
        .unwrap();
    caught_up(&s);
    // Long after the last transaction, with a tight bound, the replica is
    // still current: nothing was written since.
    c.batch_execute("SET pgsplit.max_staleness = '300ms'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(show(&c, "pgsplit.replica_lag").await, "0ms");
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_is_avoided_and_then_used_with_a_warning() {
    let s = lagging_stack("3s", &["routing.max_replica_lag=500ms"]);
    let (p, r) = (primary_port(&s), replica_port(&s));
    let writer = client(&s).await;
    writer
        .batch_execute("CREATE TABLE st (x int)")
        .await
        .unwrap();
    caught_up(&s);
    writer
        .batch_execute("INSERT INTO st VALUES (1)")
        .await
        .unwrap();
    // The insert waits 3 s to be applied; once the replica is 500 ms
    // behind, other sessions' reads go to the primary.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reader = client(&s).await;
    assert_eq!(port_of(&reader, "SELECT inet_server_port()").await, p);
    assert_eq!(
        show(&reader, "pgsplit.last_route").await,
        "primary (stale_replica)"
    );
    // A session that accepts older data still reads locally.
    reader
        .batch_execute("SET pgsplit.max_staleness = '1min'")
        .await
        .unwrap();
    assert_eq!(port_of(&reader, "SELECT inet_server_port()").await, r);

    // Primary unreachable too: the replica serves the read, with a WARNING.
    s.tunnel().cut();
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::query(&mut b, "SELECT inet_server_port()");
    raw.send(&b).await;
    let mut warning = None;
    let mut port = None;
    loop {
        let f = raw.frame().await.expect("open");
        match f.tag() {
            b'N' => {
                let e = pgsplit_protocol::backend::ErrorFields::parse(f.body()).unwrap();
                warning = Some((
                    e.severity.to_owned(),
                    e.code.to_owned(),
                    e.message.to_owned(),
                ));
            }
            b'D' => port = Some(String::from_utf8_lossy(&f.body()[6..]).into_owned()),
            b'E' => panic!("the read failed"),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(port.unwrap(), r.to_string());
    let (sev, code, msg) = warning.expect("a warning");
    assert_eq!((sev.as_str(), code.as_str()), ("WARNING", "01000"));
    assert!(msg.contains("stale replica"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stale_error_refuses_the_read() {
    let s = lagging_stack(
        "3s",
        &["routing.max_replica_lag=300ms", "routing.on_stale=error"],
    );
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE se (x int)").await.unwrap();
    caught_up(&s);
    c.batch_execute("INSERT INTO se VALUES (1)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let reader = client(&s).await;
    let e = reader.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "55000");
    // Writes are unaffected, and the session goes on.
    reader
        .batch_execute("INSERT INTO se VALUES (2)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_causal_token_carries_a_write_to_another_node() {
    let s = lagging_stack("1s", &[]);
    // Node B: a second pgsplit in front of the same servers.
    let mut cfg = s.proxy_config(&[]).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let node_b = pgsplit_lab::proxy::RunningProxy::start(cfg).unwrap();
    let a = client(&s).await;
    let b_conn = s.conn_string().replace(
        &format!("port={}", s.proxy_addr().port()),
        &format!("port={}", node_b.addr().port()),
    );
    let b = connect(&b_conn).await.unwrap();
    a.batch_execute("CREATE TABLE tokens (t text)")
        .await
        .unwrap();
    caught_up(&s);
    let mut missed = 0;
    for i in 0..10 {
        let t = format!("token-{i}");
        a.execute("INSERT INTO tokens VALUES ($1)", &[&t])
            .await
            .unwrap();
        let lsn = show(&a, "pgsplit.write_lsn").await;
        b.batch_execute(&format!("SET pgsplit.min_lsn = '{lsn}'"))
            .await
            .unwrap();
        let n: i64 = b
            .query_one("SELECT count(*) FROM tokens WHERE t = $1", &[&t])
            .await
            .unwrap()
            .get(0);
        if n != 1 {
            missed += 1;
        }
    }
    assert_eq!(missed, 0, "node B read before the token's write");
    // Without the token, node B's replica is visibly behind.
    b.batch_execute("RESET pgsplit.min_lsn").await.unwrap();
    a.execute("INSERT INTO tokens VALUES ('late')", &[])
        .await
        .unwrap();
    let n: i64 = b
        .query_one("SELECT count(*) FROM tokens WHERE t = 'late'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "expected node B's replica to lag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_replica_refuses_as_a_write_runs_on_the_primary_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let s = stack_without_read_your_writes();
    let c = client(&s).await;
    c.batch_execute(
        "CREATE TABLE touched (n int); \
         CREATE FUNCTION touch(int) RETURNS int LANGUAGE sql \
         AS 'INSERT INTO touched VALUES ($1) RETURNING n'",
    )
    .await
    .unwrap();
    caught_up(&s);
    let stats = &s.proxy().shared().stats;
    // Rows are described before the first one fails on the replica: the
    // client must see one clean answer, from the primary.
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    let sql = "SELECT n, touch(n), inet_server_port() FROM generate_series(1, 3) n";
    encode::query(&mut b, sql);
    raw.send(&b).await;
    let mut descriptions = 0;
    let mut rows = Vec::new();
    loop {
        let f = raw.frame().await.expect("open");
        match f.tag() {
            b'T' => descriptions += 1,
            b'D' => rows.push(f.body().to_vec()),
            b'E' => panic!("the client saw the replica's refusal"),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!((descriptions, rows.len()), (1, 3));
    assert_eq!(stats.retried_on_primary.load(Relaxed), 1);
    // Learned: the same text goes straight to the primary next time.
    raw.send(&b).await;
    let r = raw.replies(1).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(stats.retried_on_primary.load(Relaxed), 1);
    let n: i64 = c
        .query_one("/* pgsplit:primary */ SELECT count(*) FROM touched", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 6, "each run wrote its three rows once");
    // The same statement with other values (the memo knows reads by their
    // shape): refused once, learned, and never again.
    let mut other = BytesMut::new();
    encode::query(
        &mut other,
        "SELECT n, touch(n), inet_server_port() FROM generate_series(1, 5) n",
    );
    for _ in 0..2 {
        raw.send(&other).await;
        let r = raw.replies(1).await;
        assert!(r.errors.is_empty(), "{r:?}");
        raw.send(&b).await;
        let r = raw.replies(1).await;
        assert!(r.errors.is_empty(), "{r:?}");
    }
    assert_eq!(stats.retried_on_primary.load(Relaxed), 2);
    let n: i64 = c
        .query_one("/* pgsplit:primary */ SELECT count(*) FROM touched", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 6 + 2 * 5 + 2 * 3, "each run wrote its rows once");
    // Other reads are unaffected, and go to the replica.
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgsplit_variables_in_the_extended_protocol_and_pipelines() {
    let s = stack();
    // A driver preparing by name and executing again (tokio-postgres).
    let c = client(&s).await;
    let stmt = c.prepare("SHOW pgsplit.read_your_writes").await.unwrap();
    assert_eq!(stmt.columns()[0].name(), "pgsplit.read_your_writes");
    for _ in 0..2 {
        let v: String = c.query_one(&stmt, &[]).await.unwrap().get(0);
        assert_eq!(v, "lsn");
    }
    c.execute("SET pgsplit.read_your_writes = 'session'", &[])
        .await
        .unwrap();
    let v: String = c.query_one(&stmt, &[]).await.unwrap().get(0);
    assert_eq!(v, "session", "evaluated at each execution");
    let e = c.query_one("SHOW pgsplit.nope", &[]).await.unwrap_err();
    assert_eq!(code(&e), "42704");

    // Raw: unnamed Parse/Bind/Describe/Execute, pipelined with a server
    // statement in its own batch, then a mixed batch (refused).
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    encode::parse(&mut b, "", "SHOW pgsplit.last_route", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::describe(&mut b, b'P', "");
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    extended(&mut b, "SELECT inet_server_port()");
    encode::parse(&mut b, "", "SHOW pgsplit.last_route", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    raw.send(&b).await;
    let r = raw.replies(3).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.values.len(), 3, "{r:?}");
    assert_eq!(r.values[1], replica_port(&s).to_string());
    assert_eq!(r.values[2], "replica (read)");

    b.clear();
    encode::parse(&mut b, "", "SHOW pgsplit.last_route", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::execute(&mut b, "", 0);
    encode::parse(&mut b, "", "SELECT 1", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    extended(&mut b, "SELECT 2");
    raw.send(&b).await;
    let r = raw.replies(2).await;
    assert_eq!(r.errors, ["0A000"], "{r:?}");
    assert_eq!(r.values, ["2"], "the session goes on: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_may_wait_briefly_for_the_replica() {
    let s = lagging_stack("300ms", &["routing.max_wait_for_replica=3s"]);
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE w (x int)").await.unwrap();
    caught_up(&s);
    c.batch_execute("INSERT INTO w VALUES (1)").await.unwrap();
    let started = std::time::Instant::now();
    let n: i64 = c
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the write is visible");
    assert_eq!(show(&c, "pgsplit.last_route").await, "replica (read)");
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited");
    // Without the wait, the read goes to the primary at once.
    c.batch_execute("SET pgsplit.max_wait_for_replica = 0")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO w VALUES (2)").await.unwrap();
    port_of(&c, "SELECT count(*) FROM w").await;
    assert_eq!(
        show(&c, "pgsplit.last_route").await,
        "primary (read_your_writes)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_lag_is_reported_to_clients_that_opt_in() {
    let s = stack();
    let mut raw = Raw::login_with(s.proxy_addr(), &[("pgsplit.report_lag", "on")]).await;
    let mut b = BytesMut::new();
    encode::query(&mut b, "SELECT 1");
    raw.send(&b).await;
    let mut reported = None;
    loop {
        let f = raw.frame().await.expect("open");
        match f.tag() {
            b'S' => {
                let body = f.body();
                let mut parts = body.split(|&c| c == 0);
                let k = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
                let v = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
                if k == "pgsplit_replica_lag_ms" {
                    reported = Some(v);
                }
            }
            b'Z' => break,
            _ => {}
        }
    }
    let v = reported.expect("a pgsplit_replica_lag_ms ParameterStatus");
    assert!(v == "unknown" || v.parse::<u64>().is_ok(), "{v}");
    // Not sent to clients that did not ask.
    let mut raw = Raw::login(&s).await;
    raw.send(&b).await;
    loop {
        let f = raw.frame().await.expect("open");
        assert_ne!(f.tag(), b'S');
        if f.tag() == b'Z' {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_read_the_replica_refuses_runs_on_the_primary_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let s = stack_without_read_your_writes();
    let (p, r) = (primary_port(&s), replica_port(&s));
    let c = client(&s).await;
    c.batch_execute(
        "CREATE TABLE touched2 (n int); \
         CREATE FUNCTION touch2(int) RETURNS int LANGUAGE sql \
         AS 'INSERT INTO touched2 VALUES ($1) RETURNING n'",
    )
    .await
    .unwrap();
    caught_up(&s);
    let stats = &s.proxy().shared().stats;
    // A named statement prepared (on the replica), then executed twice.
    let stmt = c
        .prepare("SELECT n, touch2(n), inet_server_port() FROM generate_series(1, 2) n")
        .await
        .unwrap();
    for round in 0..2 {
        let rows = c
            .query(&stmt, &[])
            .await
            .expect("no 25006 reaches the client");
        assert_eq!(rows.len(), 2);
        let port: i32 = rows[0].get(2);
        assert_eq!(port, p, "round {round}");
    }
    assert_eq!(
        stats.retried_on_primary.load(Relaxed),
        1,
        "retried once, then known"
    );
    // Unnamed, in one batch with a Describe, pipelined behind a plain read.
    let mut raw = Raw::login(&s).await;
    let mut b = BytesMut::new();
    extended(&mut b, "SELECT inet_server_port()");
    encode::parse(&mut b, "", "SELECT touch2(7), inet_server_port()", &[]);
    encode::bind(&mut b, "", "", &[]);
    encode::describe(&mut b, b'P', "");
    encode::execute(&mut b, "", 0);
    encode::sync(&mut b);
    extended(&mut b, "SELECT inet_server_port()");
    raw.send(&b).await;
    let got = raw.replies(3).await;
    assert!(got.errors.is_empty(), "{got:?}");
    assert_eq!(got.values, [r.to_string(), "7".to_string(), r.to_string()]);
    assert_eq!(stats.retried_on_primary.load(Relaxed), 2);
    let n: i64 = c
        .query_one("/* pgsplit:primary */ SELECT count(*) FROM touched2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5, "every write happened exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_spell_before_a_write_is_not_replica_lag() {
    // The replica replays 1.5 s late; the staleness bound is 4 s. After a
    // quiet spell longer than the bound, the first write must not make
    // the replica look as stale as the spell was long.
    let s = lagging_stack("1500ms", &["routing.max_replica_lag=4s"]);
    let admin = s.proxy().admin_addr().expect("admin endpoint on");
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE quiet (x int)").await.unwrap();
    caught_up(&s);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let reader = client(&s).await;
    c.batch_execute("INSERT INTO quiet VALUES (1)")
        .await
        .unwrap();
    let mut worst = 0;
    for _ in 0..15 {
        let lag = show(&reader, "pgsplit.replica_lag").await;
        let ms: u64 = lag
            .strip_suffix("ms")
            .unwrap_or_else(|| panic!("lag {lag}"))
            .parse()
            .unwrap();
        worst = worst.max(ms);
        // A session that never wrote reads from the replica all along.
        assert_eq!(
            port_of(&reader, "SELECT inet_server_port()").await,
            replica_port(&s),
            "lag {lag}"
        );
        // And a load check sees a healthy node, not one that flaps.
        let (status, body) = crate::admin::get(admin, &crate::admin::request("/health")).await;
        assert_eq!(status, 200, "lag {lag}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "after a 5 s quiet spell, the reported lag peaked at {worst} ms for a 1500 ms apply delay"
    );
    assert!(worst < 3_000, "reported lag {worst} ms for a 1.5 s delay");
    // The write shows up on the replica once replayed, and the lag drops.
    caught_up(&s);
}

/// Reads retried on the primary for want of an object, for `code`.
fn missing_retries(s: &Stack, code: &str) -> u64 {
    let i = pgsplit_server::stats::MISSING
        .iter()
        .position(|c| *c == code)
        .expect("a retried SQLSTATE");
    s.proxy().shared().stats.retried_missing[i].load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_another_session_just_created_is_read_on_the_primary_while_the_replica_lacks_it() {
    let s = lagging_stack("2s", &[]);
    let c = client(&s).await;
    // Created by someone else: this session knows nothing of it, and the
    // replica will not have any of it for 2 s.
    client(&s)
        .await
        .batch_execute(
            "CREATE TABLE fresh (x int); INSERT INTO fresh VALUES (7); \
             CREATE FUNCTION fresh_f() RETURNS int LANGUAGE sql AS 'SELECT 8'",
        )
        .await
        .unwrap();
    let st = c.simple_query("SELECT x FROM fresh").await;
    let rows: Vec<String> = st
        .expect("read of a table the replica has not replayed yet")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["7"]);
    assert_eq!(
        show(&c, "pgsplit.last_route").await,
        "primary (hint)",
        "run again on the primary"
    );
    // The extended protocol, with a named statement, and a function.
    let v: i32 = c.query_one("SELECT fresh_f()", &[]).await.unwrap().get(0);
    assert_eq!(v, 8);
    let n: i64 = c
        .query_one("SELECT count(*) FROM fresh WHERE x = $1", &[&7i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert!(missing_retries(&s, "42P01") >= 2);
    assert!(missing_retries(&s, "42883") >= 1);
    // A genuine error is the primary's answer.
    let e = c
        .simple_query("SELECT * FROM no_such_table_anywhere")
        .await
        .expect_err("no such table");
    assert_eq!(code(&e), "42P01");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("no_such_table_anywhere"), "{message}");
    // Once the replica has it all, reads stay there.
    caught_up(&s);
    c.simple_query("SELECT x FROM fresh").await.unwrap();
    assert_eq!(show(&c, "pgsplit.last_route").await, "replica (read)");
    // Inside a block nothing is retried: the block is the client's.
    client(&s)
        .await
        .batch_execute("CREATE TABLE fresher (x int)")
        .await
        .unwrap();
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    let e = c
        .simple_query("SELECT * FROM fresher")
        .await
        .expect_err("the replica has not replayed it");
    assert_eq!(code(&e), "42P01");
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_right_after_its_own_init_on_a_lagging_replica() {
    // pgbench looks its tables up in the catalog on a new connection
    // first: that read must see what `pgbench -i` just did.
    let s = lagging_stack("1s", &["routing.read_your_writes_scope=proxy"]);
    pgbench(&s, &["-i", "-s", "1", "-q"]);
    // At once: the replica has none of pgbench's tables yet.
    for mode in ["simple", "prepared"] {
        let out = pgbench(
            &s,
            &["-S", "-M", mode, "-c", "2", "-j", "2", "-t", "20", "-n"],
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_proxy_scope_a_new_connection_reads_what_the_last_one_wrote() {
    for scope in ["session", "proxy"] {
        let s = lagging_stack("3s", &[&format!("routing.read_your_writes_scope={scope}")]);
        client(&s)
            .await
            .batch_execute("CREATE TABLE requests (id int)")
            .await
            .unwrap();
        caught_up(&s);
        // A POST on one connection, then at once the redirected GET on
        // another, over and over: the POST's client says goodbye the moment
        // its write is answered, as psql and PHP do, or even sends its
        // Terminate right behind the write (answered all the same, as a
        // server answers a statement before it reads what follows).
        for i in 1..=20i64 {
            let mut post = Raw::login(&s).await;
            let mut b = bytes::BytesMut::new();
            pgsplit_protocol::encode::query(&mut b, &format!("INSERT INTO requests VALUES ({i})"));
            let pipelined = i % 2 == 0;
            if pipelined {
                pgsplit_protocol::encode::terminate(&mut b);
            }
            post.send(&b).await;
            post.until_ready().await;
            if !pipelined {
                let mut x = bytes::BytesMut::new();
                pgsplit_protocol::encode::terminate(&mut x);
                post.send(&x).await;
            }
            drop(post);
            let get = client(&s).await;
            let n: i64 = get
                .query_one("SELECT count(*) FROM requests", &[])
                .await
                .unwrap()
                .get(0);
            if scope == "proxy" {
                assert_eq!(n, i, "request {i}: the previous requests' writes");
                assert_eq!(
                    show(&get, "pgsplit.last_route").await,
                    "primary (read_your_writes)"
                );
            } else {
                assert_eq!(
                    n, 0,
                    "session scope: a new connection reads the lagging replica"
                );
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_for_the_replica_ends_soon_after_the_replay() {
    let s = lagging_stack(
        "400ms",
        &[
            "routing.max_wait_for_replica=3s",
            // Far apart: only the fast poll a waiting read asks for can
            // end the wait on time.
            "monitor.interval=1s",
        ],
    );
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE waited (x int)")
        .await
        .unwrap();
    caught_up(&s);
    c.batch_execute("INSERT INTO waited VALUES (1)")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let n: i64 = c
        .query_one("SELECT count(*) FROM waited", &[])
        .await
        .unwrap()
        .get(0);
    let took = started.elapsed();
    assert_eq!(n, 1);
    assert_eq!(show(&c, "pgsplit.last_route").await, "replica (read)");
    println!("read-your-writes wait at 400 ms of apply delay: {took:?}");
    assert!(took < Duration::from_millis(900), "{took:?}");
}
