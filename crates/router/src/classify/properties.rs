//! Property tests: the classifier survives any input, and the lexical stage
//! never lets a write pass for a read however the statement is dressed.
//!
//! "Dressed" means what clients and ORMs really vary: comments (including
//! ones that mention `select` or `delete`), whitespace and line breaks
//! between tokens, and keyword case. The decoration works on the lexer's own
//! tokens and only replaces the gaps that already separated them, so the
//! decorated text is the same statement to PostgreSQL.

use proptest::prelude::*;

use super::{classify_lexical, Classifier, ClassifierConfig};
use crate::corpus::CORPUS;
use crate::lexer::{Lexer, TokenKind};
use crate::StmtKind;

/// One piece of a gap between tokens.
#[derive(Clone, Debug)]
enum Gap {
    Space,
    Newline,
    Tab,
    Block(String),
    Line(String),
}

/// Comment text full of things that would mislead a careless lexer, but
/// never a hint and never a comment delimiter.
fn comment_text() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "select",
        "SELECT",
        "insert",
        "update",
        "delete",
        "for update",
        "into",
        "temp",
        ";",
        "'",
        "\"",
        "$$",
        "$a$",
        "(",
        ")",
        "nextval(",
        "--",
        "x",
        "E'",
        "\\",
    ]);
    prop::collection::vec(word, 0..6).prop_map(|words| words.join(" "))
}

fn gap() -> impl Strategy<Value = Gap> {
    prop_oneof![
        3 => Just(Gap::Space),
        1 => Just(Gap::Newline),
        1 => Just(Gap::Tab),
        1 => comment_text().prop_map(Gap::Block),
        1 => comment_text().prop_map(Gap::Line),
    ]
}

/// Random choices for one decoration; used cyclically across tokens.
#[derive(Clone, Debug)]
struct Dressing {
    gaps: Vec<Vec<Gap>>,
    cases: Vec<u64>,
}

fn dressing() -> impl Strategy<Value = Dressing> {
    (
        prop::collection::vec(prop::collection::vec(gap(), 1..4), 1..16),
        prop::collection::vec(any::<u64>(), 1..16),
    )
        .prop_map(|(gaps, cases)| Dressing { gaps, cases })
}

impl Dressing {
    /// `sql` with its gaps replaced and its words re-cased; `salt` varies the
    /// choices between corpus entries.
    fn apply(&self, sql: &str, salt: usize) -> String {
        let mut out = String::new();
        let mut prev_end = 0;
        let mut n = salt;
        let mut open_ended = false;
        for tok in Lexer::new(sql) {
            if tok.start > prev_end || (prev_end == 0 && n % 2 == 0) {
                self.gap(&mut out, n);
            }
            let text = &sql[tok.start..tok.end];
            if tok.kind == TokenKind::Word {
                let bits = self.cases[n % self.cases.len()];
                out.extend(text.chars().enumerate().map(|(i, c)| {
                    if bits >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                }));
            } else {
                out.push_str(text);
            }
            prev_end = tok.end;
            n += 1;
            // Text after an unterminated literal would become part of it.
            open_ended = tok.kind == TokenKind::Unterminated;
        }
        if !open_ended && (prev_end < sql.len() || n % 3 == 0) {
            self.gap(&mut out, n);
        }
        out
    }

