//! Server connections leased from the pools (see [`crate::pool`]) and
//! returned to them.
//!
//! In transaction mode a connection goes back to its pool as soon as
//! nothing of the session is left on it: the server is idle outside a
//! block, no reply is owed, no pin holds it (LISTEN, temporary tables,
//! session locks, cursors `WITH HOLD`, SQL `PREPARE` on the primary) and no
//! protocol-level prepared statement of the client's lives on it. The
//! client's virtual session stays here: its settings are brought to the
//! next connection it leases (nothing when that connection already carries
//! the same settings, a reset and a replay otherwise), its unnamed
//! statement is parsed again where needed. In session mode a connection is
//! returned only when the client leaves.

use std::hash::{Hash, Hasher};

use pgsplit_protocol::backend::TxStatus;
use pgsplit_router::Target;
use tracing::debug;

use super::statements::idx;
use super::{Backend, Session};
use crate::backend::{BackendConn, BackendError, Login};
use crate::config::{PoolMode, User};
use crate::error::Error;
use crate::pool::{Checkout, PoolFull, PoolId, PoolKey};
use crate::Shared;

/// What a connection that carries other settings runs before a session
/// uses it: back to the values it logged in with.
pub(crate) const RESET: &str = "RESET ROLE; SET SESSION AUTHORIZATION DEFAULT; RESET ALL";

/// Why no connection could be leased.
pub(crate) enum LeaseError {
    Connect(BackendError),
    Full(PoolFull),
}

/// The pool key of a client's session.
pub(crate) fn pool_key(user: &User, database: &str, params: &[(String, String)]) -> PoolKey {
    PoolKey {
        user: user.name.clone(),
        database: database.to_owned(),
        params: params
            .iter()
            .filter(|(k, _)| {
                !matches!(k.as_str(), "user" | "database" | "replication")
                    && !k.starts_with("pgsplit.")
            })
            .cloned()
            .collect(),
    }
}

