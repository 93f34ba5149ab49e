//! The replication monitor: a background task with its own connections to
//! the primary and the replica, polling their WAL positions every
//! `[monitor] interval` into [`Replication`](crate::replication::Replication).
//!
//! It uses the proxy's own backend connections (the same login code as
//! sessions, TCP or unix socket) rather than a client library, and bounds
//! every poll: a server that does not answer within `connect_timeout` is
//! reported down and its connection replaced. The two servers are polled
//! concurrently, so a slow tunnel to the primary never delays what is
//! known about the local replica.

use std::sync::Arc;

use pgsplit_router::Target;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{BackendConn, Login};
use crate::config::BackendAddr;
use crate::failover::{Decider, Seen};
use crate::replication::{parse_lsn, ReplicaPoll};
use crate::Shared;

const PRIMARY_POLL: &str = "SELECT pg_current_wal_lsn()::text";
/// What each primary candidate is: in recovery, read-only (a primary
/// fenced with `default_transaction_read_only`), its timeline (from the
/// current WAL file's name on a primary, from the WAL receiver on a
/// standby; `pg_control_checkpoint()` would lag a promotion until the next
/// checkpoint) and, on a primary, its WAL position.
const CANDIDATE_POLL: &str = "SELECT pg_is_in_recovery()::text, \
     current_setting('transaction_read_only'), \
     CASE WHEN pg_is_in_recovery() \
          THEN (SELECT received_tli FROM pg_stat_wal_receiver)::text \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::text END, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END";
/// In recovery, and how far it has replayed; once promoted, all it has (its
/// current WAL position), which is what reads there see.
const REPLICA_POLL: &str = "SELECT pg_is_in_recovery()::text, \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
          ELSE pg_current_wal_lsn() END::text";

/// The `application_name` of the monitor's connections.
pub const MONITOR_APPLICATION: &str = "pgsplit monitor";

/// Runs until `shutdown`.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut cfg = shared.config();
    let mut cfg_gen = shared.live.generation();
    let Some(mut creds) = cfg.monitor_login() else {
        warn!("no user to run the replication monitor as; lag is not measured");
        return;
    };
    shared.replication.enable();
    info!(interval = ?cfg.monitor.interval, "replication monitor started");
    let mut primary: Option<BackendConn> = None;
    let mut replica: Option<BackendConn> = None;
    let mut layout = shared.failover.layout();
    let mut candidates: Vec<Option<BackendConn>> =
        shared.failover.addrs().iter().map(|_| None).collect();
    let mut decider = Decider::new(names(&shared));
    // Named, so that operators (and tests) can tell its connections from
    // the sessions' in pg_stat_activity.
    let monitor_params = vec![(
        "application_name".to_owned(),
        MONITOR_APPLICATION.to_owned(),
    )];
    let mut ticker = tokio::time::interval(cfg.monitor.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if shared.live.generation() != cfg_gen {
            // Reloaded: new addresses, login or interval from the next poll.
            cfg_gen = shared.live.generation();
            let new = shared.config();
            if new.monitor.interval != cfg.monitor.interval {
                ticker = tokio::time::interval(new.monitor.interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            if new.primary != cfg.primary || new.monitor.database != cfg.monitor.database {
                primary = None;
            }
            if new.replica != cfg.replica || new.monitor.database != cfg.monitor.database {
                replica = None;
            }
            if let Some(c) = new.monitor_login() {
                if c != creds {
                    (primary, replica) = (None, None);
                    candidates.iter_mut().for_each(|c| *c = None);
                }
                creds = c;
            }
            cfg = new;
        }
        if shared.failover.layout() != layout {
            // The candidates changed: a decider for the new list, keeping
            // the current primary when it is still one of them.
            layout = shared.failover.layout();
            candidates = shared.failover.addrs().iter().map(|_| None).collect();
            let report = shared.failover.report();
            decider = match report.current {
                Some(i) => Decider::resume(
                    names(&shared),
                    i,
                    report.seen.get(i).and_then(|s| s.timeline).unwrap_or(0),
                ),
                None => Decider::new(names(&shared)),
            };
        }
        let following = shared.failover.following();
        let login = Login {
            user: &creds.0,
            password: creds.1.as_deref(),
            database: &cfg.monitor.database,
            params: &monitor_params,
            keys: None,
        };
        let fast = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => false,
            _ = shared.replication.replay_wanted() => true,
        };
        if fast {
            // A read waits for the replica: its replay position, every few
            // milliseconds until no read waits, so the wait ends soon after
            // the replay rather than at the next regular poll.
            tokio::time::sleep(FAST_REPLICA_POLL).await;
            let r = poll(
                &shared,
                Target::Replica,
                &cfg.replica,
                &mut replica,
                &login,
                REPLICA_POLL,
            )
            .await;
            if r != Err(Failure::Refused) {
                shared
                    .replication
                    .set_replica(r.ok().map(|row| replica_poll(&row)));
            }
            continue;
        }
        let poll_no = shared.replication.start_poll();
        let primary_side = async {
            if following {
                follow(&shared, &mut candidates, &mut decider, &creds).await
            } else {
                let addr = &cfg.primary;
                poll(
                    &shared,
                    Target::Primary,
                    addr,
                    &mut primary,
                    &login,
                    PRIMARY_POLL,
                )
                .await
            }
        };
        let (p, r) = tokio::join!(
            primary_side,
            poll(
                &shared,
                Target::Replica,
                &cfg.replica,
                &mut replica,
                &login,
                REPLICA_POLL
            ),
        );
        // A server that answers with an error (or refuses the monitor's
        // login) is reachable: that says nothing about the link, so the
        // state is left as it was rather than failing writes.
        if p != Err(Failure::Refused) {
            let silent = p == Err(Failure::Silent);
            let lsn = p
                .ok()
                .and_then(|row| row.first().cloned().flatten().and_then(|s| parse_lsn(&s)));
            shared.replication.set_primary(lsn, silent);
            if let Some(l) = lsn {
                shared.replication.sampled_primary(l, poll_no);
            }
        }
        if r == Err(Failure::Refused) {
            continue;
        }
        shared
            .replication
            .set_replica(r.ok().map(|row| replica_poll(&row)));
    }
}

