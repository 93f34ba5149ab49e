//! The token scan over a statement's body: queries, DML and `CREATE`.
//!
//! A query's leading keyword says "read", but its body can still make it a
//! write or pin the session: a locking clause, `SELECT … INTO`, a
//! data-modifying CTE, or a call of a function listed in
//! [`functions`](crate::functions). This scan finds those with a three-token
//! look-behind instead of a grammar, which is enough because each of them has
//! a fixed shape:
//!
//! - `FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`, `FOR KEY SHARE` (at any
//!   depth) lock rows: write;
//! - `INSERT` / `UPDATE` / `DELETE` / `MERGE` right after the `(` of
//!   `AS (`, `AS MATERIALIZED (` or `AS NOT MATERIALIZED (` start a CTE body,
//!   and after a CTE's closing `)` at top level they start the main
//!   statement of a `WITH`: write;
//! - `INTO` not preceded by `INSERT` / `MERGE` is `SELECT … INTO`: write,
//!   or pin when the new table is temporary (`INTO TEMP`, `INTO pg_temp.x`);
//! - `name(` or `schema.name(` is a function call, looked up in the write
//!   list.
//!
//! Any other `INSERT` / `UPDATE` / `DELETE` / `MERGE` word (outside
//! `t.update` or `AS update`) might be a column name or might be a statement
//! the scan does not understand, so unless the query already needs the
//! primary the scan reports "uncertain" and the parser decides.

use super::cursor::Cursor;
use crate::functions::{Effect, SetConfigArgs, WriteFunctions};
use crate::lexer::{Token, TokenKind};
use crate::StmtKind;

/// What kind of statement body is being scanned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `SELECT`, `VALUES`, `TABLE`, `WITH` or a parenthesised query; `with`
    /// is true for a statement that starts with `WITH`.
    Query { with: bool },
    /// `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `CALL`: already a write, only
    /// function calls can raise it to a pin.
    Dml,
    /// `CREATE …`: a write; `pg_temp.name` makes it temporary, function calls
    /// (in `CREATE TABLE … AS`) may pin.
    Create,
}

/// The last few tokens, most recent first, without their offsets.
#[derive(Clone, Copy, Default)]
struct History<'a>([Option<Seen<'a>>; 3]);

/// What the look-behind needs of a token.
#[derive(Clone, Copy)]
struct Seen<'a> {
    kind: TokenKind,
    text: &'a [u8],
}

impl Seen<'_> {
    fn is_keyword(&self, kw: &str) -> bool {
        self.kind == TokenKind::Word && self.text.eq_ignore_ascii_case(kw.as_bytes())
    }

    fn is_name(&self) -> bool {
        matches!(self.kind, TokenKind::Word | TokenKind::QuotedIdent)
    }
}

impl<'a> History<'a> {
    fn push(&mut self, tok: &Token<'a>) {
        let seen = Seen {
            kind: tok.kind,
            text: tok.text,
        };
        self.0 = [Some(seen), self.0[0], self.0[1]];
    }

    fn get(&self, back: usize) -> Option<&Seen<'a>> {
        self.0.get(back).and_then(Option::as_ref)
    }

    fn is_kind(&self, back: usize, kind: TokenKind) -> bool {
        self.get(back).is_some_and(|t| t.kind == kind)
    }

    fn is_keyword(&self, back: usize, kw: &str) -> bool {
        self.get(back).is_some_and(|t| t.is_keyword(kw))
    }
}

/// Keywords of a query body the scan reacts to, recognised by length and
/// first letter before the full comparison so most words cost one match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keyword {
    Dml,
    Share,
    Into,
    Temp,
    Other,
}

fn keyword(tok: &Token<'_>) -> Keyword {
    if tok.kind != TokenKind::Word {
        return Keyword::Other;
    }
    let t = tok.text;
    let Some(&first) = t.first() else {
        return Keyword::Other;
    };
    let is = |kw: &[u8]| t.eq_ignore_ascii_case(kw);
    match (t.len(), first | 0x20) {
        (6, b'u') if is(b"update") => Keyword::Dml,
        (6, b'd') if is(b"delete") => Keyword::Dml,
        (6, b'i') if is(b"insert") => Keyword::Dml,
        (5, b'm') if is(b"merge") => Keyword::Dml,
        (5, b's') if is(b"share") => Keyword::Share,
        (4, b'i') if is(b"into") => Keyword::Into,
        (4, b't') if is(b"temp") => Keyword::Temp,
        (9, b't') if is(b"temporary") => Keyword::Temp,
        (5, b'l') if is(b"local") => Keyword::Temp,
        (6, b'g') if is(b"global") => Keyword::Temp,
        _ => Keyword::Other,
    }
}

