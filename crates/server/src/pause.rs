//! `PAUSE` and `RESUME` from the console, for maintenance (a restart of
//! the primary, a switchover by hand).
//!
//! `PAUSE` lets transactions in flight finish and holds every session at
//! its next transaction boundary: a session that is idle, or whose
//! transaction ends, parks without reading its client, so a statement
//! sent meanwhile waits in the socket and runs after `RESUME`. When every
//! session is parked, idle pooled server connections are closed and
//! `PAUSE` answers. As in PgBouncer, clients may still connect; their
//! first statement waits. A session pinned to its connection (LISTEN,
//! temporary tables, session pool mode) parks too, keeping its
//! connection open.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use tokio::sync::watch;

/// The pause switch and how many sessions it holds.
pub struct Pause {
    paused: AtomicBool,
    tx: watch::Sender<bool>,
    parked: AtomicUsize,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            paused: AtomicBool::new(false),
            tx: watch::channel(false).0,
            parked: AtomicUsize::new(0),
        }
    }
}

/// Counts a session as parked while it lives.
pub struct Parked<'a>(&'a Pause);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Relaxed);
    }
}

impl Pause {
    /// One atomic load: the sessions' check between transactions.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Relaxed)
    }

    /// Wakes idle sessions when the switch moves.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Sets the switch; false when it already was set.
    pub fn pause(&self) -> bool {
        let was = self.paused.swap(true, Relaxed);
        self.tx.send_replace(true);
        !was
    }

    /// Releases parked sessions; false when nothing was paused.
    pub fn resume(&self) -> bool {
        let was = self.paused.swap(false, Relaxed);
        self.tx.send_replace(false);
        was
    }

    pub fn parked(&self) -> usize {
        self.parked.load(Relaxed)
    }

    pub fn park(&self) -> Parked<'_> {
        self.parked.fetch_add(1, Relaxed);
        Parked(self)
    }
}
