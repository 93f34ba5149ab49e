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
    entries: Vec<(Box<str>, Class)>,
    next: usize,
}

impl Memo {
    /// The class of `sql`, from the memo or from `classify`.
    pub fn class(&mut self, sql: &str, classify: impl FnOnce(&str) -> Class) -> Class {
        if let Some((_, c)) = self.entries.iter().find(|(t, _)| **t == *sql) {
            return *c;
        }
        let c = classify(sql);
        if sql.len() <= MAX_TEXT {
            let entry = (Box::from(sql), c);
            if self.entries.len() < ENTRIES {
                self.entries.push(entry);
            } else {
                self.entries[self.next] = entry;
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
    }
}
