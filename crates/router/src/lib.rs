//! Pure routing policy for pgsplit: what a SQL string does, and so where it may run.
//!
//! Nothing here performs I/O, takes a clock or awaits: the server hands in
//! plain data (the SQL text of a `Query` or `Parse` message) and gets a plain
//! value back, so every rule is covered by ordinary unit and property tests.
//!
//! # Layout
//!
//! A SQL string flows through the modules in this order:
//!
//! - [`lexer`] turns the text into tokens without allocating. It skips
//!   whitespace, comments, string literals, quoted identifiers and
//!   dollar-quoted bodies, so nothing inside them is ever mistaken for a
//!   keyword, and it picks up `pgsplit:primary` / `pgsplit:replica` hint
//!   comments on the way.
//! - [`classify`] splits the token stream into statements at top-level `;`,
//!   decides each statement's [`StmtKind`] from its keywords when it can be
//!   certain, and combines the statements of one string by precedence. Its
//!   [`Classifier`] is the entry point the server calls.
//! - [`deep`] is the second stage: statements the lexical rules cannot decide
//!   with certainty (an unfamiliar leading keyword, `update` used as a column
//!   name, …) are parsed with `sqlparser` and the AST is walked. Its answers are
//!   kept in a bounded cache because a parse costs some thirty times the
//!   lexical path (about 4 µs against 140 ns for a typical statement).
//! - [`functions`] knows which function calls write or create session state
//!   (`nextval`, advisory locks, …), plus the operator's own glob patterns.
//!   Both stages consult it.
//!
//! - [`shape`] blanks the literals of a `SELECT`, so the server can
//!   remember the class of statements that differ only in their values.
//!
//! - [`route`] turns a [`Class`] and the session's state into the routing
//!   decision (transaction state, pins, read-your-writes).

#![forbid(unsafe_code)]

pub mod classify;
pub mod deep;
pub mod functions;
pub mod lexer;
pub mod route;
pub mod server_state;
pub mod shape;

#[cfg(any(test, feature = "corpus"))]
pub mod corpus;

pub use classify::{classify_lexical, split, Classifier, ClassifierConfig};

/// Which kind of backend a statement (or a hint) asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The read-write primary.
    Primary,
    /// A read-only streaming replica.
    Replica,
}

/// What a statement does, as far as routing is concerned.
///
/// When a string holds several statements their kinds are combined by
/// [`StmtKind::combine`]; the doc of each variant says which statements map to
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StmtKind {
    /// Nothing but whitespace, comments and semicolons.
    Empty,
    /// Safe on a read-only replica: `SELECT`, `VALUES`, `TABLE`, `SHOW`,
    /// `EXPLAIN` without `ANALYZE` (or with `ANALYZE` of a read),
    /// `COPY … TO STDOUT` of a table or a read query.
    Read,
    /// Must run on the primary: DML, `COPY … FROM`, DDL, maintenance
    /// (`VACUUM`, `ANALYZE`, …), `LOCK`, `CALL`, `DO`, `NOTIFY`, locking
    /// `SELECT … FOR UPDATE/SHARE`, `SELECT … INTO`, data-modifying CTEs,
    /// `EXPLAIN ANALYZE` of a write, calls of writing functions, two-phase
    /// commit commands, SQL-level `EXECUTE` and `DEALLOCATE`, `UNLISTEN`.
    Write,
    /// `BEGIN` / `START TRANSACTION`; `read_only` is true when the last access
    /// mode given is `READ ONLY`.
    Begin {
        /// The transaction was opened `READ ONLY`.
        read_only: bool,
    },
    /// `COMMIT`, `END`, `COMMIT AND [NO] CHAIN` (not `COMMIT PREPARED`).
    Commit,
    /// `ROLLBACK`, `ABORT` (not `ROLLBACK TO SAVEPOINT`, not `ROLLBACK PREPARED`).
    Rollback,
    /// Belongs to the current transaction's backend and is harmless
    /// elsewhere: `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`, `SET TRANSACTION`,
    /// `SET LOCAL`, `SET CONSTRAINTS`, `FETCH`, `MOVE`, `CLOSE`, `DECLARE`
    /// of a read-only cursor without `WITH HOLD`.
    TxnScoped,
    /// Session state the proxy replays on every backend the session uses:
    /// `SET`, `RESET`, `SET ROLE`, `SET SESSION AUTHORIZATION`,
    /// `SET SESSION CHARACTERISTICS`, `DISCARD`.
    Session,
    /// Creates session state that cannot be moved to another backend, so the
    /// session must stay on the primary: `LISTEN`, temporary
    /// tables, views and sequences, `SELECT … INTO TEMP`, session advisory
    /// locks, `DECLARE … WITH HOLD`, SQL-level `PREPARE`, `LOAD`, and
    /// `set_config(…, false)`.
    Pin,
    /// Neither stage could decide; the server sends it to the primary and
    /// counts it.
    Unknown,
}

