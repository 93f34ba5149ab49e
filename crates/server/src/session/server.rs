//! A server connection as this session uses it (`Backend`: the leased
//! connection, the cycles pending on it, the statements prepared on it,
//! the settings applied to it) and the session's work with it: making sure
//! one is there, bringing the client's settings to it, sending and
//! draining.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use pgsplit_protocol::backend::TxStatus;
use pgsplit_router::Target;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use super::effects::Reset;
use super::statements::idx;
use super::vectored::Chunks;
use super::*;
use crate::backend::{BackendConn, BackendError, Login};
use crate::cancel::Running;
use crate::config::ReadYourWrites;
use crate::error::Error;

/// One backend connection plus the session's bookkeeping for it.
pub(crate) struct Backend {
    pub(super) conn: BackendConn,
    pub(super) pending: VecDeque<Pending>,
    pub(super) expect: VecDeque<(u64, Expect)>,
    /// Bytes of a frame being streamed to the client that are still to come.
    pub(super) passthrough: usize,
    pub(super) status: TxStatus,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    pub(super) errored: bool,
    /// The server sent FATAL (already reported to the client as ERROR).
    pub(super) dead: bool,
    /// SET statements of the cycle in flight, logged once it succeeds.
    pub(super) sets_in_flight: Vec<String>,
    /// Removals (DEALLOCATE, DISCARD ALL) of the cycle in flight, applied
    /// to the session's view once it succeeds.
    pub(super) resets_in_flight: Vec<Reset>,
    /// Entries of the session's settings log applied on this connection.
    pub(super) applied_sets: usize,
    /// The front cycle is retryable and nothing of its answer that
    /// commits to a result has arrived: its first bytes are held back.
    pub(super) hold: bool,
    /// Bytes at the start of the read buffer held back (already scanned).
    pub(super) held: usize,
    /// The replica refused the front cycle with 25006: its answer is
    /// dropped up to its ReadyForQuery, then it runs on the primary.
    pub(super) retrying: bool,
    /// When the front cycle times out (`statement_timeout`), or, once
    /// `resolving`, when the proxy stops waiting for its outcome.
    pub(super) deadline: Option<Instant>,
    /// The front cycle may have committed and passed its deadline: the
    /// proxy waits (bounded) for its true outcome.
    pub(super) resolving: bool,
    /// The timeouts that apply to this connection's target.
    pub(super) timeouts: crate::config::Effective,
    /// The id of the transaction open on this connection, once known
    /// (asked for behind its first write): what a lost COMMIT is
    /// resolved by.
    pub(super) xid: Option<u64>,
    /// What the client gets if the extended-protocol COMMIT batch in flight
    /// (by its cycle number) commits: answered by the proxy when the answer
    /// itself is lost and the commit is resolved.
    pub(super) commit_answer: Option<(u64, Bytes)>,
    pub(super) opened: Instant,
    pub(super) last_used: Instant,
    /// The room this connection takes in its pool; freed when it closes.
    pub(super) lease: Option<crate::pool::Lease>,
    /// Fingerprint of the session settings applied on the connection when
    /// it was last returned (0: none), and whether they must be reset
    /// before the session that leased it now runs anything.
    pub(super) carried: u64,
    pub(super) reset_due: bool,
    /// Content ids of the named statements prepared on this connection
    /// (under `statements::server_name`), whoever prepared them: a cache
    /// shared by every session that leases it, emptied past
    /// [`PREPARED_CACHE`] entries.
    pub(super) prepared: std::collections::HashSet<u64>,
    /// The failover generation of the primary this connection is to (see
    /// [`failover`](crate::failover)); 0 for the replica.
    pub(crate) generation: u64,
}

/// Past this many statements prepared on one server connection, the next
/// session to use it deallocates them all first.
pub(super) const PREPARED_CACHE: usize = 500;

impl Backend {
    pub(crate) fn new(conn: BackendConn, timeouts: crate::config::Effective) -> Backend {
        let now = Instant::now();
        Backend {
            lease: None,
            generation: 0,
            carried: 0,
            reset_due: false,
            prepared: std::collections::HashSet::new(),
            deadline: None,
            resolving: false,
            xid: None,
            commit_answer: None,
            timeouts,
            opened: now,
            last_used: now,
            conn,
            pending: VecDeque::new(),
            expect: VecDeque::new(),
            passthrough: 0,
            status: TxStatus::Idle,
            errored: false,
            dead: false,
            sets_in_flight: Vec::new(),
            resets_in_flight: Vec::new(),
            applied_sets: 0,
            hold: false,
            held: 0,
            retrying: false,
        }
    }

