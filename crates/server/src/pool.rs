//! Server connection pools: many client sessions on few server connections.
//!
//! One pool per target, user, database and startup parameters (connections
//! logged in with other parameters are not interchangeable: `RESET ALL`
//! returns a connection to its startup values). Every open connection,
//! idle or leased, counts against its pool's `size` and its target's
//! `max_server_connections`, so several users cannot use up the server's
//! `max_connections` between them.
//!
//! What is pooled is the session's whole per-connection state
//! (`session::Backend`: the connection, its read buffer and bookkeeping queues),
//! so a lease allocates nothing. Idle connections also carry a fingerprint
//! of the session settings applied on them: a session whose settings match
//! takes such a connection as it is, any other resets it first (see
//! `session::lease`). Nothing is reset on return, so an app whose sessions
//! all set the same things pays nothing per transaction.
//!
//! Counting is done by a [`Lease`] that lives inside the pooled
//! connection: dropping the connection (closing it) gives its room back
//! and wakes whoever waits for room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsplit_router::Target;
use tokio::sync::Notify;

use crate::config::{Config, PoolSettings};
use crate::session::Backend;

/// A pool's index within its target.
pub type PoolId = usize;

/// What makes server connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
    /// The client's startup parameters the servers are logged in with.
    pub params: Vec<(String, String)>,
}

/// Both targets' pools.
pub struct Pools {
    pub primary: Arc<TargetPools>,
    pub replica: Arc<TargetPools>,
}

impl Pools {
    pub fn new(config: &Config) -> Pools {
        Pools {
            primary: TargetPools::new(Target::Primary, config.pool.for_target(true)),
            replica: TargetPools::new(Target::Replica, config.pool.for_target(false)),
        }
    }

    /// Puts a reloaded configuration's pool settings in force.
    pub fn apply(&self, config: &Config) {
        self.primary.set_settings(config.pool.for_target(true));
        self.replica.set_settings(config.pool.for_target(false));
    }

    pub fn get(&self, t: Target) -> &Arc<TargetPools> {
        match t {
            Target::Primary => &self.primary,
            Target::Replica => &self.replica,
        }
    }
}

/// Why a checkout failed.
#[derive(Debug)]
pub struct PoolFull {
    pub waited: Duration,
    pub size: usize,
}

/// What a checkout found.
pub(crate) enum Checkout {
    /// An idle connection (one carrying the session's settings
    /// fingerprint if the pool had one).
    Idle(Box<Backend>),
    /// Room for a new connection, already counted: the caller connects
    /// and keeps the lease in the new connection (dropping it frees the
    /// room).
    Room(Lease),
}

/// One target's pools.
pub struct TargetPools {
    pub target: Target,
    /// `[pool] mode`, fixed for the process (sessions were opened under it).
    pub mode: crate::config::PoolMode,
    /// The rest of the settings; a reload replaces them (see [`Pools::apply`]).
    settings: std::sync::RwLock<PoolSettings>,
    state: Mutex<State>,
    /// Signalled when a connection is returned or closed, if anybody
    /// waits: `waiters` counts checkouts from before they first look for a
    /// connection until they return, so a return that sees none (after
    /// releasing the state lock they took before looking) skips the
    /// notification's own lock.
    changed: Notify,
    waiters: AtomicUsize,
}

/// How long connections returned after [`TargetPools::take_all_idle`] are
/// closed rather than kept: as long as `DROP DATABASE` waits for other
/// sessions of the database to end.
const QUIET_AFTER_CLOSE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    /// Until then, returned connections are closed (see `take_all_idle`).
    closing_until: Option<Instant>,
    pools: Vec<PoolState>,
    index: HashMap<PoolKey, PoolId>,
    /// Open connections over all pools.
    total: usize,
}

struct PoolState {
    key: PoolKey,
    idle: Vec<Idle>,
    /// Open connections, idle or leased.
    open: usize,
    /// Sessions waiting for a connection now.
    waiting: usize,
    /// A session leased from it since it was last emptied: only warm
    /// pools are kept at `min_idle` (a pool of a dropped database is not).
    warm: bool,
}

