//! One connection from pgsplit to a PostgreSQL server: connect, log in with
//! the proxy's own credentials for that server, and learn the server's
//! ParameterStatus values and cancel key.
//!
//! After login the connection is a byte pipe: the session writes client
//! frames into it and scans what comes back (see `session::relay`).

use std::time::Duration;

use bytes::BytesMut;
use pgsplit_protocol::backend::{self as msg, Auth};
use pgsplit_protocol::scram::{SaltedKeys, ScramClient};
use pgsplit_protocol::{encode, frame, tag, ProtoError};
use pgsplit_router::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{BackendAddr, BackendKeys, SslMode};
use crate::stream::{Endpoint, Stream};

/// Backend messages during login are small; anything bigger is a broken peer.
const MAX_LOGIN_MESSAGE_BYTES: usize = 1 << 20;

/// SCRAM keys derived for the servers' salts: one PBKDF2 per server and
/// user, not one per connection a pool opens.
static SALTED_KEYS: std::sync::LazyLock<SaltedKeys> = std::sync::LazyLock::new(SaltedKeys::default);

/// Why a backend connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// TLS was asked for (`sslmode`) and could not be had or verified.
    #[error("TLS to {addr}: {reason}")]
    Tls { addr: String, reason: String },
    #[error("timed out after {0:?} connecting to the server")]
    Timeout(Duration),
    /// No primary candidate takes writes now (several primary candidates
    /// only): two are writable, or none has been seen writable.
    #[error("{0}")]
    NoPrimary(String),
    #[error("the primary link is down: no heartbeat answer within {0:?}")]
    LinkDown(Duration),
    #[error("connection to the server lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection during login")]
    Closed,
    /// The server refused the login with an ErrorResponse (wrong database,
    /// wrong backend credentials, too many connections, shutting down…).
    #[error("server refused the connection: {severity} {code} {message}")]
    Refused {
        severity: String,
        code: String,
        message: String,
    },
    #[error("server asked for an authentication method pgsplit does not support ({0})")]
    UnsupportedAuth(i32),
    #[error("server asked for a password but none is configured for backend user {0:?}")]
    NoPassword(String),
    #[error("SCRAM exchange with the server failed: {0}")]
    Scram(String),
    #[error("invalid message from the server: {0}")]
    Protocol(#[from] ProtoError),
}

/// What to log in as.
#[derive(Clone)]
pub struct Login<'a> {
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: &'a str,
    /// Client startup parameters passed through (application_name, …).
    pub params: &'a [(String, String)],
    /// Without a password: what an `auth_query` user's login left (see
    /// [`BackendKeys`]).
    pub keys: Option<&'a BackendKeys>,
}

/// An authenticated connection to one server.
pub struct BackendConn {
    pub stream: Stream,
    /// Bytes read from the server and not yet relayed.
    pub rbuf: BytesMut,
    pub target: Target,
    pub endpoint: Endpoint,
    /// The server's cancel key.
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values reported at login.
    pub params: Vec<(String, String)>,
    /// The thread (one runtime each) whose reactor the socket is
    /// registered with: see [`BackendConn::gone_while_idle`].
    home: u64,
}

thread_local! {
    /// A number of this thread's own, for telling runtimes apart.
    static THREAD: u64 = {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    };
}

