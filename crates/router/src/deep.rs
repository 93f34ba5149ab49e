//! The second stage: classify a statement from its parse tree.
//!
//! The lexical rules refuse to guess when a keyword's role depends on the
//! grammar (`SELECT update FROM t`: column or statement?) or when the
//! leading keyword is one they do not know. Those statements are parsed with
//! `sqlparser` (PostgreSQL dialect) and the tree is walked: the statement
//! type gives the family, and a visit of every nested query and expression
//! finds locking clauses, `SELECT … INTO`, data-modifying CTEs and calls of
//! listed functions at any depth.
//!
//! A parse costs microseconds to milliseconds, so results are kept in a
//! bounded cache keyed by the statement text.
//!
//! The parser is handed client input, so it runs inside two bounds.
//! `sqlparser` limits most of its recursion, but not all of it: a chain of
//! `JOIN`s without `ON` nests one call per join, and a few hundred of them
//! overflow a 2 MiB thread stack, which would abort the whole proxy; nested
//! statements (`EXPLAIN`, `PREPARE`, `CREATE RULE`, statement blocks) are
//! counted but take a lot of stack per level. So the statement's keywords
//! are counted first, and when the caller's remaining stack may not cover
//! that much nesting the parse runs on a stack of its own (64 MiB, committed
//! only as it is used). Switching costs tens of microseconds, so ordinary
//! statements parse in place. And statements longer than [`MAX_PARSE_BYTES`]
//! are not parsed at all but are `Unknown`, which keeps the worst case within
//! that stack and the cache's memory within capacity × that length.
//! Statements that long are almost always decided by the lexical stage
//! anyway. The cache has two generations: new
//! entries go into the young map; when it is full the old map is dropped and
//! the young one takes its place, and a hit in the old map moves the entry
//! back. That keeps recently used statements for the price of two hash maps,
//! with no per-entry bookkeeping.
//!
//! A statement `sqlparser` cannot parse is [`StmtKind::Unknown`]. A parsed
//! statement of a type not listed below is a write: new syntax is far more
//! often DDL than a read, and a write only costs a trip to the primary.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Mutex;

