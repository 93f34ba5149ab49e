//! What a statement does to the virtual session besides its result:
//! settings to log and replay elsewhere, prepared statements it removes,
//! pinned state it may release.
//!
//! Decided from the SQL text, and only for statements that are not plain
//! reads, so the hot path never comes here. A multi-statement string is
//! split ([`pgsplit_router::split`]) so that `SET a = 1; INSERT …` logs
//! the SET alone, and a driver's reset string (`…; RESET ALL`) clears the
//! settings it reset.

use pgsplit_router::lexer::Lexer;
use pgsplit_router::{classify_lexical, split, Class, StmtKind};

/// Removals the proxy applies to its own view of the session once the
/// statement has succeeded on a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reset {
    /// `DISCARD ALL`: no prepared statements, no pinned state left.
    DiscardAll,
    /// `DEALLOCATE name` (the name as the server resolves it).
    Deallocate(String),
    /// `DEALLOCATE ALL`.
    DeallocateAll,
}

/// The effects of one query string.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Effects {
    /// Session-level SET/RESET/DISCARD statements, each on its own.
    pub sets: Vec<String>,
    pub resets: Vec<Reset>,
}

impl Effects {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty() && self.resets.is_empty()
    }
}

/// The effects of the simple-protocol query `sql` classified as `class`.
pub(super) fn of_query(sql: &str, class: &Class) -> Effects {
    let mut fx = Effects::default();
    if matches!(class.kind, StmtKind::Read | StmtKind::Empty) {
        return fx;
    }
    if class.statements <= 1 {
        add_statement(&mut fx, sql.trim(), class.kind);
        return fx;
    }
    for part in split(sql) {
        if let Some(c) = classify_lexical(part, &[]) {
            add_statement(&mut fx, part, c.kind);
        } else if first_word_is(part, "deallocate") {
            add_statement(&mut fx, part, StmtKind::Write);
        }
    }
    fx
}

fn add_statement(fx: &mut Effects, stmt: &str, kind: StmtKind) {
    match kind {
        StmtKind::Session => {
            let stmt = stmt.trim_end_matches(';').trim_end();
            if set_config_param(stmt).is_some() {
                // Replayed from its Bind, with the value bound.
                return;
            }
            if is_discard_all(stmt) {
                fx.resets.push(Reset::DiscardAll);
            }
            fx.sets.push(stmt.to_owned());
        }
        StmtKind::Write => {
            if let Some(r) = deallocate(stmt) {
                fx.resets.push(r);
            }
        }
        _ => {}
    }
}

fn words(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(|c: char| c.is_ascii_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
}

fn first_word_is(sql: &str, kw: &str) -> bool {
    words(sql)
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case(kw))
}

fn is_discard_all(stmt: &str) -> bool {
    let mut w = words(stmt);
    w.next().is_some_and(|x| x.eq_ignore_ascii_case("discard"))
        && w.next().is_some_and(|x| x.eq_ignore_ascii_case("all"))
}

/// `DEALLOCATE [PREPARE] { name | "name" | ALL }`.
pub(super) fn deallocate(stmt: &str) -> Option<Reset> {
    let rest = stmt.trim_start();
    let rest = strip_keyword(rest, "deallocate")?;
    let rest = strip_keyword(rest, "prepare").unwrap_or(rest);
    let rest = rest.trim_end().trim_end_matches(';').trim_end();
    if rest.eq_ignore_ascii_case("all") {
        return Some(Reset::DeallocateAll);
    }
    identifier(rest).map(Reset::Deallocate)
}

fn strip_keyword<'a>(s: &'a str, kw: &str) -> Option<&'a str> {
    let s = s.trim_start();
    let head = s.get(..kw.len())?;
    let tail = &s[kw.len()..];
    (head.eq_ignore_ascii_case(kw) && tail.starts_with(|c: char| c.is_ascii_whitespace()))
        .then_some(tail.trim_start())
}