/// `pg_temp` or `pg_temp_N`, the schema of the session's temporary objects.
fn is_temp_schema(tok: &Seen<'_>) -> bool {
    tok.is_name()
        && tok.text.len() >= 7
        && tok.text[..7].eq_ignore_ascii_case(b"pg_temp")
        && (tok.text.len() == 7 || tok.text[7] == b'_')
}

/// Scans the rest of a statement whose first token was `first`.
///
/// Returns `None` when the body holds a keyword whose role the scan cannot
/// tell and nothing else already sends the statement to the primary.
pub(crate) fn scan<'a>(
    cur: &mut Cursor<'a>,
    first: Token<'a>,
    fns: &WriteFunctions<'_>,
    mode: Mode,
) -> Option<StmtKind> {
    let with = matches!(mode, Mode::Query { with: true });
    let query = matches!(mode, Mode::Query { .. });
    let mut kind = match mode {
        Mode::Query { .. } => StmtKind::Read,
        Mode::Dml | Mode::Create => StmtKind::Write,
    };
    let mut ambiguous = false;
    // A DML word whose role depends on the next token (`update.col` is a name).
    let mut pending = false;
    // Tokens read since a `SELECT … INTO` (1 while INTO is the previous
    // token), to spot `INTO TEMP` and `INTO [TABLE] pg_temp.x`.
    let mut since_into: Option<u8> = None;
    let mut hist = History::default();
    hist.push(&first);

    while let Some(tok) = cur.next() {
        if pending {
            pending = false;
            ambiguous |= tok.kind != TokenKind::Dot;
        }
        match tok.kind {
            TokenKind::LParen => {
                if let Some(effect) = call(&hist, fns) {
                    let args = if effect == Effect::SetConfig {
                        set_config_args(cur)
                    } else {
                        SetConfigArgs::Other
                    };
                    kind = kind.combine(effect.kind(args));
                }
            }
            TokenKind::Dot => {
                let temp_target = match mode {
                    Mode::Create => true,
                    Mode::Query { .. } => {
                        since_into == Some(2)
                            || (since_into == Some(3) && hist.is_keyword(1, "table"))
                    }
                    Mode::Dml => false,
                };
                if temp_target && hist.get(0).is_some_and(is_temp_schema) {
                    kind = kind.combine(StmtKind::Pin);
                }
            }
            TokenKind::Word if query => match keyword(&tok) {
                Keyword::Dml => {
                    let locking = tok.is_keyword("update")
                        && (hist.is_keyword(0, "for")
                            || (hist.is_keyword(0, "key")
                                && hist.is_keyword(1, "no")
                                && hist.is_keyword(2, "for")));
                    let cte_body = hist.is_kind(0, TokenKind::LParen)
                        && (hist.is_keyword(1, "as") || hist.is_keyword(1, "materialized"));
                    let main_of_with =
                        with && cur.depth() == 0 && hist.is_kind(0, TokenKind::RParen);
                    if locking || cte_body || main_of_with {
                        kind = kind.combine(StmtKind::Write);
                    } else if !hist.is_kind(0, TokenKind::Dot) && !hist.is_keyword(0, "as") {
                        pending = true;
                    }
                }
                Keyword::Share => {
                    if hist.is_keyword(0, "for")
                        || (hist.is_keyword(0, "key") && hist.is_keyword(1, "for"))
                    {
                        kind = kind.combine(StmtKind::Write);
                    }
                }
                Keyword::Into => {
                    let after_dml = hist.is_keyword(0, "insert") || hist.is_keyword(0, "merge");
                    if !after_dml {
                        kind = kind.combine(StmtKind::Write);
                        since_into = Some(0);
                    }
                }
                Keyword::Temp if since_into == Some(1) => {
                    kind = kind.combine(StmtKind::Pin);
                }
                Keyword::Temp | Keyword::Other => {}
            },
            _ => {}
        }
        since_into = since_into.and_then(|n| n.checked_add(1)).filter(|&n| n < 4);
        hist.push(&tok);
    }
    ambiguous |= pending;
    if ambiguous && kind.rank() < StmtKind::Write.rank() {
        None
    } else {
        Some(kind)
    }
}