/// Fingerprint of the first `n` entries of a settings log (0 for none).
pub(crate) fn fingerprint(entries: &[String]) -> u64 {
    if entries.is_empty() {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    entries.hash(&mut h);
    h.finish() | 1
}

/// A connection to `t` for a session in pool `id`: an idle one, or a new
/// one logged in with the session's credentials and startup parameters.
pub(crate) async fn checkout(
    shared: &Shared,
    t: Target,
    id: PoolId,
    fingerprint: u64,
    user: &User,
    database: &str,
    params: &[(String, String)],
) -> Result<Box<Backend>, LeaseError> {
    let pools = shared.pools.get(t);
    loop {
        match pools.checkout(id, fingerprint).await {
            Err(full) => return Err(LeaseError::Full(full)),
            Ok(Checkout::Idle(mut b)) => {
                if b.conn.gone_while_idle() {
                    debug!(target = ?t, "pooled connection found closed; replacing it");
                    continue;
                }
                if b.generation != shared.generation_of(t) {
                    debug!(target = ?t, "pooled connection to a former server; closing it");
                    b.conn.terminate().await;
                    continue;
                }
                return Ok(b);
            }
            Ok(Checkout::Room(lease)) => {
                let cfg = shared.config();
                let (addr, generation) = shared.server_addr(t).map_err(LeaseError::Connect)?;
                let login = Login {
                    user: user.backend_user(),
                    password: user.backend_password(),
                    keys: user.keys.as_ref(),
                    database,
                    params,
                };
                let tm = cfg.timeouts.for_target(t == Target::Primary);
                let conn = BackendConn::connect(t, &addr, &login, tm.connect_timeout)
                    .await
                    .map_err(LeaseError::Connect)?;
                let mut b = Box::new(Backend::new(conn, tm));
                b.lease = Some(lease);
                b.generation = generation;
                return Ok(b);
            }
        }
    }
}

impl Session {
    pub(super) fn pool_mode(&self, t: Target) -> PoolMode {
        self.shared.pools.get(t).mode
    }

    /// Fingerprint of the settings the session holds now.
    fn settings_fingerprint(&self) -> u64 {
        fingerprint(self.settings_log.since(0))
    }

    /// A connection to `t` from its pool.
    pub(super) async fn lease(&mut self, t: Target) -> Result<Box<Backend>, LeaseError> {
        let fp = self.settings_fingerprint();
        let mut b = checkout(
            &self.shared,
            t,
            self.pools[idx(t)],
            fp,
            &self.user,
            &self.database,
            &self.params,
        )
        .await?;
        self.adopt(&mut b, fp);
        Ok(b)
    }

    /// Settles what a leased connection has of the session's settings:
    /// all of them when it carries the same, else none, after a reset if
    /// it carries others.
    pub(super) fn adopt(&self, b: &mut Backend, fp: u64) {
        if b.carried == fp {
            b.applied_sets = self.settings_log.len();
            b.reset_due = false;
        } else {
            b.applied_sets = 0;
            b.reset_due = b.carried != 0;
        }
        b.timeouts = self
            .cfg
            .timeouts
            .for_target(b.conn.target == Target::Primary);
        b.last_used = std::time::Instant::now();
    }

    /// Without waiting: an idle connection to `t` that already carries
    /// the session's settings, installed. For the steady read path.
    pub(super) fn lease_idle_now(&mut self, t: Target) -> bool {
        if self.backends[idx(t)].is_some() || self.pool_mode(t) != PoolMode::Transaction {
            return false;
        }
        let fp = self.settings_fingerprint();
        let pools = self.shared.pools.get(t);
        let Some(mut b) = pools.take_idle_exact(self.pools[idx(t)], fp) else {
            return false;
        };
        if b.conn.gone_while_idle() {
            return false; // dropped: the general path opens another
        }
        self.adopt(&mut b, fp);
        self.install(t, b);
        true
    }

    /// Makes `b` the session's connection to `t`.
    pub(super) fn install(&mut self, t: Target, b: Box<Backend>) {
        self.cancel.set_backend(idx(t), b.running());
        self.backends[idx(t)] = Some(b);
    }

    /// Whether `t`'s connection holds nothing of the session's but its
    /// settings, so another session may use it.
    fn releasable(&self, t: Target) -> bool {
        let Some(b) = self.backends[idx(t)].as_ref() else {
            return false;
        };
        b.lease.is_some()
            && b.pending.is_empty()
            && b.expect.is_empty()
            && b.passthrough == 0
            && b.status == TxStatus::Idle
            && !b.dead
            && !b.hold
            && !b.retrying
            && !b.resolving
            && b.xid.is_none()
            && b.held == 0
            && b.conn.rbuf.is_empty()
            && b.sets_in_flight.is_empty()
            && b.resets_in_flight.is_empty()
            && !b.reset_due
            && self.tx.open != Some(t)
            && self.bound != Some(t)
            && self.copy_in.is_none_or(|c| c.target != t)
            && self.lsn_due != Some(t)
            && self.resolution.is_none()
            && !self.tx.wrap_unended
            && self.retry.inflight.is_none()
            && !self.retry.due
            && !(t == Target::Primary && (self.pin.held || self.pin.check || self.pin.sticky))
            && !self.stmts.has_zombies(t)
    }

    /// Gives `t`'s connection back to its pool.
    fn release(&mut self, t: Target) {
        let Some(mut b) = self.backends[idx(t)].take() else {
            return;
        };
        self.stmts.forget_backend(t);
        self.cancel.clear_backend(idx(t));
        // What the connection carries: the log up to where it caught up
        // (anything else, which should not happen, forces a reset).
        let fp = match self.settings_log.since(0).get(..b.applied_sets) {
            Some(applied) => fingerprint(applied),
            None => u64::MAX,
        };
        b.carried = fp;
        b.errored = false;
        b.deadline = None;
        b.commit_answer = None;
        if self.cancel.cancel_in_flight() {
            // The cancel may be for this connection's last statement: it
            // must not land on another client's (see `cancel`).
            debug!(target = ?t, "closing a connection a cancel is on its way to");
            drop(b);
            return;
        }
        let id = b.lease.as_ref().map_or(self.pools[idx(t)], |l| l.id);
        self.shared.pools.get(t).put(b, id, fp);
    }

    /// Before a statement that needs a database free of other connections
    /// (`DROP DATABASE`, `ALTER DATABASE … RENAME`, `CREATE DATABASE …
    /// TEMPLATE`): the pools' idle connections are closed, so pgsplit never
    /// holds a database open that its client wants to drop.
    pub(super) fn close_idle_for_database_ddl(&mut self, sql: &str) {
        let head = sql.trim_start().as_bytes();
        let head = &head[..head.len().min(24)];
        let starts = |w: &[u8]| head.len() >= w.len() && head[..w.len()].eq_ignore_ascii_case(w);
        let ddl = (starts(b"drop") || starts(b"alter") || starts(b"create"))
            && head.windows(8).any(|w| w.eq_ignore_ascii_case(b"database"));
        if ddl {
            for t in [Target::Primary, Target::Replica] {
                drop(self.shared.pools.get(t).take_all_idle());
            }
        }
    }

    /// In transaction mode: returns every connection the session is not
    /// using to its pool.
    pub(super) fn release_idle(&mut self) {
        let mut held = false;
        for t in [Target::Primary, Target::Replica] {
            if self.pool_mode(t) != PoolMode::Transaction {
                continue;
            }
            if self.releasable(t) {
                self.release(t);
            } else if self.backends[idx(t)].is_some() {
                held |= t == Target::Primary && (self.pin.held || self.pin.sticky);
            }
        }
        self.count_pinned(held);
    }

    /// Keeps the process-wide count of sessions holding a connection
    /// because of a pin or a named statement.
    fn count_pinned(&mut self, now: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if now != self.pin.counted {
            self.pin.counted = now;
            if now {
                crate::pool::STATS.pinned.fetch_add(1, Relaxed);
            } else {
                crate::pool::STATS.pinned.fetch_sub(1, Relaxed);
            }
        }
    }

    /// The client left: clean connections go back to their pools, the
    /// others are closed (a server rolls back what a closed connection
    /// left open).
    pub(super) async fn release_all(&mut self) {
        self.count_pinned(false);
        for t in [Target::Primary, Target::Replica] {
            if self.releasable(t) {
                self.release(t);
            } else if let Some(b) = self.backends[idx(t)].take() {
                if b.pending.is_empty() && b.status == TxStatus::Idle {
                    b.conn.terminate().await;
                }
            }
        }
    }
}

/// Keeps the pools until shutdown: closes idle connections past
/// `server_idle_timeout` (beyond `min_idle`) or `server_lifetime` (less a
/// random tenth, so connections opened together are not all replaced at
/// once), and opens connections up to `min_idle` in every pool that has
/// been used, so a write never waits for a connect through the tunnel.
pub(crate) async fn maintain(
    shared: std::sync::Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    use rand::Rng;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        for t in [Target::Primary, Target::Replica] {
            let pools = shared.pools.get(t);
            let tm = shared.config().timeouts.for_target(t == Target::Primary);
            let generation = shared.generation_of(t);
            let expired = pools.expired(tm.server_idle_timeout, |b| {
                // A connection to a former primary (or replica) goes at once.
                b.generation != generation
                    || tm.server_lifetime.is_some_and(|l| {
                        let jitter = rand::thread_rng().gen_range(0.9..=1.0);
                        b.opened.elapsed() >= l.mul_f64(jitter)
                    })
            });
            for b in expired {
                b.conn.terminate().await;
            }
            if t == Target::Primary && shared.replication.primary_link_down() {
                continue;
            }
            let cfg = shared.config();
            for (id, key, want) in pools.short_of_min_idle() {
                // An auth_query user's pool fills once its keys are known
                // (its first login); until then it has no connections.
                let Some(user) = cfg
                    .user(&key.user)
                    .cloned()
                    .or_else(|| shared.auth_query.user(&key.user))
                else {
                    continue;
                };
                let Ok((addr, generation)) = shared.server_addr(t) else {
                    continue;
                };
                let login = Login {
                    user: user.backend_user(),
                    password: user.backend_password(),
                    keys: user.keys.as_ref(),
                    database: &key.database,
                    params: &key.params,
                };
                for _ in 0..want {
                    let Some(lease) = pools.reserve_for_idle(id) else {
                        break;
                    };
                    match BackendConn::connect(t, &addr, &login, tm.connect_timeout).await {
                        Ok(conn) => {
                            let mut b = Box::new(Backend::new(conn, tm));
                            b.lease = Some(lease);
                            b.generation = generation;
                            pools.put(b, id, 0);
                        }
                        Err(e) => {
                            debug!(target = ?t, cause = %e, "opening an idle pool connection failed");
                            if matches!(e, BackendError::Refused { .. }) {
                                pools.cool(id);
                            }
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Opens the connection whose handshake the client sees: the replica
/// (reads start there and a read-only client never needs the primary), or
/// the primary when the replica refuses or cannot be reached (see
/// [`primary_may_accept`]). It also validates the database name.
pub(crate) async fn first_backend(
    shared: &Shared,
    user: &User,
    database: &str,
    params: &[(String, String)],
) -> Result<(Box<Backend>, [PoolId; 2]), Error> {
    let key = pool_key(user, database, params);
    let ids = [shared.pools.primary.id(&key), shared.pools.replica.id(&key)];
    let at = |t: Target| ids[idx(t)];
    let replica_err = match checkout(
        shared,
        Target::Replica,
        at(Target::Replica),
        0,
        user,
        database,
        params,
    )
    .await
    {
        Ok(b) => return Ok((b, ids)),
        Err(LeaseError::Full(f)) => return Err(pool_full(Target::Replica, &f)),
        Err(LeaseError::Connect(BackendError::Refused { code, message, .. }))
            if !primary_may_accept(&code) =>
        {
            return Err(Error::BackendRefused {
                target: Target::Replica,
                code,
                message,
            })
        }
        Err(LeaseError::Connect(e)) => e,
    };
    tracing::warn!(cause = %replica_err, "replica refused or unreachable at session start; trying the primary");
    match checkout(
        shared,
        Target::Primary,
        at(Target::Primary),
        0,
        user,
        database,
        params,
    )
    .await
    {
        Ok(b) => Ok((b, ids)),
        Err(LeaseError::Full(f)) => Err(pool_full(Target::Primary, &f)),
        Err(LeaseError::Connect(BackendError::Refused { code, message, .. })) => {
            Err(Error::BackendRefused {
                target: Target::Primary,
                code,
                message,
            })
        }
        Err(LeaseError::Connect(e)) => Err(Error::NothingReachable(e)),
    }
}

/// The client's error for a pool that had no room in time.
pub(crate) fn pool_full(target: Target, f: &PoolFull) -> Error {
    Error::PoolFull {
        target,
        waited: f.waited,
        size: f.size,
    }
}

/// Whether a login the replica refused with `code` may succeed on the
/// primary, so the session starts there, as when the replica cannot be
/// reached at all (its reads move to the replica once it accepts them):
/// - the replica is starting, stopping or restarting (it ends even a login
///   in progress with 57P01 on a fast shutdown);
/// - it has not replayed what the login names yet: a database created a
///   moment ago (3D000), a role or its password (28000, 28P01).
///
/// The client has already proven its password to pgsplit, with the
/// proxy's own credentials check, before any server is asked; these logins
/// use the backend credentials, so retrying one on the primary never gives
/// a client a second password guess. Other refusals (too many connections,
/// …) are the client's answer.
pub(crate) fn primary_may_accept(code: &str) -> bool {
    use pgsplit_protocol::sqlstate::{
        ADMIN_SHUTDOWN, CANNOT_CONNECT_NOW, CRASH_SHUTDOWN, INVALID_AUTHORIZATION_SPECIFICATION,
        INVALID_CATALOG_NAME, INVALID_PASSWORD,
    };
    matches!(
        code,
        ADMIN_SHUTDOWN
            | CRASH_SHUTDOWN
            | CANNOT_CONNECT_NOW
            | INVALID_CATALOG_NAME
            | INVALID_AUTHORIZATION_SPECIFICATION
            | INVALID_PASSWORD
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_the_primary_may_not_share_start_there() {
        for code in ["57P01", "57P02", "57P03", "3D000", "28000", "28P01"] {
            assert!(primary_may_accept(code), "{code}");
        }
        for code in ["53300", "57014", "XX000", "08P01"] {
            assert!(!primary_may_accept(code), "{code}");
        }
    }

    #[test]
    fn fingerprints_tell_settings_apart_and_none_is_zero() {
        assert_eq!(fingerprint(&[]), 0);
        let a = fingerprint(&["SET a = 1".into()]);
        let b = fingerprint(&["SET a = 2".into()]);
        assert_ne!(a, 0);
        assert_ne!(a, b);
        assert_eq!(a, fingerprint(&["SET a = 1".into()]));
    }
}