/// An SQL identifier as the server resolves it: quoted ones verbatim (with
/// `""` unescaped), bare ones folded to lower case.
fn identifier(s: &str) -> Option<String> {
    if let Some(inner) = s.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        if inner.is_empty() {
            return None;
        }
        return Some(inner.replace("\"\"", "\""));
    }
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    ok.then(|| s.to_lowercase())
}

/// `SELECT set_config('name', $n, false)`: the name literal as written and
/// the parameter's 0-based index.
pub(super) fn set_config_param(sql: &str) -> Option<(&str, usize)> {
    use pgsplit_router::lexer::TokenKind as K;
    let mut t = Lexer::new(sql);
    let mut next = || t.next();
    let word = |tok: Option<pgsplit_router::lexer::Token<'_>>, kw: &str| {
        tok.is_some_and(|t| t.is_keyword(kw))
    };
    let kind = |tok: &Option<pgsplit_router::lexer::Token<'_>>, k: K| {
        tok.as_ref().is_some_and(|t| t.kind == k)
    };
    if !word(next(), "select") || !word(next(), "set_config") || !kind(&next(), K::LParen) {
        return None;
    }
    let name = next().filter(|t| t.kind == K::String)?;
    if !kind(&next(), K::Comma) {
        return None;
    }
    let param = next().filter(|t| t.kind == K::Param)?;
    if !kind(&next(), K::Comma) || !word(next(), "false") || !kind(&next(), K::RParen) {
        return None;
    }
    let n: usize = std::str::from_utf8(param.text)
        .ok()?
        .trim_start_matches('$')
        .parse()
        .ok()?;
    let name = sql.get(name.start..name.end)?;
    Some((name, n.checked_sub(1)?))
}

/// The statement that replays `set_config(name, $n, false)` with the value
/// a Bind gave it.
pub(super) fn set_config_replay(name: &str, value: Option<&[u8]>) -> Option<String> {
    match value {
        None => Some(format!("SELECT set_config({name}, NULL, false)")),
        Some(v) => {
            let v = std::str::from_utf8(v).ok().filter(|v| !v.contains('\0'))?;
            Some(format!(
                "SELECT set_config({name}, '{}', false)",
                v.replace('\'', "''")
            ))
        }
    }
}

/// Whether a statement that pins the session leaves state the pin check
/// cannot see (`set_config` with a parameter, `LOAD`): such a pin stays
/// until `DISCARD ALL`.
pub(super) fn sticky_pin(sql: &str) -> bool {
    sql.as_bytes()
        .windows(10)
        .any(|w| w.eq_ignore_ascii_case(b"set_config"))
        || split(sql).iter().any(|s| first_word_is(s, "load"))
}

/// Whether the one statement `sql` is data manipulation that behaves the
/// same inside a block: INSERT, UPDATE, DELETE, MERGE, or WITH / SELECT (a
/// data-modifying CTE, a function that writes). Anything else (VACUUM,
/// CREATE DATABASE, CREATE INDEX CONCURRENTLY, …) may refuse to run in a
/// block, so the proxy never wraps it in one.
pub(super) fn wrappable_write(sql: &str) -> bool {
    const DML: &[&str] = &["insert", "update", "delete", "merge", "with", "select"];
    Lexer::new(sql)
        .find(|t| t.kind != pgsplit_router::lexer::TokenKind::LParen)
        .is_some_and(|t| DML.iter().any(|k| t.is_keyword(k)))
}

/// Whether a statement may commit work of its own before it fails, so
/// that an error does not mean nothing of it was committed: `CONCURRENTLY`
/// index builds and drops (an invalid index stays), `REINDEX` and `DETACH
/// PARTITION … CONCURRENTLY`, `VACUUM` (one transaction per table),
/// `CREATE`/`DROP DATABASE` and `CALL` (a procedure may commit). After
/// such a statement fails, the session still learns the WAL position, so
/// its next catalog read does not miss what did commit. (A `COMMIT` that
/// fails commits nothing: its deferred checks roll the block back.)
pub(super) fn commits_on_its_own(sql: &str) -> bool {
    const FIRST: &[&str] = &["vacuum", "call", "reindex"];
    let mut words = Lexer::new(sql);
    let Some(first) = words.next() else {
        return false;
    };
    if FIRST.iter().any(|k| first.is_keyword(k)) {
        return true;
    }
    let database =
        |t: Option<pgsplit_router::lexer::Token<'_>>| t.is_some_and(|t| t.is_keyword("database"));
    if (first.is_keyword("create") || first.is_keyword("drop")) && database(words.next()) {
        return true;
    }
    // A false match only learns a WAL position for nothing.
    sql.as_bytes()
        .windows(12)
        .any(|w| w.eq_ignore_ascii_case(b"concurrently"))
}

