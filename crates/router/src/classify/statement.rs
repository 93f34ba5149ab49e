//! One statement, decided by its leading keyword.
//!
//! The first keyword names the statement's family. Most families need
//! nothing more (`ALTER` is a write, `SHOW` a read); the rest hand the
//! remaining tokens to the rule that owns them: queries and DML to
//! [`query`], transaction control to
//! [`transaction`], statements carrying another
//! statement to [`nested`], plus the few small ones below
//! (`CREATE`, `SET`, `PREPARE`).
//!
//! An unfamiliar leading keyword (new syntax, a typo, garbage) is never
//! guessed at: the statement goes to the parser, and if the parser fails
//! too it is `Unknown` and runs on the primary.

use super::cursor::Cursor;
use super::query::{self, Mode};
use super::{nested, transaction};
use crate::functions::WriteFunctions;
use crate::lexer::{Token, TokenKind};
use crate::StmtKind;

/// How deeply statements may nest (`EXPLAIN ANALYZE DECLARE … FOR …`)
/// before the lexical stage gives up; it bounds the recursion on hostile
/// input such as ten thousand `EXPLAIN`s in a row.
const MAX_NESTING: u8 = 4;

/// Leading keywords that always make a write, whatever follows.
const WRITES: &[&str] = &[
    "alter",
    "analyse",
    "analyze",
    "checkpoint",
    "cluster",
    "comment",
    "deallocate",
    "do",
    "drop",
    "execute",
    "grant",
    "import",
    "lock",
    "notify",
    "reassign",
    "refresh",
    "reindex",
    "revoke",
    "security",
    "truncate",
    // Ends listening, so it creates no state; a standby refuses it.
    "unlisten",
    "vacuum",
];

/// Leading keywords of statements that leave unmovable session state.
const PINS: &[&str] = &["listen", "load"];

/// Leading keywords of statements bound to the current transaction.
const TXN_SCOPED: &[&str] = &["close", "fetch", "move", "release", "savepoint"];

/// Leading keywords of statements that change replayable session state.
const SESSION: &[&str] = &["discard", "reset"];

fn is_any(tok: &Token<'_>, keywords: &[&str]) -> bool {
    keywords.iter().any(|kw| tok.is_keyword(kw))
}

/// Classifies the statement whose first token is `first`, reading the rest
/// from `cur` (not necessarily to its end). `None` means "not certain".
pub(crate) fn classify<'a>(
    cur: &mut Cursor<'a>,
    first: Token<'a>,
    fns: &WriteFunctions<'_>,
    nesting: u8,
) -> Option<StmtKind> {
    if nesting > MAX_NESTING {
        return None;
    }
    match first.kind {
        TokenKind::LParen => return query::scan(cur, first, fns, Mode::Query { with: false }),
        TokenKind::Word => {}
        _ => return None,
    }
    let w = &first;
    if is_any(w, &["select", "values", "table"]) {
        query::scan(cur, first, fns, Mode::Query { with: false })
    } else if w.is_keyword("with") {
        query::scan(cur, first, fns, Mode::Query { with: true })
    } else if is_any(w, &["insert", "update", "delete", "merge", "call"]) {
        query::scan(cur, first, fns, Mode::Dml)
    } else if w.is_keyword("show") {
        Some(StmtKind::Read)
    } else if w.is_keyword("begin") {
        transaction::begin(cur)
    } else if w.is_keyword("start") {
        transaction::start(cur)
    } else if w.is_keyword("commit") {
        transaction::commit(cur, true)
    } else if w.is_keyword("end") {
        transaction::commit(cur, false)
    } else if w.is_keyword("rollback") {
        transaction::rollback(cur, false)
    } else if w.is_keyword("abort") {
        transaction::rollback(cur, true)
    } else if w.is_keyword("set") {
        set(cur)
    } else if w.is_keyword("explain") {
        nested::explain(cur, fns, nesting)
    } else if w.is_keyword("copy") {
        nested::copy(cur, fns, nesting)
    } else if w.is_keyword("declare") {
        nested::declare(cur, fns, nesting)
    } else if w.is_keyword("create") {
        create(cur, fns)
    } else if w.is_keyword("prepare") {
        prepare(cur)
    } else if is_any(w, WRITES) {
        Some(StmtKind::Write)
    } else if is_any(w, TXN_SCOPED) {
        Some(StmtKind::TxnScoped)
    } else if is_any(w, SESSION) {
        Some(StmtKind::Session)
    } else if is_any(w, PINS) {
        Some(StmtKind::Pin)
    } else {
        None
    }
}

/// After `SET`: `LOCAL`, `TRANSACTION` and `CONSTRAINTS` only affect the
/// current transaction; everything else (`SESSION …`, `ROLE`, `TIME ZONE`,
/// `name = value`) changes the session.
fn set(cur: &mut Cursor<'_>) -> Option<StmtKind> {
    let next = cur.next()?;
    if is_any(&next, &["local", "transaction", "constraints"]) {
        Some(StmtKind::TxnScoped)
    } else {
        Some(StmtKind::Session)
    }
}

/// After `PREPARE`: `TRANSACTION 'gid'` is two-phase commit, a write that
/// ends the session's transaction; `name [(types)] AS statement` stores a
/// statement in this backend, which pins the session.
fn prepare(cur: &mut Cursor<'_>) -> Option<StmtKind> {
    let next = cur.next()?;
    if next.is_keyword("transaction") {
        Some(StmtKind::Write)
    } else if next.is_name() {
        Some(StmtKind::Pin)
    } else {
        None
    }
}

/// After `CREATE`: a write, or a pin for a temporary object
/// (`[OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY}`, or anything created
/// in `pg_temp`).
fn create<'a>(cur: &mut Cursor<'a>, fns: &WriteFunctions<'_>) -> Option<StmtKind> {
    let mut tok = cur.next()?;
    if tok.is_keyword("or") {
        if !cur.next()?.is_keyword("replace") {
            return None;
        }
        tok = cur.next()?;
    }
    let mut temp = false;
    while is_any(&tok, &["global", "local", "temp", "temporary"]) {
        temp |= tok.is_keyword("temp") || tok.is_keyword("temporary");
        tok = cur.next()?;
    }
    let own = if temp { StmtKind::Pin } else { StmtKind::Write };
    query::scan(cur, tok, fns, Mode::Create).map(|k| k.combine(own))
}
