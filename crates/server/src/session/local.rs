//! `pgsplit.*` statements in the extended protocol, answered by the proxy.
//!
//! Drivers send even `SHOW pgsplit.replica_lag` as Parse/Bind/Describe/
//! Execute/Sync (and asyncpg prepares it by name and executes it again
//! later), so the proxy keeps such statements as *local* ones: their Parse
//! never reaches a server, and every message about them is answered here,
//! in order, with the value computed at Execute time. A batch that mixes
//! them with statements for a server is refused with `0A000`: the replies
//! of the two could not be put in order without holding the server's.

use bytes::Bytes;
use pgsplit_protocol::frontend::{self, Bind, Object, Parse};
use pgsplit_protocol::{encode, tag, Frame};

use super::batch::Meta;
use super::vars::{self, Command};
use super::Session;
use crate::error::Error;

/// How one frame of a batch relates to local statements.
enum Role {
    /// Answered by the proxy.
    Local,
    /// For a server.
    Server,
    /// Sync / Flush: either.
    Neutral,
}

impl Session {
    /// Whether the batch about to be dispatched involves a local statement
    /// (cheap when none exists: one flag).
    pub(super) fn batch_is_local(&self) -> bool {
        if !self.batch.local && self.local_portals.is_empty() {
            return false;
        }
        self.batch_roles(&self.batch.frames, &self.batch.meta).0
    }

    /// (any frame is local, any frame is for a server), following names
    /// defined earlier in the same batch.
    fn batch_roles(&self, frames: &[Frame], meta: &[Meta]) -> (bool, bool) {
        let mut stmts: Vec<(&str, bool)> = Vec::new();
        let mut portals: Vec<(&str, bool)> = Vec::new();
        let (mut local, mut server) = (false, false);
        for (f, m) in frames.iter().zip(meta) {
            match self.role(f, m, &mut stmts, &mut portals) {
                Role::Local => local = true,
                Role::Server => server = true,
                Role::Neutral => {}
            }
        }
        (local, server)
    }

