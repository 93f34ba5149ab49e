//! One client session: a virtual PostgreSQL connection backed by server
//! connections leased from the pools (one per target at most), opened or
//! leased lazily.
//!
//! The task reads client frames, asks the router where each statement (or
//! extended-protocol batch, up to Sync) goes, and forwards the frames
//! unchanged. Backend output is relayed by [`relay`] as it arrives. Order
//! is preserved by draining a backend before the next batch goes to the
//! other one. This file keeps the client's virtual state (settings,
//! statements, block, pins, read-your-writes position) and the main loop;
//! each concern has its module:
//!
//! - [`client`]: reading client messages, writing what it is owed;
//! - [`simple`] and [`extended`]: a Query cycle, a batch up to Sync;
//! - [`routing`]: the session's inputs to the router, and its waits;
//! - [`retry`]: reads run again on the primary;
//! - [`server`] and [`lease`]: a server connection as the session uses it,
//!   leased from its pool and returned;
//! - [`cycle`]: what a cycle sent expects back;
//! - [`failed_block`]: answering a client whose block was lost;
//! - [`relay`], [`steady`], [`wrap`], [`resolution`], [`timers`]: relaying
//!   answers, the fast path for reads, wrapped writes, lost commits, and
//!   deadlines.
//!
//! The rules themselves live in the router.

mod batch;
mod client;
mod cycle;
mod effects;
mod extended;
mod failed_block;
mod lease;
pub(crate) use lease::{first_backend, maintain};
mod local;
mod memo;
mod relay;
mod resolution;
mod retry;
mod routing;
mod server;
mod settings;
mod simple;
pub mod statements;
mod steady;
mod timers;
mod vars;
mod vectored;
mod wrap;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pgsplit_protocol::Frame;
use pgsplit_router::route::Reason;
use pgsplit_router::{Class, Stage, StmtKind, Target};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::cancel::CancelHandle;
use crate::config::User;
use crate::error::Error;
use crate::Shared;
use batch::{Batch, Meta};
use cycle::{CopyIn, Expect, Pending, Retry};
use effects::Reset;
use memo::Memo;
pub(crate) use server::Backend;
use settings::SettingsLog;
use statements::{idx, Statements};
use vectored::write_all_vectored;

/// The empty class: a batch of nothing but Sync/Describe portal/Close.
const EMPTY: Class = Class {
    kind: StmtKind::Empty,
    hint: None,
    statements: 0,
    stage: Stage::Lexer,
};

enum Flow {
    Continue,
    Exit,
}

/// What keeps the session's primary connection leased to it (see `effects`).
#[derive(Default)]
struct PinState {
    /// Counted in the pools' pinned sessions (see `lease`).
    counted: bool,
    /// The session holds state that lives only on its primary connection
    /// (LISTEN, temporary tables, session advisory locks, cursors `WITH
    /// HOLD`, SQL `PREPARE`): the connection stays leased to it.
    held: bool,
    /// A statement that may have released what pinned the session ran:
    /// check on the primary before the next read is kept off the replica.
    check: bool,
    /// The statement or batch being routed may release a pin: once it has
    /// run, `check` is set.
    releasing: bool,
    /// The pin holds state the pin check cannot see (see
    /// `effects::sticky_pin`): released only by `DISCARD ALL`.
    sticky: bool,
}

/// A read that may run again on the primary (see `retry`).
#[derive(Default)]
struct RetryState {
    /// The retryable read in flight on the replica.
    inflight: Option<Retry>,
    /// The replica refused `inflight`: run it on the primary next.
    due: bool,
    /// Of the retryable read in flight: the primary polls started when it
    /// was sent, and the replica's replay position known then.
    sent: (u64, u64),
    /// The retry due is for an object the replica may not have replayed
    /// yet (the index of its SQLSTATE in `stats::MISSING`), not a write.
    missing: Option<usize>,
    /// The batch of a retryable extended-protocol read (see `Retry::Batch`).
    frames: Vec<Frame>,
    /// What the batcher learned of each of `frames`.
    meta: Vec<Meta>,
}

