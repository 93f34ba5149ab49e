//! Counters the proxy keeps about its own decisions. Plain atomics for now;
//! the metrics exporter reads them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use pgsplit_router::route::{Choice, Decision};
use pgsplit_router::{Class, Stage, StmtKind};

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub routed_primary: AtomicU64,
    pub routed_replica: AtomicU64,
    pub routed_any: AtomicU64,
    /// Statements neither classifier stage could decide (sent to the primary).
    pub unclassified: AtomicU64,
    /// Statements the lexer left to the full parser.
    pub parser_decided: AtomicU64,
    /// Reads the replica refused as writes (25006), run again on the primary.
    pub retried_on_primary: AtomicU64,
    pub clients_accepted: AtomicU64,
    pub clients_rejected: AtomicU64,
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

    pub fn count_route(&self, d: &Decision) {
        let c = match d.choice {
            Choice::Primary => &self.routed_primary,
            Choice::Replica => &self.routed_replica,
            Choice::AnyOpen => &self.routed_any,
        };
        c.fetch_add(1, Relaxed);
    }
}
