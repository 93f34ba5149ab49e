//! What the replication monitor knows about the primary and the replica,
//! shared with every session.
//!
//! Sessions consult it on every read they route (is the replica within
//! the staleness bound? has it replayed this session's last write?), so it
//! is a handful of atomics: no lock, no allocation on the hot path. The
//! monitor (`monitor`) is its only writer.

use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared replication state. LSNs are byte positions in the WAL; 0 means
/// unknown.
#[derive(Debug)]
pub struct Replication {
    primary_lsn: AtomicU64,
    replay_lsn: AtomicU64,
    /// The WAL position of the latest write any session committed through
    /// this process (for `read_your_writes_scope = "proxy"`).
    written_lsn: AtomicU64,
    /// Milliseconds, or -1 when unknown.
    lag_ms: AtomicI64,
    primary_up: AtomicBool,
    replica_up: AtomicBool,
    /// In recovery and replaying (not still starting, not promoted).
    replica_replaying: AtomicBool,
    /// The replica is one of the primary candidates (see `failover`): once
    /// promoted it is a primary writes follow, not a replica left behind,
    /// and reads there see everything.
    replica_promotable: AtomicBool,
    /// Up and out of recovery.
    replica_promoted: AtomicBool,
    /// Completed replica polls; 0 until the first one.
    replica_polls: AtomicU64,
    /// When the primary's WAL positions were first seen (monitor only).
    seen: Mutex<Seen>,
    /// Primary polls the monitor has started, and the last position one
    /// of them read with that poll's number: the primary had at most this
    /// much when the poll left. (Numbers, not times: a session notes the
    /// count when it sends a read, with one atomic load.)
    polls_started: AtomicU64,
    sampled_lsn: AtomicU64,
    sampled_poll: AtomicU64,
    /// Reads waiting for the replica to replay (`max_wait_for_replica`),
    /// and the monitor's wake-up for them: while any waits, it polls the
    /// replica's replay position every few milliseconds.
    waiting: AtomicU64,
    wake: tokio::sync::Notify,
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
            written_lsn: AtomicU64::new(0),
            lag_ms: AtomicI64::new(-1),
            primary_up: AtomicBool::new(true),
            replica_up: AtomicBool::new(true),
            replica_replaying: AtomicBool::new(true),
            replica_promotable: AtomicBool::new(false),
            replica_promoted: AtomicBool::new(false),
            replica_polls: AtomicU64::new(0),
            seen: Mutex::new(Seen::default()),
            polls_started: AtomicU64::new(0),
            sampled_lsn: AtomicU64::new(0),
            sampled_poll: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            enabled: AtomicBool::new(false),
            link: tokio::sync::watch::Sender::new(true),
        }
    }
}

/// How many primary positions [`Seen`] keeps: at a 100 ms poll, 25 s of
/// writes without merging.
const SEEN_CAPACITY: usize = 256;

/// When each of the primary's WAL positions was first seen, oldest first,
/// for the replica's lag: the age of the oldest data it has not replayed.
///
/// The lag is `now` minus the first-seen time of the earliest sampled
/// position beyond the replica's replay position, and 0 when it has
/// replayed all the primary wrote. A quiet spell never counts (a position
/// is dated when it appears, not by the last transaction replayed before
/// it), and the lag is understated by at most one poll interval. When the
/// ring is full the newest entry takes the new position and keeps its
/// older time: that can only overstate, where dropping old entries would
/// understate without bound.
#[derive(Debug, Default)]
struct Seen {
    ring: std::collections::VecDeque<(u64, Instant)>,
    /// The last time the primary answered a poll.
    last_sample: Option<Instant>,
}

impl Seen {
    fn sample(&mut self, lsn: u64, now: Instant) {
        self.last_sample = Some(now);
        let full = self.ring.len() >= SEEN_CAPACITY;
        match self.ring.back_mut() {
            Some((last, _)) if lsn <= *last => {}
            Some((last, _)) if full => *last = lsn,
            _ => self.ring.push_back((lsn, now)),
        }
    }

    /// The lag of a replica that replayed up to `replayed`, with the
    /// primary `up` or not; `None` before the primary was ever sampled.
    fn lag(&mut self, replayed: u64, up: bool, now: Instant) -> Option<Duration> {
        let last_sample = self.last_sample?;
        while self.ring.front().is_some_and(|(l, _)| *l <= replayed) {
            self.ring.pop_front();
        }
        let behind = self
            .ring
            .front()
            .map_or(Duration::ZERO, |(_, t)| now.saturating_duration_since(*t));
        Some(if up {
            behind
        } else {
            // The replica may have replayed all it received, but nothing
            // says what the primary wrote since it last answered.
            behind.max(now.saturating_duration_since(last_sample))
        })
    }
}

/// A read waiting for the replica (see [`Replication::wait_for_replay`]).
pub struct ReplayWait<'a>(&'a Replication);

