//! The client's prepared statements, as the client believes they exist
//! (one server), and what the servers hold.
//!
//! Server connections are shared, so a client's names cannot go to a
//! server as they are: forty pgbench clients all call theirs `P_0`. A named
//! statement is prepared on a server under a name derived from its content
//! (`pgsplit_` and a keyed hash of its SQL and parameter types), so every
//! session that prepares the same statement finds it on a connection that
//! has prepared it once, and different statements never collide. Each
//! server connection keeps the set of contents it holds (a bounded cache,
//! see `Backend::prepared`); a Bind or Describe of a statement the leased
//! connection lacks first sends the renamed Parse there and swallows its
//! ParseComplete. The client's Close, `DEALLOCATE` and `DISCARD` act on the
//! client's view; what stays on a server is only cache.
//!
//! The unnamed statement is not renamed: drivers parse it again for
//! nearly every query, and it lives on one connection until the next
//! simple query or Parse there.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use pgsplit_protocol::frame::HEADER_BYTES;
use pgsplit_router::{Class, Target};

/// Length of a server-side statement name.
pub const SERVER_NAME_LEN: usize = 24;

/// The name a statement of content `id` has on every server connection.
pub fn server_name(id: u64) -> [u8; SERVER_NAME_LEN] {
    let mut out = *b"pgsplit_0000000000000000";
    let hex = b"0123456789abcdef";
    for i in 0..16 {
        out[8 + i] = hex[((id >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// Content id of a Parse: a hash of everything after its name (the SQL
/// and the parameter types), keyed per process, so that no client can
/// construct another statement under the same name.
pub fn content_id(parse_body: &[u8], name_len: usize) -> u64 {
    static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut h = KEY.get_or_init(Default::default).build_hasher();
    h.write(&parse_body[(name_len + 1).min(parse_body.len())..]);
    h.finish()
}

/// Close of the server statement of content `id`.
pub fn server_close(id: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_BYTES + 2 + SERVER_NAME_LEN);
    out.put_u8(b'C');
    out.put_u32((4 + 2 + SERVER_NAME_LEN) as u32);
    out.put_u8(b'S');
    out.put_slice(&server_name(id));
    out.put_u8(0);
    out.freeze()
}

/// `raw` (a whole message) with the name at `body[start..end]` replaced
/// by `name`.
pub fn renamed(raw: &[u8], start: usize, end: usize, name: &[u8]) -> Bytes {
    let body = &raw[HEADER_BYTES..];
    let len = raw.len() - (end - start) + name.len();
    let mut out = BytesMut::with_capacity(len);
    out.put_u8(raw[0]);
    out.put_u32((len - 1) as u32);
    out.put_slice(&body[..start]);
    out.put_slice(name);
    out.put_slice(&body[end..]);
    out.freeze()
}

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
    /// The client's Parse message (the unnamed statement's is replayed as
    /// is on another backend).
    pub parse: Bytes,
    /// A named statement's Parse under its server name, and its content
    /// id (empty and 0 for the unnamed statement).
    pub server: Bytes,
    pub id: u64,
    pub class: Class,
    /// The unnamed statement exists on the session's connection to
    /// [primary, replica]. (Named ones: see `Backend::prepared`.)
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
        let (server, id) = if name.is_empty() {
            (Bytes::new(), 0)
        } else {
            let id = content_id(&parse[HEADER_BYTES..], name.len());
            (renamed(&parse, 0, name.len(), &server_name(id)), id)
        };
        let stmt = Stmt {
            parse,
            server,
            id,
            class,
            on,
            local: false,
        };
        if name.is_empty() {
            self.unnamed = Some(stmt);
        } else {
            self.map.insert(name.to_owned(), stmt);
        }
    }

    /// A `pgsplit.*` statement the proxy answers itself. The unnamed one
    /// replaces the unnamed statement on every backend for the client, so
    /// the backends' copies no longer count.
    pub fn define_local(&mut self, name: &str, parse: Bytes, class: Class) {
        let s = Stmt {
            parse,
            server: Bytes::new(),
            id: 0,
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

    /// A backend connection was replaced: the unnamed statement is not on
    /// it, and nothing is left to close there.
    pub fn forget_backend(&mut self, t: Target) {
        if let Some(s) = self.unnamed.as_mut() {
            s.on[idx(t)] = false;
        }
        self.zombies[idx(t)].clear();
    }

    /// The client closed `name`. (A named statement's server copies stay,
    /// as cache of their connections.)
    pub fn close(&mut self, name: &str) {
        self.remove(name);
    }

    /// Takes a named statement out of the client's view.
    pub fn take(&mut self, name: &str) -> Option<Stmt> {
        self.map.remove(name)
    }

    /// Puts back what [`Statements::take`] took, unless the name has been
    /// defined again since.
    pub fn restore(&mut self, name: String, stmt: Stmt) {
        self.map.entry(name).or_insert(stmt);
    }

    /// `DEALLOCATE ALL`: every named statement is gone for the client.
    pub fn close_all(&mut self) {
        self.map.clear();
    }

    /// The server statement `server` on `t`'s connection holds something
    /// other than its name says (a duplicate Parse the server accepted
    /// after all): closed there before the connection is used again.
    pub fn poisoned(&mut self, t: Target, id: u64) {
        let name = String::from_utf8_lossy(&server_name(id)).into_owned();
        self.zombies[idx(t)].push(name);
    }

    /// `DISCARD ALL`: nothing is left; the other backend replays the same
    /// `DISCARD ALL` (it is in the settings log) before its next use.
    pub fn discard_all(&mut self) {
        self.map.clear();
        self.unnamed = None;
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
    fn tracks_the_unnamed_statement_and_closes_in_the_clients_view() {
        let mut s = Statements::default();
        s.define("", parse("", "SELECT 1"), class(), Target::Replica);
        assert_eq!(s.get("").unwrap().on, [false, true]);
        s.mark_on("", Target::Primary);
        assert_eq!(s.get("").unwrap().on, [true, true]);
        s.forget_backend(Target::Primary);
        assert_eq!(s.get("").unwrap().on, [false, true]);
        s.define("a", parse("a", "SELECT 1"), class(), Target::Replica);
        s.close("a");
        assert!(s.get("a").is_none());
        s.poisoned(Target::Primary, 7);
        assert!(s.has_zombies(Target::Primary));
        assert_eq!(
            s.take_zombies(Target::Primary),
            vec!["pgsplit_0000000000000007".to_owned()]
        );
        assert!(!s.has_zombies(Target::Primary));
    }

    fn parse(name: &str, sql: &str) -> Bytes {
        let mut b = BytesMut::new();
        pgsplit_protocol::encode::message(&mut b, b'P', |w| {
            w.extend_from_slice(name.as_bytes());
            w.extend_from_slice(&[0]);
            w.extend_from_slice(sql.as_bytes());
            w.extend_from_slice(&[0]);
            w.extend_from_slice(&0u16.to_be_bytes());
        });
        b.freeze()
    }

    #[test]
    fn named_statements_are_renamed_by_content() {
        let mut s = Statements::default();
        s.define("P_0", parse("P_0", "SELECT $1"), class(), Target::Replica);
        s.define(
            "_pg3_0",
            parse("_pg3_0", "SELECT $1"),
            class(),
            Target::Primary,
        );
        s.define("P_1", parse("P_1", "SELECT $2"), class(), Target::Primary);
        let (a, b, c) = (
            s.get("P_0").unwrap(),
            s.get("_pg3_0").unwrap(),
            s.get("P_1").unwrap(),
        );
        assert_eq!(a.id, b.id, "same SQL, same server statement");
        assert_ne!(a.id, c.id);
        assert_eq!(a.server, b.server);
        let name = server_name(a.id);
        assert_eq!(
            a.server,
            parse(std::str::from_utf8(&name).unwrap(), "SELECT $1")
        );
        assert!(s.get("").is_none());
    }

    #[test]
    fn renaming_keeps_the_rest_of_the_message() {
        // Bind: portal "pt", statement "st", then the rest.
        let mut b = BytesMut::new();
        pgsplit_protocol::encode::message(&mut b, b'B', |w| {
            w.extend_from_slice(b"pt\0st\0rest");
        });
        let out = renamed(&b, 3, 5, b"longer_name");
        let mut want = BytesMut::new();
        pgsplit_protocol::encode::message(&mut want, b'B', |w| {
            w.extend_from_slice(b"pt\0longer_name\0rest");
        });
        assert_eq!(out, want.freeze());
        assert_eq!(
            &server_name(0x0123_4567_89ab_cdef),
            b"pgsplit_0123456789abcdef"
        );
    }
}