/// The client's transaction block, as the proxy keeps it.
#[derive(Default)]
struct BlockState {
    /// Where the client's open block runs (`None` outside a block).
    open: Option<Target>,
    /// The backend holding the client's block was lost: answer 25P02
    /// until the client ends the block.
    failed: bool,
    /// It was lost while no statement of the client was running there: the
    /// next statement is told why (08006) rather than just 25P02.
    lost_unreported: Option<Target>,
    /// The client's block was lost with its connection (not ended by a
    /// timeout the client was told of): its COMMIT is an error, never the
    /// "ROLLBACK" tag of a failed block.
    commit_refused: Option<Target>,
    /// SET statements run inside the open block, logged if it commits.
    sets: Vec<String>,
    /// A wrapped write has answered but for its ReadyForQuery, which the
    /// proxy's COMMIT (not sent yet) will bring.
    wrap_unended: bool,
}

/// A client's session after a successful handshake.
pub(crate) struct Session {
    shared: Arc<Shared>,
    /// The configuration this session runs under: taken again between
    /// transactions when a reload changed it (see [`crate::reload`]).
    cfg: Arc<crate::Config>,
    /// `shared.live`'s generation `cfg` was taken at.
    cfg_gen: u64,
    client: crate::tls::ClientStream,
    cbuf: BytesMut,
    /// The whole messages last split off `cbuf`, of which the client's
    /// frames are slices: consecutive ones are forwarded as one slice.
    block: Bytes,
    /// Output to the client, in order: relayed chunks and own messages.
    out: VecDeque<Bytes>,
    scratch: BytesMut,
    user: User,
    database: String,
    params: Vec<(String, String)>,
    backends: [Option<Box<Backend>>; 2],
    /// Block, pin and retry state, each in one place.
    tx: BlockState,
    pin: PinState,
    retry: RetryState,
    /// The pool of each target this session leases from.
    pools: [crate::pool::PoolId; 2],
    /// The current batch was partly sent (Flush before Sync) to this backend.
    bound: Option<Target>,
    /// What was sent of it was only Parse/Describe: it may still move.
    bound_soft: bool,
    /// Discard client messages until Sync (after an error the proxy raised
    /// inside a batch, as a server does).
    skip_until_sync: bool,
    copy_in: Option<CopyIn>,
    /// COPY data from the client not yet written to the backend.
    copy_data: Vec<Bytes>,
    copy_data_bytes: usize,
    batch: Batch,
    memo: Memo,
    /// Reused list of frames to write to a backend.
    outgoing: Vec<Bytes>,
    stmts: Statements,
    /// Session-level SET/RESET statements, in order, replayed on every
    /// backend connection the session uses.
    settings_log: SettingsLog,
    seq: u64,
    /// Routing preferences (`SET pgsplit.…`).
    vars: vars::Vars,
    /// WAL position at or after the session's last committed write.
    write_lsn: u64,
    /// When the session's last write completed.
    wrote_at: Option<Instant>,
    /// Where the last statement went, and why (`SHOW pgsplit.last_route`).
    last_route: (Target, Reason),
    /// A COPY that wrote has finished on this backend: ask it for the WAL
    /// position before anything else.
    lsn_due: Option<Target>,
    /// The write before the pending WAL-position query failed as a whole:
    /// its answer is not the session's write.
    ignore_lsn: bool,
    /// The client asked for `pgsplit_replica_lag_ms` ParameterStatus
    /// messages (startup option `pgsplit.report_lag=on`).
    report_lag: bool,
    /// The last value sent (`Some(None)`: "unknown").
    reported_lag: Option<Option<u64>>,
    /// Wakes the session when the primary link goes down (heartbeat).
    link: tokio::sync::watch::Receiver<bool>,
    /// `idle_in_transaction_timeout`, when set.
    idle_in_transaction: Option<std::time::Duration>,
    /// Since when the client has sent nothing and been answered in full.
    idle_since: Instant,
    /// Portals bound to local (`pgsplit.*`) statements: (portal, statement).
    local_portals: Vec<(String, String)>,
    /// The messages of the steady read being checked (see `steady`).
    steady_meta: Vec<steady::Located>,
    /// A steady read as it goes out when it names statements (renamed),
    /// else empty (it goes out as it came).
    steady_parts: Vec<Bytes>,
    cancel: CancelHandle,
    replica_retry_at: Option<Instant>,
    /// A lost commit whose outcome is being learned: output after its
    /// place waits for it.
    resolution: Option<resolution::Resolution>,
    /// Completes when the proxy shuts down. Created once: waiting on it
    /// again costs nothing, where a fresh `cancelled()` per wait would
    /// register and unregister a waiter every time.
    shutdown: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Wakes an idle session when the console pauses (see [`crate::pause`]).
    pause: tokio::sync::watch::Receiver<bool>,
    /// Fires when the console ends this client (`KILL_CLIENT`).
    kill: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// The session's timer, for the earliest of its deadlines. Reset only
    /// when a deadline is earlier than where it stands: a deadline that
    /// moves later (every statement's does) leaves it, and when it goes off
    /// early it is simply set again. Registering a timer per statement
    /// would cost more than the statement's own relaying.
    alarm: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Where `alarm` is set, when it is.
    alarm_at: Option<Instant>,
}

