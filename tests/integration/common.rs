//! Shared helpers: start a stack, connect clients, observe where a
//! statement ran.

use std::time::Duration;

use pgsplit_lab::stack::{Stack, StackOptions};
use pgsplit_lab::Which;
use tokio_postgres::{Client, NoTls};

/// Starts a stack with default options (blocking work off the runtime).
pub fn stack() -> Stack {
    stack_with(StackOptions::default())
}

pub fn stack_with(opts: StackOptions) -> Stack {
    tokio::task::block_in_place(|| Stack::start(opts)).expect("lab stack starts")
}

/// A stack whose sessions do not follow their writes to the primary:
/// for tests about something else that expect every read outside a block
/// on the replica right after a write.
pub fn stack_without_read_your_writes() -> Stack {
    stack_with(StackOptions {
        set: vec!["routing.read_your_writes=off".into()],
        ..Default::default()
    })
}

/// Reads until one runs on the replica, within 5 s: in `lsn` mode a
/// session's reads return there once the replica has replayed its last
/// write.
pub async fn back_on_replica(stack: &Stack, c: &Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while port_of(c, "SELECT inet_server_port()").await != replica_port(stack) {
        assert!(
            std::time::Instant::now() < deadline,
            "reads did not return to the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects a tokio-postgres client through the proxy.
pub async fn client(stack: &Stack) -> Client {
    connect(&stack.conn_string())
        .await
        .expect("connect through pgsplit")
}

pub async fn connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub fn primary_port(stack: &Stack) -> i32 {
    i32::from(stack.cluster().primary_addr().port())
}

pub fn replica_port(stack: &Stack) -> i32 {
    i32::from(stack.cluster().replica_addr().port())
}

/// The server port a simple-protocol query ran on.
pub async fn port_of(c: &Client, sql: &str) -> i32 {
    let rows = c.simple_query(sql).await.expect("query runs");
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).expect("a value").parse().expect("a port");
        }
    }
    panic!("no row from {sql}");
}

