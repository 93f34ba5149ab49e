//! Accepting clients: the startup packet (SSL/GSSENC refusal, cancel
//! requests, protocol negotiation), client authentication, the first
//! backend connection, and the handshake the client sees. Then the
//! connection becomes a [`crate::session`].

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::startup::{decode_startup, Startup, StartupPacket};
use pgsplit_protocol::{encode, ProtoError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::tls::ClientStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backend::send_cancel;
use crate::error::Error;
use crate::session::Session;
use crate::Shared;

/// A client connection accepted and handed to a worker thread.
pub(crate) struct Accepted {
    pub stream: std::net::TcpStream,
    pub peer: std::net::SocketAddr,
    pub conn_id: u64,
    /// `None` when the connection limit is reached (the client gets 53300).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Accepts clients until `shutdown` fires and deals them round-robin to
/// the workers, so every core carries the same number of sessions.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    workers: Vec<mpsc::UnboundedSender<Accepted>>,
) {
    let limit = Arc::new(Semaphore::new(shared.config().max_client_connections));
    let mut conn_id: u64 = 0;
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of file descriptors and similar: wait, never give up.
                warn!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        conn_id += 1;
        let _ = stream.set_nodelay(true);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let permit = limit.clone().try_acquire_owned().ok();
        let worker = &workers[(conn_id as usize) % workers.len()];
        let _ = worker.send(Accepted {
            stream,
            peer,
            conn_id,
            permit,
        });
    }
}

/// Runs the sessions dealt to one worker until shutdown.
pub(crate) async fn worker_loop(
    mut inbox: mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let acc = tokio::select! {
            a = inbox.recv() => match a { Some(a) => a, None => return },
            _ = shutdown.cancelled() => return,
        };
        let Ok(stream) = TcpStream::from_std(acc.stream) else {
            continue;
        };
        let shared = shared.clone();
        let token = shutdown.clone();
        let span = info_span!(
            "client",
            conn_id = acc.conn_id,
            peer = %acc.peer,
            user = tracing::field::Empty,
            db = tracing::field::Empty
        );
        let permit = acc.permit;
        let (peer, id) = (acc.peer, acc.conn_id);
        tracker.spawn(async move {
            let full = permit.is_none();
            let _open = Connected::count(&shared);
            handle(stream, shared.clone(), token, full, span, (peer, id)).await;
            drop(permit);
        });
    }
}

/// Counts one open client connection in `clients_connected` while it
/// lives, however its task ends.
struct Connected(Arc<Shared>);