impl Drop for ReplayWait<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
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

    /// A read starts waiting for the replica; the wait ends when the guard
    /// drops.
    pub fn wait_for_replay(&self) -> ReplayWait<'_> {
        self.waiting.fetch_add(1, Relaxed);
        self.wake.notify_one();
        ReplayWait(self)
    }

    /// Returns once some read waits for the replica (at once if one does).
    pub(crate) async fn replay_wanted(&self) {
        while self.waiting.load(Relaxed) == 0 {
            self.wake.notified().await;
        }
    }

    /// A session learned the WAL position of a write it committed.
    pub fn note_write(&self, lsn: u64) {
        self.written_lsn.fetch_max(lsn, Relaxed);
    }

    /// The latest write position any session learned (0: none yet).
    pub fn written_lsn(&self) -> u64 {
        self.written_lsn.load(Relaxed)
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
        if self.promoted_candidate() {
            return None;
        }
        if !self.replica_replaying.load(Relaxed) {
            return Some(Stale::NotReplaying);
        }
        let lag = self.lag_ms()?;
        let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        (lag > bound_ms).then_some(Stale::Lagging(lag))
    }

    /// The replica is one of the primary candidates, so that its promotion
    /// makes it a primary reads may stay on.
    pub(crate) fn set_replica_promotable(&self, yes: bool) {
        self.replica_promotable.store(yes, Relaxed);
    }

    /// The replica was promoted, and it is one of the primary candidates:
    /// it has all there is (or writes will soon follow it there).
    pub fn promoted_candidate(&self) -> bool {
        self.replica_promotable.load(Relaxed) && self.replica_promoted.load(Relaxed)
    }

    /// Completed replica polls (tests and `/health` wait on this).
    pub fn replica_polls(&self) -> u64 {
        self.replica_polls.load(Relaxed)
    }

    /// One primary poll: its WAL position, or `None` when it could not be
    /// reached; `silent` when that was for want of an answer (a black-holed
    /// link) rather than a refused or reset connection.
    pub(crate) fn set_primary(&self, lsn: Option<u64>, silent: bool) {
        self.set_primary_at(lsn, silent, Instant::now());
    }

    fn set_primary_at(&self, lsn: Option<u64>, silent: bool, now: Instant) {
        let up = lsn.is_some();
        if let Some(l) = lsn {
            self.primary_lsn.fetch_max(l, Relaxed);
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sample(l, now);
        }
        self.primary_up.store(up, Relaxed);
        // Only a silent link makes sessions fail fast: a refused connect
        // fails fast by itself, and is retried by every new statement.
        let link_up = up || !silent;
        self.link
            .send_if_modified(|v| std::mem::replace(v, link_up) != link_up);
    }

    /// Writes moved to another primary (a promotion was followed): its WAL
    /// positions continue a new timeline, so what was sampled of the old
    /// one is forgotten.
    pub(crate) fn primary_changed(&self) {
        self.primary_lsn.store(0, Relaxed);
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ring
            .clear();
    }

    /// The monitor starts a primary poll; returns its number.
    pub(crate) fn start_poll(&self) -> u64 {
        self.polls_started.fetch_add(1, Relaxed) + 1
    }

    /// Primary polls started so far (a session notes it when it sends a
    /// read).
    pub fn polls_started(&self) -> u64 {
        self.polls_started.load(Relaxed)
    }

    /// Records the primary position read by poll number `poll`.
    pub(crate) fn sampled_primary(&self, lsn: u64, poll: u64) {
        self.sampled_lsn.store(lsn, Relaxed);
        self.sampled_poll.store(poll, Release);
    }

    /// The primary's position as read by a poll started after `polls`
    /// polls had been (see [`Replication::polls_started`]), if one has
    /// come back since. (A later sample's position can only be larger.)
    pub fn primary_sampled_after(&self, polls: u64) -> Option<u64> {
        (self.sampled_poll.load(Acquire) > polls).then(|| self.sampled_lsn.load(Relaxed))
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
    /// it is in recovery and its replay position.
    pub(crate) fn set_replica(&self, poll: Option<ReplicaPoll>) {
        self.set_replica_at(poll, Instant::now());
    }

    fn set_replica_at(&self, poll: Option<ReplicaPoll>, now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match poll {
            None => {
                self.replica_up.store(false, Relaxed);
                self.lag_ms.store(-1, Relaxed);
            }
            Some(p) => {
                self.replica_up.store(true, Relaxed);
                let replaying = p.in_recovery && p.replay_lsn.is_some();
                self.replica_replaying.store(replaying, Relaxed);
                self.replica_promoted.store(!p.in_recovery, Relaxed);
                if let Some(l) = p.replay_lsn {
                    self.replay_lsn.store(l, Relaxed);
                }
                let lag = if self.promoted_candidate() {
                    0
                } else {
                    p.replay_lsn
                        .and_then(|r| seen.lag(r, self.primary_up(), now))
                        .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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

    fn poll(replay: u64, _replayed_xact_age_ms: Option<i64>) -> Option<ReplicaPoll> {
        Some(ReplicaPoll {
            in_recovery: true,
            replay_lsn: Some(replay),
        })
    }

    #[test]
    fn an_idle_primary_is_not_a_lagging_replica() {
        let r = Replication::default();
        r.enable();
        let t0 = Instant::now();
        r.set_primary_at(Some(100), false, t0);
        r.set_replica_at(poll(100, Some(60_000)), t0);
        assert_eq!(r.lag_ms(), Some(0));
        assert_eq!(r.stale(Duration::from_secs(5)), None);
        let t1 = t0 + Duration::from_secs(1);
        r.set_primary_at(Some(200), false, t1);
        r.set_replica_at(poll(150, Some(7_000)), t1 + Duration::from_secs(7));
        assert_eq!(r.lag_ms(), Some(7_000));
        assert_eq!(r.lag_bytes(), Some(50));
        assert_eq!(r.stale(Duration::from_secs(5)), Some(Stale::Lagging(7_000)));
        assert!(r.replayed(150) && !r.replayed(151));
    }

    #[test]
    fn a_quiet_spell_is_not_lag() {
        let r = Replication::default();
        r.enable();
        let t0 = Instant::now();
        r.set_primary_at(Some(100), false, t0);
        r.set_replica_at(poll(100, None), t0);
        // 12 s without writes, then one: the replica, 1.5 s behind, is
        // not 12 s stale, whatever the age of its last replayed xact.
        let write = t0 + Duration::from_secs(12);
        r.set_primary_at(Some(100), false, write - Duration::from_millis(100));
        r.set_primary_at(Some(180), false, write);
        r.set_replica_at(poll(100, Some(12_000)), write + Duration::from_millis(100));
        assert_eq!(r.lag_ms(), Some(100));
        r.set_replica_at(
            poll(100, Some(12_000)),
            write + Duration::from_millis(1_500),
        );
        assert_eq!(r.lag_ms(), Some(1_500));
        assert_eq!(r.stale(Duration::from_secs(5)), None);
        r.set_replica_at(poll(180, Some(0)), write + Duration::from_millis(1_600));
        assert_eq!(r.lag_ms(), Some(0));
    }

    #[test]
    fn the_lag_dates_the_oldest_unreplayed_position() {
        let r = Replication::default();
        r.enable();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for (i, lsn) in [100, 200, 300, 400].into_iter().enumerate() {
            r.set_primary_at(Some(lsn), false, t0 + ms(100 * i as u64));
        }
        // Replayed into the second sample's range: dated by the second.
        r.set_replica_at(poll(150, None), t0 + ms(1_000));
        assert_eq!(r.lag_ms(), Some(900));
        r.set_replica_at(poll(300, None), t0 + ms(1_000));
        assert_eq!(r.lag_ms(), Some(700));
        r.set_replica_at(poll(400, None), t0 + ms(1_000));
        assert_eq!(r.lag_ms(), Some(0));
        // No primary sample yet: unknown, not stale.
        let r = Replication::default();
        r.enable();
        r.set_replica_at(poll(100, None), t0);
        assert_eq!(r.lag_ms(), None);
        assert_eq!(r.stale(Duration::ZERO), None);
    }

    #[test]
    fn a_full_ring_overstates_rather_than_understates() {
        let r = Replication::default();
        r.enable();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for i in 0..(SEEN_CAPACITY as u64 + 100) {
            r.set_primary_at(Some(100 + i), false, t0 + ms(i));
        }
        // The oldest positions are kept with their times.
        r.set_replica_at(poll(100, None), t0 + ms(10_000));
        assert_eq!(r.lag_ms(), Some(10_000 - 1));
        // Past the last kept entry, the merged newest entry dates it by its
        // own (older) time: overstated, never understated.
        r.set_replica_at(poll(100 + SEEN_CAPACITY as u64 + 50, None), t0 + ms(10_000));
        let lag = r.lag_ms().unwrap();
        assert!(lag >= 10_000 - (SEEN_CAPACITY as u64 + 99), "{lag}");
    }

    #[test]
    fn an_unreachable_primary_makes_the_lag_grow() {
        let r = Replication::default();
        r.enable();
        let t0 = Instant::now();
        r.set_primary_at(Some(100), false, t0);
        r.set_replica_at(poll(100, None), t0);
        assert_eq!(r.lag_ms(), Some(0));
        r.set_primary_at(None, true, t0 + Duration::from_secs(3));
        r.set_replica_at(poll(100, None), t0 + Duration::from_secs(6));
        assert_eq!(r.lag_ms(), Some(6_000));
        assert_eq!(r.stale(Duration::from_secs(5)), Some(Stale::Lagging(6_000)));
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