/// Whether `sql` runs a COPY (in any of its statements).
pub(super) fn has_copy(sql: &str) -> bool {
    if !mentions_copy(sql) {
        return false;
    }
    let first_is_copy = |s: &str| Lexer::new(s).next().is_some_and(|t| t.is_keyword("copy"));
    first_is_copy(sql) || (sql.contains(';') && split(sql).into_iter().any(first_is_copy))
}

/// Whether the letters "copy" appear anywhere in `sql`, in any case. No
/// COPY runs without them, and looking costs a small part of lexing (which
/// splits a string at every `;`, and most drivers end statements with one).
fn mentions_copy(sql: &str) -> bool {
    sql.as_bytes()
        .windows(4)
        .any(|w| (w[0] | 0x20) == b'c' && w[1..].eq_ignore_ascii_case(b"opy"))
}

/// Whether a statement run while the session is pinned may have released
/// what pinned it (so the proxy checks before keeping reads off the
/// replica). Over-reporting costs one query on the primary; missing a
/// release only keeps the session pinned.
pub(super) fn may_unpin(sql: &str) -> bool {
    const RELEASING: &[&str] = &[
        "unlisten",
        "discard",
        "drop",
        "close",
        "deallocate",
        "commit",
        "rollback",
        "end",
        "abort",
    ];
    let bytes = sql.as_bytes();
    let unlock = bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"unlock"));
    unlock
        || split(sql).iter().any(|stmt| {
            words(stmt)
                .next()
                .is_some_and(|w| RELEASING.iter().any(|k| w.eq_ignore_ascii_case(k)))
        })
}

#[cfg(test)]
mod tests {
    use super::commits_on_its_own;

