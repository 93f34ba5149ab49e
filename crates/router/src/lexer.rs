//! Allocation-free SQL tokenizer following PostgreSQL's lexical rules.
//!
//! The classifier decides by keywords, so the one thing it must never do is
//! see a keyword where PostgreSQL sees data: inside a string literal, a
//! quoted identifier, a dollar-quoted body or a comment. This lexer exists to
//! get exactly those boundaries right — `''` and `""` doubling, backslash
//! escapes in `E'…'`, `U&'…'` / `U&"…"`, `$tag$…$tag$`, nested `/* */` — and
//! to do it over the borrowed input with no heap allocation, because it runs
//! for every statement the proxy relays.
//!
//! It also picks up routing hints (`/* pgsplit:primary */`,
//! `-- pgsplit:replica`) from the comments it skips, since comments are the
//! only place a client can put them without changing the statement.
//!
//! Plain `'…'` literals follow `standard_conforming_strings = on` (the
//! default since PostgreSQL 9.1): a backslash in them is an ordinary
//! character.
//!
//! An unterminated literal, identifier or comment yields one
//! [`TokenKind::Unterminated`] token covering the rest of the input; the
//! classifier treats it as "cannot be sure".

use crate::Target;

/// What a [`Token`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// An unquoted identifier or keyword.
    Word,
    /// A `"quoted identifier"` (also `U&"…"`); the token text is the part
    /// between the quotes, with any `""` left doubled.
    QuotedIdent,
    /// Any string literal: `'…'`, `E'…'`, `U&'…'`, `B'…'`, `X'…'`, `N'…'`,
    /// `$tag$…$tag$`. The text includes prefix and quotes.
    String,
    /// A numeric literal.
    Number,
    /// A positional parameter such as `$1`.
    Param,
    /// A run of operator characters (`<>`, `::`, `||`, `~*`, …).
    Operator,
    /// `(`
    LParen,
    /// `)`
    RParen,
    /// `[`
    LBracket,
    /// `]`
    RBracket,
    /// `,`
    Comma,
    /// `;`
    Semicolon,
    /// `.`
    Dot,
    /// A single `:` (array slices).
    Colon,
    /// A literal, quoted identifier or block comment that is never closed;
    /// the token covers the rest of the input.
    Unterminated,
    /// Any other single byte (a stray `$`, `\`, `{`, …).
    Other,
}

/// One token, borrowing from the source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token<'a> {
    /// What the token is.
    pub kind: TokenKind,
    /// The token's bytes (for [`TokenKind::QuotedIdent`] only the part
    /// between the quotes).
    pub text: &'a [u8],
    /// Offset of the token's first byte in the source, prefix and quotes
    /// included.
    pub start: usize,
    /// Offset just past the token.
    pub end: usize,
}

impl Token<'_> {
    /// True for an unquoted word equal to `kw`, ignoring ASCII case.
    ///
    /// `kw` is expected in any case; quoted identifiers are never keywords.
    #[inline]
    pub fn is_keyword(&self, kw: &str) -> bool {
        self.kind == TokenKind::Word && self.text.eq_ignore_ascii_case(kw.as_bytes())
    }

    /// True for a word or quoted identifier, i.e. something that can name an
    /// object or a function.
    #[inline]
    pub fn is_name(&self) -> bool {
        matches!(self.kind, TokenKind::Word | TokenKind::QuotedIdent)
    }
}

/// An iterator over the tokens of a SQL string.
///
/// Cloning is cheap (a slice, an offset and the hint seen so far) and is how
/// the classifier looks ahead.
#[derive(Clone, Debug)]
pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    hint: Option<Target>,
}

impl<'a> Lexer<'a> {
    /// A lexer positioned at the start of `sql`.
    pub fn new(sql: &'a str) -> Self {
        Lexer {
            src: sql.as_bytes(),
            pos: 0,
            hint: None,
        }
    }

    /// The last `pgsplit:` hint found in the comments skipped so far.
    pub fn hint(&self) -> Option<Target> {
        self.hint
    }

