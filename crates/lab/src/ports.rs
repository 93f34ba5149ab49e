//! Free loopback ports for lab servers and tunnels.
//!
//! A port is found by binding `127.0.0.1:0` and releasing it, so another process can still grab
//! it before our server binds: callers retry with a fresh port when a server fails to bind.
//! Within this process a port is never handed out twice, so a stopped server's port stays its
//! own for a restart even while other labs start.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

/// Attempts before giving up; each one only fails if the kernel hands back a port we already gave out.
const ATTEMPTS: usize = 64;

/// Ports already handed out by this process.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback port that is free right now and was not returned before by this process.
///
/// # Errors
///
/// Binding `127.0.0.1:0` failed, or the kernel kept returning ports already handed out.
pub fn free_port() -> io::Result<u16> {
    for _ in 0..ATTEMPTS {
        let port = TcpListener::bind(loopback(0))?.local_addr()?.port();
        let mut seen = handed_out()
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if seen.insert(port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no fresh loopback port after repeated attempts",
    ))
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|&p| p != 0));
    }
}
