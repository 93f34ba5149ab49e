//! A backend socket: TCP, or a unix-domain socket for a server on the same
//! machine (the local replica), which skips the TCP stack on every message.
//! A host that starts with `/` is a socket directory, as in libpq. TCP may
//! carry TLS (`sslmode`, see `backend_tls`): its `try_*` calls poll the TLS
//! stream once with a no-op waker, so the session's readiness loop drives
//! it like a socket; TLS records left unwritten are pushed by
//! [`Stream::try_flush`].

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::unix::UnixConn;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    /// The socket file `<dir>/.s.PGSQL.<port>`.
    Unix(Arc<Path>),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => a.fmt(f),
            Endpoint::Unix(p) => p.display().fmt(f),
        }
    }
}

impl Endpoint {
    /// Resolves `host:port`; a host starting with `/` is a socket directory.
    ///
    /// # Errors
    /// `NotFound` when the name does not resolve.
    pub async fn resolve(host: &str, port: u16) -> io::Result<Endpoint> {
        if host.starts_with('/') {
            let path = Path::new(host).join(format!(".s.PGSQL.{port}"));
            return Ok(Endpoint::Unix(path.into()));
        }
        tokio::net::lookup_host((host, port))
            .await?
            .next()
            .map(Endpoint::Tcp)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {host}"))
            })
    }

    /// Opens a connection.
    ///
    /// # Errors
    /// The connect error.
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                set_keepalive(&s)?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(p) => Ok(Stream::Unix(UnixConn::connect(p).await?)),
        }
    }
}

/// A dead peer or path is noticed by TCP itself: keepalive probes after
/// 10 s of silence, and unacknowledged data gives up after 20 s. (Behind a
/// local SSH tunnel the peer is the tunnel, which stays alive: that case is
/// the monitor's heartbeat.)
fn set_keepalive(s: &TcpStream) -> io::Result<()> {
    let sock = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(5))
        .with_retries(2);
    sock.set_tcp_keepalive(&ka)?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(std::time::Duration::from_secs(20)))?;
    Ok(())
}

/// An open backend socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    /// Watched for reads only (see `unix`).
    Unix(UnixConn),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Polls once without waiting: `Pending` is `WouldBlock`. The socket's
/// readiness is cleared by the attempt, so the session's `writable()` /
/// `readable()` waits for the next change, as after a `try_write`.
fn now<T>(f: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>) -> io::Result<T> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match f(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Stream {
    /// Waits until the socket can take more bytes.
    ///
    /// # Errors
    /// As the socket's `writable`.
    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.writable().await,
            Stream::Unix(s) => s.writable().await,
            Stream::Tls(s) => s.get_ref().0.writable().await,
        }
    }

    /// Waits until the socket has bytes (or EOF) to read.
    ///
    /// # Errors
    /// As the socket's `readable`.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Unix(s) => s.readable().await,
            // Plaintext already decrypted and not yet read: ready now.
            Stream::Tls(s) if !s.get_ref().1.wants_read() => Ok(()),
            Stream::Tls(s) => s.get_ref().0.readable().await,
        }
    }

    /// Writes what the socket takes now (`WouldBlock` if nothing).
    ///
    /// # Errors
    /// As `try_write_vectored` of the socket.
    pub fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // One slice is a plain `send`, cheaper in the kernel than `writev`.
        match (self, bufs) {
            (Stream::Tcp(s), [one]) => s.try_write(one),
            (Stream::Tcp(s), _) => s.try_write_vectored(bufs),
            (Stream::Unix(s), _) => s.try_write_vectored(bufs),
            (Stream::Tls(s), _) => now(|cx| Pin::new(&mut **s).poll_write_vectored(cx, bufs)),
        }
    }

    /// Pushes TLS records written but not yet sent (`WouldBlock` while
    /// some remain); nothing to do for a plain socket.
    ///
    /// # Errors
    /// As the socket's write.
    pub fn try_flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => now(|cx| Pin::new(&mut **s).poll_flush(cx)),
            _ => Ok(()),
        }
    }

    /// Reads what is available without waiting (`WouldBlock` if nothing).
    ///
    /// # Errors
    /// As `try_read_buf` of the socket.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read_buf(buf),
            Stream::Unix(s) => s.try_read_buf(buf),
            Stream::Tls(s) => {
                let mut chunk = [0u8; 16 * 1024];
                let mut rb = ReadBuf::new(&mut chunk);
                now(|cx| Pin::new(&mut **s).poll_read(cx, &mut rb))?;
                buf.extend_from_slice(rb.filled());
                Ok(rb.filled().len())
            }
        }
    }

    /// Asks the kernel, not the runtime's cached readiness, whether the
    /// peer closed or reset this TCP connection. A pooled connection may
    /// be registered with another worker's runtime, which has not
    /// necessarily seen the reset yet.
    pub fn peer_gone(&self) -> bool {
        let s = match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
            Stream::Unix(_) => return false,
        };
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(s).peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