    /// Byte offset of the next unread byte.
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// Moves back to `offset`, an earlier [`Lexer::offset`], to read the
    /// same tokens again.
    pub fn rewind(&mut self, offset: usize) {
        self.pos = offset.min(self.pos);
    }

    /// The byte at `i`, or 0 past the end (0 is never compared against).
    #[inline]
    fn at(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    #[inline]
    fn token(&mut self, kind: TokenKind, start: usize, end: usize) -> Token<'a> {
        let end = end.min(self.src.len());
        self.pos = end;
        Token {
            kind,
            text: self.src.get(start..end).unwrap_or(&[]),
            start,
            end,
        }
    }

    fn unterminated(&mut self, start: usize) -> Token<'a> {
        self.token(TokenKind::Unterminated, start, self.src.len())
    }

    /// Skips whitespace and comments, recording hints. Returns the
    /// unterminated token when a block comment never closes.
    #[inline]
    fn skip_trivia(&mut self) -> Option<Token<'a>> {
        loop {
            match self.at(self.pos) {
                b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c if self.pos < self.src.len() => {
                    self.pos += 1
                }
                b'-' if self.at(self.pos + 1) == b'-' => {
                    let body = self.pos + 2;
                    let end = self.src[body..]
                        .iter()
                        .position(|&b| b == b'\n' || b == b'\r')
                        .map_or(self.src.len(), |n| body + n);
                    self.note_hint(body, end);
                    self.pos = end;
                }
                b'/' if self.at(self.pos + 1) == b'*' => {
                    let start = self.pos;
                    let mut depth = 1u32;
                    let mut i = start + 2;
                    while i < self.src.len() {
                        match (self.src[i], self.at(i + 1)) {
                            (b'/', b'*') => {
                                depth += 1;
                                i += 2;
                            }
                            (b'*', b'/') => {
                                depth -= 1;
                                i += 2;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => i += 1,
                        }
                    }
                    if depth > 0 {
                        return Some(self.unterminated(start));
                    }
                    self.note_hint(start + 2, i - 2);
                    self.pos = i;
                }
                _ => return None,
            }
        }
    }

    fn note_hint(&mut self, start: usize, end: usize) {
        if let Some(body) = self.src.get(start..end) {
            if let Some(hint) = find_hint(body) {
                self.hint = Some(hint);
            }
        }
    }

    /// `'…'` with `''` doubling; `from` is just past the opening quote.
    fn standard_string(&mut self, start: usize, from: usize) -> Token<'a> {
        let mut i = from;
        loop {
            match self
                .src
                .get(i..)
                .and_then(|s| s.iter().position(|&b| b == b'\''))
            {
                None => return self.unterminated(start),
                Some(n) if self.at(i + n + 1) == b'\'' => i += n + 2,
                Some(n) => return self.token(TokenKind::String, start, i + n + 1),
            }
        }
    }

    /// `E'…'`: backslash escapes any byte, `''` is a quote too.
    fn escape_string(&mut self, start: usize, from: usize) -> Token<'a> {
        let mut i = from;
        while i < self.src.len() {
            match self.src[i] {
                b'\\' => i += 2,
                b'\'' if self.at(i + 1) == b'\'' => i += 2,
                b'\'' => return self.token(TokenKind::String, start, i + 1),
                _ => i += 1,
            }
        }
        self.unterminated(start)
    }

    /// `"…"` with `""` doubling; `from` is just past the opening quote.
    fn quoted_ident(&mut self, start: usize, from: usize) -> Token<'a> {
        let mut i = from;
        loop {
            match self
                .src
                .get(i..)
                .and_then(|s| s.iter().position(|&b| b == b'"'))
            {
                None => return self.unterminated(start),
                Some(n) if self.at(i + n + 1) == b'"' => i += n + 2,
                Some(n) => {
                    let close = i + n;
                    let mut tok = self.token(TokenKind::QuotedIdent, start, close + 1);
                    tok.text = self.src.get(from..close).unwrap_or(&[]);
                    return tok;
                }
            }
        }
    }

    /// `$1`, `$$…$$`, `$tag$…$tag$`, or a lone `$`.
    fn dollar(&mut self, start: usize) -> Token<'a> {
        let next = self.at(start + 1);
        if next.is_ascii_digit() {
            let mut i = start + 1;
            while self.at(i).is_ascii_digit() {
                i += 1;
            }
            return self.token(TokenKind::Param, start, i);
        }
        let mut i = start + 1;
        if is_ident_start(next) {
            while is_tag_char(self.at(i)) {
                i += 1;
            }
        }
        if self.at(i) != b'$' {
            return self.token(TokenKind::Other, start, start + 1);
        }
        let delim = &self.src[start..=i];
        let body = i + 1;
        match self
            .src
            .get(body..)
            .and_then(|rest| rest.windows(delim.len()).position(|w| w == delim))
        {
            Some(n) => self.token(TokenKind::String, start, body + n + delim.len()),
            None => self.unterminated(start),
        }
    }

    fn number(&mut self, start: usize) -> Token<'a> {
        let end = number_end(self.src, start);
        self.token(TokenKind::Number, start, end)
    }

    fn operator(&mut self, start: usize) -> Token<'a> {
        let mut i = start + 1;
        while is_op_char(self.at(i)) {
            let pair = (self.at(i), self.at(i + 1));
            if pair == (b'-', b'-') || pair == (b'/', b'*') {
                break;
            }
            i += 1;
        }
        self.token(TokenKind::Operator, start, i)
    }

    #[inline]
    fn word(&mut self, start: usize) -> Token<'a> {
        let rest = self.src.get(start + 1..).unwrap_or(&[]);
        let len = rest
            .iter()
            .position(|&b| !is_ident_cont(b))
            .unwrap_or(rest.len());
        self.token(TokenKind::Word, start, start + 1 + len)
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    #[inline]
    fn next(&mut self) -> Option<Token<'a>> {
        if let Some(tok) = self.skip_trivia() {
            return Some(tok);
        }
        let start = self.pos;
        let c = *self.src.get(start)?;
        let next = self.at(start + 1);
        let single = |kind| (kind, start + 1);
        let (kind, end) = match c {
            b'(' => single(TokenKind::LParen),
            b')' => single(TokenKind::RParen),
            b'[' => single(TokenKind::LBracket),
            b']' => single(TokenKind::RBracket),
            b',' => single(TokenKind::Comma),
            b';' => single(TokenKind::Semicolon),
            b':' if next == b':' => (TokenKind::Operator, start + 2),
            b':' => single(TokenKind::Colon),
            b'.' if next.is_ascii_digit() => return Some(self.number(start)),
            b'.' => single(TokenKind::Dot),
            b'\'' => return Some(self.standard_string(start, start + 1)),
            b'"' => return Some(self.quoted_ident(start, start + 1)),
            b'$' => return Some(self.dollar(start)),
            b'0'..=b'9' => return Some(self.number(start)),
            c if is_ident_start(c) => {
                let lower = c | 0x20;
                return Some(match (lower, next, self.at(start + 2)) {
                    (b'e', b'\'', _) => self.escape_string(start, start + 2),
                    (b'b' | b'x' | b'n', b'\'', _) => self.standard_string(start, start + 2),
                    (b'u', b'&', b'\'') => self.standard_string(start, start + 3),
                    (b'u', b'&', b'"') => self.quoted_ident(start, start + 3),
                    _ => self.word(start),
                });
            }
            c if is_op_char(c) => return Some(self.operator(start)),
            _ => single(TokenKind::Other),
        };
        Some(self.token(kind, start, end))
    }
}