    /// The ParameterStatus values the server reported at login.
    pub(crate) fn server_params(&self) -> &[(String, String)] {
        &self.conn.params
    }

    pub(crate) fn running(&self) -> Running {
        Running {
            endpoint: self.conn.endpoint.clone(),
            pid: self.conn.pid,
            secret: self.conn.secret,
        }
    }
}

impl Session {
    /// A lone Flush: to the backend still answering, if any.
    pub(super) async fn forward_flush(&mut self) -> Result<(), Error> {
        let frames = std::mem::take(&mut self.batch.frames);
        self.batch.clear();
        let to = self.bound.or_else(|| {
            [Target::Primary, Target::Replica]
                .into_iter()
                .find(|t| self.busy(*t))
        });
        let res = match to {
            Some(t) => {
                let out: Vec<Bytes> = frames.iter().map(|f| f.raw().clone()).collect();
                self.send_raw(t, &out).await
            }
            None => Ok(()),
        };
        self.batch.frames = frames;
        self.batch.clear();
        res
    }

    /// Sends the WAL-position query a finished COPY left due.
    pub(super) async fn send_due_lsn_query(&mut self) -> Result<(), Error> {
        let Some(t) = self.lsn_due.take() else {
            return Ok(());
        };
        if self.backends[idx(t)].is_none() {
            return Ok(());
        }
        let seq = self.seq;
        let mut out = Vec::new();
        self.push_own_query(t, seq, &mut out, true, false);
        self.send_raw(t, &out).await
    }

    /// Records a client cycle sent to `t` (a retryable one holds its first
    /// replies back); returns the backend.
    pub(super) fn client_cycle(&mut self, t: Target, mut p: Pending) -> &mut Backend {
        p.timed = Some((
            std::time::Instant::now(),
            crate::stats::reason_index(self.last_route.1),
        ));
        if p.retryable {
            let rep = &self.shared.replication;
            self.retry.sent = (rep.polls_started(), rep.replay_lsn().unwrap_or(0));
        }
        let b = self.backends[idx(t)].as_mut().expect("ensured");
        b.hold = p.retryable;
        b.held = 0;
        b.pending.push_back(p);
        b
    }

    /// Behind a cycle sent to `t`, when its answer is needed: the proxy's
    /// own query, pipelined on the same connection (no extra round trip;
    /// its replies are consumed). It asks for the WAL insert position
    /// after a write that may have committed (`lsn`, used in `lsn` mode;
    /// `pg_current_wal_insert_lsn()` is at or after the commit record even
    /// with `synchronous_commit = off`) and for the id of the transaction
    /// left open (`xid`), which resolves a COMMIT whose answer is lost.
    pub(super) fn push_own_query(
        &mut self,
        t: Target,
        seq: u64,
        out: &mut Vec<Bytes>,
        lsn: bool,
        xid: bool,
    ) {
        let lsn =
            lsn && (self.vars.read_your_writes == ReadYourWrites::Lsn || self.vars.min_lsn != 0);
        if !lsn && !xid {
            return;
        }
        let b = self.backends[idx(t)].as_mut().expect("ensured");
        b.pending.push_back(Pending::own(seq));
        out.push(Bytes::from_static(OWN_QUERY));
        // A simple query ends the unnamed statement on the server.
        self.stmts.mark_off("", t);
    }

