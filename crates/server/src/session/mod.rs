//! One client session: a virtual PostgreSQL connection backed by up to two
//! real ones (primary, replica), opened lazily.
//!
//! The task reads client frames, asks the router where each statement (or
//! extended-protocol batch, up to Sync) goes, and forwards the frames
//! unchanged. Backend output is relayed by [`relay`] as it arrives. Order
//! is preserved by draining a backend before the next batch goes to the
//! other one. State that routing depends on (open transaction block, pin,
//! prepared statements, session settings) lives here; the rules live in
//! the router.

mod batch;
mod effects;
mod lease;
pub(crate) use lease::{first_backend, maintain};
mod local;
mod memo;
mod relay;
mod resolution;
mod settings;
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
use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::frontend::{self, Parse};
use pgsplit_protocol::{encode, frame, tag, Frame, ProtoError};
use pgsplit_router::route::{self, Choice, Freshness, Reason, SessionState};
use pgsplit_router::{Class, Stage, StmtKind, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{BackendConn, BackendError, Login};
use crate::cancel::{CancelHandle, Running};
use crate::config::{OnStale, ReadYourWrites, ReadYourWritesScope, User};
use crate::error::{Error, Warning};
use crate::Shared;
use batch::{Batch, Meta};
use effects::Reset;
use memo::Memo;
use settings::SettingsLog;
use statements::{idx, Statements, Stmt};
use vectored::Chunks;

/// A message or query sent whose ReadyForQuery has not come back.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    /// Extended-protocol batch (ends in Sync) rather than a simple Query.
    extended: bool,
    /// The cycle ends a block with COMMIT (its settings then persist).
    commits: bool,
    /// The cycle may commit a write (for read-your-writes).
    writes: bool,
    /// The proxy's own query (the WAL position after a write): its
    /// replies are consumed, never relayed.
    own: bool,
    /// One statement: when it fails, nothing of it was committed.
    single: bool,
    /// A read sent to the replica that is run again on the primary if the
    /// replica refuses it as a write (25006).
    retryable: bool,
    /// A COPY: nothing may be pipelined behind it (the server would take
    /// it for COPY data), so the WAL position is asked for afterwards.
    copy: bool,
    /// An autocommit write the proxy runs as a one-statement block (see
    /// `wrap`): its ReadyForQuery is not relayed, the closing COMMIT's is.
    wrapped: bool,
    /// The COMMIT or ROLLBACK the proxy sends to end a wrapped write: owed
    /// to the client, but only its ErrorResponse and ReadyForQuery are
    /// relayed.
    quiet: bool,
    /// It parses or runs a statement: an error for it reaches the
    /// application. (Drivers drop the answer to a lone Close or Sync.)
    runs: bool,
}

impl Pending {
    /// A cycle of the client's: a simple Query or a batch ending in Sync.
    fn client(
        seq: u64,
        extended: bool,
        class: &Class,
        writes: bool,
        copy: bool,
        retryable: bool,
    ) -> Pending {
        Pending {
            seq,
            extended,
            commits: class.kind == StmtKind::Commit,
            writes,
            own: false,
            copy,
            single: class.statements <= 1,
            retryable,
            wrapped: false,
            quiet: false,
            runs: true,
        }
    }

    /// A query of the proxy's own, answered to nobody.
    fn own(seq: u64) -> Pending {
        Pending {
            seq,
            extended: false,
            commits: false,
            writes: false,
            own: true,
            copy: false,
            single: false,
            retryable: false,
            wrapped: false,
            quiet: false,
            runs: false,
        }
    }
}

/// What a ParseComplete/CloseComplete from the backend answers.
///
/// Statements are recorded as existing when their Parse is sent, so a
/// pipelined Bind already sees them; a Parse that never completes (its
/// batch failed) is undone when the batch's ReadyForQuery arrives.
#[derive(Debug)]
enum Expect {
    /// The client's Parse; `existed` when the name was already defined (the
    /// server then refuses it with 42P05 and the old definition stays).
    ClientParse {
        name: String,
        raw: Bytes,
        class: Class,
        existed: bool,
        /// Content id of a named statement (0 for the unnamed one), and,
        /// for a duplicate, the id of the server statement it was sent as.
        id: u64,
        sent_as: u64,
    },
    InjectedParse {
        name: String,
        id: u64,
    },
    /// A Close the proxy sends ahead of a Parse of a named statement, so
    /// the server never refuses it as a duplicate: its CloseComplete is
    /// swallowed.
    InjectedClose,
    ClientClose {
        statement: Option<String>,
        /// A named statement the Close took out of the client's view when
        /// it was sent (so a Parse of the same name pipelined behind it is
        /// new): put back if the Close is skipped after an error.
        removed: Option<Box<(String, Stmt)>>,
    },
}

/// One backend connection plus the session's bookkeeping for it.
pub(crate) struct Backend {
    conn: BackendConn,
    pending: VecDeque<Pending>,
    expect: VecDeque<(u64, Expect)>,
    /// Bytes of a frame being streamed to the client that are still to come.
    passthrough: usize,
    status: TxStatus,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    errored: bool,
    /// The server sent FATAL (already reported to the client as ERROR).
    dead: bool,
    /// SET statements of the cycle in flight, logged once it succeeds.
    sets_in_flight: Vec<String>,
    /// Removals (DEALLOCATE, DISCARD ALL) of the cycle in flight, applied
    /// to the session's view once it succeeds.
    resets_in_flight: Vec<Reset>,
    /// Entries of the session's settings log applied on this connection.
    applied_sets: usize,
    /// The front cycle is retryable and nothing of its answer that
    /// commits to a result has arrived: its first bytes are held back.
    hold: bool,
    /// Bytes at the start of the read buffer held back (already scanned).
    held: usize,
    /// The replica refused the front cycle with 25006: its answer is
    /// dropped up to its ReadyForQuery, then it runs on the primary.
    retrying: bool,
    /// When the front cycle times out (`statement_timeout`), or, once
    /// `resolving`, when the proxy stops waiting for its outcome.
    deadline: Option<Instant>,
    /// The front cycle may have committed and passed its deadline: the
    /// proxy waits (bounded) for its true outcome.
    resolving: bool,
    /// The timeouts that apply to this connection's target.
    timeouts: crate::config::Effective,
    /// The id of the transaction open on this connection, once known
    /// (asked for behind its first write): what a lost COMMIT is
    /// resolved by.
    xid: Option<u64>,
    /// What the client gets if the extended-protocol COMMIT batch in flight
    /// (by its cycle number) commits: answered by the proxy when the answer
    /// itself is lost and the commit is resolved.
    commit_answer: Option<(u64, Bytes)>,
    opened: Instant,
    last_used: Instant,
    /// The room this connection takes in its pool; freed when it closes.
    lease: Option<crate::pool::Lease>,
    /// Fingerprint of the session settings applied on the connection when
    /// it was last returned (0: none), and whether they must be reset
    /// before the session that leased it now runs anything.
    carried: u64,
    reset_due: bool,
    /// Content ids of the named statements prepared on this connection
    /// (under `statements::server_name`), whoever prepared them: a cache
    /// shared by every session that leases it, emptied past
    /// [`PREPARED_CACHE`] entries.
    prepared: std::collections::HashSet<u64>,
}

/// Past this many statements prepared on one server connection, the next
/// session to use it deallocates them all first.
const PREPARED_CACHE: usize = 500;

