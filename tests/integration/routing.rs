//! Where statements run: reads on the replica, writes and blocks on the
//! primary, in the simple and the extended protocol.

use pgsplit_lab::stack::StackOptions;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_writes_to_the_primary() {
    let s = stack_without_read_your_writes();
    let c = client(&s).await;
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    c.batch_execute("CREATE TABLE t (id serial PRIMARY KEY, port int)")
        .await
        .unwrap();
    let p = port_of(
        &c,
        "INSERT INTO t (port) VALUES (inet_server_port()) RETURNING port",
    )
    .await;
    assert_eq!(p, primary_port(&s));
    // Writes hidden behind a read-looking start still go to the primary.
    let p = port_of(
        &c,
        "WITH x AS (INSERT INTO t (port) VALUES (0) RETURNING id) SELECT inet_server_port() FROM x",
    )
    .await;
    assert_eq!(p, primary_port(&s));
    let p = port_of(&c, "SELECT inet_server_port() FROM t FOR UPDATE LIMIT 1").await;
    assert_eq!(p, primary_port(&s));
    assert_eq!(
        port_of(&c, "SELECT inet_server_port(), nextval('t_id_seq')").await,
        primary_port(&s)
    );
    // A multi-statement query with any write runs on the primary.
    let p = port_of(
        &c,
        "SELECT inet_server_port(); INSERT INTO t (port) VALUES (1)",
    )
    .await;
    assert_eq!(p, primary_port(&s));
    // Comment hints.
    assert_eq!(
        port_of(&c, "/* pgsplit:primary */ SELECT inet_server_port()").await,
        primary_port(&s)
    );
    caught_up(&s);
    assert_eq!(
        port_of(&c, "SELECT inet_server_port() FROM t LIMIT 1").await,
        replica_port(&s)
    );
    let st = s
        .proxy()
        .shared()
        .stats
        .routed_replica
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(st >= 2, "replica routes counted: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_block_runs_entirely_on_the_primary() {
    let s = stack();
    let c = client(&s).await;
    c.batch_execute(
        "CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct VALUES (1, 10)",
    )
    .await
    .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        primary_port(&s)
    );
    c.batch_execute("UPDATE acct SET v = v + 1 WHERE id = 1")
        .await
        .unwrap();
    // Read-your-own-write inside the block: must see 11 (the replica can't).
    let v: i32 = c
        .query_one("SELECT v FROM acct WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 11);
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        primary_port(&s)
    );
    c.batch_execute("COMMIT").await.unwrap();
    // After the block, reads go back to the replica (once it has replayed
    // the block's writes).
    back_on_replica(&s, &c).await;
    // A READ ONLY block runs on the replica; a write in it fails as on one server.
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    let e = c.batch_execute("UPDATE acct SET v = 0").await.unwrap_err();
    assert_eq!(code(&e), "25006");
    c.batch_execute("ROLLBACK").await.unwrap();
    // tokio-postgres transactions (extended protocol).
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    let port: i32 = tx
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, primary_port(&s));
    tx.execute("UPDATE acct SET v = $1 WHERE id = 1", &[&42i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    caught_up(&s);
    let v: i32 = c
        .query_one("SELECT v FROM acct WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_parameters_and_reused_statements() {
    let s = stack_without_read_your_writes();
    let mut c = client(&s).await;
    let row = c
        .query_one("SELECT $1::int + 1, inet_server_port()", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, i32>(1), replica_port(&s));
    c.batch_execute("CREATE TABLE kv (k text PRIMARY KEY, v text)")
        .await
        .unwrap();
    let ins = c
        .prepare("INSERT INTO kv VALUES ($1, $2) RETURNING inet_server_port()")
        .await
        .unwrap();
    for i in 0..5 {
        let r = c.query_one(&ins, &[&format!("k{i}"), &"v"]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), primary_port(&s));
    }
    // Prepared on the replica (a read), then executed inside a write block:
    // pgsplit re-prepares it on the primary transparently.
    caught_up(&s);
    let read = c
        .prepare("SELECT count(*)::int, inet_server_port() FROM kv")
        .await
        .unwrap();
    let r = c.query_one(&read, &[]).await.unwrap();
    assert_eq!(
        (r.get::<_, i32>(0), r.get::<_, i32>(1)),
        (5, replica_port(&s))
    );
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO kv VALUES ('k9', 'v')", &[])
        .await
        .unwrap();
    let r = tx.query_one(&read, &[]).await.unwrap();
    assert_eq!(
        (r.get::<_, i32>(0), r.get::<_, i32>(1)),
        (6, primary_port(&s))
    );
    tx.commit().await.unwrap();
    // And still works on the replica afterwards.
    caught_up(&s);
    let r = c.query_one(&read, &[]).await.unwrap();
    assert_eq!(
        (r.get::<_, i32>(0), r.get::<_, i32>(1)),
        (6, replica_port(&s))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_pass_through_and_the_session_continues() {
    let s = stack_without_read_your_writes();
    let c = client(&s).await;
    let e = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(code(&e), "22012");
    let e = c
        .query("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P01");
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    let e = c
        .batch_execute("INSERT INTO no_such_table VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P01");
    c.batch_execute("CREATE TABLE e (x int)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .batch_execute("INSERT INTO e VALUES ('nope')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22P02");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_session_to_both_servers() {
    let s = stack_without_read_your_writes();
    let c = client(&s).await;
    c.batch_execute("SET application_name = 'split-test'")
        .await
        .unwrap();
    let r = c
        .query_one(
            "SELECT current_setting('application_name'), inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "split-test");
    assert_eq!(r.get::<_, i32>(1), replica_port(&s));
    c.batch_execute("CREATE TABLE st (a text)").await.unwrap();
    let r = c
        .query_one("INSERT INTO st VALUES (current_setting('application_name')) RETURNING a, inet_server_port()", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "split-test");
    assert_eq!(r.get::<_, i32>(1), primary_port(&s));
    c.batch_execute("RESET application_name").await.unwrap();
    let r = c
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "");
    // A SET inside a block that commits holds for the session everywhere;
    // one inside a block that rolls back does not.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET application_name = 'committed'")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET application_name = 'rolled-back'")
        .await
        .unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    let r = c
        .query_one(
            "SELECT current_setting('application_name'), inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "committed");
    assert_eq!(r.get::<_, i32>(1), replica_port(&s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_goes_to_the_primary_and_copy_out_is_relayed() {
    use bytes::Bytes;
    use futures_util::{SinkExt, TryStreamExt};
    let s = stack();
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE cp (id int, name text)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    for chunk in 0..10 {
        let data: String = (0..100)
            .map(|i| format!("{}\tname{i}\n", chunk * 100 + i))
            .collect();
        sink.send(Bytes::from(data)).await.unwrap();
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 1000);
    // A COPY error mid-stream reaches the client, and the session goes on.
    let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    sink.send(Bytes::from_static(b"1\tok\nnot-a-number\tbad\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(code(&e), "22P02");
    caught_up(&s);
    let count: i64 = c
        .query_one("SELECT count(*) FROM cp", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1000);
    let stream = c
        .copy_out("COPY (SELECT id FROM cp ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let text: Vec<u8> = chunks.concat();
    assert_eq!(text.iter().filter(|b| **b == b'\n').count(), 1000);
    assert!(text.starts_with(b"0\n1\n2\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_client_unchanged() {
    let s = stack();
    let (client, mut connection) = tokio_postgres::connect(&s.conn_string(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(std::future::poll_fn(move |cx| {
            loop {
                match connection.poll_message(cx) {
                    std::task::Poll::Ready(Some(Ok(tokio_postgres::AsyncMessage::Notice(n)))) => {
                        let _ = tx.send((n.code().code().to_owned(), n.message().to_owned()));
                    }
                    std::task::Poll::Ready(Some(Ok(_))) => {}
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        }));
        conn.as_mut().await;
    });
    client
        .batch_execute(
            "DO $$ BEGIN RAISE WARNING 'from the primary' USING ERRCODE = '01P42'; END $$",
        )
        .await
        .unwrap();
    let (code, msg) = rx.recv().await.unwrap();
    assert_eq!((code.as_str(), msg.as_str()), ("01P42", "from the primary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_to_the_primary_and_notifications_arrive_while_idle() {
    let s = stack();
    let (client, mut connection) = tokio_postgres::connect(&s.conn_string(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        std::future::poll_fn(move |cx| loop {
            match connection.poll_message(cx) {
                std::task::Poll::Ready(Some(Ok(tokio_postgres::AsyncMessage::Notification(n)))) => {
                    let _ = tx.send(n.payload().to_owned());
                }
                std::task::Poll::Ready(Some(Ok(_))) => {}
                std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        })
        .await;
    });
    client.batch_execute("LISTEN jobs").await.unwrap();
    assert_eq!(
        port_of(&client, "SELECT inet_server_port()").await,
        primary_port(&s),
        "pinned"
    );
    // Another session notifies; this one is idle and must still hear it.
    let other = crate::common::client(&s).await;
    other.batch_execute("NOTIFY jobs, 'job-1'").await.unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
    assert_eq!(got.unwrap().as_deref(), Some("job-1"));
}

/// A setting changed per request stays cheap and correct: the replayed log
/// is compacted, and the other backend ends with the last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_settings_replay_the_last_value() {
    let s = stack();
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE req (who text)")
        .await
        .unwrap();
    c.batch_execute("SET search_path = public").await.unwrap();
    for i in 0..100 {
        c.batch_execute(&format!("SET app.user_id = '{i}'"))
            .await
            .unwrap();
    }
    let r = c
        .query_one(
            "INSERT INTO req VALUES (current_setting('app.user_id')) RETURNING who, inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "99");
    assert_eq!(r.get::<_, i32>(1), primary_port(&s));
    let r = c
        .query_one(
            "SELECT current_setting('search_path'), current_setting('app.user_id')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            r.get::<_, String>(0).as_str(),
            r.get::<_, String>(1).as_str()
        ),
        ("public", "99")
    );
}

/// What neither classifier stage can parse goes to the primary, is counted,
/// and the server's own error reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclassifiable_statements_go_to_the_primary_and_are_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    let s = stack();
    let c = client(&s).await;
    let stats = &s.proxy().shared().stats;
    let (before_unclassified, before_primary) = (
        stats.unclassified.load(Relaxed),
        stats.routed_primary.load(Relaxed),
    );
    let e = c
        .simple_query("SELEKT inet_server_port()")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42601");
    assert_eq!(stats.unclassified.load(Relaxed), before_unclassified + 1);
    assert_eq!(stats.routed_primary.load(Relaxed), before_primary + 1);
    // The session carries on, and reads still go to the replica.
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
}

/// A node-local replica is best reached through its unix socket, which the
/// proxy watches for reads only: every kind of read works there, including
/// answers and statements far larger than the socket's buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reached_through_its_unix_socket_serves_every_read() {
    let s = stack_with(StackOptions {
        replica_via_unix_socket: true,
        set: vec!["routing.read_your_writes=off".into()],
        ..Default::default()
    });
    let c = client(&s).await;
    // On the replica, over the socket (no server port to report; reads of
    // `inet_server_port() IS NULL` would be answered by the primary).
    let row = c
        .query_one("SELECT inet_server_port() IS NULL, inet_server_port()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<i32>>(1), None);
    let stmt = c
        .prepare("SELECT $1::int + 1, inet_server_port() IS NULL")
        .await
        .unwrap();
    for i in 0..50 {
        let row = c.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
        assert!(row.get::<_, bool>(1));
    }
    // An answer of many reads.
    let row = c
        .query_one(
            "SELECT repeat('x', 4000000), inet_server_port() IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0).len(), 4_000_000);
    assert!(row.get::<_, bool>(1));
    // A statement the socket cannot take in one write: the proxy waits for
    // room while the server reads it.
    let big = format!(
        "SELECT length('{}'), inet_server_port() IS NULL",
        "y".repeat(4_000_000)
    );
    let got = c.simple_query(&big).await.unwrap();
    let row = got
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    assert_eq!(row.get(0), Some("4000000"));
    assert_eq!(row.get(1), Some("t"));
    // Writes still go to the primary.
    c.batch_execute("CREATE TABLE via_socket (n int); INSERT INTO via_socket VALUES (1)")
        .await
        .unwrap();
    let row = c
        .query_one(
            "INSERT INTO via_socket VALUES (2) RETURNING pg_is_in_recovery()",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
}
