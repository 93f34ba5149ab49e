//! A fault-injecting TCP relay standing in for the SSH tunnel between pgsplit and the primary.
//!
//! Faults are modes every relayed connection watches: [`Tunnel::cut`] resets all connections
//! (a dead tunnel), [`Tunnel::blackhole`] stops forwarding but keeps sockets open (a stalled
//! tunnel whose local end still accepts and acknowledges, which TCP keepalive cannot detect),
//! [`Tunnel::delay`] adds latency. The tunnel runs its own single-threaded tokio runtime on a
//! dedicated thread, so it is driven the same way from sync code and from any test runtime,
//! and a test runtime that is blocked cannot stall it.

mod relay;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::ports;

/// How long [`Tunnel::cut`] waits for the connections it resets to be gone.
const CUT_SETTLE: Duration = Duration::from_secs(2);

/// What the tunnel currently does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelMode {
    /// Forward everything as it arrives.
    Pass,
    /// Forward everything, each chunk held back this long in each direction.
    Delay(Duration),
    /// Forward nothing, but keep every socket open and accept new connections.
    Blackhole,
    /// Forward client → server as usual, but discard everything the server
    /// sends: a request arrives and runs, its answer is lost.
    DropReplies,
    /// Forward at most this many bytes per second in each direction.
    Throttle(u64),
    /// Connections were reset; new ones are accepted and reset at once.
    Cut,
}

/// Mode plus a count of cuts, so a connection notices a cut even if the mode was restored
/// before it looked.
#[derive(Clone, Copy, Debug)]
struct State {
    mode: TunnelMode,
    cuts: u64,
}

/// What the tunnel thread and its handle share.
struct Shared {
    state: watch::Sender<State>,
    /// Relayed connections currently open.
    open: AtomicUsize,
    /// Tells the accept loop to end; the runtime then drops every connection.
    stop: Notify,
}

/// A TCP relay from a loopback port to `upstream`, with switchable faults.
///
/// Dropping it stops the relay thread and closes every connection.
pub struct Tunnel {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Tunnel {
    /// Relays a fresh `127.0.0.1` port to `upstream`.
    ///
    /// # Errors
    ///
    /// Binding the listener or starting the relay thread failed.
    pub fn start(upstream: SocketAddr) -> io::Result<Tunnel> {
        Tunnel::start_on(ports::loopback(0), upstream)
    }

    /// Relays `listen` to `upstream`.
    ///
    /// # Errors
    ///
    /// Binding the listener or starting the relay thread failed.
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Tunnel> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared {
            state: watch::Sender::new(State {
                mode: TunnelMode::Pass,
                cuts: 0,
            }),
            open: AtomicUsize::new(0),
            stop: Notify::new(),
        });
        let relay_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("pgsplit-tunnel-{}", addr.port()))
            .spawn(move || {
                // The runtime is created, used and dropped on this thread only, so dropping a
                // tunnel inside an async test never drops a runtime within a runtime.
                runtime.block_on(relay::accept_loop(listener, upstream, relay_shared));
            })?;
        tracing::debug!(%addr, %upstream, "tunnel started");
        Ok(Tunnel {
            addr,
            upstream,
            shared,
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where traffic goes.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Resets every open connection (RST to both sides) and resets new ones as soon as they
    /// are accepted, until [`Tunnel::restore`]. Returns once the reset connections are closed
    /// (bounded by a couple of seconds).
    pub fn cut(&self) {
        self.shared.state.send_modify(|state| {
            state.mode = TunnelMode::Cut;
            state.cuts += 1;
        });
        let deadline = Instant::now() + CUT_SETTLE;
        while self.connections() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops forwarding in both directions while keeping every socket open; new connections
    /// are accepted and go nowhere. Nothing is lost: held data flows on [`Tunnel::restore`].
    pub fn blackhole(&self) {
        self.set_mode(TunnelMode::Blackhole);
    }

    /// Holds every chunk back for `latency` in each direction, preserving order. Chunks are
    /// queued with their due time, so throughput is not limited by the delay.
    pub fn delay(&self, latency: Duration) {
        self.set_mode(TunnelMode::Delay(latency));
    }

    /// Lets requests through and discards every answer (until the next mode
    /// change): what a client sees when a tunnel dies after its request
    /// arrived and before the reply came back.
    pub fn drop_replies(&self) {
        self.set_mode(TunnelMode::DropReplies);
    }

    /// Limits each direction of every connection to `bytes_per_second`.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.set_mode(TunnelMode::Throttle(bytes_per_second.max(1)));
    }

    /// Back to plain forwarding, for connections that survived and for new ones.
    pub fn restore(&self) {
        self.set_mode(TunnelMode::Pass);
    }

    pub fn mode(&self) -> TunnelMode {
        self.shared.state.borrow().mode
    }

    /// Relayed connections currently open (including ones held by a black hole).
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: TunnelMode) {
        self.shared.state.send_modify(|state| state.mode = mode);
        tracing::debug!(addr = %self.addr, ?mode, "tunnel mode");
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // notify_one keeps a permit if the loop is not waiting yet, so the stop is never lost.
        self.shared.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &self.mode())
            .field("connections", &self.connections())
            .finish()
    }
}

#[cfg(test)]
mod tests;