/// Counts what pins a session to its primary connection: channels it
/// listens on, objects in its temporary schema (relations, and the
/// statistics objects, functions, types and collations a client may create
/// there by name), session advisory locks, cursors `WITH HOLD` and
/// SQL-level prepared statements.
const PIN_PROBE: &str = "SELECT (SELECT count(*) FROM pg_listening_channels()) \
     + (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) \
     + (SELECT count(*) FROM pg_statistic_ext WHERE stxnamespace = pg_my_temp_schema()) \
     + (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()) \
     + (SELECT count(*) FROM pg_type WHERE typnamespace = pg_my_temp_schema()) \
     + (SELECT count(*) FROM pg_collation WHERE collnamespace = pg_my_temp_schema()) \
     + (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory') \
     + (SELECT count(*) FROM pg_cursors WHERE is_holdable) \
     + (SELECT count(*) FROM pg_prepared_statements WHERE from_sql)";

/// A Sync message of the proxy's own.
const SYNC: &[u8] = b"S\0\0\0\x04";

/// The proxy's own query after a write (a Query message): the WAL insert
/// position (for read-your-writes in `lsn` mode) and the id of the
/// transaction still open, if it has one (to resolve a lost COMMIT).
const OWN_QUERY: &[u8] = b"Q\0\0\0\x55SELECT pg_current_wal_insert_lsn()::text, pg_current_xact_id_if_assigned()::text\0";

/// COPY data is written to the server at least this often.
const COPY_FLUSH_BYTES: usize = 256 * 1024;