/// The effect of the call whose `(` was just read, if the tokens before it
/// name a listed function.
fn call(hist: &History<'_>, fns: &WriteFunctions<'_>) -> Option<Effect> {
    let name = hist.get(0).filter(|t| t.is_name())?;
    // Built-in names are never keywords; only broad configured patterns can
    // mistake one for a function.
    if fns.has_extra() && name.kind == TokenKind::Word && never_a_function(name.text) {
        return None;
    }
    let schema = match (hist.get(1), hist.get(2)) {
        (Some(dot), Some(schema)) if dot.kind == TokenKind::Dot && schema.is_name() => schema.text,
        _ => &[],
    };
    fns.effect(schema, name.text)
}

/// Reserved words that are often followed by `(` but never name a function,
/// so a broad configured pattern (`a*`) does not turn `AS (` into a call.
fn never_a_function(word: &[u8]) -> bool {
    const RESERVED: &[&str] = &[
        "all",
        "and",
        "any",
        "array",
        "as",
        "by",
        "distinct",
        "exists",
        "filter",
        "from",
        "in",
        "into",
        "join",
        "lateral",
        "not",
        "on",
        "or",
        "over",
        "returning",
        "row",
        "select",
        "some",
        "table",
        "using",
        "values",
        "where",
        "with",
        "within",
    ];
    RESERVED
        .iter()
        .any(|kw| word.eq_ignore_ascii_case(kw.as_bytes()))
}

/// How far ahead [`third_arg_is_true`] reads. Real calls are a handful of
/// tokens; the bound keeps nested `set_config(` calls from costing quadratic
/// time, and giving up only means "not known to be local" (a pin).
const SET_CONFIG_LOOKAHEAD: usize = 64;