/// psql through pgsplit: `-XAt -c sql` with libpq connection options
/// `conn` (port, user `app`, timeouts preset); whether it succeeded, and
/// its output and errors together.
pub fn psql_through(stack: &Stack, conn: &str, sql: &str) -> (bool, String) {
    let out = tokio::task::block_in_place(|| {
        pg_tool("psql")
            .args(["-X", "-A", "-t", "-c", sql])
            .arg(format!(
                "port={} user=app password=app connect_timeout=5 {conn}",
                stack.proxy_addr().port()
            ))
            .output()
            .expect("psql runs")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The rows of a simple query's answer, as text (NULL as "").
pub fn text_rows(msgs: Vec<tokio_postgres::SimpleQueryMessage>) -> Vec<Vec<String>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// SQLSTATE of a failed call.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no code: {e}"))
}

/// What `sql` returns when run with psql directly on a server (not
/// through pgsplit or the tunnel), trimmed; the blocking work is kept off
/// the runtime's worker.
pub fn psql_on(stack: &Stack, which: Which, sql: &str) -> String {
    tokio::task::block_in_place(|| stack.cluster().psql(which, sql))
        .unwrap_or_else(|e| panic!("psql {sql}: {e}"))
        .trim()
        .to_owned()
}

/// `psql_on` the primary.
pub fn on_primary(stack: &Stack, sql: &str) -> String {
    psql_on(stack, Which::Primary, sql)
}

/// Waits until the replica has replayed all the primary wrote.
pub fn caught_up(stack: &Stack) {
    tokio::task::block_in_place(|| {
        stack
            .cluster()
            .wait_replica_caught_up(Duration::from_secs(20))
    })
    .expect("replica catches up");
}

/// A raw protocol connection, for what no driver would send.
pub struct Raw {
    pub stream: tokio::net::TcpStream,
    pub buf: bytes::BytesMut,
}

impl Raw {
    pub async fn connect(stack: &Stack) -> Raw {
        Raw::connect_at(stack.proxy_addr()).await
    }

    pub async fn connect_at(addr: std::net::SocketAddr) -> Raw {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        Raw {
            stream,
            buf: bytes::BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Next backend frame, or `None` at EOF; fails the test after 10 s.
    pub async fn frame(&mut self) -> Option<pgsplit_protocol::Frame> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(f) = pgsplit_protocol::decode(&mut self.buf, 1 << 30).unwrap() {
                return Some(f);
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("proxy answers within 10 s")
                    .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads until an ErrorResponse; returns (severity, code, message).
    pub async fn error(&mut self) -> (String, String, String) {
        while let Some(f) = self.frame().await {
            if f.tag() == b'E' {
                let e = pgsplit_protocol::backend::ErrorFields::parse(f.body()).unwrap();
                return (e.severity.into(), e.code.into(), e.message.into());
            }
        }
        panic!("connection closed without an error");
    }

    /// Startup + SCRAM login as the lab user, up to the first ReadyForQuery.
    pub async fn login(stack: &Stack) -> Raw {
        Raw::login_at(stack.proxy_addr()).await
    }

    /// Login as the default lab user (app/app, database app) at `addr`.
    pub async fn login_at(addr: std::net::SocketAddr) -> Raw {
        Raw::login_with(addr, &[]).await
    }

    /// Login with extra startup parameters.
    pub async fn login_with(addr: std::net::SocketAddr, extra: &[(&str, &str)]) -> Raw {
        let opts = pgsplit_lab::LabOptions::default();
        let mut raw = Raw::connect_at(addr).await;
        let mut b = bytes::BytesMut::new();
        let mut params = vec![
            ("user", opts.user.as_str()),
            ("database", opts.database.as_str()),
        ];
        params.extend_from_slice(extra);
        pgsplit_protocol::encode::startup_message(&mut b, &params);
        raw.send(&b).await;
        let mut scram: Option<postgres_protocol_scram::Client> = None;
        loop {
            let f = raw.frame().await.expect("login completes");
            match f.tag() {
                b'R' => {
                    let code = i32::from_be_bytes(f.body()[..4].try_into().unwrap());
                    let mut w = bytes::BytesMut::new();
                    match code {
                        0 => continue,
                        10 => {
                            let c = postgres_protocol_scram::Client::new(opts.password.as_bytes());
                            pgsplit_protocol::encode::sasl_initial_response(
                                &mut w,
                                "SCRAM-SHA-256",
                                c.message(),
                            );
                            scram = Some(c);
                        }
                        11 => {
                            let c = scram.as_mut().unwrap();
                            c.update(&f.body()[4..]);
                            pgsplit_protocol::encode::sasl_response(&mut w, c.message());
                        }
                        12 => continue,
                        other => panic!("unexpected auth request {other}"),
                    }
                    raw.send(&w).await;
                }
                b'Z' => return raw,
                b'E' => panic!("login failed"),
                _ => {}
            }
        }
    }

    /// Reads until ReadyForQuery; returns the tags seen.
    pub async fn until_ready(&mut self) -> Vec<u8> {
        let mut tags = Vec::new();
        while let Some(f) = self.frame().await {
            tags.push(f.tag());
            if f.tag() == b'Z' {
                return tags;
            }
        }
        panic!("closed before ReadyForQuery: {tags:?}");
    }
}

/// A thin SCRAM client wrapper over postgres-protocol, for raw tests.
pub mod postgres_protocol_scram {
    pub struct Client(postgres_protocol::authentication::sasl::ScramSha256);
    impl Client {
        pub fn new(password: &[u8]) -> Client {
            Client(postgres_protocol::authentication::sasl::ScramSha256::new(
                password,
                postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
            ))
        }
        pub fn message(&self) -> &[u8] {
            self.0.message()
        }
        pub fn update(&mut self, data: &[u8]) {
            self.0.update(data).expect("server-first parses");
        }
    }
}

/// What came back for a pipeline of `n` Sync-terminated batches.
#[derive(Debug, Default)]
pub struct Replies {
    /// First column of every DataRow, as text.
    pub values: Vec<String>,
    /// SQLSTATE of every ErrorResponse.
    pub errors: Vec<String>,
    /// Message of every ErrorResponse.
    pub messages: Vec<String>,
    /// Tag of every CommandComplete.
    pub tags: Vec<String>,
    /// Transaction status of every ReadyForQuery.
    pub ready: Vec<u8>,
}

impl Raw {
    /// Reads until `n` ReadyForQuery messages arrived.
    pub async fn replies(&mut self, n: usize) -> Replies {
        let mut r = Replies::default();
        while r.ready.len() < n {
            let f = self.frame().await.expect("connection stays open");
            match f.tag() {
                b'D' => {
                    let body = f.body();
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    let v = if len < 0 {
                        "NULL".into()
                    } else {
                        String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
                    };
                    r.values.push(v);
                }
                b'E' => {
                    let e = pgsplit_protocol::backend::ErrorFields::parse(f.body()).unwrap();
                    r.errors.push(e.code.to_owned());
                    r.messages.push(e.message.to_owned());
                }
                b'C' => {
                    let body = f.body();
                    let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
                    r.tags
                        .push(String::from_utf8_lossy(&body[..end]).into_owned());
                }
                b'Z' => r.ready.push(f.body()[0]),
                _ => {}
            }
        }
        r
    }
}

/// Appends Bind/Execute/Sync of prepared statement `name` to `b`.
pub fn run_prepared(b: &mut bytes::BytesMut, name: &str) {
    pgsplit_protocol::encode::bind(b, "", name, &[]);
    pgsplit_protocol::encode::execute(b, "", 0);
    pgsplit_protocol::encode::sync(b);
}

/// Appends Parse/Bind/Execute/Sync of `sql` (unnamed) to `b`.
pub fn extended(b: &mut bytes::BytesMut, sql: &str) {
    pgsplit_protocol::encode::parse(b, "", sql, &[]);
    pgsplit_protocol::encode::bind(b, "", "", &[]);
    pgsplit_protocol::encode::execute(b, "", 0);
    pgsplit_protocol::encode::sync(b);
}

/// A client program of the installed PostgreSQL (psql, pgbench), blind to
/// the environment's PGHOST and PGPORT.
pub fn pg_tool(name: &str) -> std::process::Command {
    let bins = pgsplit_lab::PgBinaries::locate().expect("PostgreSQL binaries");
    let mut c = std::process::Command::new(bins.tool(name));
    c.env_remove("PGHOST")
        .env_remove("PGPORT")
        .env("PGCONNECT_TIMEOUT", "10");
    c
}

/// Runs `c` to its end; its output (stdout, then stderr). Panics with it
/// when `c` fails.
pub fn run_tool(mut c: std::process::Command) -> String {
    let out = tokio::task::block_in_place(|| c.output()).expect("tool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?} failed:\n{text}");
    text
}

/// `pgbench args… <stack's url>`: its output.
pub fn pgbench(stack: &Stack, args: &[&str]) -> String {
    let mut c = pg_tool("pgbench");
    c.args(args).arg(stack.url());
    run_tool(c)
}

/// This process's resident set in KiB and its open descriptors (the proxy
/// runs in it).
pub fn rss_and_fds() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (rss, fds)
}
