//! What the replication monitor knows about the primary and the replica,
//! shared with every session.
//!
//! Sessions consult it on every read they route (is the replica within
//! the staleness bound? has it replayed this session's last write?), so it
//! is a handful of atomics: no lock, no allocation on the hot path. The
//! monitor (`monitor`) is its only writer.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared replication state. LSNs are byte positions in the WAL; 0 means
/// unknown.
#[derive(Debug)]
pub struct Replication {
    primary_lsn: AtomicU64,
    replay_lsn: AtomicU64,
    /// Milliseconds, or -1 when unknown.
    lag_ms: AtomicI64,
    primary_up: AtomicBool,
    replica_up: AtomicBool,
    /// In recovery and replaying (not still starting, not promoted).
    replica_replaying: AtomicBool,
    /// Completed replica polls; 0 until the first one.
    replica_polls: AtomicU64,
    /// Since when the replica has been seen behind the primary without a
    /// replayed transaction to date its position by (monitor only).
    behind_since: Mutex<Option<Instant>>,
    /// Sessions may rely on it (false when no monitor runs).
    enabled: AtomicBool,
    /// Whether the primary link is up, for sessions waiting on it: a
    /// black-holed tunnel never fails their reads, only the heartbeat does.
    link: tokio::sync::watch::Sender<bool>,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            primary_lsn: AtomicU64::new(0),
            replay_lsn: AtomicU64::new(0),
            lag_ms: AtomicI64::new(-1),
            primary_up: AtomicBool::new(true),
            replica_up: AtomicBool::new(true),
            replica_replaying: AtomicBool::new(true),
            replica_polls: AtomicU64::new(0),
            behind_since: Mutex::new(None),
            enabled: AtomicBool::new(false),
            link: tokio::sync::watch::Sender::new(true),
        }
    }
}

/// Why the replica cannot serve a read right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Behind the staleness bound by this many milliseconds of lag.
    Lagging(u64),
    /// The monitor cannot reach it.
    Down,
    /// Up but not replaying (still starting up, or promoted).
    NotReplaying,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Lagging(ms) => write!(f, "the replica is {ms} ms behind the primary"),
            Stale::Down => f.write_str("the replica is unreachable"),
            Stale::NotReplaying => f.write_str("the replica is not replaying WAL"),
        }
    }
}

