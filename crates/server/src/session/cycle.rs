//! What a cycle sent to a server expects back: the pending cycles
//! (`Pending`), the replies to Parse and Close the proxy must account for
//! (`Expect`), a read that may run again on the primary (`Retry`) and a
//! COPY FROM STDIN in progress (`CopyIn`).

use bytes::Bytes;
use pgsplit_router::{Class, StmtKind, Target};

use super::statements::Stmt;

/// A message or query sent whose ReadyForQuery has not come back.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) seq: u64,
    /// Extended-protocol batch (ends in Sync) rather than a simple Query.
    pub(super) extended: bool,
    /// The cycle ends a block with COMMIT (its settings then persist).
    pub(super) commits: bool,
    /// The cycle may commit a write (for read-your-writes).
    pub(super) writes: bool,
    /// The proxy's own query (the WAL position after a write): its
    /// replies are consumed, never relayed.
    pub(super) own: bool,
    /// One statement: when it fails, nothing of it was committed.
    pub(super) single: bool,
    /// A read sent to the replica that is run again on the primary if the
    /// replica refuses it as a write (25006).
    pub(super) retryable: bool,
    /// A COPY: nothing may be pipelined behind it (the server would take
    /// it for COPY data), so the WAL position is asked for afterwards.
    pub(super) copy: bool,
    /// An autocommit write the proxy runs as a one-statement block (see
    /// `wrap`): its ReadyForQuery is not relayed, the closing COMMIT's is.
    pub(super) wrapped: bool,
    /// The COMMIT or ROLLBACK the proxy sends to end a wrapped write: owed
    /// to the client, but only its ErrorResponse and ReadyForQuery are
    /// relayed.
    pub(super) quiet: bool,
    /// It parses or runs a statement: an error for it reaches the
    /// application. (Drivers drop the answer to a lone Close or Sync.)
    pub(super) runs: bool,
    /// A client cycle: when it was sent and why it went where it did (an
    /// index into `stats::REASONS`), for the latency histogram.
    pub(super) timed: Option<(std::time::Instant, u8)>,
}

impl Pending {
    /// A cycle of the client's: a simple Query or a batch ending in Sync.
    pub(super) fn client(
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
            timed: None,
        }
    }

    /// A query of the proxy's own, answered to nobody.
    pub(super) fn own(seq: u64) -> Pending {
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
            timed: None,
        }
    }
}

/// What a ParseComplete/CloseComplete from the backend answers.
///
/// Statements are recorded as existing when their Parse is sent, so a
/// pipelined Bind already sees them; a Parse that never completes (its
/// batch failed) is undone when the batch's ReadyForQuery arrives.
#[derive(Debug)]
pub(super) enum Expect {
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

/// A read sent to the replica that runs again on the primary if the
/// replica refuses it as a write (25006).
pub(super) enum Retry {
    Query(Bytes),
    /// The batch in `Session::retry_frames` / `retry_meta`.
    Batch,
    /// A steady read (see `steady`): its block of messages, as sent.
    Block(Bytes),
}

/// A COPY FROM STDIN in progress: client frames go straight to `target`.
#[derive(Debug, Clone, Copy)]
pub(super) struct CopyIn {
    pub(super) target: Target,
    pub(super) extended: bool,
    /// The cycle that runs it: a simple Query's COPYs end with its
    /// ReadyForQuery.
    pub(super) seq: u64,
}