impl Connected {
    fn count(shared: &Arc<Shared>) -> Connected {
        shared
            .stats
            .clients_connected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Connected(shared.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0
            .stats
            .clients_connected
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One client connection, inside its span (`conn_id`, `peer`, and once
/// logged in `user` and `db`), so every line a session logs says whose it
/// is. Entering a span on each poll costs tens of nanoseconds, against
/// tens of microseconds per relayed statement.
async fn handle(
    tcp: TcpStream,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    full: bool,
    span: tracing::Span,
    (peer, id): (std::net::SocketAddr, u64),
) {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut stream = ClientStream::Plain(tcp);
    let auth_timeout = shared.config().timeouts.client_auth_timeout;
    let started = tokio::time::timeout(
        auth_timeout,
        startup(&mut stream, &mut buf, &shared, full).instrument(span.clone()),
    )
    .await;
    let ready = match started {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return, // a cancel request, or SSL refused and client left
        Ok(Err(e)) => {
            shared
                .stats
                .clients_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(cause = %e, "startup failed");
            if !matches!(e, Error::ClientGone | Error::ClientIo(_)) {
                let mut out = BytesMut::new();
                e.write_to(&mut out, true);
                let _ = send(&mut stream, &out).await;
            }
            return;
        }
        Err(_) => {
            let mut out = BytesMut::new();
            Error::AuthTimeout.write_to(&mut out, true);
            // Bounded: a client that does not read must not hold the task.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), send(&mut stream, &out))
                    .await;
            return;
        }
    };
    shared
        .stats
        .clients_accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (startup, user, first) = ready;
    let cancel = shared.cancels.register();
    let database = startup.database().unwrap_or_default().to_owned();
    let entry = shared.clients.register(crate::clients::ClientInfo {
        id,
        user: user.name.clone(),
        database: database.clone(),
        peer,
        connected_at: std::time::SystemTime::now(),
        application_name: startup
            .param("application_name")
            .unwrap_or_default()
            .to_owned(),
        console: first.is_none(),
        key_pid: cancel.pid,
    });
    let Some((first, pools)) = first else {
        span.record("user", user.name.as_str());
        span.record("db", "pgsplit");
        span.in_scope(|| info!("console session started"));
        crate::console::run(
            stream,
            buf,
            shared.clone(),
            &user.name,
            (cancel.pid, cancel.secret),
            entry.kill.clone(),
            shutdown,
        )
        .await;
        return;
    };
    let mut out = BytesMut::new();
    encode::auth_ok(&mut out);
    for (k, v) in first.server_params() {
        // The client must see a read-write server (libpq's
        // target_session_attrs=read-write checks these).
        let v = match k.as_str() {
            "in_hot_standby" | "default_transaction_read_only" => "off",
            _ => v.as_str(),
        };
        encode::parameter_status(&mut out, k, v);
    }
    encode::backend_key_data(&mut out, cancel.pid, cancel.secret);
    encode::ready_for_query(&mut out, TxStatus::Idle);
    if send(&mut stream, &out).await.is_err() {
        return;
    }
    span.record("user", user.name.as_str());
    span.record("db", database.as_str());
    span.in_scope(|| info!("session started"));
    let session = Session::new(
        shared,
        stream,
        buf,
        user,
        database,
        startup.params,
        first,
        pools,
        cancel,
        shutdown,
        entry.kill.clone(),
    );
    let res = session.run().instrument(span.clone()).await;
    drop(entry);
    span.in_scope(|| match res {
        Ok(()) => debug!("session ended"),
        Err(e) => debug!(cause = %e, "session ended"),
    });
}

/// A logged-in client: its startup packet, its user and, for a proxied
/// session, its first backend and pools (`None`: the console).
type Ready = (
    Startup,
    crate::config::User,
    Option<(Box<crate::session::Backend>, [crate::pool::PoolId; 2])>,
);

/// Reads the startup packet(s) and authenticates. `Ok(None)` when the
/// connection was only a cancel request.
async fn startup(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    shared: &Shared,
    full: bool,
) -> Result<Option<Ready>, Error> {
    let startup = loop {
        let packet = loop {
            if let Some(p) = decode_startup(buf)? {
                break p;
            }
            if stream.read_buf(buf).await.map_err(Error::ClientIo)? == 0 {
                return Err(Error::ClientGone);
            }
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                if !buf.is_empty() {
                    // Bytes behind an encryption request would be in the
                    // clear where the client expects encryption.
                    return Err(ProtoError::Malformed {
                        what: "startup (data after encryption request)",
                    }
                    .into());
                }
                match (&packet, &shared.live.tls()) {
                    (StartupPacket::SslRequest, Some(tls)) if !stream.is_tls() => {
                        stream.upgrade(tls).await.map_err(Error::ClientIo)?;
                    }
                    _ => send(stream, b"N").await.map_err(Error::ClientIo)?,
                }
            }
            StartupPacket::Cancel { pid, secret } => {
                forward_cancel(shared, pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup(s) => break s,
        }
    };
    if shared
        .live
        .tls()
        .is_some_and(|t| t.mode == crate::config::TlsMode::Require)
        && !stream.is_tls()
    {
        return Err(Error::TlsRequired);
    }
    if full {
        return Err(Error::TooManyClients);
    }
    if startup.minor > 0 || !startup.protocol_options.is_empty() {
        let mut out = BytesMut::new();
        encode::negotiate_protocol_version(&mut out, 0, &startup.protocol_options);
        send(stream, &out).await.map_err(Error::ClientIo)?;
    }
    if startup
        .param("replication")
        .is_some_and(|v| !matches!(v, "false" | "off" | "no" | "0"))
    {
        return Err(Error::Replication);
    }
    let user_name = startup.user().ok_or(Error::NoUser)?.to_owned();
    let cfg = shared.config();
    let secrets = shared.live.secrets();
    let lookup_db = startup
        .database()
        .filter(|d| !d.is_empty())
        .unwrap_or(&user_name)
        .to_owned();
    let queried =
        if cfg.user(&user_name).is_none() && cfg.auth.mode == crate::config::AuthMode::AuthQuery {
            Some(
                shared
                    .auth_query
                    .secret(shared, &user_name, &lookup_db)
                    .await?,
            )
        } else {
            None
        };
    let keys = match crate::auth::authenticate(
        stream,
        buf,
        &cfg,
        &secrets,
        &user_name,
        queried.as_ref().map(Option::as_ref),
    )
    .await
    {
        Ok(k) => k,
        Err(e @ Error::AuthFailed { .. }) => {
            if let Some(used) = &queried {
                // The replica may not have a changed password yet: the
                // next attempt uses what the primary holds.
                let _ = shared
                    .auth_query
                    .refresh_from_primary(shared, &user_name, &lookup_db, used.as_ref())
                    .await;
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if let Some(k) = keys {
        shared.auth_query.remember(&user_name, k);
    }
    let user = cfg
        .user(&user_name)
        .cloned()
        .or_else(|| shared.auth_query.user(&user_name))
        .ok_or(Error::AuthFailed {
            user: user_name.clone(),
        })?;
    let database = startup.database().unwrap_or_default();
    if database == crate::console::DATABASE {
        if !user.admin {
            return Err(Error::NotAdmin);
        }
        return Ok(Some((startup, user, None)));
    }
    let first = crate::session::first_backend(shared, &user, database, &startup.params).await?;
    Ok(Some((startup, user, Some(first))))
}

/// Writes `bytes` to the client and pushes them out (TLS buffers).
async fn send(stream: &mut ClientStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Forwards a client's CancelRequest to the backend running its statement.
async fn forward_cancel(shared: &Shared, pid: i32, secret: i32) {
    // `_delivering` keeps the target connection out of other clients'
    // hands until the server has taken the cancel (see `cancel`).
    let Some((running, _delivering)) = shared.cancels.lookup(pid, secret) else {
        debug!("cancel request for an idle session or with a wrong key; ignored");
        return;
    };
    let timeout = shared.config().timeouts.connect_timeout;
    if let Err(e) = send_cancel(&running.endpoint, running.pid, running.secret, timeout).await {
        warn!(cause = %e, "forwarding a cancel request failed");
    }
}