/// Byte classes, looked up once per byte in the scanning loops.
const IDENT_START: u8 = 1;
const IDENT_CONT: u8 = 2;
const TAG_CHAR: u8 = 4;
const OP_CHAR: u8 = 8;

static CLASS: [u8; 256] = byte_classes();

const fn byte_classes() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut class = 0;
        // PostgreSQL treats every high-bit byte as a letter.
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            class |= IDENT_START | IDENT_CONT | TAG_CHAR;
        }
        if c.is_ascii_digit() {
            class |= IDENT_CONT | TAG_CHAR;
        }
        // `$` continues an identifier but not a dollar-quote tag.
        if c == b'$' {
            class |= IDENT_CONT;
        }
        if matches!(
            c,
            b'+' | b'-'
                | b'*'
                | b'/'
                | b'<'
                | b'>'
                | b'='
                | b'~'
                | b'!'
                | b'@'
                | b'#'
                | b'%'
                | b'^'
                | b'&'
                | b'|'
                | b'`'
                | b'?'
        ) {
            class |= OP_CHAR;
        }
        table[i] = class;
        i += 1;
    }
    table
}

#[inline]
fn is_ident_start(c: u8) -> bool {
    CLASS[c as usize] & IDENT_START != 0
}

/// The end of the number token starting at `start`: letters, digits, `_`
/// and `.` run on (PostgreSQL rejects what is not a number), and so does
/// the sign of an exponent.
pub(crate) fn number_end(src: &[u8], start: usize) -> usize {
    let mut i = start;
    while let Some(&c) = src.get(i) {
        let plain = c.is_ascii_alphanumeric() || c == b'_' || c == b'.';
        let exponent_sign = (c == b'+' || c == b'-')
            && i > start
            && (src[i - 1] | 0x20) == b'e'
            && src.get(i + 1).is_some_and(u8::is_ascii_digit);
        if !(plain || exponent_sign) {
            break;
        }
        i += 1;
    }
    i
}