struct Idle {
    backend: Box<Backend>,
    since: Instant,
    fingerprint: u64,
}

/// Counters of one pool, for `SHOW pgsplit.pools` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRow {
    pub target: Target,
    pub user: String,
    pub database: String,
    pub size: usize,
    pub open: usize,
    pub idle: usize,
    pub leased: usize,
    pub waiting: usize,
}

/// Upper bounds (seconds) of the checkout wait histogram's buckets.
pub const WAIT_BUCKETS: [f64; 8] = [0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, f64::INFINITY];

/// Process-wide pool counters.
#[derive(Debug)]
pub struct PoolStats {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub leases: AtomicU64,
    /// How long leases that had to wait for room waited in all (their
    /// count is the buckets' total).
    pub wait_micros: AtomicU64,
    /// Waits by duration, per bucket of [`WAIT_BUCKETS`] (not cumulative).
    pub wait_buckets: [AtomicU64; 8],
    pub timeouts: AtomicU64,
    /// Sessions holding a connection because of a pin (LISTEN, temporary
    /// tables, session locks, …) or a named prepared statement, now.
    pub pinned: AtomicU64,
}

/// Counts one open connection against its pool; dropped with it.
pub struct Lease {
    pools: Arc<TargetPools>,
    pub id: PoolId,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut s = self.pools.lock();
            s.pools[self.id].open -= 1;
            s.total -= 1;
        }
        STATS.closed.fetch_add(1, Relaxed);
        self.pools.wake_waiters();
    }
}

/// One checkout in [`TargetPools::waiters`].
struct Waiter<'a>(&'a AtomicUsize);

