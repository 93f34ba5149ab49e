//! The classes of the statements this session sent lately.
//!
//! Drivers send the same few statements again and again (an unnamed Parse
//! per query, the same simple queries); comparing the text with a handful
//! of recent ones is several times cheaper than lexing it again. The memo
//! is per session, so it needs no lock and no hashing of client text.

use pgsplit_router::Class;

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
    /// The class of `sql`, from the memo or from `classify`.
    pub fn class(&mut self, sql: &str, classify: impl FnOnce(&str) -> Class) -> Class {
        if let Some((_, c)) = self.entries.iter().find(|(t, _)| same(t, sql)) {
            return *c;
        }
        let c = classify(sql);
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
            m.class("SELECT 1", |_| {
                calls += 1;
                class(StmtKind::Read)
            });
        }
        assert_eq!(calls, 1);
        for i in 0..100 {
            m.class(&format!("INSERT INTO t VALUES ({i})"), |_| {
                class(StmtKind::Write)
            });
        }
        assert_eq!(m.entries.len(), ENTRIES);
        let c = m.class("SELECT 1", |_| class(StmtKind::Unknown));
        assert_eq!(c.kind, StmtKind::Unknown, "evicted, classified again");
        // Same length and tail, another text.
        let c = m.class("SELECT 2 -- one", |_| class(StmtKind::Read));
        assert_eq!(c.kind, StmtKind::Read);
        let c = m.class("SELECT 3 -- one", |_| class(StmtKind::Write));
        assert_eq!(c.kind, StmtKind::Write);
    }
}