use sqlparser::ast::{
    CopySource, CopyTarget, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName,
    Query, Select, Set, SetExpr, Statement, TableFactor, TransactionAccessMode, TransactionMode,
    Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::functions::{Effect, SetConfigArgs, WriteFunctions};
use crate::lexer::Lexer;
use crate::StmtKind;

/// Longest statement text the parser is given; longer undecided statements
/// are `Unknown`.
pub const MAX_PARSE_BYTES: usize = 4 * 1024;

/// Size of the stack the parser and the AST walk run on when the caller's
/// may be too small. Sized for the deepest recursion [`MAX_PARSE_BYTES`] of
/// text can cause: `t JOIN ` is 7 bytes, so about 580 nested joins, at
/// roughly 60 KiB of stack each in an unoptimised build (8 KiB optimised).
/// It is reserved, not committed, so untouched pages cost nothing.
const PARSE_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Stack a parse needs besides its nesting: the parser's bounded recursion
/// (50 levels, most of which grow their own stack when short), the AST walk
/// and the AST's drop.
const STACK_BASE: usize = 1024 * 1024;

/// Stack one level of unguarded nesting can take, measured for a nested join
/// in an unoptimised build with room to spare.
const STACK_PER_NESTING: usize = 64 * 1024;

/// Keywords that may nest the parser without its own stack guard: joins
/// (which nest when they have no `ON`) and everything that parses a
/// statement inside a statement.
const NESTING_KEYWORDS: &[&str] = &[
    "join", "explain", "prepare", "rule", "begin", "if", "case", "while", "loop", "repeat",
];

/// Stack to have left before parsing `sql` in place.
fn stack_needed(sql: &str) -> usize {
    let nesting = Lexer::new(sql)
        .filter(|t| NESTING_KEYWORDS.iter().any(|kw| t.is_keyword(kw)))
        .count();
    STACK_BASE.saturating_add(nesting.saturating_mul(STACK_PER_NESTING))
}

/// Parser results for statements the lexical stage left open.
#[derive(Debug)]
pub struct Deep {
    capacity: usize,
    cache: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    young: HashMap<Box<str>, StmtKind>,
    old: HashMap<Box<str>, StmtKind>,
}

impl Deep {
    /// A stage that caches at most `capacity` results (0: no cache).
    pub fn new(capacity: usize) -> Self {
        Deep {
            capacity,
            cache: Mutex::new(Generations::default()),
        }
    }

    /// The kind of `sql` (one or more statements), from the cache or by
    /// parsing it.
    pub fn classify(&self, sql: &str, fns: &WriteFunctions<'_>) -> StmtKind {
        if self.capacity == 0 || sql.len() > MAX_PARSE_BYTES {
            return parse_kind(sql, fns);
        }
        if let Some(kind) = self.lookup(sql) {
            return kind;
        }
        // Parse without holding the lock: other sessions keep their hits.
        let kind = parse_kind(sql, fns);
        self.generations().insert(sql.into(), kind, self.capacity);
        kind
    }

    /// Number of cached results.
    pub fn len(&self) -> usize {
        let g = self.generations();
        g.young.len() + g.old.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, sql: &str) -> Option<StmtKind> {
        let mut g = self.generations();
        if let Some(&kind) = g.young.get(sql) {
            return Some(kind);
        }
        let (key, kind) = g.old.remove_entry(sql)?;
        g.insert(key, kind, self.capacity);
        Some(kind)
    }

    /// The cache, even if a thread panicked while holding it: the maps are
    /// always in a consistent state between statements.
    fn generations(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Generations {
    /// Inserts into the young generation, first retiring it if full. The
    /// young one holds at most half the capacity and becomes the old one
    /// whole, so together they never exceed the capacity.
    fn insert(&mut self, key: Box<str>, kind: StmtKind, capacity: usize) {
        let young_max = (capacity / 2).max(1);
        if self.young.len() >= young_max {
            if capacity > young_max {
                self.old = std::mem::take(&mut self.young);
            } else {
                self.young.clear();
            }
        }
        self.young.insert(key, kind);
    }
}

/// Parses `sql` and classifies every statement in it, uncached. `Unknown`
/// when it does not parse or is longer than [`MAX_PARSE_BYTES`].
pub fn parse_kind(sql: &str, fns: &WriteFunctions<'_>) -> StmtKind {
    if sql.len() > MAX_PARSE_BYTES {
        return StmtKind::Unknown;
    }
    // Parse, walk and drop the tree all on the same stack: each of the three
    // recurses as deeply as the tree is nested.
    stacker::maybe_grow(
        stack_needed(sql),
        PARSE_STACK_BYTES,
        || match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
            Ok(statements) if !statements.is_empty() => statements
                .iter()
                .fold(StmtKind::Empty, |kind, s| kind.combine(statement(s, fns))),
            Ok(_) => StmtKind::Empty,
            Err(_) => StmtKind::Unknown,
        },
    )
}

/// The kind of one parsed statement.
fn statement(stmt: &Statement, fns: &WriteFunctions<'_>) -> StmtKind {
    use StmtKind::*;
    let own = match stmt {
        Statement::Query(_) => Read,
        Statement::Explain {
            analyze,
            options,
            statement: inner,
            ..
        } => {
            return match explain_analyze(*analyze, options.as_deref()) {
                Some(false) => Read,
                Some(true) => statement(inner, fns).executed(),
                None => statement(inner, fns).executed().combine(Write),
            };
        }
        Statement::ExplainTable { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowCollation { .. } => return Read,
        Statement::Copy {
            source, to, target, ..
        } => match (source, to) {
            (_, false) => Write,
            (CopySource::Query(_) | CopySource::Table { .. }, true) => {
                if matches!(target, CopyTarget::Stdout) {
                    Read
                } else {
                    Write
                }
            }
        },
        Statement::StartTransaction {
            modes, statements, ..
        } if statements.is_empty() => {
            let read_only = modes.iter().fold(false, |ro, mode| match mode {
                TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => true,
                TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => false,
                TransactionMode::IsolationLevel(_) => ro,
            });
            return Begin { read_only };
        }
        Statement::Commit { .. } => return Commit,
        Statement::Rollback { savepoint, .. } => {
            return if savepoint.is_some() {
                TxnScoped
            } else {
                Rollback
            };
        }
        Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. } => return TxnScoped,
        Statement::Set(set) => return set_kind(set),
        Statement::Reset(_) | Statement::Discard { .. } => return Session,
        Statement::LISTEN { .. } | Statement::Load { .. } => return Pin,
        Statement::UNLISTEN { .. } => return Write,
        Statement::Prepare { .. } => return Pin,
        Statement::Declare { stmts, .. } => {
            let hold = stmts.iter().any(|d| d.hold == Some(true));
            if hold {
                Pin
            } else {
                TxnScoped
            }
        }
        Statement::CreateTable(t) if t.temporary || in_temp_schema(&t.name) => Pin,
        Statement::CreateView(v) if v.temporary || in_temp_schema(&v.name) => Pin,
        Statement::CreateSequence {
            temporary, name, ..
        } if *temporary || in_temp_schema(name) => Pin,
        _ => Write,
    };
    let mut effects = Effects { fns, kind: own };
    let _ = stmt.visit(&mut effects);
    effects.kind
}

/// `EXPLAIN`'s `ANALYZE`: from the old syntax flag or the option list;
/// `None` when an option value is not a plain boolean.
fn explain_analyze(flag: bool, options: Option<&[sqlparser::ast::UtilityOption]>) -> Option<bool> {
    let mut on = Some(flag);
    for opt in options.unwrap_or_default() {
        let name = opt.name.value.as_bytes();
        if name.eq_ignore_ascii_case(b"analyze") || name.eq_ignore_ascii_case(b"analyse") {
            on = match &opt.arg {
                None => Some(true),
                Some(arg) => boolean(arg),
            };
        }
    }
    on
}

fn boolean(expr: &Expr) -> Option<bool> {
    let text = match expr {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => return Some(*b),
            Value::Number(n, _) => n.as_str(),
            Value::SingleQuotedString(s) => s.as_str(),
            _ => return None,
        },
        Expr::Identifier(ident) => ident.value.as_str(),
        _ => return None,
    };
    crate::option_bool(text.as_bytes())
}

fn set_kind(set: &Set) -> StmtKind {
    use sqlparser::ast::ContextModifier;
    match set {
        Set::SingleAssignment {
            scope: Some(ContextModifier::Local),
            ..
        }
        | Set::SetRole {
            context_modifier: Some(ContextModifier::Local),
            ..
        }
        | Set::SetTransaction { session: false, .. } => StmtKind::TxnScoped,
        _ => StmtKind::Session,
    }
}

fn in_temp_schema(name: &ObjectName) -> bool {
    name.0.len() > 1
        && name.0[0].as_ident().is_some_and(|ident| {
            let v = ident.value.as_bytes();
            v.len() >= 7
                && v[..7].eq_ignore_ascii_case(b"pg_temp")
                && (v.len() == 7 || v[7] == b'_')
        })
}

/// Raises a statement's kind for what its nested queries and expressions do.
struct Effects<'f> {
    fns: &'f WriteFunctions<'f>,
    kind: StmtKind,
}

