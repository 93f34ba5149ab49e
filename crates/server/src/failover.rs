//! Following a promoted primary: which of the primary candidates takes
//! writes now.
//!
//! pgsplit does not decide a failover; Patroni, repmgr, pg_auto_failover
//! or an operator's `pg_promote()` does. With more than one candidate
//! (`[primary] hosts` or a libpq multi-host URL) the monitor asks each
//! whether it is writable (`pg_is_in_recovery()` and
//! `transaction_read_only`, as libpq's `target_session_attrs=read-write`
//! does) and on which timeline it is, and [`Decider`] moves writes to the
//! one writable candidate, under rules that never let two servers take
//! writes:
//! - a candidate is followed only once it has been writable for
//!   `failover_grace`, only when the current primary is not (unreachable,
//!   demoted or fenced), and only on a timeline higher than the highest
//!   this process has seen on a primary before it; an old primary that
//!   comes back writable on its old timeline gets nothing;
//! - two candidates writable on the same, highest, timeline cannot be told
//!   apart: writes are refused (08001) until one of them is not;
//! - a process that starts with several writable candidates on different
//!   timelines takes the highest.
//!
//! "Unreachable" from this node is not "down": another node may still
//! reach the old primary. Safety across nodes needs the promotion tool to
//! fence the old primary, as Patroni and repmgr do.
//!
//! Every change bumps a generation: pooled primary connections of an
//! older generation are closed instead of leased, and a lost COMMIT is
//! resolved on the server it was sent to.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{BackendAddr, Config};

/// What one poll saw of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    /// It answered.
    pub reachable: bool,
    /// Not in recovery and not read-only.
    pub writable: bool,
    /// It said so itself: in recovery, or read-only (demoted or fenced).
    /// An error answer (a refused login) is neither writable nor this.
    pub read_only: bool,
    /// Its timeline, when known.
    pub timeline: Option<u32>,
}

/// Why writes go where they go, for `/health`, the metrics and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Writes go to this candidate.
    Primary(usize),
    /// No candidate takes writes, and why.
    Refused(String),
}

/// The pure part: candidates' observations in, the current primary out.
#[derive(Debug)]
pub struct Decider {
    current: Option<usize>,
    /// The highest timeline seen on a writable candidate.
    highest: u32,
    /// Since when each candidate has been writable without a break.
    writable_since: Vec<Option<Instant>>,
    /// Whether the first decision (at start) was made.
    started: bool,
    /// How candidates are named in messages.
    names: Vec<String>,
}

/// A change of the current primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub from: Option<usize>,
    pub to: Option<usize>,
    pub why: String,
}

impl Decider {
    pub fn new(names: Vec<String>) -> Decider {
        Decider {
            current: None,
            highest: 0,
            writable_since: vec![None; names.len()],
            started: false,
            names,
        }
    }

    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// A decider for a changed candidate list that keeps the current
    /// primary (now at `current`) without a new first decision.
    pub fn resume(names: Vec<String>, current: usize, timeline: u32) -> Decider {
        let mut d = Decider::new(names);
        d.started = true;
        d.current = Some(current);
        d.highest = timeline;
        d
    }

