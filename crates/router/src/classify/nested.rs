//! Statements that carry another statement: `EXPLAIN`, `COPY (query) TO`,
//! `DECLARE … CURSOR FOR query`.
//!
//! Each of them is as much of a write as the statement it runs, and no more:
//! `EXPLAIN ANALYZE DELETE` deletes, plain `EXPLAIN DELETE` only plans,
//! `COPY (DELETE … RETURNING *) TO STDOUT` deletes, a cursor over
//! `SELECT … FOR UPDATE` locks rows. So these rules read their own prefix and
//! classify the inner statement with the same rules as a top-level one.

use super::cursor::Cursor;
use super::statement;
use crate::functions::WriteFunctions;
use crate::lexer::{Token, TokenKind};
use crate::StmtKind;

/// A token that starts a query, telling `EXPLAIN (SELECT 1)` from
/// `EXPLAIN (ANALYZE) …`.
fn starts_query(tok: &Token<'_>) -> bool {
    tok.kind == TokenKind::LParen
        || ["select", "values", "with", "table"]
            .iter()
            .any(|kw| tok.is_keyword(kw))
}

/// After `EXPLAIN`: `[(option [, …])] statement` or
/// `[ANALYZE] [VERBOSE] statement`.
///
/// `ANALYZE` runs the statement, so the inner kind counts; `ANALYZE false`
/// (or `off`, `0`, …) does not. An `ANALYZE` value that is not a plain
/// boolean makes the statement a write, the safe side.
pub(crate) fn explain<'a>(
    cur: &mut Cursor<'a>,
    fns: &WriteFunctions<'_>,
    nesting: u8,
) -> Option<StmtKind> {
    // Some(on) when known, None when unsure.
    let mut analyze = Some(false);
    let mut tok = cur.next()?;
    if tok.kind == TokenKind::LParen && !starts_query(&cur.peek()?) {
        analyze = options(cur)?;
        tok = cur.next()?;
    } else {
        while tok.is_keyword("analyze") || tok.is_keyword("analyse") || tok.is_keyword("verbose") {
            if !tok.is_keyword("verbose") {
                analyze = Some(true);
            }
            tok = cur.next()?;
        }
    }
    let inner = statement::classify(cur, tok, fns, nesting + 1);
    match analyze {
        Some(false) => Some(StmtKind::Read),
        Some(true) => inner.map(StmtKind::executed),
        None => Some(inner.map_or(StmtKind::Write, |k| k.executed().combine(StmtKind::Write))),
    }
}

/// The option list of `EXPLAIN (…)`, its `(` already read: whether
/// `ANALYZE` is on (`Some(None)` when its value is not a plain boolean), or
/// `None` when the list is malformed.
fn options(cur: &mut Cursor<'_>) -> Option<Option<bool>> {
    let mut analyze = Some(false);
    loop {
        let name = cur.next()?;
        if name.kind != TokenKind::Word {
            return None;
        }
        let mut value = None;
        let mut values = 0;
        let closed = loop {
            let tok = cur.next()?;
            match tok.kind {
                TokenKind::Comma => break false,
                TokenKind::RParen => break true,
                TokenKind::LParen => return None,
                _ => {
                    value = Some(tok);
                    values += 1;
                }
            }
        };
        if name.is_keyword("analyze") || name.is_keyword("analyse") {
            analyze = match (value, values) {
                (None, _) => Some(true),
                (Some(v), 1) => boolean(&v),
                _ => None,
            };
        }
        if closed {
            return Some(analyze);
        }
    }
}

/// A PostgreSQL boolean option value, or `None` when it is not a plain one.
fn boolean(tok: &Token<'_>) -> Option<bool> {
    let text = match tok.kind {
        TokenKind::Word | TokenKind::Number => tok.text,
        TokenKind::String if tok.text.first() == Some(&b'\'') && tok.text.len() >= 2 => {
            &tok.text[1..tok.text.len() - 1]
        }
        _ => return None,
    };
    crate::option_bool(text)
}

/// After `COPY`: `(query) TO …` runs the query; `table [(cols)] FROM …` is a
/// write; `table [(cols)] TO STDOUT` is a read.
///
/// `COPY … TO 'file'` and `TO PROGRAM` write on the server's own file
/// system, so they count as writes and run where the client expects: on
/// the primary.
pub(crate) fn copy<'a>(
    cur: &mut Cursor<'a>,
    fns: &WriteFunctions<'_>,
    nesting: u8,
) -> Option<StmtKind> {
    let first = cur.next()?;
    if first.kind == TokenKind::LParen {
        let inner = cur.parenthesised(|sub| {
            let first = sub.next()?;
            statement::classify(sub, first, fns, nesting + 1)
        })?;
        let direction = cur.next()?;
        if !direction.is_keyword("to") {
            return Some(inner.executed().combine(StmtKind::Write));
        }
        return Some(inner.executed().combine(to_target(cur)));
    }
    let mut tok = Some(first);
    while let Some(t) = tok {
        if cur.depth() == 0 {
            if t.is_keyword("from") {
                return Some(StmtKind::Write);
            }
            if t.is_keyword("to") {
                return Some(to_target(cur));
            }
        }
        tok = cur.next();
    }
    None
}

/// After `COPY … TO`: a read when the rows go to the client.
fn to_target(cur: &mut Cursor<'_>) -> StmtKind {
    if cur.next().is_some_and(|t| t.is_keyword("stdout")) {
        StmtKind::Read
    } else {
        StmtKind::Write
    }
}

/// After `DECLARE`: `name [BINARY] [ASENSITIVE | INSENSITIVE] [[NO] SCROLL]
/// CURSOR [{WITH | WITHOUT} HOLD] FOR query`.
///
/// A cursor lives in the transaction's backend; `WITH HOLD` makes it outlive
/// the transaction, which pins the session. The query counts too.
pub(crate) fn declare<'a>(
    cur: &mut Cursor<'a>,
    fns: &WriteFunctions<'_>,
    nesting: u8,
) -> Option<StmtKind> {
    if !cur.next()?.is_name() {
        return None;
    }
    let mut hold = false;
    loop {
        let tok = cur.next()?;
        if tok.is_keyword("for") {
            break;
        }
        if tok.is_keyword("with") {
            hold = true;
        } else if tok.is_keyword("without") {
            hold = false;
        } else if ![
            "binary",
            "asensitive",
            "insensitive",
            "no",
            "scroll",
            "cursor",
            "hold",
        ]
        .iter()
        .any(|kw| tok.is_keyword(kw))
        {
            return None;
        }
    }
    let first = cur.next()?;
    let inner = statement::classify(cur, first, fns, nesting + 1)?;
    let own = if hold {
        StmtKind::Pin
    } else {
        StmtKind::TxnScoped
    };
    Some(inner.executed().combine(own))
}