/// How long a session that ends waits for what the servers still owe it
/// (see `Session::finish_pending`).
const FINISH_PENDING: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a failed replica is left alone before reads try it again.
const REPLICA_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        client: crate::tls::ClientStream,
        cbuf: BytesMut,
        user: User,
        database: String,
        params: Vec<(String, String)>,
        first: Box<Backend>,
        pools: [crate::pool::PoolId; 2],
        cancel: CancelHandle,
        shutdown: CancellationToken,
        kill: CancellationToken,
    ) -> Session {
        let mut backends = [None, None];
        let t = first.conn.target;
        // The generation first: a reload in between is then seen again.
        let cfg_gen = shared.live.generation();
        let cfg = shared.config();
        let vars = vars::Vars::new(&cfg);
        let iit = cfg.timeouts.idle_in_transaction_timeout;
        let idle_in_transaction = (!iit.is_zero()).then_some(iit);
        let link = shared.replication.watch_link();
        let shared_pause = shared.pause.watch();
        let report_lag = params
            .iter()
            .any(|(k, v)| k == "pgsplit.report_lag" && vars::is_on(v));
        cancel.set_backend(idx(t), first.running());
        let mut first = first;
        // Pooled, it may carry another session's settings.
        first.applied_sets = 0;
        first.reset_due = first.carried != 0;
        backends[idx(t)] = Some(first);
        Session {
            shared,
            cfg,
            cfg_gen,
            client,
            cbuf,
            block: Bytes::new(),
            out: VecDeque::new(),
            scratch: BytesMut::new(),
            user,
            database,
            params,
            backends,
            tx: BlockState::default(),
            pin: PinState::default(),
            retry: RetryState::default(),
            pools,
            bound_soft: false,
            bound: None,
            skip_until_sync: false,
            copy_in: None,
            copy_data: Vec::new(),
            copy_data_bytes: 0,
            batch: Batch::default(),
            memo: Memo::default(),
            outgoing: Vec::new(),
            stmts: Statements::default(),
            settings_log: SettingsLog::default(),
            seq: 0,
            vars,
            write_lsn: 0,
            wrote_at: None,
            last_route: (Target::Replica, Reason::Read),
            lsn_due: None,
            ignore_lsn: false,
            steady_meta: Vec::new(),
            steady_parts: Vec::new(),
            local_portals: Vec::new(),
            idle_in_transaction,
            idle_since: Instant::now(),
            link,
            report_lag,
            reported_lag: None,
            cancel,
            replica_retry_at: None,
            resolution: None,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            kill: Box::pin(kill.cancelled_owned()),
            pause: shared_pause,
            alarm: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
            alarm_at: None,
        }
    }

    /// Runs until the client leaves, breaks the protocol or the proxy
    /// shuts down. Dropping the backends closes them, and a server rolls
    /// back any open transaction of a closed connection.
    pub(crate) async fn run(mut self) -> Result<(), Error> {
        let res = self.run_inner().await;
        if let Err(e) = &res {
            if !matches!(
                e,
                Error::ClientGone | Error::ClientIo(_) | Error::StreamBroken { .. }
            ) {
                let mut b = BytesMut::new();
                e.write_to(&mut b, true);
                self.out.push_back(b.freeze());
                let _ = self.flush_client().await;
            }
        }
        if matches!(res, Ok(()) | Err(Error::ClientGone)) {
            self.finish_pending().await;
        }
        self.release_all().await;
        res
    }

    /// As the session ends: what the servers still owe (a client's
    /// statement sent just before its Terminate, the WAL position the
    /// proxy asked for behind a write) is read, within `FINISH_PENDING`,
    /// and relayed while the client still listens, as a server finishes a
    /// statement before it reads the Terminate behind it. So a client that
    /// says goodbye right after its write (connect-per-request) has the
    /// write's position learned before its next connection reads
    /// (`proxy` scope), and the connection goes back to its pool instead
    /// of being closed.
    async fn finish_pending(&mut self) {
        let until = tokio::time::Instant::now() + FINISH_PENDING;
        let mut listening = true;
        for t in [Target::Primary, Target::Replica] {
            let copying = self.copy_in.is_some_and(|c| c.target == t);
            while let Some(b) = self.backends[idx(t)].as_mut() {
                if b.pending.is_empty() || copying {
                    break;
                }
                let read = b.conn.stream.read_buf(&mut b.conn.rbuf);
                match tokio::time::timeout_at(until, read).await {
                    Ok(Ok(n)) if n > 0 => {
                        let done = self.on_backend_data(t);
                        if listening {
                            listening = self.flush_client().await.is_ok();
                        }
                        self.out.clear();
                        if done.is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
    }

    async fn run_inner(&mut self) -> Result<(), Error> {
        loop {
            self.flush_client().await?;
            // A statement that may have released the pin ran (asyncpg's
            // reset on returning a connection to its pool does): ask now,
            // while the client is idle, rather than at its next read, so an
            // idle client does not hold a primary connection out of the pool.
            if self.pin.check
                && self.cbuf.is_empty()
                && self.tx.open.is_none()
                && !self.busy(Target::Primary)
                && self.pool_mode(Target::Primary) == crate::config::PoolMode::Transaction
            {
                self.recheck_pin().await?;
            }
            self.release_idle();
            self.leave_old_primary()?;
            if self.lsn_due.is_some() && self.copy_in.is_none() {
                self.send_due_lsn_query().await?;
            }
            if self.retry.due {
                self.run_due_retry().await?;
            }
            let busy = [self.busy(Target::Primary), self.busy(Target::Replica)];
            // A pinned primary can speak unasked (NotificationResponse of a
            // LISTEN, a FATAL on shutdown): read it while the client is idle.
            let primary_open = self.backends[idx(Target::Primary)].is_some();
            let watch = [busy[0] || (self.pin.held && primary_open), busy[1]];
            let idle = !busy[0] && !busy[1] && self.tx.open.is_none() && self.copy_in.is_none();
            if idle && self.shared.pause.is_paused() {
                self.park().await?;
                continue;
            }
            if let Some((at, _)) = self.next_timer() {
                if self.alarm_at.is_none_or(|a| at < a) {
                    self.alarm
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(at));
                    self.alarm_at = Some(at);
                }
            }
            let armed = self.alarm_at.is_some();
            let Session {
                client,
                cbuf,
                backends,
                shutdown,
                kill,
                link,
                alarm,
                pause,
                ..
            } = self;
            let [p, r] = backends;
            enum Ev {
                Client(std::io::Result<usize>),
                Backend(Target, std::io::Result<usize>),
                Alarm,
                Link,
                Shutdown,
                Killed,
                Pause,
            }
            let ev = tokio::select! {
                biased;
                res = read_backend(p), if watch[0] => Ev::Backend(Target::Primary, res),
                res = read_backend(r), if watch[1] => Ev::Backend(Target::Replica, res),
                res = client.read_buf(cbuf) => Ev::Client(res),
                _ = alarm.as_mut(), if armed => Ev::Alarm,
                _ = link.changed(), if busy[0] => Ev::Link,
                _ = shutdown.as_mut(), if idle => Ev::Shutdown,
                _ = kill.as_mut() => Ev::Killed,
                _ = pause.changed(), if idle => Ev::Pause,
            };
            match ev {
                Ev::Client(Ok(0)) => return Err(Error::ClientGone),
                Ev::Client(Err(e)) => return Err(Error::ClientIo(e)),
                Ev::Alarm => {
                    // Set for a deadline that may have moved later since.
                    self.alarm_at = None;
                    if let Some((at, what)) = self.next_timer() {
                        if at <= Instant::now() {
                            self.on_timer(what)?;
                        }
                    }
                }
                Ev::Link => self.on_link_change()?,
                Ev::Client(Ok(_)) => {
                    self.follow_reload();
                    if self.idle_in_transaction.is_some() {
                        self.idle_since = Instant::now();
                    }
                    self.leave_old_primary()?;
                    if let Flow::Exit = self.process_client().await? {
                        return Ok(());
                    }
                }
                Ev::Backend(t, Ok(n)) if n > 0 => self.on_backend_data(t)?,
                Ev::Backend(t, _) => self.backend_lost(t)?,
                Ev::Shutdown => return Err(Error::ShuttingDown),
                Ev::Killed => return Err(Error::Killed),
                // Handled at the top of the loop.
                Ev::Pause => {}
            }
        }
    }
}

impl Session {
    /// Held between transactions while the console's `PAUSE` is in force
    /// (see [`crate::pause`]): the client is not read until `RESUME`.
    async fn park(&mut self) -> Result<(), Error> {
        let shared = self.shared.clone();
        let _parked = shared.pause.park();
        loop {
            if !shared.pause.is_paused() {
                return Ok(());
            }
            tokio::select! {
                r = self.pause.changed() => if r.is_err() { return Ok(()) },
                _ = self.shutdown.as_mut() => return Err(Error::ShuttingDown),
                _ = self.kill.as_mut() => return Err(Error::Killed),
            }
        }
    }

    /// Between transactions, takes a reloaded configuration: routing
    /// defaults the session has not set itself, timeouts and limits apply
    /// from its next transaction on, never inside a block.
    fn follow_reload(&mut self) {
        let gen = self.shared.live.generation();
        if gen == self.cfg_gen || self.tx.open.is_some() || self.copy_in.is_some() {
            return;
        }
        let new = self.shared.config();
        self.vars.rebase(&self.cfg, &new);
        let iit = new.timeouts.idle_in_transaction_timeout;
        self.idle_in_transaction = (!iit.is_zero()).then_some(iit);
        self.cfg = new;
        self.cfg_gen = gen;
    }

    /// Writes moved to another primary (a promotion was followed) while this
    /// session held a connection to the old one, idle between statements:
    /// it is closed, so a block open there ends as on a lost connection
    /// (08006 to the next statement, the old server rolls it back) rather
    /// than writing on to a server that is no longer the primary.
    fn leave_old_primary(&mut self) -> Result<(), Error> {
        let old = self.backends[idx(Target::Primary)]
            .as_ref()
            .is_some_and(|b| b.generation != self.shared.failover.generation());
        if old && !self.busy(Target::Primary) {
            tracing::info!("the primary changed: closing this session's connection to the old one");
            return self.backend_lost(Target::Primary);
        }
        Ok(())
    }
}

fn other(t: Target) -> Target {
    match t {
        Target::Primary => Target::Replica,
        Target::Replica => Target::Primary,
    }
}

/// Sleeps until the deadline of `timer` and returns what it was for.
async fn sleep_until(timer: Option<(Instant, timers::Timer)>) -> timers::Timer {
    match timer {
        Some((at, what)) => {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            what
        }
        None => std::future::pending().await,
    }
}

async fn read_backend(b: &mut Option<Box<Backend>>) -> std::io::Result<usize> {
    match b {
        Some(b) => b.conn.stream.read_buf(&mut b.conn.rbuf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgsplit_protocol::{frame, frontend, tag};

    #[test]
    fn the_own_query_is_one_well_formed_query_message() {
        let mut b = BytesMut::from(OWN_QUERY);
        let f = frame::decode(&mut b, 1 << 16).unwrap().unwrap();
        assert!(b.is_empty());
        assert_eq!(f.tag(), tag::frontend::QUERY);
        assert_eq!(
            frontend::query(f.body()).unwrap(),
            "SELECT pg_current_wal_insert_lsn()::text, pg_current_xact_id_if_assigned()::text"
        );
    }
}