    /// Takes one round of observations (one per candidate); returns the
    /// change it made, if any, and an alarm to raise (a candidate writable
    /// where it must not be), if any.
    pub fn step(
        &mut self,
        seen: &[Seen],
        now: Instant,
        grace: Duration,
    ) -> (Option<Change>, Option<String>) {
        for (since, s) in self.writable_since.iter_mut().zip(seen) {
            *since = if s.writable {
                since.or(Some(now))
            } else {
                None
            };
        }
        let writable: Vec<usize> = (0..seen.len()).filter(|&i| seen[i].writable).collect();
        let tl = |i: usize| seen[i].timeline.unwrap_or(0);
        let top = writable.iter().map(|&i| tl(i)).max().unwrap_or(0);
        let on_top: Vec<usize> = writable.iter().copied().filter(|&i| tl(i) == top).collect();
        let was = self.current;
        if !self.started {
            // At start: the one writable candidate on the highest timeline.
            self.started = true;
            if on_top.len() == 1 {
                self.current = Some(on_top[0]);
                self.highest = top;
            }
            let alarm = self.alarm(seen, &writable);
            return (self.change(was, "first writable candidate"), alarm);
        }
        if on_top.len() > 1 && top >= self.highest {
            // Two primaries on one timeline: which is right cannot be
            // told; neither is used.
            self.current = None;
            let why = format!(
                "two writable primaries on timeline {top}: {}",
                on_top
                    .iter()
                    .map(|&i| self.names[i].as_str())
                    .collect::<Vec<_>>()
                    .join(" and ")
            );
            let alarm = self.alarm(seen, &writable);
            return (self.change(was, &why), alarm);
        }
        // A primary that says it is read-only (demoted, or fenced with
        // `default_transaction_read_only`) takes no more writes, even
        // before another is promoted: a block still open there could
        // otherwise write on. An unreachable one is kept: the link may
        // come back, and nothing else is writable yet.
        if let Some(c) = self.current {
            if seen[c].read_only {
                self.current = None;
            }
        }
        match self.current {
            Some(c) if seen[c].writable => {
                self.highest = self.highest.max(tl(c));
                (None, self.alarm(seen, &writable))
            }
            _ => {
                // The current primary is unreachable, read-only, or there is
                // none: follow a candidate promoted to a higher timeline, once
                // it has been writable for the grace period.
                let next = on_top.iter().copied().find(|&i| {
                    let promoted =
                        tl(i) > self.highest || (self.current.is_none() && tl(i) == self.highest);
                    let settled =
                        self.writable_since[i].is_some_and(|t| now.duration_since(t) >= grace);
                    Some(i) != self.current && promoted && settled
                });
                if let (Some(n), 1) = (next, on_top.len()) {
                    self.current = Some(n);
                    self.highest = tl(n);
                    let why = match was {
                        Some(c) if !seen[c].reachable => {
                            "the primary is unreachable and a candidate was promoted"
                        }
                        Some(_) => "the primary is read-only and a candidate was promoted",
                        None => "a single writable candidate",
                    };
                    let why = format!("{why} (timeline {})", tl(n));
                    return (self.change(was, &why), self.alarm(seen, &writable));
                }
                let why = match was {
                    Some(c) => format!("{} is read-only (demoted or fenced)", self.names[c]),
                    None => String::new(),
                };
                (self.change(was, &why), self.alarm(seen, &writable))
            }
        }
    }

    /// Several writable candidates at once: always worth an alarm, as one
    /// of them takes writes it should not (or none does).
    fn alarm(&self, seen: &[Seen], writable: &[usize]) -> Option<String> {
        if writable.len() < 2 {
            return None;
        }
        let list = writable
            .iter()
            .map(|&i| {
                let tl = seen[i].timeline.map_or("?".to_owned(), |t| t.to_string());
                format!("{} (timeline {tl})", self.names[i])
            })
            .collect::<Vec<_>>()
            .join(", ");
        Some(match self.current {
            Some(c) => format!(
                "several writable primaries: {list}; writes go to {} only",
                self.names[c]
            ),
            None => format!("several writable primaries: {list}; writes refused"),
        })
    }

    fn change(&self, from: Option<usize>, why: &str) -> Option<Change> {
        (from != self.current).then(|| Change {
            from,
            to: self.current,
            why: why.to_owned(),
        })
    }
}

/// The candidates and the current primary among them, shared by the
/// monitor (which decides) and the sessions (which connect).
#[derive(Debug)]
pub struct Candidates {
    /// Replaced by a reload that changes the candidates (see
    /// [`Candidates::reconfigure`]).
    addrs: std::sync::RwLock<Arc<Vec<BackendAddr>>>,
    /// Bumped when `addrs` is replaced: the monitor rebuilds its decider.
    layout: AtomicU64,
    /// A reload changed the candidates: the monitor checks them as it
    /// follows promotions, even when there is one.
    reconfigured: std::sync::atomic::AtomicBool,
    /// Index of the current primary plus one; 0: writes refused.
    current: AtomicU64,
    generation: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Which server each generation wrote to.
    history: Vec<(u64, Option<BackendAddr>)>,
    why: String,
    changed_at: Option<SystemTime>,
    alarm: Option<String>,
    seen: Vec<Seen>,
    refusal: Option<String>,
    /// Some candidate has taken writes: from then on every change counts.
    had_primary: bool,
    /// Changes after the first primary was chosen.
    changes: u64,
}

