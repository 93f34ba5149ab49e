//! pgsplit's I/O shell: everything that touches a socket.
//!
//! # Layout
//! - [`config`]: the configuration struct, TOML loading, `--set` overrides.
//! - `listener`: accept loop, startup packet, authentication, handshake.
//! - [`auth`]: client authentication (SCRAM-SHA-256, md5, trust).
//! - [`backend`]: connections to PostgreSQL servers and their login.
//! - `session`: one client's virtual session over up to two backends;
//!   `session::relay` streams backend output to the client.
//! - [`cancel`]: the client cancel keys and where each points now.
//! - [`error`]: the proxy's errors and their SQLSTATEs, in one place.
//! - [`stats`]: counters of routing decisions; `admin` serves them and
//!   the replication state over HTTP (`/metrics`, `/health`).
//! - `monitor` polls both servers' WAL positions into [`replication`],
//!   which sessions read to keep reads consistent and fresh.
//! - [`stream`]: backend sockets, TCP or unix-domain.
//!
//! A client connection flows listener → auth → session; the session asks
//! `pgsplit_router` where each statement goes and relays bytes unchanged.

mod admin;
pub mod auth;
pub mod auth_query;
pub mod backend;
pub mod backend_tls;
pub mod cancel;
pub mod clients;
pub mod config;
pub mod console;
pub mod error;
pub mod failover;
pub mod fdlimit;
mod listener;
mod monitor;
pub mod pause;
pub mod pool;
pub mod reload;
pub mod replication;
mod session;
pub mod stats;
pub mod stream;
pub mod tls;
mod unix;

use std::net::SocketAddr;
use std::sync::Arc;

use pgsplit_router::{Classifier, ClassifierConfig};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use config::Config;
pub use tokio_util::sync::CancellationToken;

/// What every session shares: read-only config and process-wide services.
pub struct Shared {
    /// The configuration in force, the secrets and TLS set-up derived from
    /// it, and reloading (see [`reload`]).
    pub live: reload::Live,
    pub classifier: Classifier,
    pub cancels: Arc<cancel::CancelRegistry>,
    pub stats: stats::Stats,
    /// Replica lag and positions, kept by the monitor.
    pub replication: replication::Replication,
    /// Server connections shared by the sessions.
    pub pools: pool::Pools,
    /// The primary candidates and which of them takes writes now.
    pub failover: failover::Candidates,
    /// The connected clients (the console's `SHOW CLIENTS`, `KILL_CLIENT`).
    pub clients: Arc<clients::Clients>,
    /// Cancelled to end a graceful shutdown at once (SIGQUIT, or a second
    /// signal): the grace period is cut short and every session closed.
    pub immediate: CancellationToken,
    /// The console's `PAUSE`/`RESUME`.
    pub pause: pause::Pause,
    /// Secrets read with `auth_query` (see [`auth_query`]).
    pub auth_query: auth_query::AuthQuery,
    /// Bumped when a reload changes the replica's address.
    pub replica_generation: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The configuration in force now (see [`reload`]).
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// Reads the configuration file again and applies what may change
    /// without a restart (see [`reload`]).
    ///
    /// # Errors
    /// The load error; the old configuration stays in force.
    pub fn reload(&self) -> Result<reload::Report, String> {
        self.live.reload(|old, new| {
            // Root certificates are read again at the next connect.
            backend_tls::forget();
            self.pools.apply(new);
            self.failover.reconfigure(old, new);
            if old.replica != new.replica {
                // New connections go to the new address; pooled ones to
                // the old are closed instead of leased.
                tracing::warn!(from = %old.replica, to = %new.replica,
                    "reload: the replica's address changed");
                self.replica_generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    }

    /// The generation a pooled connection to `t` must carry to be leased:
    /// the failover generation for the primary, the replica's address
    /// generation for the replica (both bumped when the server changes).
    pub fn generation_of(&self, t: pgsplit_router::Target) -> u64 {
        match t {
            pgsplit_router::Target::Primary => self.failover.generation(),
            pgsplit_router::Target::Replica => self
                .replica_generation
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Where a new connection to `t` goes, and the generation it belongs
    /// to (see [`Shared::generation_of`]).
    ///
    /// # Errors
    /// `NoPrimary` when no candidate takes writes now, and why.
    pub fn server_addr(
        &self,
        t: pgsplit_router::Target,
    ) -> Result<(config::BackendAddr, u64), backend::BackendError> {
        match t {
            pgsplit_router::Target::Replica => Ok((
                self.config().replica.clone(),
                self.generation_of(pgsplit_router::Target::Replica),
            )),
            pgsplit_router::Target::Primary => self
                .failover
                .current()
                .map_err(backend::BackendError::NoPrimary),
        }
    }

    pub fn new(config: Arc<Config>) -> Shared {
        let classifier = Classifier::new(ClassifierConfig {
            write_functions: config.routing.write_functions.clone(),
            cache_capacity: config.routing.parse_cache_entries,
        });
        let candidates = config.primary_candidates();
        let replication = replication::Replication::default();
        replication.set_replica_promotable(
            candidates.len() > 1
                && candidates
                    .iter()
                    .any(|c| c.host == config.replica.host && c.port == config.replica.port),
        );
        Shared {
            classifier,
            cancels: Arc::default(),
            stats: stats::Stats::default(),
            replication,
            pools: pool::Pools::new(&config),
            failover: failover::Candidates::new(candidates),
            clients: Arc::default(),
            immediate: CancellationToken::new(),
            replica_generation: std::sync::atomic::AtomicU64::new(0),
            pause: pause::Pause::default(),
            auth_query: auth_query::AuthQuery::default(),
            live: reload::Live::new(config),
        }
    }
}

/// A bound proxy, ready to run.
pub struct Server {
    listener: std::net::TcpListener,
    admin: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the configured listen address (port 0 picks a free one).
    ///
    /// # Errors
    /// The bind error (address in use, permission).
    pub fn bind(config: Config) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let admin = match config.admin.listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("admin endpoint {addr}: {e}"))
                })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let shared = Shared::new(Arc::new(config));
        let tls = tls::client_tls(&shared.config())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        shared.live.set_tls(tls);
        Ok(Server {
            listener,
            admin,
            shared: Arc::new(shared),
        })
    }

    /// The address of the admin endpoint (`/metrics`, `/health`), if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address clients connect to.
    ///
    /// # Errors
    /// Only if the socket is broken.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Configuration and counters shared by all sessions.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves clients on the calling thread plus one thread per extra
    /// worker until `shutdown` is cancelled; then stops accepting, lets
    /// sessions finish for the grace period and returns.
    ///
    /// Each worker is a single-threaded runtime that owns its sessions
    /// outright: a session's client and backend sockets are polled by one
    /// thread, with no cross-thread wake-ups on the relay path.
    ///
    /// # Errors
    /// Runtime or socket set-up failures.
    pub fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let n = self.shared.config().worker_threads();
        let mut inboxes = Vec::with_capacity(n);
        let mut senders = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            senders.push(tx);
            inboxes.push(rx);
        }
        let first = inboxes.remove(0);
        let mut threads = Vec::new();
        for (i, inbox) in inboxes.into_iter().enumerate() {
            let shared = self.shared.clone();
            let token = shutdown.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("pgsplit-worker-{}", i + 1))
                    .spawn(move || run_worker(inbox, shared, token, None))?,
            );
        }
        let acceptor = Some((self.listener, self.admin, senders));
        let res = run_worker(first, self.shared, shutdown, acceptor);
        for t in threads {
            let _ = t.join();
        }
        res
    }
}

