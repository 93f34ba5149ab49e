//! Transaction control: `BEGIN`, `START TRANSACTION`, `COMMIT`, `END`,
//! `ROLLBACK`, `ABORT`.
//!
//! These are parsed strictly, word by word, because each distinction matters
//! to the server: `BEGIN READ ONLY` may run on a replica while `BEGIN` may
//! not, `COMMIT PREPARED` is a write and not the end of the session's
//! transaction, `ROLLBACK TO SAVEPOINT` keeps the transaction open. Anything
//! that does not fit the grammar is left to the parser.

use super::cursor::Cursor;
use crate::lexer::{Token, TokenKind};
use crate::StmtKind;

/// After `BEGIN`: `[WORK | TRANSACTION] [mode [, …]]`.
pub(crate) fn begin(cur: &mut Cursor<'_>) -> Option<StmtKind> {
    let mut next = cur.next();
    if next.is_some_and(|t| t.is_keyword("work") || t.is_keyword("transaction")) {
        next = cur.next();
    }
    modes(cur, next)
}

/// After `START`: `TRANSACTION [mode [, …]]`.
pub(crate) fn start(cur: &mut Cursor<'_>) -> Option<StmtKind> {
    if !cur.next()?.is_keyword("transaction") {
        return None;
    }
    let next = cur.next();
    modes(cur, next)
}

/// Transaction modes, the first one already read as `next`. The last access
/// mode given wins, as in PostgreSQL.
fn modes<'a>(cur: &mut Cursor<'a>, mut next: Option<Token<'a>>) -> Option<StmtKind> {
    let mut read_only = false;
    while let Some(tok) = next {
        if tok.kind == TokenKind::Comma {
            next = cur.next();
            continue;
        }
        if tok.is_keyword("isolation") {
            if !cur.next()?.is_keyword("level") {
                return None;
            }
            let level = cur.next()?;
            if level.is_keyword("repeatable") || level.is_keyword("read") {
                let second = cur.next()?;
                let fits = if level.is_keyword("repeatable") {
                    second.is_keyword("read")
                } else {
                    second.is_keyword("committed") || second.is_keyword("uncommitted")
                };
                if !fits {
                    return None;
                }
            } else if !level.is_keyword("serializable") {
                return None;
            }
        } else if tok.is_keyword("read") {
            let access = cur.next()?;
            if access.is_keyword("only") {
                read_only = true;
            } else if access.is_keyword("write") {
                read_only = false;
            } else {
                return None;
            }
        } else if tok.is_keyword("not") {
            if !cur.next()?.is_keyword("deferrable") {
                return None;
            }
        } else if !tok.is_keyword("deferrable") {
            return None;
        }
        next = cur.next();
    }
    Some(StmtKind::Begin { read_only })
}

/// After `COMMIT` (`prepared` allowed) or `END`:
/// `[WORK | TRANSACTION] [AND [NO] CHAIN]`, or `PREPARED 'gid'`.
pub(crate) fn commit(cur: &mut Cursor<'_>, prepared_allowed: bool) -> Option<StmtKind> {
    let mut next = cur.next();
    if prepared_allowed && next.is_some_and(|t| t.is_keyword("prepared")) {
        return Some(StmtKind::Write);
    }
    if next.is_some_and(|t| t.is_keyword("work") || t.is_keyword("transaction")) {
        next = cur.next();
    }
    chain_then_end(cur, next).then_some(StmtKind::Commit)
}

/// After `ROLLBACK` (`prepared` and `to` allowed) or `ABORT`.
pub(crate) fn rollback(cur: &mut Cursor<'_>, is_abort: bool) -> Option<StmtKind> {
    let mut next = cur.next();
    if !is_abort && next.is_some_and(|t| t.is_keyword("prepared")) {
        return Some(StmtKind::Write);
    }
    if next.is_some_and(|t| t.is_keyword("work") || t.is_keyword("transaction")) {
        next = cur.next();
    }
    if !is_abort && next.is_some_and(|t| t.is_keyword("to")) {
        let mut name = cur.next()?;
        if name.is_keyword("savepoint") {
            name = cur.next()?;
        }
        return (name.is_name() && cur.next().is_none()).then_some(StmtKind::TxnScoped);
    }
    chain_then_end(cur, next).then_some(StmtKind::Rollback)
}

/// `[AND [NO] CHAIN]` followed by the end of the statement.
fn chain_then_end(cur: &mut Cursor<'_>, next: Option<Token<'_>>) -> bool {
    let Some(tok) = next else {
        return true;
    };
    if !tok.is_keyword("and") {
        return false;
    }
    let mut word = cur.next();
    if word.is_some_and(|t| t.is_keyword("no")) {
        word = cur.next();
    }
    word.is_some_and(|t| t.is_keyword("chain")) && cur.next().is_none()
}
