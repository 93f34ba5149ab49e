//! pgsplit's I/O shell: everything that touches a socket.
//!
//! # Layout
//! - [`config`]: the configuration struct, TOML loading, `--set` overrides.
//! - [`listener`]: accept loop, startup packet, authentication, handshake.
//! - [`auth`]: client authentication (SCRAM-SHA-256, md5, trust).
//! - [`backend`]: connections to PostgreSQL servers and their login.
//! - [`session`]: one client's virtual session over up to two backends;
//!   `session::relay` streams backend output to the client.
//! - [`cancel`]: the client cancel keys and where each points now.
//! - [`error`]: the proxy's errors and their SQLSTATEs, in one place.
//! - [`stats`]: counters of routing decisions.
//!
//! A client connection flows listener → auth → session; the session asks
//! `pgsplit_router` where each statement goes and relays bytes unchanged.

pub mod auth;
pub mod backend;
pub mod cancel;
pub mod config;
pub mod error;
mod listener;
mod session;
pub mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use pgsplit_router::{Classifier, ClassifierConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use config::Config;

/// What every session shares: read-only config and process-wide services.
pub struct Shared {
    pub config: Arc<Config>,
    pub classifier: Classifier,
    pub secrets: auth::Secrets,
    pub cancels: Arc<cancel::CancelRegistry>,
    pub stats: stats::Stats,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Shared {
        let classifier = Classifier::new(ClassifierConfig {
            write_functions: config.routing.write_functions.clone(),
            cache_capacity: config.routing.parse_cache_entries,
        });
        Shared {
            secrets: auth::Secrets::new(&config),
            classifier,
            cancels: Arc::default(),
            stats: stats::Stats::default(),
            config,
        }
    }
}

/// Binds the configured listen address.
///
/// # Errors
/// The bind error (address in use, permission).
pub async fn bind(config: &Config) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.listen).await
}

/// Serves clients on `listener` until `shutdown` completes, then stops
/// accepting, lets sessions finish their transaction for the configured
/// grace period, and closes the rest.
///
/// # Errors
/// Only start-up failures; per-client errors end that client alone.
pub async fn serve(
    listener: TcpListener,
    config: Arc<Config>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared::new(config.clone()));
    serve_shared(listener, shared, shutdown).await
}

/// Like [`serve`], with a caller-held [`Shared`] (tests read its stats).
///
/// # Errors
/// See [`serve`].
pub async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, primary = %shared.config.primary, replica = %shared.config.replica, "pgsplit listening");
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accept = listener::accept_loop(listener, shared.clone(), token.clone(), tracker.clone());
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
    token.cancel();
    tracker.close();
    let grace = shared.config.timeouts.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        info!(
            remaining = tracker.len(),
            "shutdown grace period over; closing sessions"
        );
    }
    Ok(())
}