fn this_thread() -> u64 {
    THREAD.with(|t| *t)
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("target", &self.target)
            .field("endpoint", &self.endpoint)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl BackendConn {
    /// Connects and logs in, all within `timeout`.
    ///
    /// # Errors
    /// A [`BackendError`] saying which step failed.
    pub async fn connect(
        target: Target,
        addr: &BackendAddr,
        login: &Login<'_>,
        timeout: Duration,
    ) -> Result<BackendConn, BackendError> {
        tokio::time::timeout(timeout, Self::connect_inner(target, addr, login))
            .await
            .map_err(|_| BackendError::Timeout(timeout))?
    }

    async fn connect_inner(
        target: Target,
        addr: &BackendAddr,
        login: &Login<'_>,
    ) -> Result<BackendConn, BackendError> {
        let (host, port) = (addr.host.as_str(), addr.port);
        let endpoint =
            Endpoint::resolve(host, port)
                .await
                .map_err(|source| BackendError::Resolve {
                    addr: format!("{host}:{port}"),
                    source,
                })?;
        let mut stream = endpoint
            .connect()
            .await
            .map_err(|source| BackendError::Connect {
                addr: endpoint.to_string(),
                source,
            })?;
        if addr.sslmode != SslMode::Disable {
            // A unix socket ignores sslmode, as in libpq.
            if let Stream::Tcp(tcp) = stream {
                stream = match crate::backend_tls::start(
                    tcp,
                    host,
                    addr.sslmode,
                    addr.sslrootcert.as_deref(),
                )
                .await
                .map_err(|reason| BackendError::Tls {
                    addr: endpoint.to_string(),
                    reason,
                })? {
                    Ok(tls) => Stream::Tls(tls),
                    Err(plain) => Stream::Tcp(plain),
                };
            }
        }
        let mut conn = BackendConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            target,
            endpoint,
            pid: 0,
            secret: 0,
            params: Vec::new(),
            home: this_thread(),
        };
        conn.login(login).await?;
        Ok(conn)
    }

    async fn login(&mut self, login: &Login<'_>) -> Result<(), BackendError> {
        let mut w = BytesMut::new();
        let mut params: Vec<(&str, &str)> =
            vec![("user", login.user), ("database", login.database)];
        for (k, v) in login.params {
            // pgsplit.* options are the proxy's own (e.g. pgsplit.report_lag).
            if !matches!(k.as_str(), "user" | "database" | "replication")
                && !k.starts_with("pgsplit.")
            {
                params.push((k, v));
            }
        }
        encode::startup_message(&mut w, &params);
        self.send(&w).await?;
        let mut scram: Option<ScramClient> = None;
        loop {
            let f = self.read_login_frame().await?;
            match f.tag() {
                tag::backend::AUTHENTICATION => {
                    let mut w = BytesMut::new();
                    match msg::authentication(f.body())? {
                        Auth::Ok => continue,
                        Auth::Cleartext => {
                            let pw = self.password(login)?;
                            encode::password_message(&mut w, pw.as_bytes());
                        }
                        Auth::Md5 { salt } => {
                            let stored = match (login.password, login.keys) {
                                (None, Some(BackendKeys::Md5(stored))) => stored.clone(),
                                _ => {
                                    pgsplit_protocol::md5::stored(login.user, self.password(login)?)
                                }
                            };
                            let resp = pgsplit_protocol::md5::response_from_stored(&stored, salt);
                            encode::password_message(&mut w, resp.as_bytes());
                        }
                        Auth::Sasl { mechanisms } => {
                            let offered =
                                mechanisms.split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256");
                            if !offered {
                                return Err(BackendError::UnsupportedAuth(10));
                            }
                            let s = match (login.password, login.keys) {
                                (None, Some(BackendKeys::Scram(keys))) => {
                                    ScramClient::with_keys(*keys)
                                }
                                _ => ScramClient::new(self.password(login)?.as_bytes()),
                            };
                            encode::sasl_initial_response(
                                &mut w,
                                "SCRAM-SHA-256",
                                s.client_first().as_bytes(),
                            );
                            scram = Some(s);
                        }
                        Auth::SaslContinue { data } => {
                            let s = scram
                                .as_mut()
                                .ok_or(BackendError::Scram("unexpected continue".into()))?;
                            let fin = s
                                .server_first(data, &SALTED_KEYS)
                                .map_err(|e| BackendError::Scram(e.to_string()))?;
                            encode::sasl_response(&mut w, fin.as_bytes());
                        }
                        Auth::SaslFinal { data } => {
                            let s = scram
                                .take()
                                .ok_or(BackendError::Scram("unexpected final".into()))?;
                            s.server_final(data)
                                .map_err(|e| BackendError::Scram(e.to_string()))?;
                            continue;
                        }
                        Auth::Unsupported(code) => return Err(BackendError::UnsupportedAuth(code)),
                    }
                    self.send(&w).await?;
                }
                tag::backend::PARAMETER_STATUS => {
                    let (k, v) = msg::parameter_status(f.body())?;
                    self.params.push((k.to_owned(), v.to_owned()));
                }
                tag::backend::BACKEND_KEY_DATA => {
                    (self.pid, self.secret) = msg::backend_key_data(f.body())?;
                }
                tag::backend::READY_FOR_QUERY => return Ok(()),
                tag::backend::ERROR_RESPONSE => {
                    let e = msg::ErrorFields::parse(f.body())?;
                    return Err(BackendError::Refused {
                        severity: e.severity.to_owned(),
                        code: e.code.to_owned(),
                        message: e.message.to_owned(),
                    });
                }
                // NoticeResponse, NegotiateProtocolVersion: nothing to do.
                _ => {}
            }
        }
    }

    fn password<'a>(&self, login: &Login<'a>) -> Result<&'a str, BackendError> {
        login
            .password
            .ok_or_else(|| BackendError::NoPassword(login.user.to_owned()))
    }

    async fn read_login_frame(&mut self) -> Result<frame::Frame, BackendError> {
        loop {
            if let Some(f) = frame::decode(&mut self.rbuf, MAX_LOGIN_MESSAGE_BYTES)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// Runs `sql` with the simple protocol and discards its results; used to
    /// replay session settings. Returns the first error's SQLSTATE and
    /// message, if any.
    ///
    /// # Errors
    /// I/O or protocol errors (the connection is then unusable).
    pub async fn run_silent(
        &mut self,
        sql: &str,
    ) -> Result<Option<(String, String)>, BackendError> {
        let mut ignored = Vec::new();
        Ok(self.query(sql, &mut ignored).await?.err())
    }

    /// Runs a query of the proxy's own on an idle connection and returns
    /// the columns of its first row as text (`None` for NULL; empty when
    /// there is no row), or the SQLSTATE it failed with.
    /// NotificationResponses that arrive in the meantime belong to the
    /// client and are appended to `async_out`.
    ///
    /// # Errors
    /// The connection failed or the server sent FATAL.
    pub async fn query_row(
        &mut self,
        sql: &str,
        async_out: &mut Vec<bytes::Bytes>,
    ) -> Result<Result<Vec<Option<String>>, String>, BackendError> {
        Ok(self.query(sql, async_out).await?.map_err(|(code, _)| code))
    }

    /// As [`BackendConn::query_row`], with the error's message as well.
    async fn query(
        &mut self,
        sql: &str,
        async_out: &mut Vec<bytes::Bytes>,
    ) -> Result<Result<Vec<Option<String>>, (String, String)>, BackendError> {
        let mut w = BytesMut::new();
        encode::query(&mut w, sql);
        self.send(&w).await?;
        let mut value = None;
        let mut err = None;
        loop {
            let f = self.read_frame(usize::MAX >> 1).await?;
            match f.tag() {
                tag::backend::ERROR_RESPONSE => {
                    let e = msg::ErrorFields::parse(f.body())?;
                    if e.is_fatal() {
                        return Err(BackendError::Closed);
                    }
                    err.get_or_insert_with(|| (e.code.to_owned(), e.message.to_owned()));
                }
                tag::backend::DATA_ROW if value.is_none() => {
                    value = Some(columns(f.body()));
                }
                tag::backend::NOTIFICATION_RESPONSE => async_out.push(f.into_bytes()),
                tag::backend::READY_FOR_QUERY => {
                    return Ok(match err {
                        Some(e) => Err(e),
                        None => Ok(value.unwrap_or_default()),
                    })
                }
                _ => {}
            }
        }
    }

    /// Reads one whole frame (used off the relay path).
    ///
    /// # Errors
    /// I/O errors, `Closed` at EOF, protocol errors.
    pub async fn read_frame(&mut self, max: usize) -> Result<frame::Frame, BackendError> {
        loop {
            if let Some(f) = frame::decode(&mut self.rbuf, max.min(i32::MAX as usize))? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// A ParameterStatus value reported at login.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this pooled connection, idle until now, was closed by its
    /// server or the network: checked before it is leased. When its socket
    /// is registered with this thread's runtime, the runtime's readiness
    /// (current as of its last poll of the kernel, which woke the session
    /// now asking) answers without a system call; a connection another
    /// runtime drives asks the kernel, as that runtime may not have seen a
    /// reset yet.
    pub fn gone_while_idle(&mut self) -> bool {
        self.is_closed_while_idle() || (self.home != this_thread() && self.stream.peer_gone())
    }

    /// Checks, without waiting, whether the server closed this idle
    /// connection (shutdown, idle timeout, a cut tunnel that was noticed).
    /// Pending bytes (a FATAL, a notice) are kept in `rbuf`.
    pub fn is_closed_while_idle(&mut self) -> bool {
        loop {
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return true,
                Ok(_) => {
                    if self.rbuf_has_fatal() {
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    fn rbuf_has_fatal(&self) -> bool {
        let mut at = 0;
        while let Ok(Some((t, len))) = frame::peek(&self.rbuf[at..], usize::MAX >> 1) {
            if self.rbuf.len() < at + len {
                return false;
            }
            if t == tag::backend::ERROR_RESPONSE {
                if let Ok(e) = msg::ErrorFields::parse(&self.rbuf[at + 5..at + len]) {
                    if e.is_fatal() {
                        return true;
                    }
                }
            }
            at += len;
        }
        false
    }

    /// Sends Terminate and closes, ignoring errors (best effort).
    pub async fn terminate(mut self) {
        let mut w = BytesMut::new();
        encode::terminate(&mut w);
        let _ = tokio::time::timeout(Duration::from_millis(100), self.send(&w)).await;
    }

    /// Writes and flushes (TLS keeps records until flushed).
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

/// Sends a CancelRequest for the statement running on (`pid`, `secret`).
///
/// # Errors
/// Connect or write failures.
pub async fn send_cancel(
    endpoint: &Endpoint,
    pid: i32,
    secret: i32,
    timeout: Duration,
) -> std::io::Result<()> {
    let fut = async {
        let mut s = endpoint.connect().await?;
        let mut w = BytesMut::new();
        encode::cancel_request(&mut w, pid, secret);
        s.write_all(&w).await?;
        // The server closes without answering; wait for that so the cancel
        // is processed before we return.
        let mut sink = [0u8; 16];
        let _ = s.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel timed out"))?
}

/// The columns of a DataRow body as text (`None` for NULL).
fn columns(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(n) = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return out;
    };
    let mut at = 2;
    for _ in 0..n {
        let Some(len) = body.get(at..at + 4) else {
            break;
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        match usize::try_from(len) {
            Ok(len) => {
                let v = body.get(at..at + len).unwrap_or_default();
                out.push(Some(String::from_utf8_lossy(v).into_owned()));
                at += len;
            }
            Err(_) => out.push(None),
        }
    }
    out
}
