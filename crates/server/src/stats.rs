//! Counters the proxy keeps about its own decisions. Plain atomics for now;
//! the metrics exporter reads them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use pgsplit_router::route::{Choice, Decision, Reason};
use pgsplit_router::{Class, Stage, StmtKind};

/// Every routing reason, in the order of [`Stats::routed`].
pub const REASONS: [Reason; 12] = [
    Reason::Bound,
    Reason::Transaction,
    Reason::Pinned,
    Reason::Hint,
    Reason::Read,
    Reason::Write,
    Reason::ReadOnlyTransaction,
    Reason::Unclassified,
    Reason::Anywhere,
    Reason::ReadYourWrites,
    Reason::Stale,
    Reason::Setting,
];

/// Outcomes of lost commits, in the order of [`Stats::resolutions`].
pub const RESOLUTIONS: [&str; 3] = ["committed", "aborted", "unknown"];

/// SQLSTATEs of a read the replica may fail only because it has not
/// replayed what the primary created yet: undefined table, function,
/// schema, object and column.
pub const MISSING: [&str; 5] = ["42P01", "42883", "3F000", "42704", "42703"];

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub routed_primary: AtomicU64,
    pub routed_replica: AtomicU64,
    pub routed_any: AtomicU64,
    /// Decisions by [primary, replica, any open] and reason.
    pub routed: [[AtomicU64; REASONS.len()]; 3],
    /// Statements neither classifier stage could decide (sent to the primary).
    pub unclassified: AtomicU64,
    /// Statements the lexer left to the full parser.
    pub parser_decided: AtomicU64,
    /// Reads the replica refused as writes (25006), run again on the primary.
    pub retried_on_primary: AtomicU64,
    /// Reads the replica failed for want of an object it may not have
    /// replayed yet, run again on the primary, by [`MISSING`] SQLSTATE.
    pub retried_missing: [AtomicU64; MISSING.len()],
    /// Lost commits resolved, by outcome: committed, aborted, unknown.
    pub resolutions: [AtomicU64; 3],
    pub clients_accepted: AtomicU64,
    pub clients_rejected: AtomicU64,
    /// Client connections open now, logging in or logged in.
    pub clients_connected: AtomicU64,
    /// Cycle durations by [primary, replica] and reason (see [`Latency`]).
    pub latency: [[Latency; REASONS.len()]; 2],
}

/// Upper bounds (seconds) of the statement latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
    f64::INFINITY,
];

/// A histogram of cycle durations (a simple Query, or an extended batch up
/// to Sync, from sending it to the server to its ReadyForQuery): one
/// atomic add per bucket hit and one for the sum, nothing allocated.
#[derive(Debug, Default)]
pub struct Latency {
    /// Not cumulative: the exposition sums them.
    pub buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    pub sum_micros: AtomicU64,
}

impl Latency {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LATENCY_BUCKETS.len() - 1);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }
}

/// The index of `r` in [`REASONS`].
pub fn reason_index(r: Reason) -> u8 {
    REASONS.iter().position(|x| *x == r).unwrap_or(0) as u8
}

impl Stats {
    pub fn count_class(&self, c: &Class) {
        if c.kind == StmtKind::Unknown {
            self.unclassified.fetch_add(1, Relaxed);
        }
        if c.stage == Stage::Parser {
            self.parser_decided.fetch_add(1, Relaxed);
        }
    }

    /// Counts a lost commit's resolution by its outcome's name.
    pub fn count_resolution(&self, outcome: &str) {
        let i = RESOLUTIONS.iter().position(|o| *o == outcome).unwrap_or(2);
        self.resolutions[i].fetch_add(1, Relaxed);
    }

    pub fn count_route(&self, d: &Decision) {
        let (c, i) = match d.choice {
            Choice::Primary => (&self.routed_primary, 0),
            Choice::Replica => (&self.routed_replica, 1),
            Choice::AnyOpen => (&self.routed_any, 2),
        };
        c.fetch_add(1, Relaxed);
        let r = REASONS.iter().position(|r| *r == d.reason).unwrap_or(0);
        self.routed[i][r].fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_counter() {
        // A new reason fails to compile here until it is listed.
        fn listed(r: Reason) -> bool {
            match r {
                Reason::Bound
                | Reason::Transaction
                | Reason::Pinned
                | Reason::Hint
                | Reason::Read
                | Reason::Write
                | Reason::ReadOnlyTransaction
                | Reason::Unclassified
                | Reason::Anywhere
                | Reason::ReadYourWrites
                | Reason::Stale
                | Reason::Setting => REASONS.contains(&r),
            }
        }
        assert!(REASONS.iter().all(|r| listed(*r)));
        let mut names: Vec<_> = REASONS.iter().map(|r| r.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), REASONS.len());
    }
}