impl<'a> Waiter<'a> {
    fn count(n: &'a AtomicUsize) -> Waiter<'a> {
        n.fetch_add(1, SeqCst);
        Waiter(n)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// The counters of every pool in the process.
pub static STATS: PoolStats = PoolStats {
    opened: AtomicU64::new(0),
    closed: AtomicU64::new(0),
    leases: AtomicU64::new(0),
    wait_micros: AtomicU64::new(0),
    wait_buckets: [const { AtomicU64::new(0) }; 8],
    timeouts: AtomicU64::new(0),
    pinned: AtomicU64::new(0),
};

impl TargetPools {
    fn new(target: Target, settings: PoolSettings) -> Arc<TargetPools> {
        Arc::new(TargetPools {
            target,
            mode: settings.mode,
            settings: std::sync::RwLock::new(settings),
            state: Mutex::default(),
            changed: Notify::new(),
            waiters: AtomicUsize::new(0),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> PoolSettings {
        *self.settings.read().unwrap_or_else(|e| e.into_inner())
    }

    /// New sizes and timeouts from a reload: a smaller pool shrinks as
    /// connections come back (the surplus is closed on return), a larger
    /// one lets waiting sessions in at once.
    fn set_settings(&self, mut new: PoolSettings) {
        new.mode = self.mode;
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = new;
        self.changed.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool for `key`, created on first use.
    pub fn id(&self, key: &PoolKey) -> PoolId {
        let mut s = self.lock();
        if let Some(&id) = s.index.get(key) {
            return id;
        }
        let id = s.pools.len();
        s.pools.push(PoolState {
            key: key.clone(),
            idle: Vec::new(),
            open: 0,
            waiting: 0,
            warm: false,
        });
        s.index.insert(key.clone(), id);
        id
    }

    /// Without waiting: the most recently returned idle connection of pool
    /// `id`, one carrying `fingerprint` if there is one.
    pub(crate) fn take_idle(&self, id: PoolId, fingerprint: u64) -> Option<Box<Backend>> {
        let mut s = self.lock();
        let idle = &mut s.pools[id].idle;
        let at = idle
            .iter()
            .rposition(|i| i.fingerprint == fingerprint)
            .or_else(|| idle.len().checked_sub(1))?;
        let i = idle.swap_remove(at);
        drop(s);
        STATS.leases.fetch_add(1, Relaxed);
        Some(i.backend)
    }

    /// Without waiting: an idle connection of pool `id` carrying exactly
    /// `fingerprint`.
    pub(crate) fn take_idle_exact(&self, id: PoolId, fingerprint: u64) -> Option<Box<Backend>> {
        let mut s = self.lock();
        let idle = &mut s.pools[id].idle;
        let at = idle.iter().rposition(|i| i.fingerprint == fingerprint)?;
        let i = idle.swap_remove(at);
        drop(s);
        STATS.leases.fetch_add(1, Relaxed);
        Some(i.backend)
    }

    /// Room for one more connection in pool `id`, counted at once; when
    /// only the target is full, an idle connection of another pool is
    /// closed to make room (returned, to be dropped outside the lock).
    fn reserve(self: &Arc<Self>, id: PoolId) -> (Option<Lease>, Option<Box<Backend>>) {
        let mut s = self.lock();
        if s.pools[id].open >= self.settings().size {
            return (None, None);
        }
        let mut evicted = None;
        if s.total >= self.settings().max_server_connections {
            let victim = s
                .pools
                .iter_mut()
                .filter(|p| !p.idle.is_empty())
                .min_by_key(|p| p.idle[0].since);
            match victim {
                // Its lease frees the room when dropped; the room is taken
                // here, so it is counted twice until then.
                Some(p) => evicted = Some(p.idle.remove(0).backend),
                None => return (None, None),
            }
        }
        s.pools[id].open += 1;
        s.total += 1;
        drop(s);
        STATS.opened.fetch_add(1, Relaxed);
        STATS.leases.fetch_add(1, Relaxed);
        let lease = Lease {
            pools: self.clone(),
            id,
        };
        (Some(lease), evicted)
    }

    /// An idle connection of pool `id`, or room for a new one, waiting up
    /// to `checkout_timeout` for either.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        id: PoolId,
        fingerprint: u64,
    ) -> Result<Checkout, PoolFull> {
        self.lock().pools[id].warm = true;
        let start = Instant::now();
        let deadline = start + self.settings().checkout_timeout;
        let mut counted = false;
        // Counted before the first look (see `waiters`), until this returns
        // or is dropped.
        let _waiter = Waiter::count(&self.waiters);
        let res = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(b) = self.take_idle(id, fingerprint) {
                break Ok(Checkout::Idle(b));
            }
            let (lease, evicted) = self.reserve(id);
            drop(evicted);
            if let Some(lease) = lease {
                break Ok(Checkout::Room(lease));
            }
            if !counted {
                counted = true;
                self.lock().pools[id].waiting += 1;
            }
            let at = tokio::time::Instant::from_std(deadline);
            if tokio::time::timeout_at(at, changed).await.is_err() {
                STATS.timeouts.fetch_add(1, Relaxed);
                break Err(PoolFull {
                    waited: start.elapsed(),
                    size: self.settings().size,
                });
            }
        };
        if counted {
            self.lock().pools[id].waiting -= 1;
            let waited = start.elapsed();
            let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
            STATS.wait_micros.fetch_add(us, Relaxed);
            let secs = waited.as_secs_f64();
            let b = WAIT_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(7);
            STATS.wait_buckets[b].fetch_add(1, Relaxed);
        }
        res
    }

    /// Every idle connection to this target, taken out to be closed; the
    /// pools are not refilled until a session uses them again (a database
    /// about to be dropped or renamed must not be held open).
    #[allow(clippy::vec_box)] // boxed as the sessions hold them
    pub(crate) fn take_all_idle(&self) -> Vec<Box<Backend>> {
        let mut s = self.lock();
        s.closing_until = Some(Instant::now() + QUIET_AFTER_CLOSE);
        s.pools
            .iter_mut()
            .flat_map(|p| {
                p.warm = false;
                p.idle.drain(..).map(|i| i.backend)
            })
            .collect()
    }

    /// Pool `id` is not to be refilled until a session uses it (its
    /// database refused a connection).
    pub(crate) fn cool(&self, id: PoolId) {
        self.lock().pools[id].warm = false;
    }

    /// Returns an idle, clean connection to its pool.
    pub(crate) fn put(&self, backend: Box<Backend>, id: PoolId, fingerprint: u64) {
        let settings = self.settings();
        let mut s = self.lock();
        let now = Instant::now();
        // Over the size (a reload made the pool smaller): closed, so the
        // pool shrinks as its connections come back.
        let surplus = s.pools[id].open > settings.size || s.total > settings.max_server_connections;
        if surplus || s.closing_until.is_some_and(|t| now < t) {
            // Closed (outside the lock): a database may be being dropped.
            drop(s);
            drop(backend);
            return;
        }
        s.pools[id].idle.push(Idle {
            backend,
            since: now,
            fingerprint,
        });
        drop(s);
        self.wake_waiters();
    }

    /// Wakes the checkouts waiting for a connection or room, if any.
    fn wake_waiters(&self) {
        if self.waiters.load(SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Idle connections past `idle_timeout` (beyond `min_idle` per pool) or
    /// past `lifetime`, taken out to be closed.
    #[allow(clippy::vec_box)] // boxed as the sessions hold them
    pub(crate) fn expired(
        &self,
        idle_timeout: Option<Duration>,
        lifetime: impl Fn(&Backend) -> bool,
    ) -> Vec<Box<Backend>> {
        let mut out = Vec::new();
        let mut s = self.lock();
        let keep = self.settings().min_idle;
        for p in &mut s.pools {
            let mut i = 0;
            while i < p.idle.len() {
                let old = idle_timeout.is_some_and(|t| p.idle[i].since.elapsed() >= t)
                    && p.idle.len() > keep;
                if old || lifetime(&p.idle[i].backend) {
                    out.push(p.idle.remove(i).backend);
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// Pools short of `min_idle` idle connections, with how many they
    /// lack (within their size and the target's cap).
    pub fn short_of_min_idle(&self) -> Vec<(PoolId, PoolKey, usize)> {
        let s = self.lock();
        let mut room = self
            .settings()
            .max_server_connections
            .saturating_sub(s.total);
        let mut out = Vec::new();
        for (id, p) in s.pools.iter().enumerate().filter(|(_, p)| p.warm) {
            let want = self
                .settings()
                .min_idle
                .saturating_sub(p.idle.len())
                .min(self.settings().size.saturating_sub(p.open))
                .min(room);
            if want > 0 {
                room -= want;
                out.push((id, p.key.clone(), want));
            }
        }
        out
    }

    /// Room for a connection the pool opens itself (to keep `min_idle`).
    pub fn reserve_for_idle(self: &Arc<Self>, id: PoolId) -> Option<Lease> {
        let (lease, evicted) = self.reserve(id);
        drop(evicted);
        lease
    }

    /// One row per pool.
    pub fn rows(&self) -> Vec<PoolRow> {
        let s = self.lock();
        s.pools
            .iter()
            .map(|p| PoolRow {
                target: self.target,
                user: p.key.user.clone(),
                database: p.key.database.clone(),
                size: self.settings().size,
                open: p.open,
                idle: p.idle.len(),
                leased: p.open - p.idle.len(),
                waiting: p.waiting,
            })
            .collect()
    }

    /// The idle connections of every pool: (user, database, where, server
    /// pid), for the console's `SHOW SERVERS`.
    pub fn idle_servers(&self) -> Vec<(String, String, crate::stream::Endpoint, i32)> {
        let s = self.lock();
        s.pools
            .iter()
            .flat_map(|p| {
                p.idle.iter().map(|i| {
                    let r = i.backend.running();
                    (
                        p.key.user.clone(),
                        p.key.database.clone(),
                        r.endpoint,
                        r.pid,
                    )
                })
            })
            .collect()
    }

    /// Open connections over all pools.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}