type Acceptor = (
    std::net::TcpListener,
    Option<std::net::TcpListener>,
    Vec<tokio::sync::mpsc::UnboundedSender<listener::Accepted>>,
);

fn run_worker(
    inbox: tokio::sync::mpsc::UnboundedReceiver<listener::Accepted>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    acceptor: Option<Acceptor>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tracker = TaskTracker::new();
        if let Some((l, admin, senders)) = acceptor {
            if let Some(a) = admin {
                let a = TcpListener::from_std(a)?;
                info!(addr = %a.local_addr()?, "admin endpoint: /metrics, /health");
                tokio::spawn(admin::serve(a, shared.clone(), shutdown.clone()));
            }
            let listener = TcpListener::from_std(l)?;
            let addr = listener.local_addr()?;
            let cfg = shared.config();
            info!(%addr, primary = %cfg.primary, replica = %cfg.replica,
                  workers = senders.len(), "pgsplit listening");
            fdlimit::check(&cfg);
            // The monitor has a thread of its own: its timer would otherwise
            // make every idle moment of this worker arm a kernel timer.
            let (m_shared, m_stop) = (shared.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name("pgsplit-monitor".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(async move {
                            // Pool upkeep opens connections here, where a
                            // mostly idle runtime drives their I/O at once.
                            tokio::spawn(session::maintain(m_shared.clone(), m_stop.clone()));
                            monitor::run(m_shared, m_stop).await
                        }),
                        Err(e) => {
                            tracing::error!(cause = %e, "replication monitor failed to start")
                        }
                    }
                })?;
            tokio::spawn(listener::accept_loop(
                listener,
                shared.clone(),
                shutdown.clone(),
                senders,
            ));
        }
        listener::worker_loop(inbox, shared.clone(), shutdown.clone(), tracker.clone()).await;
        tracker.close();
        let grace = shared.config().timeouts.shutdown_grace;
        if !tracker.is_empty() {
            info!(
                sessions = tracker.len(),
                ?grace,
                "waiting for transactions in flight; a second signal (or SIGQUIT) closes at once"
            );
        }
        tokio::select! {
            r = tokio::time::timeout(grace, tracker.wait()) => if r.is_err() {
                info!(
                    remaining = tracker.len(),
                    "shutdown grace period over; closing sessions"
                );
            },
            () = shared.immediate.cancelled() => info!(
                remaining = tracker.len(),
                "closing at once"
            ),
        }
        Ok(())
    })
}
