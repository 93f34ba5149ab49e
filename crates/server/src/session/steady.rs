//! The steady read: the common case of a read-mostly session, routed
//! without the general batch machinery.
//!
//! Most of what such an application sends is one cycle per read of its
//! socket (a simple Query, or Parse, Bind, Describe, Execute and Sync) for
//! a statement the classifier knows to be a read, while the session holds
//! nothing that could change where it goes: no block, no pin, no batch half
//! sent, no retry, nothing in flight. Such a block of messages is checked
//! in place and sent to the replica as the one slice it arrived in: no
//! frame is cut off it, nothing is held in the batch and routing takes no
//! await. The bookkeeping is the general path's (statements parsed, the
//! cycle pending, the read kept for a 25006 retry). Anything else (another
//! kind of message, a statement not on the replica yet, a setting to
//! replay, a replica outside its staleness bound) leaves the block to the
//! general path, with nothing changed.

use bytes::Bytes;
use pgsplit_protocol::frame::HEADER_BYTES;
use pgsplit_protocol::{frame, frontend, tag};
use pgsplit_router::route::{self, Choice, Reason};
use pgsplit_router::{Class, StmtKind, Target};

use super::batch::{self, Meta};
use super::statements::{self, idx};
use super::{vars, Expect, Pending, Retry, Session, EMPTY};
use crate::config::OnStale;

/// A block of more messages than this (a pipeline) takes the general path.
const MAX_MESSAGES: usize = 16;

/// The backend a steady read goes to.
const REPLICA: usize = 1;

/// One message of a steady read: where it is in the block, and what it
/// names.
#[derive(Clone, Copy)]
pub(super) struct Located {
    at: usize,
    end: usize,
    meta: Meta,
}

impl Session {
    /// Whether nothing in the session stands in the way of a steady read.
    fn steady(&self) -> bool {
        self.batch.is_empty()
            && self.copy_in.is_none()
            && !self.skip_until_sync
            && !self.tx.failed
            && self.tx.open.is_none()
            && self.bound.is_none()
            && !self.pin.held
            && !self.pin.check
            && !self.pin.releasing
            && self.retry.inflight.is_none()
            && !self.retry.due
            && self.lsn_due.is_none()
            && self.resolution.is_none()
            && !self.tx.wrap_unended
            && !self.report_lag
            && self.tx.lost_unreported.is_none()
            && self.tx.commit_refused.is_none()
            && self.local_portals.is_empty()
            && !self.busy(Target::Primary)
            && !self.busy(Target::Replica)
    }

    /// Takes `block` (every whole message of one client read) as a steady
    /// read if it is one, recording it as sent to the replica: the caller
    /// then writes it there. False, with nothing changed that the general
    /// path depends on, for anything else.
    pub(super) fn steady_read(&mut self, block: &Bytes) -> bool {
        if !self.steady() || block.len() > self.cfg.routing.batch_buffer_bytes {
            return false;
        }
        let query = block.first() == Some(&tag::frontend::QUERY);
        let found = if query {
            self.steady_query(block)
        } else {
            self.locate_steady(block)
        };
        let Some((class, executes, parses)) = found else {
            return false;
        };
        let decision = route::route(&class, &self.state());
        if decision.choice != Choice::Replica || decision.reason != Reason::Read || decision.pin {
            return false;
        }
        if self.cfg.routing.on_stale == OnStale::Replica
            && self
                .shared
                .replication
                .stale(self.vars.max_staleness)
                .is_some()
        {
            return false; // served with a warning, by the general path
        }
        // The replica connection as `ensure` and `prepare_backend` leave it
        // (in transaction mode, an idle one of the pool's that carries the
        // session's settings).
        if self.backends[REPLICA].is_none() && !self.lease_idle_now(Target::Replica) {
            return false;
        }
        let Some(b) = self.backends[REPLICA].as_mut() else {
            return false;
        };
        let expired = b
            .timeouts
            .server_lifetime
            .is_some_and(|l| b.opened.elapsed() >= l);
        if expired
            || b.reset_due
            || b.applied_sets != self.settings_log.len()
            || self.stmts.has_zombies(Target::Replica)
        {
            return false;
        }
        if b.conn.is_closed_while_idle() {
            // The general path opens another.
            self.forget_closed(Target::Replica);
            return false;
        }
        // Named statements go under their server names, and must be there.
        self.steady_parts.clear();
        let mut from = 0;
        for l in &self.steady_meta {
            let Meta::Uses { start, end } = l.meta else {
                continue;
            };
            if start == end {
                continue; // the unnamed statement
            }
            let body = &block[l.at + HEADER_BYTES..l.end];
            let name = batch::body_text(body, start, end);
            let Some(s) = self.stmts.get(name) else {
                return false;
            };
            if !b.prepared.contains(&s.id) {
                self.steady_parts.clear();
                return false;
            }
            if from < l.at {
                self.steady_parts.push(block.slice(from..l.at));
            }
            let n = statements::server_name(s.id);
            self.steady_parts
                .push(statements::renamed(&block[l.at..l.end], start, end, &n));
            from = l.end;
        }
        if !self.steady_parts.is_empty() && from < block.len() {
            self.steady_parts.push(block.slice(from..));
        }

        // Taken: the general path's bookkeeping for a read batch.
        let stats = &self.shared.stats;
        stats.count_route(&decision);
        if query {
            stats.count_class(&class);
        }
        self.last_route = (Target::Replica, Reason::Read);
        self.seq += 1;
        let seq = self.seq;
        let b = self.backends[REPLICA].as_mut().expect("checked above");
        for l in &self.steady_meta {
            let Meta::Parse {
                name_end, class, ..
            } = l.meta
            else {
                continue;
            };
            stats.count_class(&class);
            let raw = block.slice(l.at..l.end);
            let name = batch::body_text(&raw[HEADER_BYTES..], 0, name_end);
            let existed = !name.is_empty() && self.stmts.get(name).is_some();
            if !existed {
                self.stmts.define(name, raw.clone(), class, Target::Replica);
            }
            b.expect.push_back((
                seq,
                Expect::ClientParse {
                    name: name.to_owned(),
                    raw,
                    class,
                    existed,
                    id: 0,
                    sent_as: 0,
                },
            ));
        }
        self.cancel.set_active(Some(REPLICA));
        self.bound_soft = false;
        if query {
            self.retry.inflight = Some(Retry::Query(block.clone()));
            // A simple query ends the unnamed statement on its server.
            self.stmts.mark_off("", Target::Replica);
            self.client_cycle(
                Target::Replica,
                Pending::client(seq, false, &class, false, false, true),
            );
        } else {
            self.retry.inflight = Some(Retry::Block(block.clone()));
            self.client_cycle(
                Target::Replica,
                Pending {
                    single: executes <= 1,
                    runs: executes > 0 || parses > 0,
                    ..Pending::client(seq, true, &class, false, false, true)
                },
            );
        }
        true
    }