/// How the decider names the candidates.
fn names(shared: &Shared) -> Vec<String> {
    shared
        .failover
        .addrs()
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Polls every primary candidate at once, lets the decider move writes,
/// and returns the current primary's WAL position as the primary poll.
async fn follow(
    shared: &Arc<Shared>,
    conns: &mut [Option<BackendConn>],
    decider: &mut Decider,
    creds: &(String, Option<String>),
) -> Result<Row, Failure> {
    let mut set = tokio::task::JoinSet::new();
    for (i, conn) in conns.iter_mut().enumerate() {
        let mut c = conn.take();
        let shared = shared.clone();
        let Some(addr) = shared.failover.addrs().get(i).cloned() else {
            continue;
        };
        let (user, password) = creds.clone();
        set.spawn(async move {
            let monitor_params = vec![(
                "application_name".to_owned(),
                MONITOR_APPLICATION.to_owned(),
            )];
            let login = Login {
                user: &user,
                password: password.as_deref(),
                database: &shared.config().monitor.database,
                params: &monitor_params,
                keys: None,
            };
            let r = poll(
                &shared,
                Target::Primary,
                &addr,
                &mut c,
                &login,
                CANDIDATE_POLL,
            )
            .await;
            (i, c, r)
        });
    }
    let mut results = vec![Err(Failure::Down); conns.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, c, r)) = done {
            conns[i] = c;
            results[i] = r;
        }
    }
    let seen: Vec<Seen> = results
        .iter()
        .map(|r| match r {
            Ok(row) => {
                let col = |i: usize| row.get(i).cloned().flatten();
                let writable =
                    col(0).as_deref() == Some("false") && col(1).as_deref() == Some("off");
                Seen {
                    reachable: true,
                    writable,
                    read_only: !writable,
                    timeline: col(2).and_then(|t| t.parse().ok()),
                }
            }
            // Answering with an error is reachable, and not writable.
            Err(Failure::Refused) => Seen {
                reachable: true,
                ..Seen::default()
            },
            Err(_) => Seen::default(),
        })
        .collect();
    let (change, alarm) = decider.step(
        &seen,
        std::time::Instant::now(),
        shared.config().monitor.failover_grace,
    );
    if change.is_some() {
        shared.replication.primary_changed();
    }
    shared.failover.record(seen, change, alarm);
    match shared.failover.current_index() {
        // Its WAL position, in the first column as the primary poll has it.
        Some(i) => results[i]
            .clone()
            .map(|row| vec![row.get(3).cloned().flatten()]),
        // No primary: writes are refused, and the primary counts as down.
        None => Err(Failure::Down),
    }
}