    /// Makes sure a connection to `t` is open and alive. With `fallback`,
    /// reads whose replica is unreachable go to the primary.
    pub(super) async fn ensure(&mut self, t: Target, fallback: bool) -> Result<Target, Error> {
        let expired = self.backends[idx(t)].as_ref().is_some_and(|b| {
            b.timeouts
                .server_lifetime
                .is_some_and(|l| b.opened.elapsed() >= l)
        });
        if expired && self.closable(t) {
            debug!(target = ?t, "backend connection past server_lifetime; replacing it");
            self.close_backend(t);
        }
        let link_down = t == Target::Primary && self.shared.replication.primary_link_down();
        if let Some(b) = self.backends[idx(t)].as_mut() {
            let idle = b.pending.is_empty() && self.bound != Some(t) && self.copy_in.is_none();
            if !idle || !(link_down || b.conn.is_closed_while_idle()) {
                return Ok(t);
            }
            self.forget_closed(t);
            if self.pin.held && t == Target::Primary {
                // LISTENs, temporary tables, session locks died with it; a
                // server would have ended this session, so pgsplit does too.
                return Err(Error::PinnedStateLost);
            }
            if self.tx.open == Some(t) {
                self.tx.open = None;
                self.tx.failed = true;
                self.tx.commit_refused = Some(t);
                return Err(Error::BackendLostInBlock { target: t });
            }
        }
        if link_down {
            // Fail fast: a connect through a black-holed tunnel would only
            // wait out connect_timeout.
            let bound = self.cfg.monitor.heartbeat_timeout;
            warn!("primary link down (heartbeat); refusing primary work at once");
            return Err(Error::PrimaryUnreachable(BackendError::LinkDown(bound)));
        }
        if t == Target::Replica && fallback {
            if let Some(at) = self.replica_retry_at {
                if Instant::now() < at {
                    return self.ensure_primary_for_read().await;
                }
            }
        }
        // What the session holds but does not use goes back first: a
        // session never waits for one pool while holding an idle
        // connection of the other (two such sessions would wait for each
        // other).
        self.release_idle();
        let leased = match self.lease(t).await {
            Ok(b) => Ok(b),
            Err(lease::LeaseError::Full(f)) => return Err(lease::pool_full(t, &f)),
            Err(lease::LeaseError::Connect(e)) => Err(e),
        };
        match leased {
            Ok(b) => {
                if t == Target::Replica {
                    self.replica_retry_at = None;
                }
                self.install(t, b);
                Ok(t)
            }
            Err(BackendError::Refused { code, message, .. })
                if !(t == Target::Replica && fallback) =>
            {
                Err(Error::BackendRefused {
                    target: t,
                    code,
                    message,
                })
            }
            Err(e) if t == Target::Primary => {
                warn!(cause = %e, "primary unreachable");
                Err(Error::PrimaryUnreachable(e))
            }
            Err(e) => {
                warn!(cause = %e, "replica unreachable");
                if !fallback {
                    return Err(Error::BackendLost { target: t });
                }
                self.replica_retry_at = Some(Instant::now() + REPLICA_RETRY);
                self.ensure_primary_for_read().await
            }
        }
    }

    /// `t`'s connection was found closed while idle: forgotten, with the
    /// statements it held, so the next statement that needs it opens
    /// another.
    pub(super) fn forget_closed(&mut self, t: Target) {
        debug!(target = ?t, "backend closed while idle; replacing it");
        self.backends[idx(t)] = None;
        self.stmts.forget_backend(t);
    }

    /// A read whose replica is down goes to the primary if it is reachable.
    pub(super) async fn ensure_primary_for_read(&mut self) -> Result<Target, Error> {
        match Box::pin(self.ensure(Target::Primary, false)).await {
            Ok(t) => Ok(t),
            Err(Error::PrimaryUnreachable(e)) => Err(Error::NothingReachable(e)),
            Err(e) => Err(e),
        }
    }

    /// A connection of the proxy's own outside the pools (to resolve a lost
    /// commit), logged in as the session's user.
    ///
    /// For the primary, the one of failover generation `generation`: a lost
    /// commit is asked about where it was sent, and when that server is no
    /// longer known, the connection fails.
    pub(super) async fn connect(
        &self,
        t: Target,
        generation: u64,
    ) -> Result<BackendConn, BackendError> {
        let cfg = &self.cfg;
        let addr = match t {
            Target::Primary => self.shared.failover.addr_of(generation).ok_or_else(|| {
                BackendError::NoPrimary(
                    "the primary the commit was sent to is no longer known".into(),
                )
            })?,
            Target::Replica => self.shared.config().replica.clone(),
        };
        let login = Login {
            user: self.user.backend_user(),
            password: self.user.backend_password(),
            keys: self.user.keys.as_ref(),
            database: &self.database,
            params: &self.params,
        };
        BackendConn::connect(
            t,
            &addr,
            &login,
            cfg.timeouts
                .for_target(t == Target::Primary)
                .connect_timeout,
        )
        .await
    }