impl Replication {
    /// Marks the state as maintained by a running monitor.
    pub fn enable(&self) {
        self.enabled.store(true, Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// The replica's replay position, when known.
    pub fn replay_lsn(&self) -> Option<u64> {
        Some(self.replay_lsn.load(Relaxed)).filter(|&l| l > 0)
    }

    /// The primary's last known WAL position.
    pub fn primary_lsn(&self) -> Option<u64> {
        Some(self.primary_lsn.load(Relaxed)).filter(|&l| l > 0)
    }

    /// Replica lag in milliseconds, when known.
    pub fn lag_ms(&self) -> Option<u64> {
        u64::try_from(self.lag_ms.load(Relaxed)).ok()
    }

    /// Replica lag in bytes of WAL, when both positions are known.
    pub fn lag_bytes(&self) -> Option<u64> {
        Some(self.primary_lsn()?.saturating_sub(self.replay_lsn()?))
    }

    pub fn primary_up(&self) -> bool {
        self.primary_up.load(Relaxed)
    }

    pub fn replica_up(&self) -> bool {
        self.replica_up.load(Relaxed)
    }

    /// Whether the replica has replayed up to `lsn`.
    pub fn replayed(&self, lsn: u64) -> bool {
        self.replay_lsn.load(Relaxed) >= lsn
    }

    /// Why the replica is outside `bound`, or `None` when it may serve
    /// reads. Before the first poll (and without a monitor) the replica is
    /// given the benefit of the doubt.
    pub fn stale(&self, bound: Duration) -> Option<Stale> {
        if !self.enabled() {
            return None;
        }
        if !self.replica_up.load(Relaxed) {
            return Some(Stale::Down);
        }
        if !self.replica_replaying.load(Relaxed) {
            return Some(Stale::NotReplaying);
        }
        let lag = self.lag_ms()?;
        let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        (lag > bound_ms).then_some(Stale::Lagging(lag))
    }

    /// Completed replica polls (tests and `/health` wait on this).
    pub fn replica_polls(&self) -> u64 {
        self.replica_polls.load(Relaxed)
    }

    /// One primary poll: its WAL position, or `None` when it could not be
    /// reached; `silent` when that was for want of an answer (a black-holed
    /// link) rather than a refused or reset connection.
    pub(crate) fn set_primary(&self, lsn: Option<u64>, silent: bool) {
        let up = lsn.is_some();
        if let Some(l) = lsn {
            self.primary_lsn.fetch_max(l, Relaxed);
        }
        self.primary_up.store(up, Relaxed);
        // Only a silent link makes sessions fail fast: a refused connect
        // fails fast by itself, and is retried by every new statement.
        let link_up = up || !silent;
        self.link
            .send_if_modified(|v| std::mem::replace(v, link_up) != link_up);
    }

    /// Whether the primary link is known to be silent (heartbeat got no
    /// answer in time): primary work then fails at once.
    pub fn primary_link_down(&self) -> bool {
        self.enabled() && !*self.link.borrow()
    }

    /// A receiver that wakes when the primary link goes down or up.
    pub fn watch_link(&self) -> tokio::sync::watch::Receiver<bool> {
        self.link.subscribe()
    }

    /// One replica poll: `None` when it could not be reached, else whether
    /// it is in recovery, its replay position and the age of the last
    /// transaction it replayed.
    pub(crate) fn set_replica(&self, poll: Option<ReplicaPoll>) {
        self.set_replica_at(poll, Instant::now());
    }

    fn set_replica_at(&self, poll: Option<ReplicaPoll>, now: Instant) {
        let mut behind_since = self.behind_since.lock().unwrap_or_else(|e| e.into_inner());
        match poll {
            None => {
                self.replica_up.store(false, Relaxed);
                self.lag_ms.store(-1, Relaxed);
                *behind_since = None;
            }
            Some(p) => {
                self.replica_up.store(true, Relaxed);
                let replaying = p.in_recovery && p.replay_lsn.is_some();
                self.replica_replaying.store(replaying, Relaxed);
                if let Some(l) = p.replay_lsn {
                    self.replay_lsn.store(l, Relaxed);
                }
                // An idle primary is not a lagging replica: all written is
                // replayed, however old the last transaction is.
                let caught_up = match (self.primary_lsn(), p.replay_lsn) {
                    (Some(pl), Some(rl)) => rl >= pl,
                    _ => false,
                };
                let behind = !caught_up && p.replay_lsn.is_some() && self.primary_lsn().is_some();
                // Until the replica replays a transaction (right after it
                // starts) nothing dates its position; the time it has been
                // seen behind is then a lower bound of its lag, which never
                // overstates it and grows while it stays behind.
                let since = match (behind, p.replay_age_ms) {
                    (true, None) => Some(*behind_since.get_or_insert(now)),
                    _ => None,
                };
                *behind_since = since;
                let lag = if caught_up {
                    0
                } else if let Some(age) = p.replay_age_ms {
                    age.max(0)
                } else if let Some(t) = since {
                    i64::try_from(now.duration_since(t).as_millis()).unwrap_or(i64::MAX)
                } else {
                    -1
                };
                self.lag_ms.store(lag, Relaxed);
            }
        }
        self.replica_polls.fetch_add(1, Relaxed);
    }
}

/// What one poll of the replica returned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplicaPoll {
    pub in_recovery: bool,
    pub replay_lsn: Option<u64>,
    pub replay_age_ms: Option<i64>,
}

/// Formats a WAL position as PostgreSQL does (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `16/B374D848`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        for s in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/3000148"] {
            assert_eq!(format_lsn(parse_lsn(s).unwrap()), s);
        }
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        for bad in ["", "1", "x/1", "1/", "/1", "1/2/3", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    fn poll(replay: u64, age: Option<i64>) -> Option<ReplicaPoll> {
        Some(ReplicaPoll {
            in_recovery: true,
            replay_lsn: Some(replay),
            replay_age_ms: age,
        })
    }

    #[test]
    fn an_idle_primary_is_not_a_lagging_replica() {
        let r = Replication::default();
        r.enable();
        r.set_primary(Some(100), false);
        r.set_replica(poll(100, Some(60_000)));
        assert_eq!(r.lag_ms(), Some(0));
        assert_eq!(r.stale(Duration::from_secs(5)), None);
        r.set_primary(Some(200), false);
        r.set_replica(poll(150, Some(7_000)));
        assert_eq!(r.lag_ms(), Some(7_000));
        assert_eq!(r.lag_bytes(), Some(50));
        assert_eq!(r.stale(Duration::from_secs(5)), Some(Stale::Lagging(7_000)));
        assert!(r.replayed(150) && !r.replayed(151));
    }

    #[test]
    fn a_replica_behind_with_nothing_replayed_yet_has_a_growing_lag() {
        let r = Replication::default();
        r.enable();
        let t0 = Instant::now();
        r.set_primary(Some(200), false);
        r.set_replica_at(poll(100, None), t0);
        assert_eq!(r.lag_ms(), Some(0), "first seen behind");
        r.set_replica_at(poll(150, None), t0 + Duration::from_millis(700));
        assert_eq!(r.lag_ms(), Some(700));
        assert_eq!(
            r.stale(Duration::from_millis(500)),
            Some(Stale::Lagging(700))
        );
        // A replayed transaction dates the position from then on.
        r.set_replica_at(poll(180, Some(40)), t0 + Duration::from_millis(800));
        assert_eq!(r.lag_ms(), Some(40));
        r.set_replica_at(poll(190, None), t0 + Duration::from_millis(900));
        assert_eq!(r.lag_ms(), Some(0), "behind again: measured afresh");
        // Caught up: nothing to date.
        r.set_replica_at(poll(200, None), t0 + Duration::from_millis(1000));
        assert_eq!(r.lag_ms(), Some(0));
        assert_eq!(r.stale(Duration::ZERO), None);
        // No primary position known: unknown, not stale.
        let r = Replication::default();
        r.enable();
        r.set_replica_at(poll(100, None), t0);
        assert_eq!(r.lag_ms(), None);
        assert_eq!(r.stale(Duration::ZERO), None);
    }

    #[test]
    fn down_or_not_replaying_is_stale() {
        let r = Replication::default();
        assert_eq!(r.stale(Duration::ZERO), None, "no monitor: no opinion");
        r.enable();
        assert_eq!(r.stale(Duration::ZERO), None, "before the first poll");
        r.set_replica(None);
        assert_eq!(r.stale(Duration::from_secs(5)), Some(Stale::Down));
        r.set_replica(Some(ReplicaPoll {
            in_recovery: true,
            replay_lsn: None,
            replay_age_ms: None,
        }));
        assert_eq!(r.stale(Duration::from_secs(5)), Some(Stale::NotReplaying));
        r.set_primary(None, false);
        assert!(!r.primary_up());
        assert!(!r.primary_link_down(), "refused, not silent");
        r.set_primary(None, true);
        assert!(r.primary_link_down());
        r.set_primary(Some(300), false);
        assert!(!r.primary_link_down());
    }
}
