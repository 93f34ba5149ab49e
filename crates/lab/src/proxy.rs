//! pgsplit itself, in-process, on its own threads: tests and the lab drive
//! the same `Server::run` as production, on a port picked at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use pgsplit_server::{CancellationToken, Config, Server, Shared};

/// A running proxy; dropping it shuts it down and waits for it.
pub struct RunningProxy {
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl RunningProxy {
    /// Binds `config.listen` (port 0 picks one) and serves on new threads.
    ///
    /// # Errors
    /// The bind error.
    pub fn start(config: Config) -> std::io::Result<RunningProxy> {
        let server = Server::bind(config)?;
        let addr = server.local_addr()?;
        let admin = server.admin_addr();
        let shared = server.shared().clone();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pgsplit-proxy".into())
            .spawn(move || {
                if let Err(e) = server.run(token) {
                    eprintln!("pgsplit: {e}");
                }
            })?;
        Ok(RunningProxy {
            addr,
            admin,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin endpoint (`/metrics`, `/health`), if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The proxy's shared state (configuration, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
