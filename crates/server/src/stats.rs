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
