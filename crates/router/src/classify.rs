//! Statement classification: the lexical rules, the combination of the
//! statements of one string, and the two-stage [`Classifier`].
//!
//! The server classifies every `Query` and every `Parse`, so the common case
//! must be cheap: the lexical stage reads the tokens once, allocates
//! nothing, and is certain about almost every statement real applications
//! send. Only a statement it cannot be sure about is handed to the
//! [`deep`](crate::deep) stage — alone, not the whole string — and only those
//! answers are cached, because the lexical path is already cheaper than a
//! cache lookup.
//!
//! The lexical rules are organised by what they read: the cursor that keeps
//! a rule inside its statement, the leading-keyword dispatch, the query body
//! scan, transaction control, and statements that carry another statement.
//!
//! Statements are split at `;` outside parentheses. The body of a
//! `BEGIN ATOMIC … END` function is split too, which miscounts its
//! statements but cannot make a write look like a read: the `CREATE` part is
//! a write and that outranks everything the body can contain.

mod cursor;
mod nested;
#[cfg(test)]
mod properties;
mod query;
mod statement;
mod transaction;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::RwLock;

use cursor::{Cursor, End};

use crate::deep::Deep;
use crate::functions::WriteFunctions;
use crate::lexer::{Lexer, Token};
use crate::{Class, Stage, StmtKind};

/// Settings of a [`Classifier`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassifierConfig {
    /// Extra functions that write, as case-insensitive globs over the called
    /// name (`"audit_*"`, `"billing.touch_*"`); see
    /// [`functions`](crate::functions) for how qualified names match.
    pub write_functions: Vec<String>,
    /// How many parser results to keep. Only statements the lexical stage
    /// cannot decide reach the parser, so a small cache covers an
    /// application's odd statements; 0 disables caching.
    pub cache_capacity: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            write_functions: Vec::new(),
            cache_capacity: 1024,
        }
    }
}

/// Classifies SQL strings: lexical rules first, the SQL parser for what
/// they cannot decide.
///
/// Shared by all sessions (`Send + Sync`); the parser cache is behind a
/// mutex that is only taken when the parser stage is needed.
#[derive(Debug)]
pub struct Classifier {
    write_functions: Vec<String>,
    deep: Deep,
    /// Statements a replica refused as writes (25006), by exact text.
    learned: RwLock<HashSet<Box<str>>>,
    /// Set once anything was learned, so the common case takes no lock.
    has_learned: AtomicBool,
}

/// Statements learned as writes, at most (a bound on memory when an app
/// generates endless distinct texts).
const MAX_LEARNED: usize = 10_000;
/// Longer statements are not learned.
const MAX_LEARNED_TEXT: usize = 8 * 1024;

impl Classifier {
    /// A classifier with the given extra write functions and cache size.
    pub fn new(cfg: ClassifierConfig) -> Self {
        Classifier {
            write_functions: cfg.write_functions,
            deep: Deep::new(cfg.cache_capacity),
            learned: RwLock::default(),
            has_learned: AtomicBool::new(false),
        }
    }

    /// Remembers `sql` as a write: a replica refused it with 25006 although
    /// it looked like a read (a function that writes, on no list).
    pub fn learn_write(&self, sql: &str) {
        if sql.len() > MAX_LEARNED_TEXT {
            return;
        }
        let mut set = self.learned.write().unwrap_or_else(|e| e.into_inner());
        if set.len() < MAX_LEARNED {
            set.insert(Box::from(sql));
            self.has_learned.store(true, Relaxed);
        }
    }

    /// Whether `sql` was learned as a write (see [`Classifier::learn_write`]).
    pub fn learned_write(&self, sql: &str) -> bool {
        self.has_learned.load(Relaxed)
            && self
                .learned
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(sql)
    }

    /// Classifies every statement in `sql` and combines them.
    ///
    /// Statements the lexical stage decides cost no allocation; each other
    /// statement is parsed (or found in the cache), and when the parser
    /// cannot make sense of it either, it is [`StmtKind::Unknown`].
    pub fn classify(&self, sql: &str) -> Class {
        let fns = WriteFunctions::new(&self.write_functions);
        let mut class =
            scan(sql, &fns, |stmt| Some(self.deep.classify(stmt, &fns))).unwrap_or(Class {
                kind: StmtKind::Unknown,
                hint: None,
                statements: 0,
                stage: Stage::Parser,
            });
        if class.kind == StmtKind::Read && self.learned_write(sql) {
            class.kind = StmtKind::Write;
        }
        if class.kind == StmtKind::Read
            && class.hint.is_none()
            && crate::server_state::mentions_server_state(sql)
        {
            class.hint = Some(crate::Target::Primary);
        }
        class
    }