    /// A block that is one simple Query of one statement, a read: its class.
    fn steady_query(&mut self, block: &Bytes) -> Option<(Class, usize, usize)> {
        self.steady_meta.clear();
        let (_, len) = frame::peek(block, usize::MAX).ok()??;
        if len != block.len() {
            return None;
        }
        let sql = frontend::query(&block[HEADER_BYTES..]).ok()?;
        let class = self.classify(sql);
        if class.kind != StmtKind::Read || class.statements != 1 || vars::parse(sql).is_some() {
            return None;
        }
        Some((class, 1, 0))
    }

    /// Checks every message of `block`: Parse, Bind, Describe and Execute
    /// of known reads on the replica, ending in its only Sync. Leaves them
    /// in `steady_meta`; returns the combined class and the numbers of
    /// Executes and Parses.
    fn locate_steady(&mut self, block: &Bytes) -> Option<(Class, usize, usize)> {
        use tag::frontend as t;
        self.steady_meta.clear();
        let bytes = &block[..];
        let (mut at, mut executes, mut parses) = (0, 0, 0);
        let mut class: Option<Class> = None;
        let mut synced = false;
        while at < bytes.len() {
            if synced || self.steady_meta.len() == MAX_MESSAGES {
                return None;
            }
            // Whole messages: `decode_block` checked every length.
            let (tag, len) = frame::peek(&bytes[at..], usize::MAX).ok()??;
            let end = at + len;
            let body = &bytes[at + HEADER_BYTES..end];
            let (mut meta, text) = match tag {
                t::PARSE | t::BIND | t::DESCRIBE | t::EXECUTE => {
                    batch::locate(tag, body, EMPTY).ok()?
                }
                t::SYNC => {
                    synced = true;
                    (Meta::Other, "")
                }
                _ => return None,
            };
            let c = match &mut meta {
                Meta::Parse {
                    name_end, class: c, ..
                } => {
                    let sql = text;
                    *c = self.classify(sql);
                    if c.kind != StmtKind::Read || vars::parse(sql).is_some() {
                        return None;
                    }
                    if *name_end != 0 {
                        // A named statement is renamed on its way: the
                        // general path prepares it.
                        return None;
                    }
                    parses += 1;
                    Some(*c)
                }
                Meta::Uses { .. } => Some(self.steady_statement(bytes, text)?),
                _ => {
                    if tag == t::EXECUTE {
                        executes += 1;
                    }
                    None
                }
            };
            if let Some(c) = c {
                class = Some(class.map_or(c, |prev| route::combine(&prev, &c)));
            }
            self.steady_meta.push(Located { at, end, meta });
            at = end;
        }
        if !synced {
            return None;
        }
        Some((class?, executes, parses))
    }

    /// The class of statement `name`, bound or described in a steady read:
    /// parsed earlier in the same block, or a read that exists on the
    /// replica.
    fn steady_statement(&self, bytes: &[u8], name: &str) -> Option<Class> {
        let parsed = self.steady_meta.iter().rev().find_map(|l| match l.meta {
            Meta::Parse {
                name_end, class, ..
            } => {
                let body = &bytes[l.at + HEADER_BYTES..l.end];
                (batch::body_text(body, 0, name_end) == name).then_some(class)
            }
            _ => None,
        });
        if parsed.is_some() {
            return parsed;
        }
        let s = self.stmts.get(name)?;
        // (A named one must be on the connection the read gets: checked
        // once it has one.)
        ((!name.is_empty() || s.on[idx(Target::Replica)])
            && !s.local
            && s.class.kind == StmtKind::Read)
            .then_some(s.class)
    }

    /// The frames of a steady read the replica refused, for running it
    /// again on the primary.
    pub(super) fn unpack_steady(&mut self, mut block: Bytes) {
        self.retry.frames.clear();
        self.retry.meta.clear();
        while let Some(f) = frame::next_in(&mut block) {
            let Ok((mut meta, text)) = batch::locate(f.tag(), f.body(), EMPTY) else {
                continue; // checked when it arrived
            };
            if let Meta::Parse { class, .. } = &mut meta {
                *class = self.classify(text);
            }
            self.retry.frames.push(f);
            self.retry.meta.push(meta);
        }
    }
}