impl Backend {
    pub(crate) fn new(conn: BackendConn, timeouts: crate::config::Effective) -> Backend {
        let now = Instant::now();
        Backend {
            lease: None,
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

    fn running(&self) -> Running {
        Running {
            endpoint: self.conn.endpoint.clone(),
            pid: self.conn.pid,
            secret: self.conn.secret,
        }
    }
}

/// A read sent to the replica that runs again on the primary if the
/// replica refuses it as a write (25006).
enum Retry {
    Query(Bytes),
    /// The batch in `Session::retry_frames` / `retry_meta`.
    Batch,
    /// A steady read (see `steady`): its block of messages, as sent.
    Block(Bytes),
}

/// A COPY FROM STDIN in progress: client frames go straight to `target`.
#[derive(Debug, Clone, Copy)]
struct CopyIn {
    target: Target,
    extended: bool,
    /// The cycle that runs it: a simple Query's COPYs end with its
    /// ReadyForQuery.
    seq: u64,
}

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

/// A client's session after a successful handshake.
pub(crate) struct Session {
    shared: Arc<Shared>,
    client: TcpStream,
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
    /// The pool of each target this session leases from.
    pools: [crate::pool::PoolId; 2],
    /// Counted in the pools' pinned sessions (see `lease`).
    pin_counted: bool,
    txn: Option<Target>,
    /// The backend holding the client's block was lost: answer 25P02
    /// until the client ends the block.
    virtual_failed: bool,
    /// It was lost while no statement of the client was running there: the
    /// next statement is told why (08006) rather than just 25P02.
    block_lost_unreported: Option<Target>,
    pinned: bool,
    /// A statement that may have released what pinned the session ran:
    /// check on the primary before the next read is kept off the replica.
    pin_check: bool,
    /// The statement or batch being routed may release a pin: once it has
    /// run, `pin_check` is set.
    releasing: bool,
    /// The pin holds state the pin check cannot see (see
    /// `effects::sticky_pin`): released only by `DISCARD ALL`.
    pin_sticky: bool,
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
    /// SET statements run inside the open block, logged if it commits.
    block_sets: Vec<String>,
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
    /// The Query of the retryable read in flight on the replica.
    retry: Option<Retry>,
    /// The replica refused `retry`: run it on the primary next.
    retry_due: bool,
    /// Of the retryable read in flight: the primary polls started when it
    /// was sent, and the replica's replay position known then.
    retry_sent: (u64, u64),
    /// The retry due is for an object the replica may not have replayed
    /// yet (the index of its SQLSTATE in `stats::MISSING`), not a write.
    retry_missing: Option<usize>,
    /// The batch of a retryable extended-protocol read (see `Retry::Batch`).
    retry_frames: Vec<Frame>,
    retry_meta: Vec<Meta>,
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
    /// The client's block was lost with its connection (not ended by a
    /// timeout the client was told of): its COMMIT is an error, never the
    /// "ROLLBACK" tag of a failed block.
    commit_refused: Option<Target>,
    /// A wrapped write has answered but for its ReadyForQuery, which the
    /// proxy's COMMIT (not sent yet) will bring.
    wrap_unended: bool,
    /// Completes when the proxy shuts down. Created once: waiting on it
    /// again costs nothing, where a fresh `cancelled()` per wait would
    /// register and unregister a waiter every time.
    shutdown: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
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
/// listens on, temporary relations, session advisory locks, cursors
/// `WITH HOLD` and SQL-level prepared statements.
const PIN_PROBE: &str = "SELECT (SELECT count(*) FROM pg_listening_channels()) \
     + (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) \
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

/// How long a failed replica is left alone before reads try it again.
const REPLICA_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        client: TcpStream,
        cbuf: BytesMut,
        user: User,
        database: String,
        params: Vec<(String, String)>,
        first: Box<Backend>,
        pools: [crate::pool::PoolId; 2],
        cancel: CancelHandle,
        shutdown: CancellationToken,
    ) -> Session {
        let mut backends = [None, None];
        let t = first.conn.target;
        let vars = vars::Vars::new(&shared.config);
        let iit = shared.config.timeouts.idle_in_transaction_timeout;
        let idle_in_transaction = (!iit.is_zero()).then_some(iit);
        let link = shared.replication.watch_link();
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
            client,
            cbuf,
            block: Bytes::new(),
            out: VecDeque::new(),
            scratch: BytesMut::new(),
            user,
            database,
            params,
            backends,
            pools,
            pin_counted: false,
            txn: None,
            virtual_failed: false,
            block_lost_unreported: None,
            pinned: false,
            pin_check: false,
            bound_soft: false,
            pin_sticky: false,
            releasing: false,
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
            block_sets: Vec::new(),
            seq: 0,
            vars,
            write_lsn: 0,
            wrote_at: None,
            last_route: (Target::Replica, Reason::Read),
            lsn_due: None,
            ignore_lsn: false,
            retry: None,
            retry_due: false,
            retry_sent: (0, 0),
            retry_missing: None,
            retry_frames: Vec::new(),
            retry_meta: Vec::new(),
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
            wrap_unended: false,
            commit_refused: None,
            shutdown: Box::pin(shutdown.cancelled_owned()),
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
        self.release_all().await;
        res
    }

    async fn run_inner(&mut self) -> Result<(), Error> {
        loop {
            self.flush_client().await?;
            self.release_idle();
            if self.lsn_due.is_some() && self.copy_in.is_none() {
                self.send_due_lsn_query().await?;
            }
            if self.retry_due {
                self.run_due_retry().await?;
            }
            let busy = [self.busy(Target::Primary), self.busy(Target::Replica)];
            // A pinned primary can speak unasked (NotificationResponse of a
            // LISTEN, a FATAL on shutdown): read it while the client is idle.
            let primary_open = self.backends[idx(Target::Primary)].is_some();
            let watch = [busy[0] || (self.pinned && primary_open), busy[1]];
            let idle = !busy[0] && !busy[1] && self.txn.is_none() && self.copy_in.is_none();
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
                link,
                alarm,
                ..
            } = self;
            let [p, r] = backends;
            enum Ev {
                Client(std::io::Result<usize>),
                Backend(Target, std::io::Result<usize>),
                Alarm,
                Link,
                Shutdown,
            }
            let ev = tokio::select! {
                biased;
                res = read_backend(p), if watch[0] => Ev::Backend(Target::Primary, res),
                res = read_backend(r), if watch[1] => Ev::Backend(Target::Replica, res),
                res = client.read_buf(cbuf) => Ev::Client(res),
                _ = alarm.as_mut(), if armed => Ev::Alarm,
                _ = link.changed(), if busy[0] => Ev::Link,
                _ = shutdown.as_mut(), if idle => Ev::Shutdown,
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
                    if self.idle_in_transaction.is_some() {
                        self.idle_since = Instant::now();
                    }
                    if let Flow::Exit = self.process_client().await? {
                        return Ok(());
                    }
                }
                Ev::Backend(t, Ok(n)) if n > 0 => self.on_backend_data(t)?,
                Ev::Backend(t, _) => self.backend_lost(t)?,
                Ev::Shutdown => return Err(Error::ShuttingDown),
            }
        }
    }

    /// Handles every whole frame in the client buffer.
    async fn process_client(&mut self) -> Result<Flow, Error> {
        let max = self.shared.config.max_message_bytes;
        let flow = 'read: loop {
            let Some(mut block) = frame::decode_block(&mut self.cbuf, max)? else {
                break Flow::Continue;
            };
            if self.steady_read(&block) {
                if self.steady_parts.is_empty() {
                    self.send_raw(Target::Replica, std::slice::from_ref(&block))
                        .await?;
                } else {
                    let parts = std::mem::take(&mut self.steady_parts);
                    let res = self.send_raw(Target::Replica, &parts).await;
                    self.steady_parts = parts;
                    self.steady_parts.clear();
                    res?;
                }
                continue;
            }
            self.block = block.clone();
            while let Some(f) = frame::next_in(&mut block) {
                let cap = self.shared.config.routing.batch_buffer_bytes;
                if self.only_batches(&f) && self.batch.bytes + f.len() <= cap {
                    // The common case, without an await: a message held
                    // for the batch its Sync will dispatch.
                    self.batch_push(f)?;
                    continue;
                }
                if let Flow::Exit = self.on_client_frame(f).await? {
                    break 'read Flow::Exit;
                }
            }
            // Not kept past its frames: an idle session would hold the
            // last (possibly large) read.
            self.block = Bytes::new();
        };
        if !self.copy_data.is_empty() {
            self.flush_copy().await?;
        }
        Ok(flow)
    }

    /// Writes the COPY data gathered from one read of the client in one go.
    async fn flush_copy(&mut self) -> Result<(), Error> {
        if self.copy_data.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.copy_data);
        self.copy_data_bytes = 0;
        let res = match self.copy_in {
            Some(c) if self.backends[idx(c.target)].is_some() => {
                self.send_raw(c.target, &chunks).await
            }
            _ => Ok(()),
        };
        self.copy_data = chunks;
        self.copy_data.clear();
        res
    }

    async fn on_client_frame(&mut self, f: Frame) -> Result<Flow, Error> {
        use tag::frontend as t;
        if let Some(copy) = self.copy_in {
            match f.tag() {
                t::COPY_DATA | t::COPY_DONE | t::COPY_FAIL | t::SYNC | t::FLUSH => {
                    let ends = matches!(f.tag(), t::COPY_DONE | t::COPY_FAIL);
                    self.copy_data_bytes += f.len();
                    vectored::push_joined(&mut self.copy_data, &self.block, f.raw());
                    if ends || self.copy_data_bytes >= COPY_FLUSH_BYTES {
                        self.flush_copy().await?;
                    }
                    if ends && copy.extended {
                        self.copy_in = None;
                        // The Sync that follows belongs to the copy's backend.
                        self.bound = Some(copy.target);
                    }
                    // A simple Query may hold several COPYs (`copy a from
                    // stdin; copy b from stdin`): its copy data keeps going
                    // to that server until the Query's ReadyForQuery, or
                    // until the client sends something else.
                    return Ok(Flow::Continue);
                }
                _ => {
                    self.flush_copy().await?;
                    self.copy_in = None;
                }
            }
        }
        if self.skip_until_sync {
            if f.tag() == t::SYNC {
                self.skip_until_sync = false;
                self.bound = None;
                self.batch.clear();
                self.drain_all().await?;
                self.push_ready();
            }
            return Ok(Flow::Continue);
        }
        match f.tag() {
            t::QUERY => {
                if !self.batch.is_empty() {
                    self.dispatch_batch(false).await?;
                }
                self.on_query(f).await?;
            }
            t::PARSE | t::BIND | t::DESCRIBE | t::EXECUTE | t::CLOSE => {
                self.batch_push(f)?;
                if self.batch.bytes > self.shared.config.routing.batch_buffer_bytes {
                    self.dispatch_batch(false).await?;
                }
            }
            t::SYNC => {
                self.batch_push(f)?;
                self.dispatch_batch(true).await?;
            }
            t::FLUSH => {
                self.batch_push(f)?;
                self.dispatch_batch(false).await?;
            }
            t::FUNCTION_CALL => {
                // Fast-path calls (large objects) may write.
                let class = Class {
                    kind: StmtKind::Write,
                    ..EMPTY
                };
                self.batch.add_class(class);
                self.batch_push(f)?;
                self.dispatch_batch(true).await?;
            }
            t::TERMINATE => return Ok(Flow::Exit),
            // Outside COPY a server ignores these too.
            t::COPY_DATA | t::COPY_DONE | t::COPY_FAIL => {}
            _ => {
                return Err(ProtoError::Malformed {
                    what: "frontend (invalid message type)",
                }
                .into())
            }
        }
        Ok(Flow::Continue)
    }

    /// Whether `f` is only added to the batch (see `on_client_frame`).
    fn only_batches(&self, f: &Frame) -> bool {
        use tag::frontend as t;
        self.copy_in.is_none()
            && !self.skip_until_sync
            && matches!(
                f.tag(),
                t::PARSE | t::BIND | t::DESCRIBE | t::EXECUTE | t::CLOSE
            )
    }

    fn batch_push(&mut self, f: Frame) -> Result<(), Error> {
        let (mut meta, text) = batch::locate(f.tag(), f.body(), EMPTY)?;
        match &mut meta {
            Meta::Parse { class, .. } => {
                let sql = text;
                *class = self.classify(sql);
                if matches!(class.kind, StmtKind::Read | StmtKind::Session)
                    && vars::parse(sql).is_some()
                {
                    self.batch.local = true;
                }
                if (self.pinned || class.kind == StmtKind::Pin) && effects::may_unpin(sql) {
                    self.releasing = true;
                }
                if class.kind == StmtKind::Pin && effects::sticky_pin(sql) {
                    self.pin_sticky = true;
                }
                if class.kind == StmtKind::Write {
                    self.close_idle_for_database_ddl(sql);
                }
                self.shared.stats.count_class(class);
                self.batch.add_class(*class);
            }
            Meta::Uses { .. } => {
                let name = text;
                if let Some(c) = self.statement_class(name) {
                    self.batch.add_class(c);
                }
                if self.stmts.get(name).is_some_and(|s| s.local) {
                    self.batch.local = true;
                }
            }
            _ => {}
        }
        self.batch.push(f, meta);
        Ok(())
    }

    /// Classifies a statement, remembering the last few.
    fn classify(&mut self, sql: &str) -> Class {
        let classifier = &self.shared.classifier;
        self.memo.class(
            sql,
            |s| classifier.classify(s),
            |s| classifier.learned_write(s),
        )
    }

    fn statement_class(&self, name: &str) -> Option<Class> {
        self.batch
            .local_class(name)
            .or_else(|| self.stmts.get(name).map(|s| s.class))
    }

    fn state(&self) -> SessionState {
        SessionState {
            txn: self.txn,
            pinned: self.pinned,
            bound: self.bound,
            replica: self.freshness(),
        }
    }

    /// Whether the replica may serve this session's reads now.
    fn freshness(&self) -> Freshness {
        let rep = &self.shared.replication;
        if self.shared.config.routing.on_stale != OnStale::Replica
            && rep.stale(self.vars.max_staleness).is_some()
        {
            return Freshness::Stale;
        }
        let behind = match self.vars.read_your_writes {
            ReadYourWrites::Lsn => {
                let lsn = if self.shared.config.routing.read_your_writes_scope
                    == ReadYourWritesScope::Proxy
                {
                    self.write_lsn.max(rep.written_lsn())
                } else {
                    self.write_lsn
                };
                lsn > 0 && !rep.replayed(lsn)
            }
            ReadYourWrites::Session => self.wrote_at.is_some(),
            ReadYourWrites::Window => self
                .wrote_at
                .is_some_and(|at| at.elapsed() < self.vars.window),
            ReadYourWrites::Off => false,
        };
        if behind || (self.vars.min_lsn > 0 && !rep.replayed(self.vars.min_lsn)) {
            Freshness::BehindWrites
        } else {
            Freshness::Fresh
        }
    }

    /// A lone Flush: to the backend still answering, if any.
    async fn forward_flush(&mut self) -> Result<(), Error> {
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

    /// The start of a batch (Parse/Describe) went to the replica, and its
    /// rest needs the primary: the replica's implicit transaction is ended
    /// with a Sync of the proxy's own, and the rest goes to the primary,
    /// where the statements are prepared on the fly.
    async fn unbind_soft(&mut self) -> Result<(), Error> {
        self.bound = None;
        self.bound_soft = false;
        let Some(b) = self.backends[idx(Target::Replica)].as_mut() else {
            return Ok(());
        };
        b.pending.push_back(Pending {
            extended: true,
            ..Pending::own(self.seq)
        });
        self.send_raw(Target::Replica, &[Bytes::from_static(SYNC)])
            .await
    }

    /// A Parse/Describe sent ahead to the replica, never executed (asyncpg
    /// prepares to learn a COPY's columns, then runs it): if what comes
    /// next (`class`) needs the primary, it is ended there first.
    async fn unbind_soft_for(&mut self, class: &Class) -> Result<(), Error> {
        if self.bound_soft && self.bound == Some(Target::Replica) && self.txn.is_none() {
            let unbound = SessionState {
                bound: None,
                ..self.state()
            };
            if route::route(class, &unbound).choice == Choice::Primary {
                self.unbind_soft().await?;
            }
        }
        Ok(())
    }

    /// Whether the batch being dispatched runs a COPY (checked only for
    /// batches that write).
    fn batch_has_copy(&self) -> bool {
        self.batch
            .frames
            .iter()
            .zip(&self.batch.meta)
            .any(|(f, m)| match *m {
                Meta::Parse { sql, .. } => effects::has_copy(batch::text(f, sql.0, sql.1)),
                Meta::Uses { start, end } => self
                    .stmts
                    .get(batch::text(f, start, end))
                    .and_then(|s| Parse::parse(&s.parse[frame::HEADER_BYTES..]).ok())
                    .is_some_and(|p| effects::has_copy(p.sql)),
                _ => false,
            })
    }

    /// Sends the WAL-position query a finished COPY left due.
    async fn send_due_lsn_query(&mut self) -> Result<(), Error> {
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

    /// Whether a statement just routed to `target` is a read the replica
    /// may refuse and the proxy can run again on the primary: outside a
    /// block, routed as a read, and nothing else in flight there.
    fn retryable_read(&self, target: Target) -> bool {
        target == Target::Replica
            && self.txn.is_none()
            && self.last_route.1 == Reason::Read
            && self.backends[idx(target)]
                .as_ref()
                .is_some_and(|b| b.pending.is_empty())
    }

    /// Records a client cycle sent to `t` (a retryable one holds its first
    /// replies back); returns the backend.
    fn client_cycle(&mut self, t: Target, p: Pending) -> &mut Backend {
        if p.retryable {
            let rep = &self.shared.replication;
            self.retry_sent = (rep.polls_started(), rep.replay_lsn().unwrap_or(0));
        }
        let b = self.backends[idx(t)].as_mut().expect("ensured");
        b.hold = p.retryable;
        b.held = 0;
        b.pending.push_back(p);
        b
    }

    /// Whether a cycle of `kind` sent to `t` may commit a write.
    fn commits_write(&self, kind: StmtKind, t: Target) -> bool {
        t == Target::Primary
            && match kind {
                StmtKind::Commit => true,
                StmtKind::Write | StmtKind::Pin | StmtKind::Unknown => self.txn.is_none(),
                _ => false,
            }
    }

    /// Whether the id of the primary's open transaction is worth asking
    /// for behind a cycle of `class`: it may write inside a block (or open
    /// one and write), and the id is not known yet.
    fn wants_xid(&self, class: &Class, t: Target) -> bool {
        use crate::config::CommitResolution;
        t == Target::Primary
            && self.shared.config.timeouts.commit_resolution != CommitResolution::Off
            && matches!(
                class.kind,
                StmtKind::Write | StmtKind::Pin | StmtKind::Unknown
            )
            && (self.txn == Some(t) || class.statements > 1)
            && self.backends[idx(t)]
                .as_ref()
                .is_some_and(|b| b.xid.is_none())
    }

    /// Behind a cycle sent to `t`, when its answer is needed: the proxy's
    /// own query, pipelined on the same connection (no extra round trip;
    /// its replies are consumed). It asks for the WAL insert position
    /// after a write that may have committed (`lsn`, used in `lsn` mode;
    /// `pg_current_wal_insert_lsn()` is at or after the commit record even
    /// with `synchronous_commit = off`) and for the id of the transaction
    /// left open (`xid`), which resolves a COMMIT whose answer is lost.
    fn push_own_query(&mut self, t: Target, seq: u64, out: &mut Vec<Bytes>, lsn: bool, xid: bool) {
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

    /// Picks the backend for a decision, preferring an open connection
    /// when any will do.
    fn resolve(&self, choice: Choice) -> Target {
        match choice {
            Choice::Primary => Target::Primary,
            Choice::Replica => Target::Replica,
            Choice::AnyOpen => {
                // A backend still answering keeps replies in order for free.
                if self.busy(Target::Primary) {
                    Target::Primary
                } else if self.busy(Target::Replica)
                    || self.backends[idx(Target::Replica)].is_some()
                {
                    Target::Replica
                } else if self.backends[idx(Target::Primary)].is_some() {
                    Target::Primary
                } else {
                    Target::Replica
                }
            }
        }
    }

    async fn on_query(&mut self, f: Frame) -> Result<(), Error> {
        if self.retry.is_some() || self.retry_due {
            self.settle_retry().await?;
        }
        let sql = frontend::query(f.body())?;
        let class = self.classify(sql);
        self.shared.stats.count_class(&class);
        if self.virtual_failed {
            self.drain_all().await?;
            self.answer_failed_block(class.kind, None);
            return Ok(());
        }
        if matches!(class.kind, StmtKind::Read | StmtKind::Session) && class.statements == 1 {
            if let Some(cmd) = vars::parse(sql) {
                self.drain_all().await?;
                self.answer_var(cmd);
                return Ok(());
            }
        }
        self.unbind_soft_for(&class).await?;
        if class.kind == StmtKind::Write {
            self.close_idle_for_database_ddl(sql);
        }
        let fx = effects::of_query(sql, &class);
        if (self.pinned || class.kind == StmtKind::Pin) && effects::may_unpin(sql) {
            self.releasing = true;
        }
        if class.kind == StmtKind::Pin && effects::sticky_pin(sql) {
            self.pin_sticky = true;
        }
        if let [Reset::Deallocate(name)] = fx.resets.as_slice() {
            if class.statements == 1 && self.stmts.get(name).is_some() {
                // A protocol-level statement lives on whichever backends
                // needed it: the proxy closes it there itself.
                let name = name.clone();
                self.drain_all().await?;
                if self.client_status() != TxStatus::Failed {
                    self.stmts.close(&name);
                    self.push_own(|b| encode::command_complete(b, "DEALLOCATE"));
                    self.push_ready();
                    return Ok(());
                }
            }
        }
        let target = match self.target_for(&class).await {
            Ok(t) => t,
            Err(e) => {
                self.push_error(&e);
                self.push_ready();
                return Ok(());
            }
        };
        self.seq += 1;
        let seq = self.seq;
        let writes = self.commits_write(class.kind, target);
        let copy = writes && effects::has_copy(sql);
        let retryable = self.retryable_read(target);
        if retryable {
            self.retry = Some(Retry::Query(f.raw().clone()));
        }
        let wrap = writes
            && !copy
            && class.statements == 1
            && self.wraps(class.kind, target)
            && effects::wrappable_write(sql);
        let mut outgoing = std::mem::take(&mut self.outgoing);
        if wrap {
            self.push_begin(target, seq, &mut outgoing);
        }
        // Recorded before the write, so a failed write answers this query.
        let b = self.client_cycle(
            target,
            Pending {
                wrapped: wrap,
                writes: writes && !wrap,
                single: class.statements <= 1 && !(writes && effects::commits_on_its_own(sql)),
                ..Pending::client(seq, false, &class, writes, copy, retryable)
            },
        );
        b.sets_in_flight.extend(fx.sets);
        if !fx.resets.is_empty() {
            // DEALLOCATE or DISCARD ALL there: what the connection keeps
            // is known again when it is next used.
            b.prepared.clear();
        }
        b.resets_in_flight.extend(fx.resets);
        self.cancel.set_active(Some(idx(target)));
        // A simple query ends the unnamed prepared statement on that server,
        // and ends an extended-protocol batch sent in part before it.
        self.stmts.mark_off("", target);
        self.bound = None;
        // A client may send its COPY data right behind the COPY, before the
        // server's CopyInResponse (asyncpg does): from now on its CopyData
        // goes to this server. (Should the COPY fail instead, the server
        // ignores stray CopyData, and the client's next message ends this.)
        if class.kind.needs_primary() && effects::has_copy(sql) {
            self.copy_in = Some(CopyIn {
                target,
                extended: false,
                seq,
            });
        }
        let xid = wrap || (self.wants_xid(&class, target) && !effects::has_copy(sql));
        outgoing.push(f.into_bytes());
        if (writes && !copy) || xid {
            self.push_own_query(target, seq, &mut outgoing, writes && !wrap, xid);
        }
        let res = self.send_raw(target, &outgoing).await;
        outgoing.clear();
        self.outgoing = outgoing;
        res?;
        if wrap {
            self.finish_wrap(target, seq).await?;
        }
        Ok(())
    }

    /// Routes `class`, makes sure the backend is connected and caught up,
    /// and drains the other backend so replies stay in order.
    async fn target_for(&mut self, class: &Class) -> Result<Target, Error> {
        // Replies must reach the client in order, and a reply still in flight
        // on the other backend can change the decision (its ReadyForQuery may
        // open or end a block), so that backend is drained first and the
        // decision taken again. Batches to the same backend stay pipelined.
        if self.pin_check && self.txn.is_none() && self.bound.is_none() {
            let unpinned = SessionState {
                pinned: false,
                ..self.state()
            };
            if route::route(class, &unpinned).choice != Choice::Primary {
                self.recheck_pin().await?;
            }
        }
        let mut waited = false;
        let (decision, wanted) = loop {
            let decision = route::route(class, &self.state());
            let wanted = self.resolve(decision.choice);
            if self.busy(other(wanted)) {
                self.drain(other(wanted)).await?;
                continue;
            }
            if self.lsn_due.is_some() && self.copy_in.is_none() {
                // A COPY just wrote: learn its WAL position before deciding.
                self.send_due_lsn_query().await?;
                continue;
            }
            if decision.reason == Reason::ReadYourWrites && !waited && !self.vars.max_wait.is_zero()
            {
                // Worth a short wait when the replica is about to catch up
                // and the primary is a slow tunnel away.
                waited = true;
                if self.wait_for_replica().await {
                    continue;
                }
            }
            break (decision, wanted);
        };
        self.shared.stats.count_route(&decision);
        let fallback = self.bound.is_none() && self.txn.is_none();
        let rep = &self.shared.replication;
        if decision.reason == Reason::Stale && self.shared.config.routing.on_stale == OnStale::Error
        {
            if let Some(st) = rep.stale(self.vars.max_staleness) {
                return Err(Error::StaleReplica(st, self.vars.max_staleness));
            }
        }
        let target = match self.ensure(wanted, fallback).await {
            Ok(t) => t,
            // A read sent to the primary only for freshness: with the
            // primary gone, the replica serves it, and says so.
            Err(Error::PrimaryUnreachable(cause))
                if matches!(decision.reason, Reason::ReadYourWrites | Reason::Stale) =>
            {
                match Box::pin(self.ensure(Target::Replica, false)).await {
                    Ok(t) => {
                        let w = match self.shared.replication.stale(self.vars.max_staleness) {
                            Some(st) => Warning::ServedStale(st),
                            None => Warning::ServedBehindWrites,
                        };
                        self.push_own(|b| w.write_to(b));
                        t
                    }
                    Err(_) => return Err(Error::NothingReachable(cause)),
                }
            }
            Err(e) => return Err(e),
        };
        if target == Target::Replica
            && self.shared.config.routing.on_stale == OnStale::Replica
            && !class.kind.needs_primary()
        {
            if let Some(st) = self.shared.replication.stale(self.vars.max_staleness) {
                self.push_own(|b| Warning::ServedStale(st).write_to(b));
            }
        }
        self.last_route = (target, decision.reason);
        if self.report_lag {
            let lag = self.shared.replication.lag_ms();
            if self.reported_lag != Some(lag) {
                self.reported_lag = Some(lag);
                let v = lag.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
                self.push_own(|b| encode::parameter_status(b, "pgsplit_replica_lag_ms", &v));
            }
        }
        if decision.pin {
            self.pinned = true;
        }
        if std::mem::take(&mut self.releasing) && self.pinned {
            self.pin_check = true;
        }
        debug!(target = ?target, reason = decision.reason.as_str(), kind = ?class.kind, "routed");
        match self.prepare_backend(target).await {
            Ok(()) => Ok(target),
            // The replica cannot take a setting the primary holds (`SET
            // ROLE` of a role it has not replayed yet): the statement runs
            // on the primary, never on the replica under other settings.
            Err(Error::SettingNotApplied { .. })
                if target == Target::Replica && fallback && !class.kind.needs_primary() =>
            {
                self.drain(Target::Replica).await?;
                let t = Box::pin(self.ensure(Target::Primary, false)).await?;
                self.prepare_backend(t).await?;
                self.last_route = (t, Reason::Setting);
                Ok(t)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `max_wait_for_replica` for the replica to reach this
    /// session's writes; true when it did.
    async fn wait_for_replica(&mut self) -> bool {
        let deadline = Instant::now() + self.vars.max_wait;
        let shared = self.shared.clone();
        let _waiting = shared.replication.wait_for_replay();
        loop {
            if self.freshness() == Freshness::Fresh {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(std::time::Duration::from_millis(2));
            tokio::time::sleep(step).await;
        }
    }

    /// Asks the primary whether the state that pinned the session is still
    /// there; unpins it when nothing is left.
    async fn recheck_pin(&mut self) -> Result<(), Error> {
        self.pin_check = false;
        if !self.pinned || self.pin_sticky {
            return Ok(());
        }
        self.drain(Target::Primary).await?;
        let Some(b) = self.backends[idx(Target::Primary)].as_mut() else {
            return Ok(());
        };
        let mut notifications = Vec::new();
        let res = b.conn.query_row(PIN_PROBE, &mut notifications).await;
        self.out.extend(notifications);
        match res {
            Ok(Ok(row)) if row.first().is_some_and(|n| n.as_deref() == Some("0")) => {
                debug!("pinned state released; reads return to the replica");
                self.pinned = false;
            }
            Ok(Ok(_)) => {}
            Ok(Err(code)) => warn!(code, "checking the session's pin failed"),
            Err(_) => {
                self.backends[idx(Target::Primary)] = None;
                self.stmts.forget_backend(Target::Primary);
                return Err(Error::PinnedStateLost);
            }
        }
        Ok(())
    }

    /// Before the next statement: a retryable read still on the replica is
    /// answered first, and if the replica refused it, it runs again on the
    /// primary, so replies stay in order.
    async fn settle_retry(&mut self) -> Result<(), Error> {
        if self.retry.is_some() {
            self.drain(Target::Replica).await?;
        }
        self.run_due_retry().await
    }

    /// Runs the read the replica refused with 25006 on the primary, and
    /// remembers its text as a write.
    async fn run_due_retry(&mut self) -> Result<(), Error> {
        if !std::mem::take(&mut self.retry_due) {
            return Ok(());
        }
        let raw = match self.retry.take() {
            None => return Ok(()),
            Some(Retry::Batch) => return self.retry_batch().await,
            Some(Retry::Block(block)) => {
                self.unpack_steady(block);
                return self.retry_batch().await;
            }
            Some(Retry::Query(raw)) => raw,
        };
        let Ok(sql) = frontend::query(&raw[frame::HEADER_BYTES..]) else {
            return Ok(());
        };
        let missing = self.retry_missing.take();
        self.count_retry(missing);
        let class = if missing.is_some() {
            debug!("the replica lacks what a read names; running it on the primary");
            Class {
                kind: StmtKind::Read,
                hint: Some(Target::Primary),
                statements: 1,
                ..EMPTY
            }
        } else {
            debug!("the replica refused a read as a write; running it on the primary");
            self.shared.classifier.learn_write(sql);
            self.memo.forget(sql);
            Class {
                kind: StmtKind::Write,
                statements: 1,
                ..EMPTY
            }
        };
        let target = match self.target_for(&class).await {
            Ok(t) => t,
            Err(e) => {
                self.push_error(&e);
                self.push_ready();
                return Ok(());
            }
        };
        self.seq += 1;
        let seq = self.seq;
        let b = self.backends[idx(target)].as_mut().expect("ensured");
        let writes = missing.is_none();
        b.pending.push_back(Pending {
            writes,
            own: false,
            single: true,
            ..Pending::own(seq)
        });
        self.cancel.set_active(Some(idx(target)));
        self.stmts.mark_off("", target);
        let mut out = vec![raw];
        self.push_own_query(target, seq, &mut out, writes, false);
        self.send_raw(target, &out).await
    }

    /// Counts a read run again on the primary, by why.
    fn count_retry(&self, missing: Option<usize>) {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.shared.stats;
        match missing {
            Some(i) => stats.retried_missing[i].fetch_add(1, Relaxed),
            None => stats.retried_on_primary.fetch_add(1, Relaxed),
        };
    }

    /// Whether the replica may have failed the retryable read in flight
    /// only for want of what it has not replayed yet: unless a primary
    /// position read after the read was sent is no further than what the
    /// replica had replayed before it, or nothing can be asked of the
    /// primary.
    fn replica_may_lack(rep: &crate::replication::Replication, sent: (u64, u64)) -> bool {
        if rep.primary_link_down() {
            return false;
        }
        let (polls, replayed) = sent;
        !rep.primary_sampled_after(polls)
            .is_some_and(|p| p <= replayed && replayed > 0)
    }

    /// An extended-protocol batch the replica refused (25006): its
    /// statements are learned as writes, forgotten on the replica, and the
    /// batch runs again on the primary.
    async fn retry_batch(&mut self) -> Result<(), Error> {
        let frames = std::mem::take(&mut self.retry_frames);
        let mut meta = std::mem::take(&mut self.retry_meta);
        let missing = self.retry_missing.take();
        self.count_retry(missing);
        if missing.is_some() {
            debug!("the replica lacks what a batch names; running it on the primary");
            for (f, m) in frames.iter().zip(&meta) {
                if let Meta::Parse { name_end, .. } = *m {
                    // Parsed afresh on the primary by this batch's own Parse.
                    self.stmts.close(batch::text(f, 0, name_end));
                }
            }
            let current = std::mem::take(&mut self.batch);
            self.batch.frames = frames;
            self.batch.meta = meta;
            self.batch.class = Some(Class {
                kind: StmtKind::Read,
                hint: Some(Target::Primary),
                statements: 1,
                ..EMPTY
            });
            let res = Box::pin(self.dispatch_batch(true)).await;
            self.batch = current;
            return res;
        }
        debug!("the replica refused a batch as a write; running it on the primary");
        for (f, m) in frames.iter().zip(meta.iter_mut()) {
            match m {
                Meta::Parse {
                    name_end,
                    sql,
                    class,
                } => {
                    let text = batch::text(f, sql.0, sql.1);
                    self.shared.classifier.learn_write(text);
                    self.memo.forget(text);
                    class.kind = StmtKind::Write;
                    // Defined on the replica by this batch: start afresh, so
                    // the primary gets it from this batch's own Parse.
                    self.stmts.close(batch::text(f, 0, *name_end));
                }
                Meta::Uses { start, end } => self.stmts.mark_write(batch::text(f, *start, *end)),
                _ => {}
            }
        }
        // The batch being assembled (this retry may run just before it is
        // dispatched) waits its turn.
        let current = std::mem::take(&mut self.batch);
        self.batch.frames = frames;
        self.batch.meta = meta;
        self.batch.class = Some(Class {
            kind: StmtKind::Write,
            statements: 1,
            ..EMPTY
        });
        let res = Box::pin(self.dispatch_batch(true)).await;
        self.batch = current;
        res
    }

    /// Relays everything both backends still owe the client, before the
    /// proxy answers something itself.
    async fn drain_all(&mut self) -> Result<(), Error> {
        self.drain(Target::Primary).await?;
        self.drain(Target::Replica).await
    }

    async fn dispatch_batch(&mut self, synced: bool) -> Result<(), Error> {
        if self.retry.is_some() || self.retry_due {
            self.settle_retry().await?;
        }
        use tag::frontend as t;
        if !synced && self.batch.frames.iter().all(|f| f.tag() == t::FLUSH) {
            // A lone Flush (psycopg sends one leaving pipeline mode) asks for
            // nothing new: pass it to a server that still owes replies.
            return self.forward_flush().await;
        }
        // Parse/Describe only, sent ahead with a Flush (asyncpg's first run
        // of every statement): no effects yet, so it goes where its class
        // says and may still move before its Sync.
        let soft = !synced
            && self
                .batch
                .frames
                .iter()
                .all(|f| matches!(f.tag(), t::PARSE | t::DESCRIBE | t::FLUSH));
        let mut class = self.batch.class.unwrap_or(EMPTY);
        self.unbind_soft_for(&class).await?;
        if !synced
            && !soft
            && self.bound.is_none()
            && self.txn.is_none()
            && !class.kind.needs_primary()
        {
            // Part of a batch goes out before its Sync: the rest runs in the
            // same implicit transaction and may write, so it starts where
            // writes can run.
            class.kind = StmtKind::Write;
        }
        let closes_only = self.batch_only_closes();
        let named_closes_only = closes_only
            && synced
            && self.copy_in.is_none()
            && self
                .batch
                .meta
                .iter()
                .any(|m| matches!(m, Meta::CloseStatement { .. }))
            && self.batch.meta.iter().all(|m| match *m {
                Meta::CloseStatement { start, end } => end > start,
                Meta::Other => true,
                _ => false,
            });
        if (self.virtual_failed && closes_only) || named_closes_only {
            // Closing statements works in a failed block, as on a server;
            // and it is not where the client learns its block was lost
            // (drivers drop these answers). A named statement's server
            // copies are only cache: closing it is the proxy's own business,
            // and costs no server a message (nor the replica a cycle in
            // flight that would keep the client's next read from being run
            // again elsewhere).
            self.drain_all().await?;
            for (f, m) in self.batch.frames.iter().zip(&self.batch.meta) {
                if let Meta::CloseStatement { start, end } = *m {
                    let name = batch::text(f, start, end).to_owned();
                    self.stmts.close(&name);
                }
            }
            let closes = self
                .batch
                .frames
                .iter()
                .filter(|f| f.tag() == tag::frontend::CLOSE)
                .count();
            for _ in 0..closes {
                self.push_own(|b| encode::message(b, tag::backend::CLOSE_COMPLETE, |_| {}));
            }
            self.batch.clear();
            if synced {
                self.push_ready();
            }
            return Ok(());
        }
        if self.virtual_failed {
            self.drain_all().await?;
            if matches!(class.kind, StmtKind::Rollback | StmtKind::Commit) {
                // A failed block still parses the statement that ends it
                // (drivers prepare their ROLLBACK): it exists for the
                // client, on no server yet.
                for (f, m) in self.batch.frames.iter().zip(&self.batch.meta) {
                    if let Meta::Parse {
                        name_end, class, ..
                    } = *m
                    {
                        let name = batch::text(f, 0, name_end);
                        self.stmts.define_nowhere(name, f.raw().clone(), class);
                    }
                }
            }
            let frames = std::mem::take(&mut self.batch.frames);
            self.batch.clear();
            self.answer_failed_block(class.kind, Some(&frames));
            self.batch.frames = frames;
            self.batch.frames.clear();
            if !synced {
                self.skip_until_sync = true;
            }
            return Ok(());
        }
        if self.batch_is_local() {
            return self.answer_local_batch(synced).await;
        }
        let target = match self.target_for(&class).await {
            Ok(t) => t,
            Err(e) => {
                self.batch.clear();
                self.push_error(&e);
                if synced {
                    self.bound = None;
                    self.push_ready();
                } else {
                    self.skip_until_sync = true;
                }
                return Ok(());
            }
        };
        self.seq += 1;
        let seq = self.seq;
        let mut outgoing = std::mem::take(&mut self.outgoing);
        let wrap = synced
            && self.commits_write(class.kind, target)
            && self.wraps(class.kind, target)
            && self.batch_wrappable();
        if wrap {
            self.push_begin(target, seq, &mut outgoing);
        }
        {
            let b = self.backends[idx(target)].as_mut().expect("ensured");
            for (f, m) in self.batch.frames.iter().zip(&self.batch.meta) {
                // A named statement goes to the server under its server name.
                let mut as_sent = None;
                match *m {
                    Meta::Parse {
                        name_end,
                        sql,
                        class,
                    } => {
                        if matches!(class.kind, StmtKind::Session | StmtKind::Write) {
                            let fx = effects::of_query(batch::text(f, sql.0, sql.1), &class);
                            b.sets_in_flight.extend(fx.sets);
                            if !fx.resets.is_empty() {
                                b.prepared.clear();
                            }
                            b.resets_in_flight.extend(fx.resets);
                        }
                        let name = batch::text(f, 0, name_end);
                        let existing = (!name.is_empty()).then(|| self.stmts.get(name)).flatten();
                        let (existed, id, sent_as) = match existing {
                            Some(s) => {
                                // Sent as the existing statement, which the
                                // server must have, so it refuses the
                                // duplicate as one server would (42P05).
                                let old = s.id;
                                if !b.prepared.contains(&old) {
                                    inject_parse(b, &mut outgoing, seq, name, s);
                                }
                                let id = statements::content_id(f.body(), name_end);
                                let n = statements::server_name(old);
                                as_sent = Some(statements::renamed(f.raw(), 0, name_end, &n));
                                (true, id, old)
                            }
                            None => {
                                self.stmts.define(name, f.raw().clone(), class, target);
                                match self.stmts.get(name).filter(|_| !name.is_empty()) {
                                    Some(s) => {
                                        // A Close first: the connection
                                        // may hold it already.
                                        outgoing.push(statements::server_close(s.id));
                                        b.expect.push_back((seq, Expect::InjectedClose));
                                        b.prepared.insert(s.id);
                                        as_sent = Some(s.server.clone());
                                        (false, s.id, s.id)
                                    }
                                    None => (false, 0, 0),
                                }
                            }
                        };
                        b.expect.push_back((
                            seq,
                            Expect::ClientParse {
                                name: name.to_owned(),
                                raw: f.raw().clone(),
                                class,
                                existed,
                                id,
                                sent_as,
                            },
                        ));
                    }
                    Meta::Uses { start, end } => {
                        // A statement this batch does not parse itself, that
                        // exists for the client but not on this connection:
                        // its Parse goes first (its reply is swallowed).
                        // (Statements count as present from the moment their
                        // Parse is sent, so one parsed or injected earlier in
                        // this batch or a pipelined one is not sent twice.)
                        let name = batch::text(f, start, end);
                        if f.tag() == tag::frontend::BIND {
                            if let Some(replay) = bound_setting(&self.stmts, name, f) {
                                b.sets_in_flight.push(replay);
                            }
                        }
                        match self.stmts.get(name).filter(|s| !s.local) {
                            Some(s) if name.is_empty() && !s.on[idx(target)] => {
                                outgoing.push(s.parse.clone());
                                b.expect.push_back((
                                    seq,
                                    Expect::InjectedParse {
                                        name: String::new(),
                                        id: 0,
                                    },
                                ));
                                self.stmts.mark_on(name, target);
                            }
                            Some(_) if name.is_empty() => {}
                            Some(s) => {
                                if !b.prepared.contains(&s.id) {
                                    inject_parse(b, &mut outgoing, seq, name, s);
                                }
                                let n = statements::server_name(s.id);
                                as_sent = Some(statements::renamed(f.raw(), start, end, &n));
                            }
                            // Unknown: the server says so, naming it.
                            None => {}
                        }
                    }
                    Meta::CloseStatement { start, end } => {
                        let name = batch::text(f, start, end);
                        let taken = (!name.is_empty()).then(|| self.stmts.take(name)).flatten();
                        let close = match taken {
                            Some(s) => {
                                b.prepared.remove(&s.id);
                                let n = statements::server_name(s.id);
                                as_sent = Some(statements::renamed(f.raw(), start, end, &n));
                                Expect::ClientClose {
                                    statement: None,
                                    removed: Some(Box::new((name.to_owned(), s))),
                                }
                            }
                            None => Expect::ClientClose {
                                statement: Some(name.to_owned()),
                                removed: None,
                            },
                        };
                        b.expect.push_back((seq, close));
                    }
                    Meta::ClosePortal => {
                        b.expect.push_back((
                            seq,
                            Expect::ClientClose {
                                statement: None,
                                removed: None,
                            },
                        ));
                    }
                    Meta::Other => {}
                }
                match as_sent {
                    Some(m) => outgoing.push(m),
                    None => vectored::push_joined(&mut outgoing, &self.block, f.raw()),
                }
            }
            self.cancel.set_active(Some(idx(target)));
        }
        if synced {
            let executes = self
                .batch
                .frames
                .iter()
                .filter(|f| {
                    matches!(
                        f.tag(),
                        tag::frontend::EXECUTE | tag::frontend::FUNCTION_CALL
                    )
                })
                .count();
            // A batch that only prepares or describes runs nothing.
            let writes = self.commits_write(class.kind, target) && executes > 0;
            let wants_xid = self.wants_xid(&class, target);
            let has_copy = (writes || wants_xid) && self.batch_has_copy();
            let copy = writes && has_copy;
            // A read outside a block may be refused by the replica as a
            // write (25006): keep the batch to run it again on the primary.
            let retryable = self.retryable_read(target)
                && !self.batch.frames.iter().any(|f| {
                    matches!(f.tag(), tag::frontend::CLOSE | tag::frontend::FUNCTION_CALL)
                });
            if retryable {
                // Kept (below) by swapping buffers with the batch: no copy,
                // no allocation.
                self.retry = Some(Retry::Batch);
            }
            // Should its answer be lost and the commit be resolved.
            let answer = (class.kind == StmtKind::Commit && executes > 0)
                .then(|| resolution::extended_commit_answer(&self.batch.frames));
            let b = self.client_cycle(
                target,
                Pending {
                    wrapped: wrap,
                    writes: writes && !wrap,
                    // Statements are counted per message that names them.
                    single: executes <= 1,
                    runs: executes > 0
                        || self
                            .batch
                            .frames
                            .iter()
                            .any(|f| f.tag() == tag::frontend::PARSE),
                    ..Pending::client(seq, true, &class, writes, copy, retryable)
                },
            );
            if let Some(answer) = answer.filter(|_| b.xid.is_some()) {
                b.commit_answer = Some((seq, answer));
            }
            let xid = wrap || (wants_xid && !has_copy);
            if (writes && !copy) || xid {
                self.push_own_query(target, seq, &mut outgoing, writes && !wrap, xid);
            }
            if retryable {
                std::mem::swap(&mut self.retry_frames, &mut self.batch.frames);
                std::mem::swap(&mut self.retry_meta, &mut self.batch.meta);
            }
        }
        self.batch.clear();
        self.bound_soft = !synced && soft && (self.bound.is_none() || self.bound_soft);
        self.bound = if synced { None } else { Some(target) };
        let res = self.send_raw(target, &outgoing).await;
        outgoing.clear();
        self.outgoing = outgoing;
        res?;
        if wrap {
            self.finish_wrap(target, seq).await?;
        }
        Ok(())
    }

    /// Whether the batch being dispatched only closes statements or
    /// portals (besides Sync/Flush).
    fn batch_only_closes(&self) -> bool {
        use tag::frontend as ft;
        self.batch
            .frames
            .iter()
            .all(|f| matches!(f.tag(), ft::CLOSE | ft::SYNC | ft::FLUSH))
    }

    /// Makes sure a connection to `t` is open and alive. With `fallback`,
    /// reads whose replica is unreachable go to the primary.
    async fn ensure(&mut self, t: Target, fallback: bool) -> Result<Target, Error> {
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
            if self.pinned && t == Target::Primary {
                // LISTENs, temporary tables, session locks died with it; a
                // server would have ended this session, so pgsplit does too.
                return Err(Error::PinnedStateLost);
            }
            if self.txn == Some(t) {
                self.txn = None;
                self.virtual_failed = true;
                self.commit_refused = Some(t);
                return Err(Error::BackendLostInBlock { target: t });
            }
        }
        if link_down {
            // Fail fast: a connect through a black-holed tunnel would only
            // wait out connect_timeout.
            let bound = self.shared.config.monitor.heartbeat_timeout;
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
    fn forget_closed(&mut self, t: Target) {
        debug!(target = ?t, "backend closed while idle; replacing it");
        self.backends[idx(t)] = None;
        self.stmts.forget_backend(t);
    }

    /// A read whose replica is down goes to the primary if it is reachable.
    async fn ensure_primary_for_read(&mut self) -> Result<Target, Error> {
        match Box::pin(self.ensure(Target::Primary, false)).await {
            Ok(t) => Ok(t),
            Err(Error::PrimaryUnreachable(e)) => Err(Error::NothingReachable(e)),
            Err(e) => Err(e),
        }
    }

    /// A connection of the proxy's own outside the pools (to resolve a lost
    /// commit), logged in as the session's user.
    async fn connect(&self, t: Target) -> Result<BackendConn, BackendError> {
        let cfg = &self.shared.config;
        let addr = match t {
            Target::Primary => &cfg.primary,
            Target::Replica => &cfg.replica,
        };
        let login = Login {
            user: self.user.backend_user(),
            password: self.user.backend_password(),
            database: &self.database,
            params: &self.params,
        };
        BackendConn::connect(
            t,
            &addr.host,
            addr.port,
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
    async fn prepare_backend(&mut self, t: Target) -> Result<(), Error> {
        let Some(b) = self.backends[idx(t)].as_mut() else {
            return Ok(());
        };
        let full = b.prepared.len() > PREPARED_CACHE && !(t == Target::Primary && self.pinned);
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

    fn busy(&self, t: Target) -> bool {
        self.backends[idx(t)]
            .as_ref()
            .is_some_and(|b| !b.pending.is_empty() || self.bound == Some(t) || b.passthrough > 0)
    }

    /// Relays everything `t` still owes the client.
    async fn drain(&mut self, t: Target) -> Result<(), Error> {
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
    async fn send_raw(&mut self, t: Target, frames: &[Bytes]) -> Result<(), Error> {
        self.arm(t);
        let mut todo = Chunks::new(frames);
        while !todo.is_done() {
            let Some(b) = self.backends[idx(t)].as_mut() else {
                return Ok(()); // lost while relaying; already answered
            };
            let mut slices = vectored::slice_array();
            let n = todo.slices(&mut slices);
            match b.conn.stream.try_write_vectored(&slices[..n]) {
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

    /// The session's transaction status as the client must see it.
    fn client_status(&self) -> TxStatus {
        if self.virtual_failed {
            return TxStatus::Failed;
        }
        match self.txn.and_then(|t| self.backends[idx(t)].as_ref()) {
            Some(b) => b.status,
            None => TxStatus::Idle,
        }
    }

    fn push_own(&mut self, write: impl FnOnce(&mut BytesMut)) {
        write(&mut self.scratch);
        let b = self.scratch.split().freeze();
        self.out.push_back(b);
    }

    fn push_error(&mut self, e: &Error) {
        self.push_own(|b| e.write_to(b, false));
    }

    fn push_ready(&mut self) {
        let s = self.client_status();
        self.push_own(|b| encode::ready_for_query(b, s));
    }

    /// The client's block died with its backend: answer as a server does
    /// for a failed block — 25P02 until ROLLBACK/COMMIT, which end it.
    fn answer_failed_block(&mut self, kind: StmtKind, frames: Option<&[Frame]>) {
        let ends = matches!(kind, StmtKind::Rollback | StmtKind::Commit);
        // A block lost while the client was idle is explained to the next
        // statement; after that, 25P02 as a server says.
        let unreported = self.block_lost_unreported.take();
        let refused = unreported.or(self.commit_refused);
        if let (Some(t), StmtKind::Commit) = (refused, kind) {
            // A COMMIT must not look like success (a server's "ROLLBACK"
            // tag for a failed block is read as success by most drivers)
            // unless the client surely saw its block fail: a lost
            // connection may have been reported to a statement whose
            // answer the driver had already taken as complete.
            self.virtual_failed = false;
            self.commit_refused = None;
            self.push_error(&Error::BackendLostInBlock { target: t });
            let ends_cycle = frames.is_none_or(|f| {
                f.last()
                    .is_some_and(|f| matches!(f.tag(), tag::frontend::SYNC))
            });
            if ends_cycle {
                self.push_ready();
            }
            return;
        }
        let failed = match unreported {
            Some(t) if !ends => Error::BackendLostInBlock { target: t },
            _ => Error::InFailedBlock,
        };
        let Some(frames) = frames else {
            if ends {
                self.virtual_failed = false;
                self.commit_refused = None;
                self.push_own(|b| encode::command_complete(b, "ROLLBACK"));
            } else {
                self.push_error(&failed);
            }
            self.push_ready();
            return;
        };
        if !ends {
            self.push_error(&failed);
            let ends_cycle =
                |f: &Frame| matches!(f.tag(), tag::frontend::SYNC | tag::frontend::FUNCTION_CALL);
            if frames.last().is_some_and(ends_cycle) {
                self.push_ready();
            }
            return;
        }
        // An extended-protocol ROLLBACK: answered message by message as a
        // server would.
        if frames.iter().any(|f| f.tag() == tag::frontend::EXECUTE) {
            self.virtual_failed = false;
            self.commit_refused = None;
        }
        self.out
            .push_back(resolution::extended_answer(frames, "ROLLBACK"));
        if frames.iter().any(|f| f.tag() == tag::frontend::SYNC) {
            self.push_ready();
        }
    }

    async fn flush_client(&mut self) -> Result<(), Error> {
        if let Some(r) = self.resolution.take() {
            self.settle_resolution(r).await?;
        }
        if self.out.is_empty() {
            return Ok(());
        }
        if let [one] = self.out.make_contiguous() {
            // The usual case: one run of replies, taken by the socket at once.
            match self.client.try_write(one) {
                Ok(n) if n == one.len() => {
                    self.out.clear();
                    return Ok(());
                }
                Ok(n) => *one = one.slice(n..),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::ClientIo(e)),
            }
        }
        let res = write_all_vectored(&mut self.client, self.out.make_contiguous()).await;
        self.out.clear();
        res.map_err(Error::ClientIo)
    }
}

fn other(t: Target) -> Target {
    match t {
        Target::Primary => Target::Replica,
        Target::Replica => Target::Primary,
    }
}

/// Sends a named statement's Parse, under its server name, to a
/// connection that lacks it (a Close first, in case it has it after all);
/// both replies are swallowed.
fn inject_parse(b: &mut Backend, outgoing: &mut Vec<Bytes>, seq: u64, name: &str, s: &Stmt) {
    outgoing.push(statements::server_close(s.id));
    b.expect.push_back((seq, Expect::InjectedClose));
    outgoing.push(s.server.clone());
    b.expect.push_back((
        seq,
        Expect::InjectedParse {
            name: name.to_owned(),
            id: s.id,
        },
    ));
    b.prepared.insert(s.id);
}

/// For a Bind of `SELECT set_config('name', $n, false)`: the statement that
/// replays it with the value bound.
fn bound_setting(stmts: &Statements, stmt: &str, bind: &Frame) -> Option<String> {
    let s = stmts.get(stmt)?;
    if s.class.kind != StmtKind::Session {
        return None;
    }
    let p = Parse::parse(&s.parse[frame::HEADER_BYTES..]).ok()?;
    let (name, n) = effects::set_config_param(p.sql)?;
    let params = frontend::bind_params(bind.body()).ok()?;
    let (_, value) = params.get(n)?;
    effects::set_config_replay(name, *value)
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

/// Writes every chunk, in as few system calls as the socket allows.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    s: &mut W,
    chunks: &[Bytes],
) -> std::io::Result<()> {
    if let [one] = chunks {
        // A plain `send`, cheaper in the kernel than `writev`.
        return s.write_all(one).await;
    }
    let mut todo = Chunks::new(chunks);
    while !todo.is_done() {
        let mut slices = vectored::slice_array();
        let n = todo.slices(&mut slices);
        let written = s.write_vectored(&slices[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        todo.advance(written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