/// A snapshot for `/health`, `/metrics` and `SHOW pgsplit.primary`.
#[derive(Debug, Clone)]
pub struct Report {
    pub addrs: Vec<BackendAddr>,
    pub seen: Vec<Seen>,
    pub current: Option<usize>,
    pub generation: u64,
    pub why: String,
    pub changed_at: Option<SystemTime>,
    pub alarm: Option<String>,
    /// Times writes moved (or were refused) after the first primary was
    /// chosen.
    pub changes: u64,
}

/// The columns of `SHOW pgsplit.primaries`.
pub const COLUMNS: [&str; 6] = ["candidate", "role", "timeline", "current", "since", "why"];

impl Report {
    /// What a candidate was last seen as.
    pub fn role(&self, i: usize) -> &'static str {
        match self.seen.get(i) {
            None => "not polled",
            Some(s) if !s.reachable => "unreachable",
            Some(s) if s.writable => "primary",
            Some(s) if s.timeline.is_some() || !s.writable => "standby or read-only",
            Some(_) => "unknown",
        }
    }

    /// Seconds since the epoch of the last change, if there was one.
    pub fn changed_at_secs(&self) -> Option<u64> {
        self.changed_at
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }

    /// One row per candidate, as [`COLUMNS`] names them.
    pub fn rows(&self) -> Vec<Vec<String>> {
        (0..self.addrs.len())
            .map(|i| {
                let current = self.current == Some(i);
                vec![
                    self.addrs[i].to_string(),
                    self.role(i).to_owned(),
                    self.seen
                        .get(i)
                        .and_then(|s| s.timeline)
                        .map_or_else(String::new, |t| t.to_string()),
                    if current { "yes" } else { "no" }.to_owned(),
                    if current {
                        self.changed_at_secs()
                            .map_or_else(String::new, |s| s.to_string())
                    } else {
                        String::new()
                    },
                    if current || self.current.is_none() {
                        self.why.clone()
                    } else {
                        String::new()
                    },
                ]
            })
            .collect()
    }
}

