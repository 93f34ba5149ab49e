//! The client's prepared statements, as the client believes they exist
//! (one server), and where each one really exists (primary, replica).
//!
//! A statement is created on a backend lazily: when a Bind or Describe
//! needs it on a backend that does not have it, the session injects the
//! client's original Parse frame (the same bytes) and swallows the extra
//! ParseComplete. A Close on one backend leaves a "zombie" on the other,
//! closed there before that backend is next used.

use std::collections::HashMap;

use bytes::Bytes;
use pgsplit_router::{Class, Target};

/// Index of a backend in per-backend arrays.
#[inline]
pub fn idx(t: Target) -> usize {
    match t {
        Target::Primary => 0,
        Target::Replica => 1,
    }
}

/// One prepared statement.
#[derive(Debug, Clone)]
pub struct Stmt {
    /// The client's Parse message, replayed as is on another backend.
    pub parse: Bytes,
    pub class: Class,
    /// Exists on [primary, replica].
    pub on: [bool; 2],
    /// A `pgsplit.*` statement the proxy answers itself; on no server.
    pub local: bool,
}

/// All of a session's statements.
#[derive(Debug, Default)]
pub struct Statements {
    /// The unnamed statement, kept apart: drivers re-parse it on nearly
    /// every query, and a field costs no hashing.
    unnamed: Option<Stmt>,
    map: HashMap<String, Stmt>,
    /// Names closed by the client that still exist on a backend.
    zombies: [Vec<String>; 2],
}