impl Effects<'_> {
    fn raise(&mut self, kind: StmtKind) {
        self.kind = self.kind.combine(kind);
    }

    fn call(&mut self, name: &ObjectName, args: Option<&[FunctionArg]>) {
        let parts: Vec<&str> = name
            .0
            .iter()
            .filter_map(|p| p.as_ident().map(|i| i.value.as_str()))
            .collect();
        let Some((&fname, rest)) = parts.split_last() else {
            return;
        };
        let schema = rest.last().copied().unwrap_or("");
        if let Some(effect) = self.fns.effect(schema.as_bytes(), fname.as_bytes()) {
            let is_local_true = effect == Effect::SetConfig
                && args.and_then(|a| a.get(2)).is_some_and(|arg| {
                    matches!(
                        arg,
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))
                            if v.value == Value::Boolean(true)
                    )
                });
            // Only the lexical stage recognises replayable literal calls;
            // here anything but a local one pins.
            self.raise(effect.kind(if is_local_true {
                SetConfigArgs::Local
            } else {
                SetConfigArgs::Other
            }));
        }
    }
}

impl Visitor for Effects<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            self.raise(StmtKind::Write);
        }
        if matches!(
            *query.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ) {
            self.raise(StmtKind::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if let Some(into) = &select.into {
            let temp_schema = into.targets.iter().any(|t| match t {
                Expr::CompoundIdentifier(parts) => parts.first().is_some_and(|p| {
                    let v = p.value.as_bytes();
                    v.len() >= 7 && v[..7].eq_ignore_ascii_case(b"pg_temp")
                }),
                _ => false,
            });
            self.raise(if into.temporary || temp_schema {
                StmtKind::Pin
            } else {
                StmtKind::Write
            });
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        if matches!(
            stmt,
            Statement::Insert(_)
                | Statement::Update(_)
                | Statement::Delete(_)
                | Statement::Merge(_)
        ) {
            self.raise(StmtKind::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let args = match &f.args {
                FunctionArguments::List(list) => Some(list.args.as_slice()),
                _ => None,
            };
            self.call(&f.name, args);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => self.call(name, Some(&args.args)),
            TableFactor::Function { name, args, .. } => self.call(name, Some(args)),
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StmtKind::*;

    fn kind(sql: &str) -> StmtKind {
        parse_kind(sql, &WriteFunctions::new(&[]))
    }

    #[test]
    fn families() {
        assert_eq!(kind("SELECT update FROM t"), Read);
        assert_eq!(kind("SELECT * FROM t WHERE a = 1 FOR UPDATE"), Write);
        assert_eq!(kind("SELECT * INTO t2 FROM t"), Write);
        assert_eq!(kind("SELECT * INTO TEMP t2 FROM t"), Pin);
        assert_eq!(
            kind("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"),
            Write
        );
        assert_eq!(kind("INSERT INTO t VALUES (1)"), Write);
        assert_eq!(kind("EXPLAIN DELETE FROM t"), Read);
        assert_eq!(kind("EXPLAIN ANALYZE DELETE FROM t"), Write);
        assert_eq!(kind("EXPLAIN (ANALYZE) DELETE FROM t"), Write);
        assert_eq!(kind("EXPLAIN (ANALYZE off) DELETE FROM t"), Read);
        assert_eq!(kind("COPY t TO STDOUT"), Read);
        assert_eq!(kind("COPY t FROM STDIN"), Write);
        assert_eq!(kind("COPY (DELETE FROM t RETURNING *) TO STDOUT"), Write);
        assert_eq!(kind("BEGIN READ ONLY"), Begin { read_only: true });
        assert_eq!(kind("COMMIT"), Commit);
        assert_eq!(kind("ROLLBACK TO SAVEPOINT s"), TxnScoped);
        assert_eq!(kind("SET LOCAL a = 1"), TxnScoped);
        assert_eq!(
            kind("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Session
        );
        assert_eq!(kind("SET a = 1"), Session);
        assert_eq!(kind("LISTEN ch"), Pin);
        assert_eq!(kind("DECLARE c CURSOR WITH HOLD FOR SELECT 1"), Pin);
        assert_eq!(
            kind("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE"),
            Write
        );
        assert_eq!(kind("CREATE TEMP TABLE x (a int)"), Pin);
        assert_eq!(kind("CREATE TABLE pg_temp.x (a int)"), Pin);
        assert_eq!(kind("CREATE TABLE x (a int)"), Write);
        assert_eq!(kind("not sql at all"), Unknown);
    }

    #[test]
    fn nesting_keywords_raise_the_stack_estimate() {
        assert_eq!(stack_needed("SELECT update FROM t"), STACK_BASE);
        assert_eq!(
            stack_needed("SELECT 1 FROM a JOIN b JOIN c ON true ON true"),
            STACK_BASE + 2 * STACK_PER_NESTING
        );
        // Words in strings and comments do not count.
        assert_eq!(stack_needed("SELECT 'join' /* explain */"), STACK_BASE);
    }

    #[test]
    fn function_calls_anywhere() {
        assert_eq!(kind("SELECT update, nextval('s') FROM t"), Write);
        assert_eq!(
            kind("SELECT * FROM t WHERE a IN (SELECT pg_advisory_lock(1))"),
            Pin
        );
        assert_eq!(kind("SELECT * FROM pg_try_advisory_lock(1)"), Pin);
        assert_eq!(
            kind("SELECT pg_catalog.set_config('a', 'b', true)"),
            TxnScoped
        );
        assert_eq!(kind("SELECT set_config('a', 'b', false)"), Pin);
        let extra = vec!["app.touch_*".to_string()];
        assert_eq!(
            parse_kind("SELECT app.touch_it(1)", &WriteFunctions::new(&extra)),
            Write
        );
    }

    #[test]
    fn cache_keeps_recent_entries_within_capacity() {
        let fns = WriteFunctions::new(&[]);
        for capacity in 1..8 {
            let deep = Deep::new(capacity);
            for i in 0..20 {
                deep.classify(&format!("SELECT update FROM t{i}"), &fns);
                assert!(deep.len() <= capacity, "capacity {capacity}");
            }
            assert!(deep.lookup("SELECT update FROM t19").is_some());
        }
        let deep = Deep::new(4);
        for i in 0..10 {
            deep.classify(&format!("SELECT update FROM t{i}"), &fns);
        }
        // The most recent statement is still cached.
        assert_eq!(deep.lookup("SELECT update FROM t9"), Some(Read));
        let off = Deep::new(0);
        off.classify("SELECT update FROM t", &fns);
        assert!(off.is_empty());
        let huge = format!(
            "SELECT update FROM t WHERE a = '{}'",
            "x".repeat(MAX_PARSE_BYTES)
        );
        let deep = Deep::new(4);
        assert_eq!(deep.classify(&huge, &fns), Unknown);
        assert!(deep.is_empty());
    }

    /// Shapes that make `sqlparser` recurse once per repetition, as long as
    /// the size bound lets them be, on a test thread's ordinary stack.
    #[test]
    fn deep_recursion_cannot_overflow_the_callers_stack() {
        let fns = WriteFunctions::new(&[]);
        let fill = |prefix: &str, unit: &str, suffix: &str| {
            let n = (MAX_PARSE_BYTES - prefix.len() - suffix.len()) / unit.len();
            format!("{prefix}{}{suffix}", unit.repeat(n))
        };
        let cases = [
            fill("SELECT update FROM ", "t JOIN ", "t"),
            fill("SELECT update FROM ", "t JOIN\"t\"", ""),
            fill("SELECT update FROM t WHERE ", "(", "1"),
            fill("SELECT update FROM ", "(", "t"),
            fill("", "IF 1 THEN ", ""),
            fill("", "BEGIN ", ""),
            fill("SELECT update FROM t", " JOIN t", ""),
            fill("", "EXPLAIN ANALYZE ", "SELECT 1"),
            fill("", "PREPARE a AS ", "SELECT 1"),
            fill(
                "",
                "CREATE RULE r AS ON SELECT TO t DO INSTEAD ",
                "SELECT 1",
            ),
            fill("SELECT ", "(", "1"),
            fill("SELECT 1 ", "AND 1 ", ""),
            fill("SELECT ", "- ", "1"),
        ];
        for sql in &cases {
            assert!(sql.len() <= MAX_PARSE_BYTES);
            // Any answer will do; the point is returning at all.
            let _ = parse_kind(sql, &fns);
        }
    }
}