impl StmtKind {
    /// True when the statement can only run on the primary (Write, Pin,
    /// Unknown, and a read-write `BEGIN`).
    pub fn needs_primary(self) -> bool {
        matches!(
            self,
            StmtKind::Write
                | StmtKind::Pin
                | StmtKind::Unknown
                | StmtKind::Begin { read_only: false }
        )
    }

    /// Position in the combination order; a string's kind is the kind of its
    /// highest-ranked statement.
    ///
    /// From highest to lowest: Unknown, Pin, Write, Begin (read write),
    /// Session, Begin (read only), Commit, Rollback, TxnScoped, Read, Empty.
    /// The order puts whatever constrains the server most on top:
    /// `BEGIN; INSERT …; COMMIT` must be treated as a write, and
    /// `SET a = 1; SELECT 1` must still be replayed.
    pub fn rank(self) -> u8 {
        match self {
            StmtKind::Empty => 0,
            StmtKind::Read => 1,
            StmtKind::TxnScoped => 2,
            StmtKind::Rollback => 3,
            StmtKind::Commit => 4,
            StmtKind::Begin { read_only: true } => 5,
            StmtKind::Session => 6,
            StmtKind::Begin { read_only: false } => 7,
            StmtKind::Write => 8,
            StmtKind::Pin => 9,
            StmtKind::Unknown => 10,
        }
    }

    /// The higher-ranked of two kinds (see [`StmtKind::rank`]).
    #[must_use]
    pub fn combine(self, other: StmtKind) -> StmtKind {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

/// Which stage of the classifier produced an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Every statement was decided by the lexical rules.
    Lexer,
    /// At least one statement needed the SQL parser (or its cache).
    Parser,
}

impl StmtKind {
    /// What a wrapper that runs a statement (`EXPLAIN ANALYZE`, `COPY
    /// (query)`, `DECLARE … FOR`) makes of the statement's kind. Statements
    /// that cannot be wrapped (a `BEGIN`, a `SET`) are a syntax error in
    /// PostgreSQL and count as writes here.
    pub fn executed(self) -> StmtKind {
        match self {
            StmtKind::Read
            | StmtKind::Write
            | StmtKind::Pin
            | StmtKind::Unknown
            | StmtKind::TxnScoped => self,
            _ => StmtKind::Write,
        }
    }
}

/// A PostgreSQL boolean option spelling (`on`, `t`, `yes`, `1`, …), or
/// `None` when `text` is not one.
pub(crate) fn option_bool(text: &[u8]) -> Option<bool> {
    let is = |words: &[&str]| {
        words
            .iter()
            .any(|w| text.eq_ignore_ascii_case(w.as_bytes()))
    };
    if is(&["true", "t", "on", "yes", "y", "1"]) {
        Some(true)
    } else if is(&["false", "f", "off", "no", "n", "0"]) {
        Some(false)
    } else {
        None
    }
}

/// The classification of one SQL string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// Combined kind of all statements in the string.
    pub kind: StmtKind,
    /// A `pgsplit:primary` / `pgsplit:replica` hint found in any comment of
    /// the string; the last one wins.
    pub hint: Option<Target>,
    /// Number of non-empty statements (`;`-separated at top level).
    pub statements: u32,
    /// Which stage decided.
    pub stage: Stage,
}

#[cfg(test)]
mod tests {
    use super::StmtKind::{self, *};

    const ORDER: [StmtKind; 11] = [
        Empty,
        Read,
        TxnScoped,
        Rollback,
        Commit,
        Begin { read_only: true },
        Session,
        Begin { read_only: false },
        Write,
        Pin,
        Unknown,
    ];

    #[test]
    fn combine_follows_the_documented_precedence() {
        for (i, a) in ORDER.iter().enumerate() {
            for (j, b) in ORDER.iter().enumerate() {
                let want = if i >= j { *a } else { *b };
                assert_eq!(a.combine(*b), want, "{a:?} + {b:?}");
            }
        }
    }

    #[test]
    fn needs_primary_covers_exactly_the_primary_only_kinds() {
        let primary: Vec<_> = ORDER.iter().filter(|k| k.needs_primary()).collect();
        assert_eq!(
            primary,
            [&Begin { read_only: false }, &Write, &Pin, &Unknown]
        );
    }
}