impl Statements {
    pub fn get(&self, name: &str) -> Option<&Stmt> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.map.get(name)
        }
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Stmt> {
        if name.is_empty() {
            self.unnamed.as_mut()
        } else {
            self.map.get_mut(name)
        }
    }

    fn remove(&mut self, name: &str) -> Option<Stmt> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.map.remove(name)
        }
    }

    /// A Parse succeeded on `t`.
    pub fn define(&mut self, name: &str, parse: Bytes, class: Class, t: Target) {
        let mut on = [false; 2];
        on[idx(t)] = true;
        self.define_on(name, parse, class, on);
    }

    /// A Parse the proxy answered itself (in a block lost with its
    /// server): created on a backend when first needed there.
    pub fn define_nowhere(&mut self, name: &str, parse: Bytes, class: Class) {
        self.define_on(name, parse, class, [false; 2]);
    }

    fn define_on(&mut self, name: &str, parse: Bytes, class: Class, on: [bool; 2]) {
        match self.get_mut(name) {
            Some(s) => {
                // Only the unnamed statement can be redefined; the other
                // backend's copy is stale but will be overwritten when an
                // injection replaces it.
                s.parse = parse;
                s.class = class;
                s.on = on;
                s.local = false;
            }
            None if name.is_empty() => {
                self.unnamed = Some(Stmt {
                    parse,
                    class,
                    on,
                    local: false,
                })
            }
            None => {
                let local = false;
                self.map.insert(
                    name.to_owned(),
                    Stmt {
                        parse,
                        class,
                        on,
                        local,
                    },
                );
            }
        }
    }

    /// A `pgsplit.*` statement the proxy answers itself. The unnamed one
    /// replaces the unnamed statement on every backend for the client, so
    /// the backends' copies no longer count.
    pub fn define_local(&mut self, name: &str, parse: Bytes, class: Class) {
        let s = Stmt {
            parse,
            class,
            on: [false; 2],
            local: true,
        };
        if name.is_empty() {
            self.unnamed = Some(s);
        } else {
            self.map.insert(name.to_owned(), s);
        }
    }

    /// The statement turned out to write (the replica refused it): it
    /// routes to the primary from now on.
    pub fn mark_write(&mut self, name: &str) {
        if let Some(s) = self.get_mut(name) {
            s.class.kind = pgsplit_router::StmtKind::Write;
        }
    }

    /// An injected Parse succeeded on `t`.
    pub fn mark_on(&mut self, name: &str, t: Target) {
        if let Some(s) = self.get_mut(name) {
            s.on[idx(t)] = true;
        }
    }

    /// The backend lost its copy (a simple query ends the unnamed
    /// statement; a backend connection was replaced).
    pub fn mark_off(&mut self, name: &str, t: Target) {
        if let Some(s) = self.get_mut(name) {
            s.on[idx(t)] = false;
        }
    }

    /// The Parse `raw` failed: its statement does not exist anywhere,
    /// unless a later Parse of the same name has replaced it since.
    pub fn forget_if(&mut self, name: &str, raw: &Bytes) {
        if self
            .get(name)
            .is_some_and(|s| s.parse.as_ptr() == raw.as_ptr())
        {
            self.remove(name);
        }
    }

    /// Whether a named statement exists on `t` (the unnamed one is parsed
    /// again wherever it is needed).
    pub fn any_named_on(&self, t: Target) -> bool {
        self.map.values().any(|s| s.on[idx(t)])
    }

    /// A backend connection was replaced: nothing exists on it any more.
    pub fn forget_backend(&mut self, t: Target) {
        for s in self.map.values_mut().chain(self.unnamed.as_mut()) {
            s.on[idx(t)] = false;
        }
        self.zombies[idx(t)].clear();
    }

    /// The client closed `name` on `t`; the other backend's copy becomes a
    /// zombie to close before that backend is used again.
    pub fn close(&mut self, name: &str, t: Target) {
        if let Some(s) = self.remove(name) {
            let other = 1 - idx(t);
            if s.on[other] && !name.is_empty() {
                self.zombies[other].push(name.to_owned());
            }
        }
    }

    /// The proxy deallocates `name` for the client itself: every backend
    /// holding a copy closes it before its next use.
    pub fn close_everywhere(&mut self, name: &str) {
        if let Some(s) = self.remove(name) {
            for (i, on) in s.on.into_iter().enumerate() {
                if on && !name.is_empty() {
                    self.zombies[i].push(name.to_owned());
                }
            }
        }
    }

    /// `DEALLOCATE ALL` ran on `t`: every named statement is gone for the
    /// client; copies on the other backend become zombies.
    pub fn close_all(&mut self, t: Target) {
        let other = 1 - idx(t);
        for (name, s) in self.map.drain() {
            if s.on[other] {
                self.zombies[other].push(name);
            }
        }
    }

    /// `DISCARD ALL`: nothing is left; the other backend replays the same
    /// `DISCARD ALL` (it is in the settings log) before its next use.
    pub fn discard_all(&mut self) {
        self.map.clear();
        self.unnamed = None;
        self.zombies = Default::default();
    }

    /// Takes the zombies to close on `t` before sending it anything.
    pub fn take_zombies(&mut self, t: Target) -> Vec<String> {
        std::mem::take(&mut self.zombies[idx(t)])
    }

    pub fn has_zombies(&self, t: Target) -> bool {
        !self.zombies[idx(t)].is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgsplit_router::{Stage, StmtKind};

    fn class() -> Class {
        Class {
            kind: StmtKind::Read,
            hint: None,
            statements: 1,
            stage: Stage::Lexer,
        }
    }

    #[test]
    fn tracks_where_statements_exist() {
        let mut s = Statements::default();
        s.define("a", Bytes::from_static(b"P"), class(), Target::Replica);
        assert_eq!(s.get("a").unwrap().on, [false, true]);
        s.mark_on("a", Target::Primary);
        assert_eq!(s.get("a").unwrap().on, [true, true]);
        s.close("a", Target::Replica);
        assert!(s.get("a").is_none());
        assert!(s.has_zombies(Target::Primary));
        assert_eq!(s.take_zombies(Target::Primary), vec!["a".to_owned()]);
        assert!(!s.has_zombies(Target::Primary));
        s.define("b", Bytes::from_static(b"P"), class(), Target::Primary);
        s.forget_backend(Target::Primary);
        assert_eq!(s.get("b").unwrap().on, [false, false]);
    }
}