impl Candidates {
    /// With one candidate, it is the primary from the start, as before
    /// failover following existed; with more, none is until the monitor
    /// has seen which is writable.
    pub fn new(addrs: Vec<BackendAddr>) -> Candidates {
        let single = addrs.len() == 1;
        Candidates {
            current: AtomicU64::new(u64::from(single)),
            generation: AtomicU64::new(1),
            state: Mutex::new(State {
                history: vec![(1, if single { addrs.first().cloned() } else { None })],
                why: if single {
                    "the only candidate"
                } else {
                    "not polled yet"
                }
                .into(),
                refusal: (!single).then(|| "no candidate has been seen writable yet".to_owned()),
                ..State::default()
            }),
            addrs: std::sync::RwLock::new(Arc::new(addrs)),
            layout: AtomicU64::new(0),
            reconfigured: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// More than one candidate, or a reloaded list: the monitor polls them
    /// and follows promotions.
    pub fn following(&self) -> bool {
        self.addrs().len() > 1 || self.reconfigured.load(Relaxed)
    }

    pub fn addrs(&self) -> Arc<Vec<BackendAddr>> {
        self.addrs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Which candidate list the monitor's decider must be built for.
    pub fn layout(&self) -> u64 {
        self.layout.load(Relaxed)
    }

    /// A reload's primary candidates. When the current primary is among
    /// them it stays current; otherwise writes are refused until the
    /// monitor has seen one of the new candidates writable, the check a
    /// promoted candidate goes through, and connections to the old one
    /// are closed (a new generation).
    pub fn reconfigure(&self, _old: &Config, new: &Config) {
        let list = new.primary_candidates();
        let mut st = self.lock();
        let old = self.addrs();
        if *old == list {
            return;
        }
        let current = self.current_index().and_then(|i| old.get(i)).cloned();
        let keep = current
            .as_ref()
            .and_then(|c| list.iter().position(|a| a == c));
        tracing::warn!(
            from = %old.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            to = %list.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            kept = keep.is_some(),
            "reload: the primary candidates changed"
        );
        st.seen = vec![Seen::default(); list.len()];
        *self
            .addrs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(list);
        self.reconfigured.store(true, Relaxed);
        match keep {
            Some(j) => self.current.store(j as u64 + 1, Relaxed),
            None => {
                let gen = self.generation.load(Relaxed) + 1;
                st.history.push((gen, None));
                if st.history.len() > 64 {
                    st.history.remove(0);
                }
                st.why = "the configuration named new primary candidates".into();
                st.changed_at = Some(SystemTime::now());
                st.refusal = Some(
                    "no writable primary: the reloaded candidates have not been seen writable yet"
                        .into(),
                );
                self.current.store(0, Relaxed);
                self.generation.store(gen, Relaxed);
            }
        }
        self.layout.fetch_add(1, Relaxed);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// Where writes go now and the generation that names it, or why none
    /// takes them.
    pub fn current(&self) -> Result<(BackendAddr, u64), String> {
        let gen = self.generation.load(Relaxed);
        let refused = || {
            self.lock()
                .refusal
                .clone()
                .unwrap_or_else(|| "no writable primary".into())
        };
        match self.current.load(Relaxed) {
            0 => Err(refused()),
            i => self
                .addrs()
                .get((i - 1) as usize)
                .map(|a| (a.clone(), gen))
                .ok_or_else(refused),
        }
    }

    /// Which candidate takes writes now.
    pub fn current_index(&self) -> Option<usize> {
        match self.current.load(Relaxed) {
            0 => None,
            i => Some((i - 1) as usize),
        }
    }

    /// The server generation `gen` wrote to, if any.
    pub fn addr_of(&self, gen: u64) -> Option<BackendAddr> {
        self.lock()
            .history
            .iter()
            .rev()
            .find(|(g, _)| *g == gen)
            .and_then(|(_, a)| a.clone())
    }

    /// Records one round of observations and what the decider made of it.
    pub fn record(&self, seen: Vec<Seen>, change: Option<Change>, alarm: Option<String>) {
        let mut st = self.lock();
        st.seen = seen;
        if st.alarm != alarm {
            if let Some(a) = &alarm {
                tracing::error!(alarm = %a, "primary candidates");
            } else {
                tracing::info!("primary candidates: alarm cleared");
            }
        }
        st.alarm = alarm;
        let Some(c) = change else { return };
        let addrs = self.addrs();
        let gen = self.generation.load(Relaxed) + 1;
        st.history
            .push((gen, c.to.and_then(|i| addrs.get(i).cloned())));
        if st.history.len() > 64 {
            st.history.remove(0);
        }
        st.why = c.why.clone();
        st.changed_at = Some(SystemTime::now());
        if st.had_primary {
            st.changes += 1;
        }
        st.had_primary |= c.to.is_some();
        st.refusal =
            c.to.is_none()
                .then(|| format!("no writable primary: {}", c.why));
        match c.to {
            Some(i) => tracing::warn!(
                from = ?c.from.and_then(|f| addrs.get(f)).map(ToString::to_string),
                to = %addrs.get(i).map(ToString::to_string).unwrap_or_default(),
                why = %c.why,
                "writes now go to a new primary"
            ),
            None => tracing::error!(why = %c.why, "writes refused: no single writable primary"),
        }
        self.generation.store(gen, Relaxed);
        self.current
            .store(c.to.map_or(0, |i| i as u64 + 1), Relaxed);
    }

    pub fn report(&self) -> Report {
        let st = self.lock();
        Report {
            addrs: self.addrs().to_vec(),
            seen: st.seen.clone(),
            current: match self.current.load(Relaxed) {
                0 => None,
                i => Some((i - 1) as usize),
            },
            generation: self.generation.load(Relaxed),
            why: st.why.clone(),
            changed_at: st.changed_at,
            alarm: st.alarm.clone(),
            changes: st.changes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(1);

    fn w(timeline: u32) -> Seen {
        Seen {
            reachable: true,
            writable: true,
            read_only: false,
            timeline: Some(timeline),
        }
    }
    fn standby(timeline: u32) -> Seen {
        Seen {
            reachable: true,
            writable: false,
            read_only: true,
            timeline: Some(timeline),
        }
    }
    fn decider(n: usize) -> Decider {
        Decider::new((1..=n).map(|i| format!("h{i}")).collect())
    }

    const GONE: Seen = Seen {
        reachable: false,
        writable: false,
        read_only: false,
        timeline: None,
    };

    #[test]
    fn starts_on_the_writable_candidate() {
        let mut d = decider(2);
        let (c, alarm) = d.step(&[standby(1), w(1)], Instant::now(), GRACE);
        assert_eq!(c.unwrap().to, Some(1));
        assert_eq!(alarm, None);
    }

    #[test]
    fn follows_a_promotion_after_the_grace_period_only() {
        let t0 = Instant::now();
        let mut d = decider(2);
        d.step(&[w(1), standby(1)], t0, GRACE);
        assert_eq!(d.current(), Some(0));
        // The primary goes away; the replica is promoted to timeline 2.
        let (c, _) = d.step(&[GONE, w(2)], t0 + Duration::from_millis(100), GRACE);
        assert_eq!(c, None, "not before the grace period");
        let (c, _) = d.step(&[GONE, w(2)], t0 + Duration::from_millis(1200), GRACE);
        let c = c.expect("followed");
        assert_eq!((c.from, c.to), (Some(0), Some(1)));
        // The old primary comes back writable on its old timeline: ignored,
        // and raised.
        let (c, alarm) = d.step(&[w(1), w(2)], t0 + Duration::from_secs(5), GRACE);
        assert_eq!(c, None);
        assert_eq!(d.current(), Some(1));
        assert!(alarm
            .unwrap()
            .contains("h1 (timeline 1), h2 (timeline 2); writes go to h2 only"));
    }

    #[test]
    fn never_follows_while_the_primary_is_writable() {
        let t0 = Instant::now();
        let mut d = decider(2);
        d.step(&[w(1), standby(1)], t0, GRACE);
        // A candidate on a higher timeline while the primary still takes
        // writes (a promotion without fencing): stay, and raise it.
        for s in 1..5 {
            let (c, _) = d.step(&[w(1), w(2)], t0 + Duration::from_secs(s), GRACE);
            assert_eq!(c, None);
        }
        assert_eq!(d.current(), Some(0));
    }

    #[test]
    fn a_fenced_primary_hands_over_to_a_promoted_one() {
        let t0 = Instant::now();
        let mut d = decider(2);
        d.step(&[w(1), standby(1)], t0, GRACE);
        // Fenced (read-only): it takes no more writes at once.
        let (c, _) = d.step(
            &[standby(1), standby(1)],
            t0 + Duration::from_secs(1),
            GRACE,
        );
        let c = c.expect("dropped");
        assert_eq!((c.from, c.to), (Some(0), None));
        assert!(c.why.contains("h1 is read-only"), "{}", c.why);
        // Then the other is promoted.
        d.step(&[standby(1), w(2)], t0 + Duration::from_secs(2), GRACE);
        let (c, _) = d.step(&[standby(1), w(2)], t0 + Duration::from_secs(4), GRACE);
        assert_eq!(c.unwrap().to, Some(1));
    }

    #[test]
    fn a_fence_lifted_before_any_promotion_gives_writes_back() {
        let t0 = Instant::now();
        let mut d = decider(2);
        d.step(&[w(1), standby(1)], t0, GRACE);
        d.step(
            &[standby(1), standby(1)],
            t0 + Duration::from_secs(1),
            GRACE,
        );
        assert_eq!(d.current(), None);
        d.step(&[w(1), standby(1)], t0 + Duration::from_secs(2), GRACE);
        let (c, _) = d.step(&[w(1), standby(1)], t0 + Duration::from_secs(4), GRACE);
        assert_eq!(c.unwrap().to, Some(0));
    }

    #[test]
    fn two_writable_on_one_timeline_refuse_writes() {
        let t0 = Instant::now();
        let mut d = decider(2);
        let (c, alarm) = d.step(&[w(1), w(1)], t0, GRACE);
        assert_eq!(c, None, "no primary chosen at start");
        assert!(alarm.unwrap().contains("writes refused"));
        let mut d = decider(2);
        d.step(&[w(1), standby(1)], t0, GRACE);
        let (c, alarm) = d.step(&[w(1), w(1)], t0 + Duration::from_secs(1), GRACE);
        let c = c.unwrap();
        assert_eq!(c.to, None, "writes refused");
        assert_eq!(c.why, "two writable primaries on timeline 1: h1 and h2");
        assert!(alarm.is_some());
        // One of them steps down: once the other has been writable for the
        // grace period, it is followed.
        let ms = Duration::from_millis;
        let (c, _) = d.step(&[standby(1), w(1)], t0 + ms(1500), GRACE);
        assert_eq!(c, None);
        let (c, alarm) = d.step(&[standby(1), w(1)], t0 + ms(2500), GRACE);
        assert_eq!(c.unwrap().to, Some(1));
        assert_eq!(alarm, None);
    }

    #[test]
    fn at_start_the_highest_timeline_wins() {
        let mut d = decider(3);
        let (c, alarm) = d.step(&[w(1), w(3), standby(3)], Instant::now(), GRACE);
        assert_eq!(c.unwrap().to, Some(1));
        assert!(alarm.unwrap().contains("writes go to h2 only"));
    }

    #[test]
    fn a_primary_that_is_only_unreachable_is_kept() {
        let t0 = Instant::now();
        let mut d = decider(2);
        d.step(&[w(1), standby(1)], t0, GRACE);
        for s in 1..5 {
            let (c, _) = d.step(&[GONE, standby(1)], t0 + Duration::from_secs(s), GRACE);
            assert_eq!(c, None);
        }
        assert_eq!(d.current(), Some(0));
    }

    #[test]
    fn generations_remember_where_they_wrote() {
        let addr = |p| BackendAddr {
            host: "127.0.0.1".into(),
            port: p,
            hosts: Vec::new(),
            sslmode: crate::config::SslMode::Disable,
            sslrootcert: None,
        };
        let c = Candidates::new(vec![addr(1), addr(2)]);
        assert!(c.current().is_err());
        c.record(
            vec![w(1), standby(1)],
            Some(Change {
                from: None,
                to: Some(0),
                why: "x".into(),
            }),
            None,
        );
        let (a, g1) = c.current().unwrap();
        assert_eq!(a.port, 1);
        c.record(
            vec![GONE, w(2)],
            Some(Change {
                from: Some(0),
                to: Some(1),
                why: "y".into(),
            }),
            None,
        );
        let (a, g2) = c.current().unwrap();
        assert_eq!((a.port, g2), (2, g1 + 1));
        assert_eq!(c.addr_of(g1).unwrap().port, 1);
        assert_eq!(c.report().why, "y");
    }

    fn cfg_with(hosts: &[&str]) -> Config {
        let mut c = Config::default();
        c.primary.hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
        c
    }

    #[test]
    fn a_reload_keeps_the_current_primary_when_it_stays_a_candidate() {
        let old = cfg_with(&["127.0.0.1:1", "127.0.0.1:2"]);
        let c = Candidates::new(old.primary_candidates());
        c.record(
            vec![w(1), standby(1)],
            Some(Change {
                from: None,
                to: Some(0),
                why: "x".into(),
            }),
            None,
        );
        let (_, g) = c.current().unwrap();
        let layout = c.layout();
        let new = cfg_with(&["127.0.0.1:3", "127.0.0.1:1"]);
        c.reconfigure(&old, &new);
        let (a, g2) = c.current().unwrap();
        // Same server, same generation: its connections stay in use.
        assert_eq!((a.port, g2), (1, g));
        assert_eq!(c.current_index(), Some(1));
        assert_ne!(c.layout(), layout, "the monitor rebuilds its decider");
        assert!(c.following());
        // The same list again changes nothing.
        c.reconfigure(&new, &new);
        assert_eq!(c.current().unwrap().1, g);
    }

    #[test]
    fn a_reload_that_drops_the_primary_refuses_writes_until_one_is_seen_writable() {
        let old = Config::default();
        let c = Candidates::new(old.primary_candidates());
        let (first, g) = c.current().unwrap();
        let new = cfg_with(&["127.0.0.1:7"]);
        c.reconfigure(&old, &new);
        let e = c.current().unwrap_err();
        assert!(e.contains("not been seen writable"), "{e}");
        assert!(c.following(), "one new candidate is still checked");
        assert_eq!(c.generation(), g + 1, "old connections are closed");
        // A lost commit on the old primary is still asked where it went.
        assert_eq!(c.addr_of(g), Some(first));
        let mut d = Decider::new(vec!["127.0.0.1:7".into()]);
        let (change, _) = d.step(&[w(1)], Instant::now(), GRACE);
        c.record(vec![w(1)], change, None);
        assert_eq!(c.current().unwrap().0.port, 7);
    }
}