    /// Before a backend runs the client's next statement: apply session
    /// settings it has not seen and close statements the client closed
    /// elsewhere.
    pub(super) async fn prepare_backend(&mut self, t: Target) -> Result<(), Error> {
        let Some(b) = self.backends[idx(t)].as_mut() else {
            return Ok(());
        };
        let full = b.prepared.len() > PREPARED_CACHE && !(t == Target::Primary && self.pin.held);
        if b.applied_sets == self.settings_log.len()
            && !self.stmts.has_zombies(t)
            && !b.reset_due
            && !full
        {
            return Ok(());
        }
        let mut lost = false;
        if full {
            // The connection's statement cache is full: emptied (what this
            // session needs is prepared again as it is used).
            match b.conn.run_silent("DEALLOCATE ALL").await {
                Ok(None) => b.prepared.clear(),
                Ok(Some(_)) | Err(_) => lost = true,
            }
        }
        let mut refused = None;
        if !lost && std::mem::take(&mut b.reset_due) {
            // A pooled connection that carries another session's settings.
            match b.conn.run_silent(lease::RESET).await {
                Ok(None) => b.applied_sets = 0,
                Ok(Some(_)) | Err(_) => lost = true,
            }
        }
        let from = if lost { usize::MAX } else { b.applied_sets };
        for (i, sql) in self.settings_log.since(from).iter().enumerate() {
            match b.conn.run_silent(sql).await {
                Ok(None) => b.applied_sets = from + i + 1,
                Ok(Some((code, message))) => {
                    // Not skipped: the connection stays behind the log, so
                    // the next statement for it tries again (the server may
                    // have caught up with what the setting names).
                    refused = Some(Error::SettingNotApplied {
                        setting: sql.clone(),
                        target: t,
                        code,
                        message,
                    });
                    break;
                }
                Err(_) => {
                    lost = true;
                    break;
                }
            }
        }
        if !lost && refused.is_none() {
            for name in self.stmts.take_zombies(t) {
                let sql = format!("DEALLOCATE \"{}\"", name.replace('"', "\"\""));
                if b.conn.run_silent(&sql).await.is_err() {
                    lost = true;
                    break;
                }
            }
        }
        if lost {
            self.backends[idx(t)] = None;
            self.stmts.forget_backend(t);
            return Err(Error::BackendLost { target: t });
        }
        match refused {
            Some(e) => {
                debug!(target = ?t, cause = %e, "replaying a session setting failed");
                Err(e)
            }
            None => Ok(()),
        }
    }

    pub(super) fn busy(&self, t: Target) -> bool {
        self.backends[idx(t)]
            .as_ref()
            .is_some_and(|b| !b.pending.is_empty() || self.bound == Some(t) || b.passthrough > 0)
    }

    /// Relays everything `t` still owes the client.
    pub(super) async fn drain(&mut self, t: Target) -> Result<(), Error> {
        while self.busy(t) && self.bound != Some(t) {
            self.flush_client().await?;
            let b = self.backends[idx(t)].as_mut().expect("busy backend exists");
            let deadline = b.deadline.map(|d| (d, timers::Timer::Statement(t)));
            let link = &mut self.link;
            let res = tokio::select! {
                biased;
                r = b.conn.stream.read_buf(&mut b.conn.rbuf) => Ok(r),
                what = sleep_until(deadline), if deadline.is_some() => Err(Some(what)),
                _ = link.changed(), if t == Target::Primary => Err(None),
            };
            match res {
                Ok(Ok(n)) if n > 0 => self.on_backend_data(t)?,
                Ok(_) => self.backend_lost(t)?,
                Err(Some(what)) => self.on_timer(what)?,
                Err(None) => self.on_link_change()?,
            }
        }
        Ok(())
    }

    /// Writes frames to `t`. While the server does not take them, its
    /// output is read and relayed: a server blocked writing replies (a COPY
    /// raising a notice per row, a long pipeline) stops reading, and a proxy
    /// that only wrote would then wait for it forever.
    pub(super) async fn send_raw(&mut self, t: Target, frames: &[Bytes]) -> Result<(), Error> {
        self.arm(t);
        let mut todo = Chunks::new(frames);
        loop {
            let Some(b) = self.backends[idx(t)].as_mut() else {
                return Ok(()); // lost while relaying; already answered
            };
            let res = if todo.is_done() {
                // All taken; TLS may still hold records to send.
                match b.conn.stream.try_flush() {
                    Ok(()) => break,
                    Err(e) => Err(e),
                }
            } else {
                let mut slices = vectored::slice_array();
                let n = todo.slices(&mut slices);
                b.conn.stream.try_write_vectored(&slices[..n])
            };
            match res {
                Ok(written) => {
                    todo.advance(written);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(cause = %e, target = ?t, "write to backend failed");
                    return self.backend_lost(t);
                }
            }
            let stream = &b.conn.stream;
            let readable = tokio::select! {
                biased;
                r = stream.writable() => r.map(|_| false),
                r = stream.readable() => r.map(|_| true),
            };
            match readable {
                Ok(false) => {}
                Ok(true) => match b.conn.stream.try_read_buf(&mut b.conn.rbuf) {
                    Ok(0) => return self.backend_lost(t),
                    // Relayed later: the client may itself be blocked writing.
                    Ok(_) => self.on_backend_data(t)?,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return self.backend_lost(t),
                },
                Err(_) => return self.backend_lost(t),
            }
        }
        Ok(())
    }
}