    /// Number of parser results currently cached.
    pub fn cached(&self) -> usize {
        self.deep.len()
    }
}

/// The lexical stage alone: the classification of `sql`, or `None` when any
/// of its statements would need the parser.
///
/// `extra_write_functions` are glob patterns as in
/// [`ClassifierConfig::write_functions`].
pub fn classify_lexical(sql: &str, extra_write_functions: &[String]) -> Option<Class> {
    scan(sql, &WriteFunctions::new(extra_write_functions), |_| None)
}

/// The text of each non-empty statement of `sql`, split at top-level `;`
/// (never inside literals, quoted identifiers, comments or dollar quotes),
/// without the `;`.
///
/// Off the hot path: the server uses it for the rare multi-statement
/// string whose parts have different effects on the session.
pub fn split(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    each_statement(sql, |cur, first| {
        cur.skip_rest();
        out.push(
            sql.get(first.start..cur.text_end())
                .unwrap_or(sql)
                .trim_end(),
        );
        Some(())
    });
    out
}

/// Calls `each` with a cursor on every non-empty statement of `sql` and
/// the statement's first token; `each` reads the statement to its end.
/// Returns the lexer past the last statement (it holds the hints), or
/// `None` as soon as `each` does.
fn each_statement<'a>(
    sql: &'a str,
    mut each: impl FnMut(&mut Cursor<'a>, Token<'a>) -> Option<()>,
) -> Option<Lexer<'a>> {
    let mut lex = Lexer::new(sql);
    loop {
        let mut cur = Cursor::statement(lex);
        let Some(first) = cur.next() else {
            let end = cur.end();
            lex = cur.into_lexer();
            if end == End::Semicolon {
                continue;
            }
            return Some(lex);
        };
        each(&mut cur, first)?;
        lex = cur.into_lexer();
    }
}