#[inline]
pub(crate) fn is_ident_cont(c: u8) -> bool {
    CLASS[c as usize] & IDENT_CONT != 0
}

#[inline]
fn is_tag_char(c: u8) -> bool {
    CLASS[c as usize] & TAG_CHAR != 0
}

#[inline]
fn is_op_char(c: u8) -> bool {
    CLASS[c as usize] & OP_CHAR != 0
}

/// The last `pgsplit:primary` / `pgsplit:replica` in a comment body.
///
/// Case-insensitive, with optional whitespace around the colon; the hint must
/// be a whole word on both ends so `xpgsplit:primaryish` does not count.
fn find_hint(body: &[u8]) -> Option<Target> {
    const TAG: &[u8] = b"pgsplit";
    let mut found = None;
    let mut i = 0;
    while i + TAG.len() <= body.len() {
        let at_word_start = i == 0 || !is_ident_cont(body[i - 1]);
        if at_word_start && body[i..i + TAG.len()].eq_ignore_ascii_case(TAG) {
            let mut j = skip_spaces(body, i + TAG.len());
            if body.get(j) == Some(&b':') {
                j = skip_spaces(body, j + 1);
                for (word, target) in [(b"primary", Target::Primary), (b"replica", Target::Replica)]
                {
                    let end = j + word.len();
                    let whole = body
                        .get(j..end)
                        .is_some_and(|w| w.eq_ignore_ascii_case(word))
                        && !body.get(end).copied().is_some_and(is_ident_cont);
                    if whole {
                        found = Some(target);
                    }
                }
            }
        }
        i += 1;
    }
    found
}

