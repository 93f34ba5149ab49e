//! A token cursor confined to one statement, or to one parenthesised
//! statement inside another.
//!
//! The lexical rules read a statement front to back and sometimes look one
//! token ahead; they should never have to think about where the statement
//! ends. The cursor owns that: it stops at a top-level `;` (or, for a
//! sub-statement such as the query of `COPY (…) TO`, at the `)` that closes
//! it), tracks parenthesis depth relative to its start, remembers whether an
//! unterminated literal was seen, and records where the statement's text
//! ends so an undecided statement can be handed to the parser on its own.

use crate::lexer::{Lexer, Token, TokenKind};

/// Where the cursor's scope ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// A top-level statement: ends at `;` outside parentheses, or the input's end.
    Statement,
    /// A statement in parentheses: ends at the unmatched `)`.
    Paren,
}

/// How a scope ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Still inside the scope.
    Open,
    /// At the end of the input.
    Eof,
    /// At a top-level `;`, which was consumed.
    Semicolon,
    /// At the closing `)` of a parenthesised scope, which was consumed.
    Paren,
    /// A parenthesised scope met a `;` before its `)`; the `;` is left for the
    /// enclosing statement.
    Broken,
}

#[derive(Clone, Debug)]
pub(crate) struct Cursor<'a> {
    lex: Lexer<'a>,
    scope: Scope,
    depth: u32,
    end: End,
    unterminated: bool,
    text_end: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor over the next top-level statement of `lex`.
    pub(crate) fn statement(lex: Lexer<'a>) -> Self {
        let text_end = lex.offset();
        Cursor {
            lex,
            scope: Scope::Statement,
            depth: 0,
            end: End::Open,
            unterminated: false,
            text_end,
        }
    }

    /// The next token of the scope, or `None` once the scope has ended.
    #[inline]
    pub(crate) fn next(&mut self) -> Option<Token<'a>> {
        if self.end != End::Open {
            return None;
        }
        let before = self.lex.offset();
        let Some(tok) = self.lex.next() else {
            self.end = End::Eof;
            return None;
        };
        match tok.kind {
            TokenKind::Semicolon if self.depth == 0 => {
                if self.scope == Scope::Paren {
                    self.lex.rewind(before);
                    self.end = End::Broken;
                } else {
                    self.end = End::Semicolon;
                }
                return None;
            }
            TokenKind::LParen => self.depth += 1,
            TokenKind::RParen if self.depth == 0 && self.scope == Scope::Paren => {
                self.text_end = tok.end;
                self.end = End::Paren;
                return None;
            }
            // A stray `)` in a top-level statement is a syntax error for
            // PostgreSQL; it is just another token here.
            TokenKind::RParen if self.depth == 0 => {}
            TokenKind::RParen => self.depth -= 1,
            TokenKind::Unterminated => self.unterminated = true,
            _ => {}
        }
        self.text_end = tok.end;
        Some(tok)
    }

    /// The token [`Cursor::next`] would return, without consuming it.
    pub(crate) fn peek(&self) -> Option<Token<'a>> {
        self.clone().next()
    }

    /// Parentheses opened since the scope began and not yet closed.
    pub(crate) fn depth(&self) -> u32 {
        self.depth
    }

    /// Consumes the rest of the scope.
    pub(crate) fn skip_rest(&mut self) {
        while self.next().is_some() {}
    }

    /// How the scope ended ([`End::Open`] while it has not).
    pub(crate) fn end(&self) -> End {
        self.end
    }

    /// True when an unterminated literal, identifier or comment was met: the
    /// token boundaries after it are unknown.
    pub(crate) fn unterminated(&self) -> bool {
        self.unterminated
    }

    /// Offset just past the last token of the scope read so far.
    pub(crate) fn text_end(&self) -> usize {
        self.text_end
    }

    /// The lexer, positioned after the scope's terminator.
    pub(crate) fn into_lexer(self) -> Lexer<'a> {
        self.lex
    }

    /// Runs `f` over the statement inside the parentheses just opened (the
    /// last token returned must be `(`), then continues after its `)`.
    ///
    /// A sub-statement that never finds its `)` makes the outer statement
    /// count as unterminated, so the lexical stage does not decide it.
    pub(crate) fn parenthesised<R>(&mut self, f: impl FnOnce(&mut Cursor<'a>) -> R) -> R {
        let mut inner = Cursor {
            lex: self.lex.clone(),
            scope: Scope::Paren,
            depth: 0,
            end: End::Open,
            unterminated: false,
            text_end: self.text_end,
        };
        let result = f(&mut inner);
        inner.skip_rest();
        match inner.end {
            End::Paren => self.depth = self.depth.saturating_sub(1),
            // The `;` the inner scope stopped at ends this statement too.
            End::Broken => {
                self.depth = 0;
                self.unterminated = true;
            }
            _ => self.unterminated = true,
        }
        self.unterminated |= inner.unterminated;
        self.text_end = inner.text_end;
        self.lex = inner.lex;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(cur: &mut Cursor<'_>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(t) = cur.next() {
            out.push(String::from_utf8_lossy(t.text).into_owned());
        }
        out
    }

    #[test]
    fn stops_at_top_level_semicolon_only() {
        let mut cur = Cursor::statement(Lexer::new("a (b; c) d; e"));
        assert_eq!(words(&mut cur), ["a", "(", "b", ";", "c", ")", "d"]);
        assert_eq!(cur.end(), End::Semicolon);
        let mut next = Cursor::statement(cur.into_lexer());
        assert_eq!(words(&mut next), ["e"]);
        assert_eq!(next.end(), End::Eof);
    }

    #[test]
    fn parenthesised_scope_resumes_after_its_paren() {
        let mut cur = Cursor::statement(Lexer::new("copy (select (1)) to x"));
        cur.next();
        cur.next();
        let inner = cur.parenthesised(|sub| words(sub));
        assert_eq!(inner, ["select", "(", "1", ")"]);
        assert_eq!(cur.depth(), 0);
        assert_eq!(words(&mut cur), ["to", "x"]);
        assert!(!cur.unterminated());
    }

    #[test]
    fn parenthesised_scope_without_paren_is_unterminated() {
        let mut cur = Cursor::statement(Lexer::new("copy (select 1; x"));
        cur.next();
        cur.next();
        cur.parenthesised(|sub| sub.skip_rest());
        assert!(cur.unterminated());
        assert_eq!(cur.next(), None);
        assert_eq!(cur.end(), End::Semicolon);
    }

    #[test]
    fn records_unterminated_tokens_and_text_end() {
        let mut cur = Cursor::statement(Lexer::new("select 'abc"));
        cur.skip_rest();
        assert!(cur.unterminated());
        assert_eq!(cur.text_end(), 11);
    }
}
