//! The session's deadlines: `statement_timeout` (enforced by the proxy,
//! so a client gets its answer at the deadline even when the cancel and
//! the server's reply must cross a slow tunnel), the bounded wait for the
//! outcome of a write that may have committed, `idle_in_transaction_timeout`
//! and `server_idle_timeout` / `server_lifetime` for backend connections.
//!
//! Nothing here costs anything unless the timeout is configured: the
//! deadlines are plain `Option<Instant>`s checked when the session waits.

use std::time::Instant;

use pgsplit_router::Target;
use tracing::{debug, warn};

use super::statements::idx;
use super::Session;
use crate::backend::send_cancel;
use crate::error::Error;

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    Statement(Target),
    IdleInTransaction,
    ServerIdle(Target),
}

impl Session {
    /// Starts the front cycle's clock on `t` if it has none.
    pub(super) fn arm(&mut self, t: Target) {
        if let Some(b) = self.backends[idx(t)].as_mut() {
            if let Some(st) = b.timeouts.statement_timeout {
                if b.deadline.is_none() && !b.pending.is_empty() {
                    b.deadline = Some(Instant::now() + st);
                }
            }
        }
    }

    /// A cycle on `t` finished: the next one (if any) starts its clock.
    pub(super) fn rearm(&mut self, t: Target) {
        let idle_timers = self.idle_in_transaction.is_some();
        if let Some(b) = self.backends[idx(t)].as_mut() {
            b.resolving = false;
            b.deadline = match b.timeouts.statement_timeout {
                Some(st) if !b.pending.is_empty() => Some(Instant::now() + st),
                _ => None,
            };
            if b.timeouts.server_idle_timeout.is_some() {
                b.last_used = Instant::now();
            }
        }
        if idle_timers {
            self.idle_since = Instant::now();
        }
    }

    /// The earliest deadline, if any.
    pub(super) fn next_timer(&self) -> Option<(Instant, Timer)> {
        let mut next: Option<(Instant, Timer)> = None;
        let mut consider = |at: Instant, what: Timer| {
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, what));
            }
        };
        for t in [Target::Primary, Target::Replica] {
            let Some(b) = self.backends[idx(t)].as_ref() else {
                continue;
            };
            if let Some(d) = b.deadline {
                consider(d, Timer::Statement(t));
            }
            if let Some(idle) = b.timeouts.server_idle_timeout {
                if self.closable(t) {
                    consider(b.last_used + idle, Timer::ServerIdle(t));
                }
            }
        }
        if let Some(limit) = self.idle_in_transaction {
            let idle = !self.busy(Target::Primary)
                && !self.busy(Target::Replica)
                && self.copy_in.is_none();
            if (self.tx.open.is_some() || self.tx.failed) && idle {
                consider(self.idle_since + limit, Timer::IdleInTransaction);
            }
        }
        next
    }

    /// The heartbeat says the primary link went down (or came back): what
    /// is in flight on it will not be answered, so it is answered now.
    pub(super) fn on_link_change(&mut self) -> Result<(), Error> {
        self.link.borrow_and_update();
        if !self.shared.replication.primary_link_down() {
            return Ok(());
        }
        let Some(b) = self.backends[idx(Target::Primary)].as_ref() else {
            return Ok(());
        };
        if b.pending.is_empty() && self.bound != Some(Target::Primary) {
            return Ok(());
        }
        warn!("primary link down with statements in flight");
        let first = b
            .pending
            .iter()
            .find(|p| !p.own)
            .is_some_and(|p| p.writes)
            .then_some(Error::TransactionResolutionUnknown);
        self.backend_lost_with(Target::Primary, first)
    }

    /// Whether `t`'s connection can be closed now without the client
    /// noticing: idle, outside the client's block, holding no pinned state.
    pub(super) fn closable(&self, t: Target) -> bool {
        let Some(b) = self.backends[idx(t)].as_ref() else {
            return false;
        };
        b.pending.is_empty()
            && b.passthrough == 0
            && self.bound != Some(t)
            && self.tx.open != Some(t)
            && !(self.pin.held && t == Target::Primary)
            && self.copy_in.is_none_or(|c| c.target != t)
    }

    /// A deadline passed.
    pub(super) fn on_timer(&mut self, timer: Timer) -> Result<(), Error> {
        match timer {
            Timer::Statement(t) => self.on_statement_deadline(t),
            Timer::IdleInTransaction => Err(Error::IdleInTransactionTimeout),
            Timer::ServerIdle(t) => {
                if self.closable(t) {
                    debug!(target = ?t, "closing an idle backend connection");
                    self.close_backend(t);
                }
                Ok(())
            }
        }
    }

    /// Closes `t`'s idle connection politely; the next statement that
    /// needs it opens a new one.
    pub(super) fn close_backend(&mut self, t: Target) {
        if let Some(b) = self.backends[idx(t)].take() {
            self.stmts.forget_backend(t);
            tokio::spawn(b.conn.terminate());
        }
    }

    /// The front cycle on `t` ran past `statement_timeout` (or past the
    /// bound for learning its outcome).
    fn on_statement_deadline(&mut self, t: Target) -> Result<(), Error> {
        let Some(b) = self.backends[idx(t)].as_mut() else {
            return Ok(());
        };
        let running = b.running();
        // The first cycle the client waits for (the proxy's own WAL-position
        // query may be ahead of it).
        let front_writes = b.pending.iter().find(|p| !p.own).is_some_and(|p| p.writes);
        if !b.resolving {
            // Ask the server to stop; the answer no longer matters for a
            // read or a statement of a block, and for a write it decides the
            // outcome. The cancel crosses the tunnel in the background.
            let bound = b.timeouts.connect_timeout;
            tokio::spawn(async move {
                if let Err(e) =
                    send_cancel(&running.endpoint, running.pid, running.secret, bound).await
                {
                    warn!(cause = %e, "cancel after statement_timeout failed");
                }
            });
        }
        if front_writes && !b.resolving {
            // An autocommit write or a COMMIT may commit even now: the
            // client waits (bounded) for the truth rather than a guess.
            b.resolving = true;
            b.deadline = Some(Instant::now() + self.cfg.timeouts.commit_resolution_timeout);
            return Ok(());
        }
        let cause = if b.resolving {
            Error::TransactionResolutionUnknown
        } else {
            Error::StatementTimeout
        };
        // The connection is given up: a block on it can never commit (the
        // server rolls back when the connection closes), and nothing late
        // from it can be mistaken for a later answer. The pool's idle
        // connections to that server may sit behind the same dead link: a
        // lease must not find one and wait out another deadline.
        for idle in self.shared.pools.get(t).take_all_idle() {
            drop(idle);
        }
        self.backend_lost_with(t, Some(cause))
    }
}