    #[test]
    fn statements_that_commit_before_they_fail() {
        for sql in [
            "CREATE INDEX CONCURRENTLY i ON t (x)",
            "drop index concurrently i",
            "REINDEX TABLE CONCURRENTLY t",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
            "VACUUM t",
            "CALL proc()",
            "create database d",
            "DROP DATABASE d",
        ] {
            assert!(commits_on_its_own(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1)",
            "CREATE INDEX i ON t (x)",
            "UPDATE t SET x = 1",
            "",
        ] {
            assert!(!commits_on_its_own(sql), "{sql}");
        }
    }

    use super::*;
    use pgsplit_router::{Classifier, ClassifierConfig};

    fn fx(sql: &str) -> Effects {
        let class = Classifier::new(ClassifierConfig::default()).classify(sql);
        of_query(sql, &class)
    }

    #[test]
    fn only_dml_is_wrapped_in_a_block() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            " /* c */ update t SET a = 1",
            "(SELECT app.touch())",
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
        ] {
            assert!(wrappable_write(sql), "{sql}");
        }
        for sql in [
            "VACUUM t",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "CREATE DATABASE d",
            "ALTER SYSTEM SET work_mem = '1MB'",
            "COPY t FROM STDIN",
            "-- INSERT\nREINDEX TABLE CONCURRENTLY t",
            "",
        ] {
            assert!(!wrappable_write(sql), "{sql}");
        }
    }

    #[test]
    fn single_settings_are_logged_whole() {
        assert_eq!(fx("SET search_path = a").sets, ["SET search_path = a"]);
        assert_eq!(fx("RESET ALL;").sets, ["RESET ALL"]);
        assert!(fx("SELECT 1").is_empty());
        assert!(fx("SET LOCAL a.b = 1").is_empty());
    }

    #[test]
    fn settings_are_picked_out_of_mixed_strings() {
        let f = fx("SET app.user = 7; INSERT INTO t VALUES (1); SELECT 2");
        assert_eq!(f.sets, ["SET app.user = 7"]);
        // The reset string of a connection pool.
        let f = fx("SELECT pg_advisory_unlock_all(); CLOSE ALL; \
                    DO $$ BEGIN PERFORM 1; END $$; RESET ALL;");
        assert_eq!(f.sets, ["RESET ALL"]);
        let f = fx("SET a.b = 1; SELECT ';'; DISCARD ALL");
        assert_eq!(f.sets, ["SET a.b = 1", "DISCARD ALL"]);
        assert_eq!(f.resets, [Reset::DiscardAll]);
    }

    #[test]
    fn deallocate_names_resolve_as_the_server_does() {
        assert_eq!(
            deallocate("DEALLOCATE s1"),
            Some(Reset::Deallocate("s1".into()))
        );
        assert_eq!(
            deallocate("deallocate prepare Foo;"),
            Some(Reset::Deallocate("foo".into()))
        );
        assert_eq!(
            deallocate(r#"DEALLOCATE "My""Stmt""#),
            Some(Reset::Deallocate("My\"Stmt".into()))
        );
        assert_eq!(deallocate("DEALLOCATE ALL"), Some(Reset::DeallocateAll));
        assert_eq!(
            deallocate("DEALLOCATE PREPARE ALL"),
            Some(Reset::DeallocateAll)
        );
        assert_eq!(deallocate("DEALLOCATE"), None);
        assert_eq!(deallocate("DEALLOCATE a b"), None);
        assert_eq!(fx("DEALLOCATE x").resets, [Reset::Deallocate("x".into())]);
        assert_eq!(
            fx("SELECT 1; DEALLOCATE ALL").resets,
            [Reset::DeallocateAll]
        );
    }

    #[test]
    fn set_config_with_a_parameter_is_replayed_with_its_value() {
        let sql = "SELECT set_config('jit', $1, false)";
        assert_eq!(set_config_param(sql), Some(("'jit'", 0)));
        assert_eq!(
            set_config_param("select set_config('a', $2, FALSE);"),
            Some(("'a'", 1))
        );
        assert_eq!(set_config_param("SELECT set_config('a', $1, true)"), None);
        assert_eq!(set_config_param("SELECT set_config('a', 'b', false)"), None);
        assert_eq!(
            set_config_replay("'jit'", Some(b"o'n")).unwrap(),
            "SELECT set_config('jit', 'o''n', false)"
        );
        assert!(fx(sql).sets.is_empty(), "logged at Bind, not at Parse");
    }

    #[test]
    fn copies_are_found() {
        assert!(has_copy("COPY t FROM STDIN"));
        assert!(has_copy("/* x */ copy t (a) from stdin"));
        assert!(has_copy("SET a = 1; COPY t FROM STDIN"));
        assert!(!has_copy("INSERT INTO t VALUES ('copy; copy')"));
        assert!(!has_copy("INSERT INTO copy VALUES (1)"));
        assert!(has_copy("CoPy t TO STDOUT;"));
        assert!(has_copy("SELECT 1; cOpY t FROM STDIN;"));
        assert!(!has_copy("UPDATE t SET a = a + 1 WHERE b = 2;"));
        assert!(mentions_copy("x COPY") && mentions_copy("copy") && !mentions_copy("cop"));
        assert!(!mentions_copy("c\u{f8}py") && !mentions_copy("CO PY"));
    }

    #[test]
    fn releasing_statements_are_noticed() {
        for sql in [
            "UNLISTEN *",
            "SELECT pg_advisory_unlock(1)",
            "drop table tmp",
            "COMMIT",
            "select 1; discard temp",
            "CLOSE c",
        ] {
            assert!(may_unpin(sql), "{sql}");
        }
        for sql in ["SELECT 1", "INSERT INTO t VALUES ('drop')", "LISTEN x"] {
            assert!(!may_unpin(sql), "{sql}");
        }
    }
}