/// While a read waits for the replica, how often its replay position is
/// read.
const FAST_REPLICA_POLL: std::time::Duration = std::time::Duration::from_millis(2);

fn replica_poll(row: &Row) -> ReplicaPoll {
    let col = |i: usize| row.get(i).cloned().flatten();
    ReplicaPoll {
        in_recovery: col(0).as_deref() == Some("true"),
        replay_lsn: col(1).and_then(|s| parse_lsn(&s)),
    }
}

/// Why a poll returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No answer in time, or no connection: the server or the link is down.
    Down,
    /// The server answered with an error or refused the login.
    Refused,
    /// An existing connection turned out closed (tried again at once).
    Broken,
    /// No answer within the bound: a black-holed link looks like this.
    Silent,
}

type Row = Vec<Option<String>>;

/// One bounded poll of one server (the connection is dropped and made
/// again next time when it failed).
async fn poll(
    shared: &Shared,
    t: Target,
    addr: &BackendAddr,
    conn: &mut Option<BackendConn>,
    login: &Login<'_>,
    sql: &str,
) -> Result<Row, Failure> {
    // A connection found dead (the server restarted it, or an operator
    // killed it) is replaced at once: only a failed fresh connection
    // means the server is down.
    for _ in 0..2 {
        let fresh = conn.is_none();
        match poll_once(shared, t, addr, conn, login, sql).await {
            Ok(row) => return Ok(row),
            Err(Failure::Broken) if !fresh => {}
            Err(Failure::Broken) => return Err(Failure::Down),
            Err(f) => return Err(f),
        }
    }
    Err(Failure::Down)
}

async fn poll_once(
    shared: &Shared,
    t: Target,
    addr: &BackendAddr,
    conn: &mut Option<BackendConn>,
    login: &Login<'_>,
    sql: &str,
) -> Result<Row, Failure> {
    let cfg = shared.config();
    let primary = t == Target::Primary;
    let bound = cfg.timeouts.for_target(primary).connect_timeout;
    // The primary poll is the link's heartbeat.
    let (bound, answer_bound) = if primary {
        let hb = cfg.monitor.heartbeat_timeout;
        (bound.min(hb), hb)
    } else {
        (bound, bound)
    };
    if conn.is_none() {
        match BackendConn::connect(t, addr, login, bound).await {
            Ok(c) => *conn = Some(c),
            Err(e @ crate::backend::BackendError::Refused { .. }) => {
                warn!(target = ?t, cause = %e, "the server refused the monitor's login");
                return Err(Failure::Refused);
            }
            Err(e @ crate::backend::BackendError::Timeout(_)) => {
                debug!(target = ?t, cause = %e, "monitor cannot connect in time");
                return Err(Failure::Silent);
            }
            Err(e) => {
                debug!(target = ?t, cause = %e, "monitor cannot connect");
                return Err(Failure::Down);
            }
        }
    }
    let Some(c) = conn.as_mut() else {
        return Err(Failure::Down);
    };
    let mut ignored = Vec::new();
    let res = tokio::time::timeout(answer_bound, c.query_row(sql, &mut ignored)).await;
    match res {
        Ok(Ok(Ok(row))) => Ok(row),
        Ok(Ok(Err(code))) => {
            warn!(target = ?t, code, "replication poll failed");
            Err(Failure::Refused)
        }
        Ok(Err(_)) => {
            debug!(target = ?t, "monitor connection lost");
            *conn = None;
            Err(Failure::Broken)
        }
        Err(_) => {
            debug!(target = ?t, "no answer within the bound");
            *conn = None;
            Err(Failure::Silent)
        }
    }
}