fn skip_spaces(body: &[u8], mut i: usize) -> usize {
    while body.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::TokenKind::*;
    use super::*;

    fn kinds(sql: &str) -> Vec<(TokenKind, std::string::String)> {
        Lexer::new(sql)
            .map(|t| {
                (
                    t.kind,
                    std::string::String::from_utf8_lossy(t.text).into_owned(),
                )
            })
            .collect()
    }

    fn hint(sql: &str) -> Option<Target> {
        let mut lex = Lexer::new(sql);
        lex.by_ref().for_each(drop);
        lex.hint()
    }

    #[test]
    fn words_punctuation_and_params() {
        assert_eq!(
            kinds("SELECT a.b, f($1)::int FROM t;"),
            [
                (Word, "SELECT".into()),
                (Word, "a".into()),
                (Dot, ".".into()),
                (Word, "b".into()),
                (Comma, ",".into()),
                (Word, "f".into()),
                (LParen, "(".into()),
                (Param, "$1".into()),
                (RParen, ")".into()),
                (Operator, "::".into()),
                (Word, "int".into()),
                (Word, "FROM".into()),
                (Word, "t".into()),
                (Semicolon, ";".into()),
            ]
        );
    }

    #[test]
    fn comments_are_skipped_including_nested_ones() {
        assert_eq!(
            kinds("/* a /* b */ delete */ x -- update\n y"),
            [(Word, "x".into()), (Word, "y".into())]
        );
        assert_eq!(kinds("-- only a comment"), []);
        // PostgreSQL ends a line comment at a carriage return too.
        assert_eq!(kinds("a --x\rb"), [(Word, "a".into()), (Word, "b".into())]);
        assert_eq!(kinds("a--b"), [(Word, "a".into())]);
        assert_eq!(kinds("a-/*c*/-b").len(), 4);
    }

    #[test]
    fn strings_of_every_flavour_are_single_tokens() {
        for sql in [
            "'it''s'",
            r"E'a\'b'",
            r"e'a\\'",
            "E'x''y'",
            "U&'d\\0061t'",
            "B'101'",
            "X'ff'",
            "N'abc'",
            "$$ delete from t $$",
            "$fn$ a $$ b $fn$",
            "$a1_$x$a1_$",
        ] {
            let toks = kinds(sql);
            assert_eq!(toks.len(), 1, "{sql}: {toks:?}");
            assert_eq!(toks[0].0, String, "{sql}");
        }
        // A backslash in a plain literal is just a character.
        assert_eq!(kinds(r"'a\' b").len(), 2);
    }

    #[test]
    fn quoted_identifiers_keep_only_the_inside() {
        assert_eq!(
            kinds(r#""up""date" U&"x""#),
            [
                (QuotedIdent, r#"up""date"#.into()),
                (QuotedIdent, "x".into())
            ]
        );
    }

    #[test]
    fn unterminated_things_end_in_one_unterminated_token() {
        for sql in [
            "select 'abc",
            r"select E'abc\'",
            r#"select "abc"#,
            "select $$abc",
            "select $q$abc$$",
            "select /* a /* b */",
            "select E'\\",
        ] {
            let toks = kinds(sql);
            assert_eq!(toks.last().map(|t| t.0), Some(Unterminated), "{sql}");
            assert_eq!(toks.len(), 2, "{sql}");
        }
    }

    #[test]
    fn dollar_forms() {
        assert_eq!(kinds("$12")[0].0, Param);
        assert_eq!(kinds("$")[0].0, Other);
        assert_eq!(kinds("$a b")[0].0, Other);
        // `$` continues an identifier, so this is one word.
        assert_eq!(kinds("a$$b$$"), [(Word, "a$$b$$".into())]);
    }

    #[test]
    fn numbers_and_operators() {
        assert_eq!(
            kinds("1.5e-3 .5 0x1F 1_000 a<>-1"),
            [
                (Number, "1.5e-3".into()),
                (Number, ".5".into()),
                (Number, "0x1F".into()),
                (Number, "1_000".into()),
                (Word, "a".into()),
                (Operator, "<>-".into()),
                (Number, "1".into()),
            ]
        );
    }

    #[test]
    fn non_ascii_identifiers_stay_whole() {
        assert_eq!(
            kinds("select größe"),
            [(Word, "select".into()), (Word, "größe".into())]
        );
    }

    #[test]
    fn hints_are_found_in_comments_only_and_last_wins() {
        assert_eq!(
            hint("/* pgsplit:primary */ select 1"),
            Some(Target::Primary)
        );
        assert_eq!(hint("/*pgsplit:replica*/select 1"), Some(Target::Replica));
        assert_eq!(hint("select 1 -- PGSPLIT : Replica"), Some(Target::Replica));
        assert_eq!(
            hint("/* pgsplit:replica */ select 1 /* app=x pgsplit:primary */"),
            Some(Target::Primary)
        );
        assert_eq!(hint("select '/* pgsplit:primary */'"), None);
        assert_eq!(hint("select 1 /* pgsplit:primaryish */"), None);
        assert_eq!(hint("select 1 /* mypgsplit:primary */"), None);
        assert_eq!(hint("select 1 /* pgsplit:primary"), None);
    }
}
