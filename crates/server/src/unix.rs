//! A unix-socket connection to a server, watched for reads only.
//!
//! A unix socket reports "writable" to its event queue every time its peer
//! reads from it. Registered for both directions, as tokio's `UnixStream`
//! is, the proxy would be woken once per statement for nothing, the moment
//! the server takes the query: a context switch and a turn of the event
//! loop per statement, on the path a node-local deployment uses most (the
//! replica's socket). So this connection is registered for reads only.
//! Writes are simply tried; one that would block registers a duplicate of
//! the descriptor for writes, waits for room, and drops it again.
//!
//! Reads go into the caller's spare buffer space as tokio's do: the bytes
//! the kernel wrote are the only ones marked as filled.

use std::io::{self, IoSlice, Write as _};
use std::net::Shutdown;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf, Ready};

/// Spare room a read asks for when the buffer has none (as tokio's
/// `read_buf` does).
const MIN_READ: usize = 64;

#[derive(Debug)]
pub struct UnixConn {
    fd: AsyncFd<StdUnixStream>,
    /// A duplicate registered for writes while a write waits for room.
    room: Option<AsyncFd<StdUnixStream>>,
}

/// Registers an owned socket with the runtime for `interest`.
#[allow(unsafe_code)]
fn register(s: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: `s` owns an open socket and the `AsyncFd` takes it over: the
    // descriptor stays open and is not replaced until the registration is
    // dropped.
    unsafe { AsyncFd::register_with_interest(s, interest) }.map_err(|e| e.into_parts().1)
}

impl UnixConn {
    pub async fn connect(path: &Path) -> io::Result<UnixConn> {
        // Connected by tokio (a non-blocking connect), then registered anew.
        let s = tokio::net::UnixStream::connect(path).await?.into_std()?;
        Ok(UnixConn {
            fd: register(s, Interest::READABLE)?,
            room: None,
        })
    }

    /// A duplicate of the socket, registered for writes: watched only while
    /// a write waits for room.
    fn watch_room(&self) -> io::Result<AsyncFd<StdUnixStream>> {
        register(self.fd.get_ref().try_clone()?, Interest::WRITABLE)
    }

    /// Waits until the socket has room for a write.
    pub async fn writable(&self) -> io::Result<()> {
        let _ready = self.watch_room()?.writable().await?;
        Ok(())
    }

    /// Waits until the socket may have something to read.
    pub async fn readable(&self) -> io::Result<()> {
        let _ready = self.fd.readable().await?;
        Ok(())
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut s = self.fd.get_ref();
        match bufs {
            [one] => s.write(one),
            _ => s.write_vectored(bufs),
        }
    }

    /// Reads what is there into `buf`'s spare room, without waiting.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        self.fd
            .try_io(Interest::READABLE, |s| recv_into_bytes(s, buf))
    }

    /// A write, or a wait for room to write.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl Fn(&StdUnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.fd.get_ref()) {
                Ok(n) => {
                    self.room = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.room.is_none() {
                self.room = Some(self.watch_room()?);
            }
            let room = self.room.as_ref().expect("registered above");
            let mut ready = ready!(room.poll_write_ready(cx))?;
            ready.clear_ready();
        }
    }
}

/// `recv` into the spare room of `buf`; the bytes received become part of
/// it.
#[allow(unsafe_code)]
fn recv_into_bytes(s: &StdUnixStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.len() == buf.capacity() {
        buf.reserve(MIN_READ);
    }
    let n = socket2::SockRef::from(s).recv(buf.spare_capacity_mut())?;
    // SAFETY: `recv` initialised the first `n` bytes of the spare room.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

impl AsyncRead for UnixConn {
    #[allow(unsafe_code)]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.fd.poll_read_ready(cx))?;
            // SAFETY: only `recv` writes to it, and it de-initialises nothing.
            let unfilled = unsafe { buf.unfilled_mut() };
            let wanted = unfilled.len();
            match ready.try_io(|fd| socket2::SockRef::from(fd.get_ref()).recv(unfilled)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < wanted {
                        // Less than asked for: the socket is drained, and
                        // the next read waits without a system call.
                        ready.clear_ready_matching(Ready::READABLE);
                    }
                    // SAFETY: `recv` initialised the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut s| s.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.fd.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server end and a connected `UnixConn`.
    async fn pair() -> (tokio::net::UnixStream, UnixConn, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (conn, accepted) = tokio::join!(UnixConn::connect(&path), listener.accept());
        (accepted.unwrap().0, conn.unwrap(), dir)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "pgsplit-unix-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn reads_and_writes_both_ways() {
        let (mut server, mut conn, _dir) = pair().await;
        conn.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.unwrap();
        let mut buf = BytesMut::new();
        while buf.len() < 4 {
            conn.read_buf(&mut buf).await.unwrap();
        }
        assert_eq!(&buf[..], b"pong");
        // Nothing more: a try reads nothing and says so.
        let e = conn.try_read_buf(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        server.write_all(b"!").await.unwrap();
        conn.readable().await.unwrap();
        assert_eq!(conn.try_read_buf(&mut buf).unwrap(), 1);
        // End of stream.
        drop(server);
        assert_eq!(conn.read_buf(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_write_that_would_block_waits_for_room() {
        let (mut server, mut conn, _dir) = pair().await;
        // Fill the socket until it takes no more.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        loop {
            match conn.try_write_vectored(&[IoSlice::new(&chunk)]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(sent > 0);
        // A blocked write completes once the reader drains the socket.
        let expected = sent + chunk.len();
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while total < expected {
                total += server.read(&mut buf).await.unwrap();
            }
            total
        });
        let waited = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            conn.writable().await.unwrap();
            conn.write_all(&chunk).await.unwrap();
        })
        .await;
        assert!(waited.is_ok(), "the write waited for room and went out");
        assert_eq!(reader.await.unwrap(), expected);
    }
}
