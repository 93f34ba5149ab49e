//! The classes of the statements this session sent lately.
//!
//! Drivers send the same few statements again and again (an unnamed Parse
//! per query, the same simple queries); comparing the text with a handful
//! of recent ones is several times cheaper than lexing it again. The memo
//! is per session, so it needs no lock and no hashing of client text.
//!
//! Clients that inline their values never repeat a text, so reads are also
//! remembered by shape ([`pgsplit_router::shape`]): the `SELECT` with its
//! literals blanked out, whose class the values cannot change.

use pgsplit_router::shape::select_shape;
use pgsplit_router::{Class, StmtKind};

/// Statements remembered per session.
const ENTRIES: usize = 8;

/// Longer statements are not remembered (their text would cost memory for
/// little gain: long statements are rarely repeated verbatim).
const MAX_TEXT: usize = 1024;

#[derive(Default)]
pub(super) struct Memo {
    /// Texts are overwritten in place when evicted: a statement that is
    /// never repeated (literals inlined) costs a copy, not an allocation.
    entries: Vec<(String, Class)>,
    next: usize,
    /// Shapes of reads, overwritten in place as the texts are.
    shapes: Vec<(Vec<u8>, Class)>,
    next_shape: usize,
    /// The shape of the statement being looked up.
    scratch: Vec<u8>,
}

/// Whether `a` and `b` are the same text. Statements sent again and again
/// differ, if at all, mostly in the literals near their end: that is
/// compared first.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let tail = a.len().min(8);
    a.len() == b.len() && a[a.len() - tail..] == b[b.len() - tail..] && a == b
}

impl Memo {
    /// The class of `sql`, from the memo or from `classify`. A read known
    /// by its shape only is still checked against `learned`, the texts
    /// the replica refused as writes.
    pub fn class(
        &mut self,
        sql: &str,
        classify: impl FnOnce(&str) -> Class,
        learned: impl FnOnce(&str) -> bool,
    ) -> Class {
        if let Some((_, c)) = self.entries.iter().find(|(t, _)| same(t, sql)) {
            return *c;
        }
        let shaped = sql.len() <= MAX_TEXT && select_shape(sql, &mut self.scratch);
        if shaped {
            if let Some((_, c)) = self.shapes.iter().find(|(s, _)| *s == self.scratch) {
                if !learned(sql) {
                    return *c;
                }
            }
        }
        let c = classify(sql);
        if shaped && c.kind == StmtKind::Read && c.hint.is_none() {
            if self.shapes.len() < ENTRIES {
                self.shapes.push((self.scratch.clone(), c));
            } else {
                let (shape, class) = &mut self.shapes[self.next_shape];
                shape.clear();
                shape.extend_from_slice(&self.scratch);
                *class = c;
                self.next_shape = (self.next_shape + 1) % ENTRIES;
            }
        }
        if sql.len() <= MAX_TEXT {
            if self.entries.len() < ENTRIES {
                self.entries.push((sql.to_owned(), c));
            } else {
                let (text, class) = &mut self.entries[self.next];
                text.clear();
                text.push_str(sql);
                *class = c;
                self.next = (self.next + 1) % ENTRIES;
            }
        }
        c
    }

    /// Drops what is remembered about `sql` (it was learned to be a write).
    pub fn forget(&mut self, sql: &str) {
        self.entries.retain(|(t, _)| **t != *sql);
        self.next = 0;
        if sql.len() <= MAX_TEXT && select_shape(sql, &mut self.scratch) {
            let shape = &self.scratch;
            self.shapes.retain(|(s, _)| s != shape);
            self.next_shape = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgsplit_router::{Stage, StmtKind};

    fn class(kind: StmtKind) -> Class {
        Class {
            kind,
            hint: None,
            statements: 1,
            stage: Stage::Lexer,
        }
    }

    #[test]
    fn repeats_are_not_classified_again_and_the_memo_is_bounded() {
        let mut m = Memo::default();
        let mut calls = 0;
        for _ in 0..3 {
            m.class(
                "VALUES (1)",
                |_| {
                    calls += 1;
                    class(StmtKind::Read)
                },
                |_| false,
            );
        }
        assert_eq!(calls, 1);
        for i in 0..100 {
            m.class(
                &format!("INSERT INTO t VALUES ({i})"),
                |_| class(StmtKind::Write),
                |_| false,
            );
        }
        assert_eq!(m.entries.len(), ENTRIES);
        let c = m.class("VALUES (1)", |_| class(StmtKind::Unknown), |_| false);
        assert_eq!(c.kind, StmtKind::Unknown, "evicted, classified again");
        // Same length and tail, another text.
        let c = m.class("SELECT 2 -- one", |_| class(StmtKind::Read), |_| false);
        assert_eq!(c.kind, StmtKind::Read);
        let c = m.class("SELECT 3 -- one", |_| class(StmtKind::Write), |_| false);
        assert_eq!(c.kind, StmtKind::Write);
    }

    #[test]
    fn reads_are_known_by_their_shape() {
        /// Classifies `sql` as `kind` and counts the classifier's calls.
        fn seen(m: &mut Memo, sql: &str, kind: StmtKind, learned: bool, calls: &mut u32) {
            m.class(
                sql,
                |_| {
                    *calls += 1;
                    class(kind)
                },
                |_| learned,
            );
        }
        let mut m = Memo::default();
        let mut calls = 0;
        for i in 0..20 {
            let sql = format!("SELECT * FROM t WHERE id = {i} AND s = 'v{i}'");
            seen(&mut m, &sql, StmtKind::Read, false, &mut calls);
        }
        assert_eq!(calls, 1, "one shape, classified once");
        // A text learned as a write is classified again, shape or not.
        let learned = "SELECT * FROM t WHERE id = 99 AND s = 'w'";
        seen(&mut m, learned, StmtKind::Read, true, &mut calls);
        assert_eq!(calls, 2);
        // Forgetting a text forgets its shape.
        m.forget("SELECT * FROM t WHERE id = 5 AND s = 'x'");
        let other = "SELECT * FROM t WHERE id = 6 AND s = 'y'";
        seen(&mut m, other, StmtKind::Read, false, &mut calls);
        assert_eq!(calls, 3);
        // A text too long to be remembered is not shaped to be forgotten
        // either: the scratch buffer stays small.
        let long = format!("SELECT {} FROM t", "x, ".repeat(MAX_TEXT));
        m.forget(&long);
        assert!(m.scratch.capacity() <= MAX_TEXT, "{}", m.scratch.capacity());
        // Only reads are remembered by shape.
        for i in 0..3 {
            let sql = format!("SELECT nextval('s{i}')");
            seen(&mut m, &sql, StmtKind::Write, false, &mut calls);
        }
        assert_eq!(calls, 6);
    }
}
