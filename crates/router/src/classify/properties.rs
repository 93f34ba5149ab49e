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
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

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
