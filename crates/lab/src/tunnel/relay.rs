//! The tunnel's inside: the accept loop and, per connection, two pumps (one per direction)
//! that forward chunks under the tunnel's current [`TunnelMode`].
//!
//! Each pump is a reader and a writer joined by a bounded queue of timestamped chunks. A delay
//! stamps each chunk with its due time on arrival, and the writer waits for it, so latency is
//! added without serialising throughput behind sleeps and order is kept. A black hole parks
//! both the reader (before its next read) and the writer (before its next write), so data
//! stays in socket buffers or the queue and flows again on restore.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Shared, State, TunnelMode};

/// Bytes read per chunk.
const CHUNK_BYTES: usize = 16 * 1024;

/// Chunks queued per direction before the reader waits for the writer.
const QUEUE_CHUNKS: usize = 64;

/// Pause after a failed accept (e.g. out of descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Accepts until the tunnel is dropped, one task per connection.
pub(super) async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = shared.stop.notified() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    tracing::trace!(%peer, "tunnel accepted");
                    tokio::spawn(serve(client, upstream, Arc::clone(&shared)));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "tunnel accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard<'a>(&'a AtomicUsize);

impl<'a> OpenGuard<'a> {
    fn new(open: &'a AtomicUsize) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Relays one accepted connection until either side closes, an error, or a cut.
async fn serve(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let _open = OpenGuard::new(&shared.open);
    let mut state = shared.state.subscribe();
    let cuts = state.borrow().cuts;
    let _ = client.set_nodelay(true);

    // A stalled tunnel accepts but reaches nothing: go upstream only once traffic flows.
    let Ok(now) = state
        .wait_for(|s| s.cuts != cuts || s.mode != TunnelMode::Blackhole)
        .await
        .map(|s| *s)
    else {
        return;
    };
    if now.cuts != cuts || now.mode == TunnelMode::Cut {
        reset(&client);
        return;
    }

    let connected = tokio::select! {
        connected = TcpStream::connect(upstream) => connected,
        () = cut_after(state.clone(), cuts) => {
            reset(&client);
            return;
        }
    };
    let mut upstream_stream = match connected {
        Ok(stream) => stream,
        Err(err) => {
            // Like `ssh -L` when the far end refuses: the client's connection just closes.
            tracing::debug!(%upstream, error = %err, "tunnel upstream unreachable");
            return;
        }
    };
    let _ = upstream_stream.set_nodelay(true);
    let mut client = client;

    let outcome = tokio::select! {
        outcome = relay(&mut client, &mut upstream_stream, &shared.state) => outcome,
        () = cut_after(state, cuts) => Err(io::ErrorKind::ConnectionAborted.into()),
    };
    if let Err(err) = outcome {
        tracing::trace!(error = %err, "tunnel connection broken, resetting both sides");
        reset(&client);
        reset(&upstream_stream);
    }
}

/// Forwards both directions; ends when both have reached EOF, or at the first error.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    state: &watch::Sender<State>,
) -> io::Result<()> {
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    tokio::try_join!(
        pump(client_read, upstream_write, state, false),
        pump(upstream_read, client_write, state, true),
    )
    .map(drop)
}

/// A chunk read from one side, to be written to the other no earlier than `due`.
struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
}

/// One direction: reads `from`, writes `to`, and half-closes `to` after `from`'s EOF.
/// `replies` is the server → client direction.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    state: &watch::Sender<State>,
    replies: bool,
) -> io::Result<()> {
    let (queue, mut queued) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let mut read_state = state.subscribe();
    let mut write_state = state.subscribe();

    let reading = async move {
        loop {
            flowing(&mut read_state).await?;
            let mut bytes = vec![0; CHUNK_BYTES];
            let n = from.read(&mut bytes).await?;
            if n == 0 {
                // Dropping `queue` lets the writer drain what is left, then half-close.
                return Ok(());
            }
            bytes.truncate(n);
            let latency = match read_state.borrow().mode {
                TunnelMode::Delay(latency) => latency,
                _ => Duration::ZERO,
            };
            let chunk = Chunk {
                due: Instant::now() + latency,
                bytes,
            };
            if queue.send(chunk).await.is_err() {
                // The writer stopped on an error, which it reports.
                return Ok(());
            }
        }
    };
    let writing = async move {
        while let Some(chunk) = queued.recv().await {
            if chunk.due > Instant::now() {
                tokio::time::sleep_until(chunk.due).await;
            }
            flowing(&mut write_state).await?;
            let mode = write_state.borrow().mode;
            match mode {
                TunnelMode::DropReplies if replies => continue,
                TunnelMode::Throttle(rate) => {
                    // Each chunk waits its share of a second: at most
                    // `rate` bytes a second get through.
                    let secs = chunk.bytes.len() as f64 / rate as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
                _ => {}
            }
            to.write_all(&chunk.bytes).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reading, writing).map(drop)
}

/// Waits while the tunnel is a black hole. A cut fails the pump instead:
/// what a black hole held must never slip through as it is cut.
async fn flowing(state: &mut watch::Receiver<State>) -> io::Result<()> {
    // An error means the tunnel is being dropped, which drops this task too.
    let mode = state
        .wait_for(|s| s.mode != TunnelMode::Blackhole)
        .await
        .map(|s| s.mode);
    if mode.is_ok_and(|m| m == TunnelMode::Cut) {
        return Err(io::ErrorKind::ConnectionAborted.into());
    }
    Ok(())
}

/// Completes once the tunnel has been cut after `cuts` cuts; never if the tunnel goes away.
async fn cut_after(mut state: watch::Receiver<State>, cuts: u64) {
    if state.wait_for(|s| s.cuts != cuts).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Makes closing `stream` send RST instead of FIN (SO_LINGER with a zero timeout).
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