    fn gap(&self, out: &mut String, n: usize) {
        for piece in &self.gaps[n % self.gaps.len()] {
            match piece {
                Gap::Space => out.push(' '),
                Gap::Newline => out.push('\n'),
                Gap::Tab => out.push('\t'),
                Gap::Block(text) => {
                    out.push_str("/* ");
                    out.push_str(text);
                    out.push_str(" */");
                }
                Gap::Line(text) => {
                    out.push_str("-- ");
                    out.push_str(text);
                    out.push('\n');
                }
            }
        }
    }
}

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "select",
            "insert",
            "update",
            "delete",
            "with",
            "as",
            "explain",
            "analyze",
            "copy",
            "to",
            "from",
            "for",
            "into",
            "begin",
            "set",
            "declare",
            "create",
            "temp",
            "(",
            ")",
            ";",
            "'",
            "''",
            "\"",
            "$",
            "$$",
            "$q$",
            "$1",
            "/*",
            "*/",
            "--",
            "\n",
            " ",
            "E'",
            "U&'",
            "\\",
            ",",
            ".",
            "::",
            "nextval(",
            "pg_advisory_lock(",
        ])
        .prop_map(str::to_string),
        "[a-z]{1,6}",
        any::<char>().prop_map(String::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(pgsplit_protocol::proptest_cases(128)))]

    #[test]
    fn never_panics_on_arbitrary_text(sql in any::<String>()) {
        let class = Classifier::new(ClassifierConfig::default()).classify(&sql);
        if let Some(lexical) = classify_lexical(&sql, &[]) {
            prop_assert_eq!(lexical.kind, class.kind);
        }
    }

    #[test]
    fn never_panics_on_sql_fragments(parts in prop::collection::vec(fragment(), 0..40)) {
        let sql = parts.concat();
        let class = Classifier::new(ClassifierConfig::default()).classify(&sql);
        if let Some(lexical) = classify_lexical(&sql, &[]) {
            prop_assert_eq!(lexical.kind, class.kind);
        }
    }

    /// The safety property: a statement that needs the primary is never
    /// decided as a read (or as empty) by the lexical stage, however it is
    /// decorated. Undecided is fine; the parser gets it.
    #[test]
    fn decorated_writes_never_become_reads(d in dressing()) {
        for (i, &(sql, want)) in CORPUS.iter().enumerate() {
            if !want.needs_primary() {
                continue;
            }
            let dressed = d.apply(sql, i);
            if let Some(class) = classify_lexical(&dressed, &[]) {
                prop_assert!(
                    !matches!(class.kind, StmtKind::Read | StmtKind::Empty),
                    "{:?} became {:?}", dressed, class.kind
                );
                prop_assert_eq!(class.kind, want, "{:?}", dressed);
            }
        }
    }

    /// Reads stay reads, decided by the same stage as undecorated.
    #[test]
    fn decorated_reads_stay_reads(d in dressing()) {
        let classifier = Classifier::new(ClassifierConfig::default());
        for (i, &(sql, want)) in CORPUS.iter().enumerate() {
            if !matches!(want, StmtKind::Read | StmtKind::Empty) {
                continue;
            }
            let dressed = d.apply(sql, i);
            let lexical = classify_lexical(&dressed, &[]).map(|c| c.kind);
            let plain = classify_lexical(sql, &[]).map(|c| c.kind);
            prop_assert_eq!(lexical, plain, "{:?}", dressed);
            prop_assert_eq!(classifier.classify(&dressed).kind, want, "{:?}", dressed);
        }
    }

    /// Every other label (transaction control, session state) is just as
    /// stable under decoration.
    #[test]
    fn decorated_control_statements_keep_their_kind(d in dressing()) {
        for (i, &(sql, want)) in CORPUS.iter().enumerate() {
            if want.needs_primary() || matches!(want, StmtKind::Read | StmtKind::Empty) {
                continue;
            }
            let dressed = d.apply(sql, i);
            let got = classify_lexical(&dressed, &[]).map(|c| c.kind);
            prop_assert_eq!(got, Some(want), "{:?}", dressed);
        }
    }
}

/// A read to splice a write into: `(text, starts with SELECT)`.
const READS: &[&str] = &[
    "SELECT 1",
    "SELECT a, b FROM t WHERE a = $1",
    "SELECT count(*) FROM t JOIN u USING (id) GROUP BY 1 ORDER BY 1",
    "SELECT * FROM t WHERE id IN (SELECT id FROM u LIMIT 3)",
    "SELECT x FROM (SELECT 1 AS x UNION ALL SELECT 2) s",
    "SELECT 'insert into t values (1)', \"delete\" FROM t",
    "SELECT $$update t set a = 1$$ AS q",
    "SELECT now() - interval '1 day', lower('DELETE')",
];

/// A statement that writes, for the multi-statement splice.
const WRITES: &[&str] = &[
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET a = a + 1",
    "DELETE FROM t WHERE a = 1",
    "CREATE TABLE n (x int)",
    "TRUNCATE t",
    "SELECT nextval('s')",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
];

/// A data-modifying statement that can sit in a CTE.
const CTE_WRITES: &[&str] = &[
    "INSERT INTO t VALUES (1) RETURNING *",
    "UPDATE t SET a = 2 RETURNING a",
    "DELETE FROM t RETURNING id",
];

