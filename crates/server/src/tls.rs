//! TLS for clients: `[tls] cert` and `key` (PEM) turn an SSLRequest's `N`
//! into `S` and a rustls handshake; `[tls] mode = "require"` refuses a
//! client that logs in without it (`FATAL 28000`), as a `hostssl`-only
//! server does. GSSENCRequest is still answered `N`.
//!
//! A client connection is a [`ClientStream`]: plain TCP, or TLS over it.
//! The plain case is what the relay path polls, with a match per call and
//! nothing more; `try_write` (the relay's one-syscall fast path) exists
//! only for it, and TLS takes the ordinary write path.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, TlsMode};

/// The client side's TLS, when configured.
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: TlsAcceptor,
    pub mode: TlsMode,
}

/// Loads `[tls] cert` and `key`; `None` when TLS is off.
///
/// # Errors
/// A file that cannot be read or holds no certificate or key, or a key
/// that does not match the certificate: one line naming the file.
pub fn client_tls(cfg: &Config) -> Result<Option<ClientTls>, String> {
    let mode = cfg.tls.effective_mode();
    if mode == TlsMode::Disable {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&cfg.tls.cert, &cfg.tls.key) else {
        return Err("[tls] cert and key are both needed".into());
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect)
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {}: no certificate in it", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    // ring builds with a C compiler alone (aws-lc-rs needs more of the
    // build machine); it offers no post-quantum key exchange, which is
    // why rustls marks it deprecated.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert and tls.key: {e}"))?;
    Ok(Some(ClientTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        mode,
    }))
}

/// A client connection.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the handshake takes the TCP stream over (and after a
    /// failed one): every call fails.
    Closed,
}

impl ClientStream {
    /// Whether TLS protects it.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Writes what the socket takes now without waiting (plain TCP);
    /// `WouldBlock` for TLS, which takes the ordinary path.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.try_write(buf),
            _ => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Answers an SSLRequest with `S` and runs the handshake.
    ///
    /// # Errors
    /// The handshake failed (the connection is then unusable).
    pub async fn upgrade(&mut self, tls: &ClientTls) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let ClientStream::Plain(mut tcp) = std::mem::replace(self, ClientStream::Closed) else {
            return Err(io::Error::other("TLS requested twice"));
        };
        tcp.write_all(b"S").await?;
        let s = tls.acceptor.accept(tcp).await?;
        *self = ClientStream::Tls(Box::new(s));
        Ok(())
    }
}

fn closed() -> io::Error {
    io::ErrorKind::NotConnected.into()
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
            ClientStream::Closed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }
}
