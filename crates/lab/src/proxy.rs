//! pgsplit itself, in-process, on its own runtime thread: tests and the lab
//! drive the same `serve` as production, on a port picked at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use pgsplit_server::{Config, Shared};
use tokio::sync::oneshot;

/// A running proxy; dropping it shuts it down and waits for it.
pub struct RunningProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningProxy {
    /// Binds `config.listen` (port 0 picks one) and serves on a new thread.
    ///
    /// # Errors
    /// The bind error.
    pub fn start(config: Config) -> std::io::Result<RunningProxy> {
        let config = Arc::new(config);
        let shared = Arc::new(Shared::new(config.clone()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgsplit-proxy")
            .enable_all()
            .build()?;
        let listener = rt.block_on(pgsplit_server::bind(&config))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pgsplit-proxy-main".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _ = pgsplit_server::serve_shared(listener, s, async move {
                        let _ = stopped.await;
                    })
                    .await;
                });
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
            })?;
        Ok(RunningProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's shared state (configuration, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