/// Splits `sql` into statements, decides each lexically, asks `undecided`
/// about the rest (by their own text), and combines the kinds. `None` when
/// `undecided` had no answer.
fn scan(
    sql: &str,
    fns: &WriteFunctions<'_>,
    mut undecided: impl FnMut(&str) -> Option<StmtKind>,
) -> Option<Class> {
    let mut kind = StmtKind::Empty;
    let mut statements = 0u32;
    let mut stage = Stage::Lexer;
    let lex = each_statement(sql, |cur, first| {
        statements = statements.saturating_add(1);
        let lexical = statement::classify(cur, first, fns, 0);
        cur.skip_rest();
        let decided = match lexical {
            Some(k) if !cur.unterminated() => k,
            _ => {
                stage = Stage::Parser;
                let text = sql.get(first.start..cur.text_end()).unwrap_or(sql);
                undecided(text)?
            }
        };
        kind = kind.combine(decided);
        Some(())
    })?;
    Some(Class {
        kind,
        hint: lex.hint(),
        statements,
        stage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StmtKind::*, Target};

    fn lexical(sql: &str) -> Option<StmtKind> {
        classify_lexical(sql, &[]).map(|c| c.kind)
    }

    fn full(sql: &str) -> Class {
        Classifier::new(ClassifierConfig::default()).classify(sql)
    }

    #[test]
    fn learned_writes_stay_writes() {
        let c = Classifier::new(ClassifierConfig::default());
        let sql = "SELECT app_touch(1)";
        assert_eq!(c.classify(sql).kind, Read);
        c.learn_write(sql);
        assert_eq!(c.classify(sql).kind, Write);
        assert_eq!(
            c.classify("SELECT app_touch(2)").kind,
            Read,
            "exact text only"
        );
    }

    #[test]
    fn classifier_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Classifier>();
    }

    #[test]
    fn split_keeps_semicolons_inside_literals() {
        assert_eq!(
            split("SET a = 1; SELECT ';' ; /* ; */ INSERT INTO t VALUES ($$;$$);;"),
            ["SET a = 1", "SELECT ';'", "INSERT INTO t VALUES ($$;$$)"]
        );
        assert!(split(" ; -- x").is_empty());
        assert_eq!(split("select 1"), ["select 1"]);
    }

    #[test]
    fn empty_strings() {
        for sql in ["", "   ", ";", ";;", " ; ; ", "-- c", "/* a */ ; -- b\n"] {
            let class = classify_lexical(sql, &[]).expect(sql);
            assert_eq!(class.kind, Empty, "{sql:?}");
            assert_eq!(class.statements, 0, "{sql:?}");
        }
    }

    #[test]
    fn statements_are_counted_and_combined() {
        let c = classify_lexical("BEGIN; UPDATE t SET a = 1; COMMIT;", &[]).unwrap();
        assert_eq!((c.kind, c.statements, c.stage), (Write, 3, Stage::Lexer));
        let c = classify_lexical("select 1;;select 2", &[]).unwrap();
        assert_eq!((c.kind, c.statements), (Read, 2));
        assert_eq!(lexical("SET a = 1; SELECT 1"), Some(Session));
        assert_eq!(
            lexical("BEGIN READ ONLY; SELECT 1; COMMIT"),
            Some(Begin { read_only: true })
        );
        assert_eq!(lexical("SELECT 1; LISTEN x"), Some(Pin));
    }

    #[test]
    fn transaction_control() {
        assert_eq!(lexical("BEGIN"), Some(Begin { read_only: false }));
        assert_eq!(lexical("begin work"), Some(Begin { read_only: false }));
        assert_eq!(lexical("BEGIN READ ONLY"), Some(Begin { read_only: true }));
        assert_eq!(
            lexical("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE"),
            Some(Begin { read_only: true })
        );
        assert_eq!(
            lexical("BEGIN READ ONLY ISOLATION LEVEL READ COMMITTED READ WRITE"),
            Some(Begin { read_only: false })
        );
        assert_eq!(
            lexical("begin transaction isolation level repeatable read not deferrable"),
            Some(Begin { read_only: false })
        );
        assert_eq!(lexical("BEGIN ISOLATION LEVEL CHAOS"), None);
        assert_eq!(lexical("START"), None);
        assert_eq!(lexical("COMMIT"), Some(Commit));
        assert_eq!(lexical("commit work and no chain"), Some(Commit));
        assert_eq!(lexical("END TRANSACTION"), Some(Commit));
        assert_eq!(lexical("COMMIT PREPARED 'x'"), Some(Write));
        assert_eq!(lexical("ROLLBACK"), Some(Rollback));
        assert_eq!(lexical("ABORT AND CHAIN"), Some(Rollback));
        assert_eq!(lexical("ROLLBACK PREPARED 'x'"), Some(Write));
        assert_eq!(lexical("ROLLBACK TO SAVEPOINT s1"), Some(TxnScoped));
        assert_eq!(lexical("rollback work to s1"), Some(TxnScoped));
        assert_eq!(lexical("COMMIT NOW"), None);
    }

    #[test]
    fn explain_variants() {
        assert_eq!(lexical("EXPLAIN DELETE FROM t"), Some(Read));
        assert_eq!(lexical("EXPLAIN ANALYZE DELETE FROM t"), Some(Write));
        assert_eq!(lexical("EXPLAIN ANALYSE VERBOSE SELECT 1"), Some(Read));
        assert_eq!(
            lexical("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1"),
            Some(Write)
        );
        assert_eq!(lexical("EXPLAIN (ANALYZE true) DELETE FROM t"), Some(Write));
        assert_eq!(
            lexical("EXPLAIN (ANALYZE off, COSTS) DELETE FROM t"),
            Some(Read)
        );
        assert_eq!(lexical("EXPLAIN (ANALYZE '0') DELETE FROM t"), Some(Read));
        assert_eq!(
            lexical("EXPLAIN (FORMAT JSON, ANALYZE) SELECT 1"),
            Some(Read)
        );
        assert_eq!(lexical("EXPLAIN (ANALYZE maybe) SELECT 1"), Some(Write));
        assert_eq!(lexical("EXPLAIN (SELECT 1)"), Some(Read));
        assert_eq!(
            lexical("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)"),
            Some(Pin)
        );
        assert_eq!(lexical("EXPLAIN"), None);
    }

    #[test]
    fn copy_variants() {
        assert_eq!(lexical("COPY t FROM STDIN"), Some(Write));
        assert_eq!(
            lexical("copy t (a, b) from stdin with (format csv)"),
            Some(Write)
        );
        assert_eq!(lexical("COPY t TO STDOUT"), Some(Read));
        assert_eq!(lexical("COPY t TO '/tmp/x'"), Some(Write));
        assert_eq!(lexical("COPY (SELECT * FROM t) TO STDOUT"), Some(Read));
        assert_eq!(
            lexical("COPY (DELETE FROM t RETURNING *) TO STDOUT"),
            Some(Write)
        );
        assert_eq!(lexical("COPY (SELECT nextval('s')) TO STDOUT"), Some(Write));
        assert_eq!(lexical("COPY (SELECT 1; DELETE FROM t"), None);
        assert_eq!(lexical("COPY t"), None);
    }

    #[test]
    fn cursors_and_prepared_statements() {
        assert_eq!(lexical("DECLARE c CURSOR FOR SELECT 1"), Some(TxnScoped));
        assert_eq!(
            lexical("DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1"),
            Some(TxnScoped)
        );
        assert_eq!(
            lexical("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Some(Pin)
        );
        assert_eq!(
            lexical("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE"),
            Some(Write)
        );
        assert_eq!(lexical("FETCH 10 FROM c"), Some(TxnScoped));
        assert_eq!(lexical("PREPARE p (int) AS SELECT $1"), Some(Pin));
        assert_eq!(lexical("PREPARE TRANSACTION 'gid'"), Some(Write));
        assert_eq!(lexical("EXECUTE p (1)"), Some(Write));
        assert_eq!(lexical("DEALLOCATE ALL"), Some(Write));
    }

    #[test]
    fn session_statements() {
        assert_eq!(lexical("SET search_path TO app"), Some(Session));
        assert_eq!(lexical("SET TIME ZONE 'UTC'"), Some(Session));
        assert_eq!(
            lexical("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Some(Session)
        );
        assert_eq!(lexical("SET LOCAL statement_timeout = 0"), Some(TxnScoped));
        assert_eq!(lexical("SET TRANSACTION READ ONLY"), Some(TxnScoped));
        assert_eq!(lexical("SET CONSTRAINTS ALL DEFERRED"), Some(TxnScoped));
        assert_eq!(lexical("RESET ALL"), Some(Session));
        assert_eq!(lexical("DISCARD ALL"), Some(Session));
    }

    #[test]
    fn temporary_objects_pin() {
        assert_eq!(lexical("CREATE TEMP TABLE x (a int)"), Some(Pin));
        assert_eq!(lexical("CREATE LOCAL TEMPORARY TABLE x (a int)"), Some(Pin));
        assert_eq!(
            lexical("CREATE OR REPLACE TEMP VIEW v AS SELECT 1"),
            Some(Pin)
        );
        assert_eq!(lexical("CREATE UNLOGGED TABLE x (a int)"), Some(Write));
        assert_eq!(
            lexical("CREATE TABLE x AS SELECT pg_advisory_lock(1)"),
            Some(Pin)
        );
        assert_eq!(lexical("CREATE OR"), None);
    }

    #[test]
    fn unknown_and_garbage_go_to_the_parser() {
        assert_eq!(lexical("FROBNICATE t"), None);
        assert_eq!(lexical("42"), None);
        assert_eq!(lexical("SELECT 'unterminated"), None);
        assert_eq!(lexical("SELECT 1 /* unterminated"), None);
        let c = full("FROBNICATE t");
        assert_eq!((c.kind, c.stage, c.statements), (Unknown, Stage::Parser, 1));
    }

    #[test]
    fn only_undecided_statements_reach_the_parser() {
        let c = full("SELECT 1; SELECT update FROM t; VACUUM ANALYZE t");
        assert_eq!((c.kind, c.stage, c.statements), (Write, Stage::Parser, 3));
        let c = full("SELECT update FROM t");
        assert_eq!((c.kind, c.stage), (Read, Stage::Parser));
    }

    #[test]
    fn hints_survive_both_stages() {
        let c = full("/* pgsplit:primary */ SELECT 1");
        assert_eq!((c.kind, c.hint), (Read, Some(Target::Primary)));
        let c = full("SELECT update FROM t -- pgsplit:replica");
        assert_eq!((c.hint, c.stage), (Some(Target::Replica), Stage::Parser));
    }

    #[test]
    fn parser_results_are_cached_and_bounded() {
        let classifier = Classifier::new(ClassifierConfig {
            write_functions: vec![],
            cache_capacity: 8,
        });
        classifier.classify("SELECT 1");
        assert_eq!(classifier.cached(), 0);
        for i in 0..100 {
            let sql = format!("SELECT update FROM t{i}");
            assert_eq!(classifier.classify(&sql).kind, Read);
            assert!(classifier.cached() <= 8);
        }
        assert!(classifier.cached() > 0);
    }

    /// Statements shaped to slip past a keyword classifier. Each must need
    /// the primary, whichever stage decides.
    #[test]
    fn disguised_writes_need_the_primary() {
        let classifier = Classifier::new(ClassifierConfig::default());
        for sql in [
            "SELECT nextval ('s')",
            "SELECT nextval/**/('s')",
            r#"SELECT pg_catalog."nextval"('s')"#,
            r#"SELECT "pg_catalog".nextval('s')"#,
            "SELECT * FROM t WHERE id = 1 FOR/**/UPDATE",
            "SELECT * FROM t WHERE id = 1 FOR\nNO\tKEY  UPDATE",
            "SELECT 1 UNION SELECT nextval('s')",
            "(SELECT * FROM t FOR UPDATE)",
            "SELECT (SELECT a FROM t FOR SHARE)",
            "WITH x AS /* c */ ( -- c\n DELETE FROM t RETURNING *) SELECT 1",
            "WITH x (a, b) AS (UPDATE t SET a = 1 RETURNING a, b) SELECT 1",
            "WITH x AS (VALUES (1)), y AS (DELETE FROM t RETURNING *) SELECT 1",
            "WITH x AS (SELECT 1) SELECT update FROM x; DELETE FROM t",
            "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "EXPLAIN (ANALYZE TRUE, FORMAT JSON) INSERT INTO t VALUES (1)",
            "EXPLAIN (ANALYZE 'yes') DELETE FROM t",
            "EXPLAIN ANALYZE EXECUTE p",
            "SELECT * FROM dblink_exec('dbname=x', 'delete from t')",
            "SELECT lo_import('/etc/motd')",
            "COPY t FROM PROGRAM 'cat /tmp/x'",
            "SELECT $$;$$; DELETE FROM t",
            r"SELECT E'\\'; DELETE FROM t; --'",
            "SELECT 'a'';'';'; UPDATE t SET a = 1",
            "SELECT \"a;\"; DELETE FROM t",
            "SELECT 1 /* a /* b */ ; */ ; DELETE FROM t",
            "VALUES (1); TRUNCATE t",
            "SELECT update FROM t FOR UPDATE",
            "SELECT set_config('a', 'b', is_local => true)",
            "SELECT 1 FROM t WHERE a IN (SELECT pg_advisory_lock(1))",
            "SELECT * FROM pg_advisory_lock(1)",
            "/* pgsplit:replica */ DELETE FROM t",
            "SELECT 1 --x\r; DELETE FROM t",
        ] {
            let class = classifier.classify(sql);
            assert!(class.kind.needs_primary(), "{sql:?}: {class:?}");
        }
    }

    /// Inputs built to exhaust the stack or the CPU: each must finish fast
    /// and safely (the test's own run time is the bound).
    #[test]
    fn pathological_inputs_finish() {
        let classifier = Classifier::new(ClassifierConfig::default());
        let cases = [
            ("(".repeat(100_000), None),
            (
                format!("SELECT update {}", "(".repeat(100_000)),
                Some(Unknown),
            ),
            ("EXPLAIN ".repeat(10_000), None),
            (
                format!("{}SELECT 1", "EXPLAIN ANALYZE ".repeat(10_000)),
                None,
            ),
            ("/*".repeat(100_000), Some(Unknown)),
            (format!("SELECT {}", "set_config(".repeat(20_000)), None),
            (format!("SELECT ${}$", "a".repeat(100_000)), Some(Unknown)),
            (format!("SELECT {}", "$a$".repeat(30_001)), Some(Unknown)),
            (";".repeat(100_000), Some(Empty)),
            (format!("SELECT '{}'", "''".repeat(100_000)), Some(Read)),
        ];
        for (sql, want) in cases {
            let class = classifier.classify(&sql);
            if let Some(want) = want {
                assert_eq!(class.kind, want, "{}", &sql[..40.min(sql.len())]);
            }
            assert!(class.kind.needs_primary() || class.kind == Empty || class.kind == Read);
        }
    }

    #[test]
    fn configured_functions_apply_to_both_stages() {
        let classifier = Classifier::new(ClassifierConfig {
            write_functions: vec!["audit_*".into()],
            ..ClassifierConfig::default()
        });
        assert_eq!(classifier.classify("SELECT audit_touch(1)").kind, Write);
        assert_eq!(
            classifier
                .classify("SELECT update, audit_touch(1) FROM t")
                .kind,
            Write
        );
        assert_eq!(classifier.classify("SELECT audit FROM t").kind, Read);
    }
}