/// A call that writes (or pins the session), for a select list.
const WRITE_CALLS: &[&str] = &[
    "nextval('s')",
    "setval('s', 1)",
    "pg_catalog.nextval('s')",
    "NEXTVAL ( 's' )",
    "pg_advisory_lock(1)",
    "pg_try_advisory_xact_lock(1)",
    "lo_create(0)",
    "pg_notify('c', 'x')",
    "pg_current_xact_id()",
    "audit_touch(1)",
];

/// Comments that look like routing hints, or mention reads.
const HINT_LIKE: &[&str] = &[
    "/* pgsplit:replica */ ",
    "/*pgsplit:replica*/",
    "-- pgsplit:replica\n",
    "/* read only: SELECT */ ",
    "/* pgsplit: replica, it is only a read */ ",
    "",
];

/// How a write is spliced into a read.
#[derive(Clone, Debug)]
enum Splice {
    /// `WITH w AS (<write>) <read>`.
    Cte(usize),
    /// `WITH r AS (<read>), w AS (<write>) SELECT * FROM r`.
    SecondCte(usize),
    /// The read with a writing call added to its select list.
    Call(usize),
    /// `<read>; <write>` or `<write>; <read>`, or the write in the middle.
    Multi(usize, u8),
    /// `<read> FOR UPDATE` and its siblings.
    Locking(u8),
    /// `SELECT … INTO new_table FROM …`.
    Into,
}

fn splice() -> impl Strategy<Value = Splice> {
    prop_oneof![
        (0..CTE_WRITES.len()).prop_map(Splice::Cte),
        (0..CTE_WRITES.len()).prop_map(Splice::SecondCte),
        (0..WRITE_CALLS.len()).prop_map(Splice::Call),
        (0..WRITES.len(), 0u8..3).prop_map(|(w, at)| Splice::Multi(w, at)),
        (0u8..4).prop_map(Splice::Locking),
        Just(Splice::Into),
    ]
}

impl Splice {
    fn apply(&self, read: &str) -> String {
        let rest = read
            .strip_prefix("SELECT ")
            .expect("reads start with SELECT");
        match *self {
            Splice::Cte(w) => format!("WITH w AS ({}) {read}", CTE_WRITES[w]),
            Splice::SecondCte(w) => format!(
                "WITH r AS ({read}), w AS ({}) SELECT * FROM r",
                CTE_WRITES[w]
            ),
            Splice::Call(c) => format!("SELECT {}, {rest}", WRITE_CALLS[c]),
            Splice::Multi(w, 0) => format!("{read}; {}", WRITES[w]),
            Splice::Multi(w, 1) => format!("{}; {read}", WRITES[w]),
            Splice::Multi(w, _) => format!("{read}; {}; {read};", WRITES[w]),
            Splice::Locking(l) => format!(
                "{read} {}",
                [
                    "FOR UPDATE",
                    "FOR NO KEY UPDATE",
                    "FOR SHARE",
                    "FOR KEY SHARE NOWAIT"
                ][l as usize]
            ),
            Splice::Into => match rest.split_once(" FROM ") {
                Some((list, from)) => format!("SELECT {list} INTO TEMP new_t FROM {from}"),
                None => format!("SELECT {rest} INTO new_t"),
            },
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(pgsplit_protocol::proptest_cases(512)))]

    /// The safety property again, from the other side: a read with a write
    /// spliced into it anywhere (a data-modifying CTE, a writing call, one
    /// statement of several, a locking clause, `INTO`), behind comments
    /// that look like hints and dressed like any other statement, is never
    /// classified as a read by either stage.
    #[test]
    fn reads_with_a_write_spliced_in_never_stay_reads(
        read in 0..READS.len(),
        s in splice(),
        comment in 0..HINT_LIKE.len(),
        d in dressing(),
    ) {
        let classifier = Classifier::new(ClassifierConfig {
            write_functions: vec!["audit_*".into()],
            ..ClassifierConfig::default()
        });
        let spliced = format!("{}{}", HINT_LIKE[comment], s.apply(READS[read]));
        for sql in [spliced.clone(), d.apply(&spliced, read)] {
            let class = classifier.classify(&sql);
            prop_assert!(
                class.kind.needs_primary(),
                "{:?} classified {:?}", sql, class.kind
            );
            if let Some(lexical) = classify_lexical(&sql, &["audit_*".into()]) {
                prop_assert!(
                    !matches!(lexical.kind, StmtKind::Read | StmtKind::Empty),
                    "{:?} lexically {:?}", sql, lexical.kind
                );
            }
        }
    }
}