    fn role<'a>(
        &self,
        f: &'a Frame,
        m: &Meta,
        stmts: &mut Vec<(&'a str, bool)>,
        portals: &mut Vec<(&'a str, bool)>,
    ) -> Role {
        use tag::frontend as t;
        let stmt_local =
            |stmts: &[(&str, bool)], name: &str| match stmts.iter().rev().find(|(n, _)| *n == name)
            {
                Some((_, l)) => *l,
                None => self.stmts.get(name).is_some_and(|s| s.local),
            };
        let portal_local = |portals: &[(&str, bool)], name: &str| match portals
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
        {
            Some((_, l)) => *l,
            None => self.local_portals.iter().any(|(p, _)| p == name),
        };
        let local = match (f.tag(), m) {
            (t::SYNC | t::FLUSH, _) => return Role::Neutral,
            (t::PARSE, Meta::Parse { name_end, sql, .. }) => {
                let l = vars::parse(super::batch::text(f, sql.0, sql.1)).is_some();
                stmts.push((super::batch::text(f, 0, *name_end), l));
                l
            }
            (t::BIND, _) => match Bind::parse(f.body()) {
                Ok(b) => {
                    let l = stmt_local(stmts, b.statement);
                    portals.push((b.portal, l));
                    l
                }
                Err(_) => false,
            },
            (t::DESCRIBE | t::CLOSE, _) => match frontend::object(f.body(), "Describe") {
                Ok(Object::Statement(n)) => stmt_local(stmts, n),
                Ok(Object::Portal(p)) => portal_local(portals, p),
                Err(_) => false,
            },
            (t::EXECUTE, _) => frontend::execute(f.body()).is_ok_and(|p| portal_local(portals, p)),
            _ => false,
        };
        if local {
            Role::Local
        } else {
            Role::Server
        }
    }

    /// Answers a batch that involves local statements.
    pub(super) async fn answer_local_batch(&mut self, synced: bool) -> Result<(), Error> {
        self.drain_all().await?;
        let frames = std::mem::take(&mut self.batch.frames);
        let meta = std::mem::take(&mut self.batch.meta);
        self.batch.clear();
        let mixed = self.batch_roles(&frames, &meta).1;
        let mut failed = if mixed {
            Some(Error::NotSupported(
                "a pgsplit.* statement in the same batch (up to Sync) as server statements",
            ))
        } else if self.client_status() == pgsplit_protocol::backend::TxStatus::Failed {
            Some(Error::InFailedBlock)
        } else {
            None
        };
        if let Some(e) = &failed {
            self.push_error(e);
        }
        for (f, m) in frames.iter().zip(&meta) {
            if f.tag() == tag::frontend::SYNC {
                failed = None;
                self.local_portals.clear();
                self.push_ready();
                continue;
            }
            if failed.is_some() {
                continue;
            }
            if let Err(e) = self.answer_local(f, m) {
                self.push_error(&e);
                failed = Some(e);
            }
        }
        if !synced && failed.is_some() {
            self.skip_until_sync = true;
        }
        // Reuse the allocations.
        self.batch.frames = frames;
        self.batch.meta = meta;
        self.batch.clear();
        Ok(())
    }

    fn answer_local(&mut self, f: &Frame, m: &Meta) -> Result<(), Error> {
        use tag::backend as bt;
        use tag::frontend as t;
        match (f.tag(), m) {
            (
                t::PARSE,
                Meta::Parse {
                    name_end, class, ..
                },
            ) => {
                let name = super::batch::text(f, 0, *name_end).to_owned();
                if !name.is_empty() && self.stmts.get(&name).is_some() {
                    return Err(Error::DuplicateStatement(name));
                }
                let raw: Bytes = f.raw().clone();
                self.stmts.define_local(&name, raw, *class);
                self.push_own(encode::parse_complete);
            }
            (t::BIND, _) => {
                let b = Bind::parse(f.body())?;
                let (portal, stmt) = (b.portal.to_owned(), b.statement.to_owned());
                self.local_portals.retain(|(p, _)| *p != portal);
                self.local_portals.push((portal, stmt));
                self.push_own(|w| encode::message(w, bt::BIND_COMPLETE, |_| {}));
            }
            (t::DESCRIBE, _) => {
                let (stmt, with_params) = match frontend::object(f.body(), "Describe")? {
                    Object::Statement(n) => (n.to_owned(), true),
                    Object::Portal(p) => (self.portal_statement(p)?, false),
                };
                let cmd = self.local_command(&stmt)?;
                if with_params {
                    self.push_own(|w| {
                        encode::message(w, bt::PARAMETER_DESCRIPTION, |w| {
                            w.extend_from_slice(&0i16.to_be_bytes())
                        })
                    });
                }
                match cmd {
                    Command::Show(name) => {
                        let columns = super::vars::show_columns(&name);
                        let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
                        self.push_own(|w| encode::row_description_text(w, &columns));
                    }
                    Command::Set(..) | Command::Reset(_) => {
                        self.push_own(|w| encode::message(w, bt::NO_DATA, |_| {}))
                    }
                }
            }
            (t::EXECUTE, _) => {
                let portal = frontend::execute(f.body())?.to_owned();
                let stmt = self.portal_statement(&portal)?;
                let cmd = self.local_command(&stmt)?;
                let answer = self.run_var(cmd)?;
                self.push_own(|w| {
                    for row in &answer.rows {
                        let values: Vec<Option<&str>> =
                            row.iter().map(|v| Some(v.as_str())).collect();
                        encode::data_row_text(w, &values);
                    }
                    encode::command_complete(w, answer.tag);
                });
            }
            (t::CLOSE, _) => {
                match frontend::object(f.body(), "Close")? {
                    Object::Statement(n) => {
                        let n = n.to_owned();
                        self.stmts.close(&n);
                    }
                    Object::Portal(p) => {
                        let p = p.to_owned();
                        self.local_portals.retain(|(q, _)| *q != p);
                    }
                }
                self.push_own(|w| encode::message(w, bt::CLOSE_COMPLETE, |_| {}));
            }
            _ => {}
        }
        Ok(())
    }

    fn portal_statement(&self, portal: &str) -> Result<String, Error> {
        self.local_portals
            .iter()
            .find(|(p, _)| p == portal)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| Error::UnknownPortal(portal.to_owned()))
    }

    fn local_command(&self, stmt: &str) -> Result<Command, Error> {
        let s = self
            .stmts
            .get(stmt)
            .filter(|s| s.local)
            .ok_or_else(|| Error::UnknownStatement(stmt.to_owned()))?;
        let p = Parse::parse(&s.parse[pgsplit_protocol::frame::HEADER_BYTES..])?;
        vars::parse(p.sql).ok_or_else(|| Error::UnknownStatement(stmt.to_owned()))
    }
}