/// For `set_config(` just read: is the third argument the bare word `true`?
fn set_config_args(cur: &Cursor<'_>) -> SetConfigArgs {
    let mut ahead = cur.clone();
    let depth = ahead.depth();
    // Per argument: its token count and its first token's kind.
    let mut args: [(u32, Option<TokenKind>); 3] = [(0, None); 3];
    let mut third_true = false;
    let mut third_false = false;
    let mut i = 0;
    for _ in 0..SET_CONFIG_LOOKAHEAD {
        let Some(tok) = ahead.next() else {
            return SetConfigArgs::Other;
        };
        if ahead.depth() < depth {
            break;
        }
        if tok.kind == TokenKind::Comma && ahead.depth() == depth {
            i += 1;
            if i > 2 {
                return SetConfigArgs::Other;
            }
            continue;
        }
        args[i].0 += 1;
        args[i].1.get_or_insert(tok.kind);
        if i == 2 {
            third_true = tok.is_keyword("true");
            third_false = tok.is_keyword("false");
        }
    }
    let single = |a: (u32, Option<TokenKind>), k: TokenKind| a.0 == 1 && a.1 == Some(k);
    if i == 2 && args[2].0 == 1 && third_true {
        SetConfigArgs::Local
    } else if i == 2
        && args[2].0 == 1
        && third_false
        && single(args[0], TokenKind::String)
        && (single(args[1], TokenKind::String) || single(args[1], TokenKind::Number))
    {
        SetConfigArgs::SessionLiterals
    } else if i == 2
        && args[2].0 == 1
        && third_false
        && single(args[0], TokenKind::String)
        && single(args[1], TokenKind::Param)
    {
        SetConfigArgs::SessionParam
    } else {
        SetConfigArgs::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lexer::Lexer;
    use StmtKind::*;

    fn scan_sql(sql: &str, extra: &[&str]) -> Option<StmtKind> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let fns = WriteFunctions::new(&extra);
        let mut cur = Cursor::statement(Lexer::new(sql));
        let first = cur.next()?;
        let mode = if first.is_keyword("insert") || first.is_keyword("update") {
            Mode::Dml
        } else if first.is_keyword("create") {
            Mode::Create
        } else {
            Mode::Query {
                with: first.is_keyword("with"),
            }
        };
        scan(&mut cur, first, &fns, mode)
    }

    #[test]
    fn locking_clauses() {
        for sql in [
            "select * from t for update",
            "select * from t FOR no KEY update of t skip locked",
            "select * from t for share nowait",
            "select * from t for key share",
            "select * from (select * from t for update) s",
        ] {
            assert_eq!(scan_sql(sql, &[]), Some(Write), "{sql}");
        }
        assert_eq!(scan_sql("select share from t", &[]), Some(Read));
    }

    #[test]
    fn data_modifying_ctes() {
        for sql in [
            "with x as (insert into t values (1) returning *) select * from x",
            "with x as materialized (delete from t returning *) select 1",
            "with x as not materialized (update t set a = 1 returning *) select 1",
            "with x(a) as (merge into t using s on true when matched then delete) select 1",
            "with x as (select 1) insert into t select * from x",
            "with x as (select 1), y as (select 2) delete from t",
        ] {
            assert_eq!(scan_sql(sql, &[]), Some(Write), "{sql}");
        }
        assert_eq!(
            scan_sql("with x as (select 1) select * from x", &[]),
            Some(Read)
        );
    }

    #[test]
    fn select_into() {
        assert_eq!(scan_sql("select * into newtable from t", &[]), Some(Write));
        assert_eq!(
            scan_sql("select * into unlogged t2 from t", &[]),
            Some(Write)
        );
        assert_eq!(scan_sql("select * into temp t2 from t", &[]), Some(Pin));
        assert_eq!(
            scan_sql("select * into temporary table t2 from t", &[]),
            Some(Pin)
        );
        assert_eq!(scan_sql("select * into pg_temp.t2 from t", &[]), Some(Pin));
        assert_eq!(
            scan_sql("select * into table pg_temp.t2 from t", &[]),
            Some(Pin)
        );
        assert_eq!(scan_sql("select * from pg_temp.t2", &[]), Some(Read));
        // INSERT INTO a table called temp is not a temporary table.
        assert_eq!(
            scan_sql("with x as (select 1) insert into temp select * from x", &[]),
            Some(Write)
        );
    }

    #[test]
    fn ambiguous_dml_words_are_uncertain_unless_already_a_write() {
        assert_eq!(scan_sql("select update from t", &[]), None);
        assert_eq!(scan_sql("select 1 as delete", &[]), Some(Read));
        assert_eq!(
            scan_sql("select t.update, update.x from t", &[]),
            Some(Read)
        );
        assert_eq!(
            scan_sql("select update from t for update", &[]),
            Some(Write)
        );
        assert_eq!(scan_sql("select insert", &[]), None);
    }

    #[test]
    fn function_calls() {
        assert_eq!(scan_sql("select nextval('s')", &[]), Some(Write));
        assert_eq!(
            scan_sql("select pg_catalog . setval('s', 1)", &[]),
            Some(Write)
        );
        assert_eq!(scan_sql(r#"select "nextval"('s')"#, &[]), Some(Write));
        assert_eq!(scan_sql("select pg_advisory_lock(1)", &[]), Some(Pin));
        assert_eq!(
            scan_sql("select pg_advisory_xact_lock(1)", &[]),
            Some(Write)
        );
        assert_eq!(scan_sql("select nextval", &[]), Some(Read));
        assert_eq!(scan_sql("select count(*) from t", &[]), Some(Read));
        assert_eq!(
            scan_sql("select app.audit_touch(1)", &["audit_*"]),
            Some(Write)
        );
        assert_eq!(scan_sql("select 1 where a in (1)", &["*"]), Some(Read));
        assert_eq!(
            scan_sql("insert into t values (pg_advisory_lock(1))", &[]),
            Some(Pin)
        );
    }

    #[test]
    fn set_config_third_argument() {
        assert_eq!(
            scan_sql("select set_config('a', 'b', true)", &[]),
            Some(TxnScoped)
        );
        assert_eq!(
            scan_sql("select set_config('a', f(1, 2), TRUE)", &[]),
            Some(TxnScoped)
        );
        assert_eq!(
            scan_sql("select set_config('a', 'b', false)", &[]),
            Some(Session),
            "replayable as written"
        );
        assert_eq!(
            scan_sql("SELECT set_config('TimeZone', 'UTC', false)", &[]),
            Some(Session)
        );
        assert_eq!(
            scan_sql("select set_config('a', $1, false)", &[]),
            Some(Session),
            "replayed with the bound value"
        );
        assert_eq!(
            scan_sql("select set_config($1, 'b', false)", &[]),
            Some(Pin)
        );
        assert_eq!(
            scan_sql("select set_config('a', lower('B'), false)", &[]),
            Some(Pin)
        );
        assert_eq!(scan_sql("select set_config('a', 'b', $1)", &[]), Some(Pin));
        assert_eq!(scan_sql("select set_config('a', 'b')", &[]), Some(Pin));
    }

    #[test]
    fn create_with_temp_schema() {
        assert_eq!(scan_sql("create table pg_temp.x (a int)", &[]), Some(Pin));
        assert_eq!(scan_sql("create table pg_temp_3.x (a int)", &[]), Some(Pin));
        assert_eq!(
            scan_sql("create table pg_temporal.x (a int)", &[]),
            Some(Write)
        );
        assert_eq!(scan_sql("create table x (a int)", &[]), Some(Write));
    }
}
