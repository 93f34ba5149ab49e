//! The shape of a `SELECT`: its text with the literals blanked out.
//!
//! Clients that inline their values (psql, psycopg2 and so Django, most
//! `-M simple` loads) send the same statement over and over with other
//! numbers and strings in it, so a memo of exact texts never hits and
//! every one is lexed and classified again. Whether a `SELECT` reads or
//! writes never depends on the value of a literal in it (only on keywords,
//! names and the kinds of tokens), so two statements of one shape have one
//! class and the server can remember classes by shape.
//!
//! The scan is deliberately narrower than the lexer: it blanks only what
//! the lexer itself reads as a plain `'…'` string or a plain decimal number,
//! copies names and operators as they are, and gives up (no shape) on
//! anything rarer — comments (they carry routing hints), prefixed or
//! dollar-quoted strings, numbers with letters in them, control bytes. A
//! statement without a shape is simply classified as before.

use crate::lexer::{is_ident_cont, number_end};

/// Stands for a number in a shape.
const NUMBER: u8 = 0x01;
/// Stands for a string literal in a shape.
const STRING: u8 = 0x02;

/// Writes the shape of `sql` into `out` (cleared first) and returns true,
/// or returns false when `sql` has no shape: it does not start with
/// `SELECT`, or holds something the scan does not blank with certainty.
pub fn select_shape(sql: &str, out: &mut Vec<u8>) -> bool {
    out.clear();
    let src = sql.as_bytes();
    let start = src
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(src.len());
    let starts_with_select = src.len() >= start + 6
        && src[start..start + 6].eq_ignore_ascii_case(b"select")
        && !src.get(start + 6).copied().is_some_and(is_ident_cont);
    if !starts_with_select {
        return false;
    }
    out.reserve(src.len());
    let mut i = 0;
    while i < src.len() {
        // Most bytes are copied as they are: find the next one that is not.
        let run = src[i..]
            .iter()
            .position(|&b| SPECIAL[b as usize])
            .unwrap_or(src.len() - i);
        out.extend_from_slice(&src[i..i + run]);
        i += run;
        let Some(&c) = src.get(i) else { break };
        let prev = if i > 0 { src[i - 1] } else { b' ' };
        match c {
            b'\'' | b'"' => {
                // A prefix (E'…', B'…', U&'…', U&"…") changes the rules.
                if is_ident_cont(prev) || prev == b'&' {
                    return false;
                }
                let Some(end) = closing(src, i + 1, c) else {
                    return false;
                };
                if c == b'\'' {
                    out.push(STRING);
                } else {
                    out.extend_from_slice(&src[i..end]);
                }
                i = end;
            }
            b'0'..=b'9' if !is_ident_cont(prev) && prev != b'.' => {
                // The lexer's number token: the same maximal run.
                let end = number_end(src, i);
                let run = &src[i..end];
                let dots = run.iter().filter(|&&b| b == b'.').count();
                let plain = run.iter().all(|b| b.is_ascii_digit() || *b == b'.')
                    && dots <= 1
                    && run.last() != Some(&b'.');
                if !plain {
                    return false;
                }
                out.push(NUMBER);
                i = end;
            }
            b'$' if !src.get(i + 1).is_some_and(u8::is_ascii_digit) => return false,
            b'-' if src.get(i + 1) == Some(&b'-') => return false,
            b'/' if src.get(i + 1) == Some(&b'*') => return false,
            0..=0x08 | 0x0e..=0x1f | 0x7f => return false,
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    true
}

/// Bytes the scan must look at; every other byte is copied as it is.
static SPECIAL: [bool; 256] = special_bytes();

const fn special_bytes() -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        table[i] = matches!(c, b'\'' | b'"' | b'0'..=b'9' | b'$' | b'-' | b'/')
            || (c < 0x20 && !matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
            || c == 0x7f;
        i += 1;
    }
    table
}

/// Just past the quote closing what opened at `from - 1`, with the quote
/// doubled inside standing for itself (`''`, `""`).
fn closing(src: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    loop {
        let n = src.get(i..)?.iter().position(|&b| b == quote)?;
        if src.get(i + n + 1) == Some(&quote) {
            i += n + 2;
        } else {
            return Some(i + n + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lexer::{Lexer, TokenKind};
    use crate::{Classifier, ClassifierConfig};
    use proptest::prelude::*;

    fn shape(sql: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        select_shape(sql, &mut out).then_some(out)
    }

    /// The shape as the lexer sees it: its plain strings and the numbers
    /// that start with a digit blanked (the scan keeps `.5` as it is),
    /// everything between tokens kept.
    fn lexer_shape(sql: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        for tok in Lexer::new(sql) {
            out.extend_from_slice(&sql.as_bytes()[at..tok.start]);
            match tok.kind {
                TokenKind::Number if sql.as_bytes()[tok.start] != b'.' => out.push(NUMBER),
                TokenKind::String if sql.as_bytes()[tok.start] == b'\'' => out.push(STRING),
                _ => out.extend_from_slice(&sql.as_bytes()[tok.start..tok.end]),
            }
            at = tok.end;
        }
        out.extend_from_slice(&sql.as_bytes()[at..]);
        out
    }

    #[test]
    fn literals_are_blanked_and_the_rest_kept() {
        let a = shape("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;").unwrap();
        let b = shape("SELECT abalance FROM pgbench_accounts WHERE aid = 7;").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            shape("select * from t where name = 'O''Brien; DELETE' and x > 1.5"),
            shape("select * from t where name = 'x' and x > 2")
        );
        assert_ne!(shape("SELECT 1"), shape("SELECT '1'"), "kinds differ");
        assert_ne!(shape("SELECT a FROM t"), shape("SELECT b FROM t"));
        assert_eq!(
            shape(r#"SELECT "we""ird" FROM t WHERE x = $1 AND y = 3"#).unwrap(),
            b"SELECT \"we\"\"ird\" FROM t WHERE x = $1 AND y = \x01".to_vec()
        );
        assert_eq!(
            shape("SELECT t1.c2 FROM t1").unwrap(),
            b"SELECT t1.c2 FROM t1"
        );
    }

    #[test]
    fn what_the_scan_is_not_sure_of_has_no_shape() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "selectx 1",
            "/* pgsplit:primary */ SELECT 1",
            "SELECT 1 -- pgsplit:primary",
            "SELECT E'\\'' ",
            "SELECT U&'d\\0061t'",
            "SELECT x'1F'",
            "SELECT $$a$$",
            "SELECT 1e5",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1.2.3",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "SELECT \u{1}",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    #[test]
    fn one_shape_one_class_over_the_corpus() {
        let c = Classifier::new(ClassifierConfig::default());
        let variants = |sql: &str| {
            [
                sql.replace("1", "42"),
                sql.replace("'a'", "'; DELETE FROM t; --'"),
                sql.replace("'x'", "'it''s'"),
            ]
        };
        let mut checked = 0;
        for (sql, _) in crate::corpus::CORPUS {
            let Some(s) = shape(sql) else { continue };
            for v in variants(sql) {
                if shape(&v).as_ref() == Some(&s) {
                    assert_eq!(c.classify(sql), c.classify(&v), "{sql} / {v}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 10, "only {checked} variants compared");
    }

    /// Fragments that stress the boundaries the scan and the lexer must
    /// agree on.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(" ".to_owned()),
            Just("\n".to_owned()),
            Just("a".to_owned()),
            Just("e".to_owned()),
            Just("x1".to_owned()),
            Just("$".to_owned()),
            Just("$1".to_owned()),
            Just("&".to_owned()),
            Just(".".to_owned()),
            Just("'".to_owned()),
            Just("''".to_owned()),
            Just("'s t'".to_owned()),
            Just("\"".to_owned()),
            Just("\"q\"".to_owned()),
            Just("-".to_owned()),
            Just("/".to_owned()),
            Just("*".to_owned()),
            Just("+".to_owned()),
            Just(";".to_owned()),
            Just("\\".to_owned()),
            Just("(".to_owned()),
            "[0-9]{1,3}",
            "[0-9]\\.[0-9]",
            "[a-zA-Z_]{1,3}",
        ]
    }

    proptest! {
        #[test]
        fn the_scan_blanks_exactly_the_lexers_plain_literals(
            parts in proptest::collection::vec(fragment(), 0..24)
        ) {
            let sql = format!("SELECT {}", parts.concat());
            if let Some(s) = shape(&sql) {
                prop_assert_eq!(s, lexer_shape(&sql), "{}", sql);
            }
        }
    }
}
