//! An extended-protocol cycle: the batch of Parse/Bind/Describe/Execute/
//! Close up to Sync (or Flush), routed as a whole, with named statements
//! renamed and re-prepared on whichever server connection runs it.

use bytes::Bytes;
use pgsplit_protocol::frontend::{self, Parse};
use pgsplit_protocol::{encode, frame, tag, Frame};
use pgsplit_router::route::{self, Choice, SessionState};
use pgsplit_router::{Class, StmtKind, Target};

use super::batch::Meta;
use super::statements::{idx, Statements, Stmt};
use super::*;
use crate::error::Error;

impl Session {
    /// The start of a batch (Parse/Describe) went to the replica, and its
    /// rest needs the primary: the replica's implicit transaction is ended
    /// with a Sync of the proxy's own, and the rest goes to the primary,
    /// where the statements are prepared on the fly.
    pub(super) async fn unbind_soft(&mut self) -> Result<(), Error> {
        self.bound = None;
        self.bound_soft = false;
        let Some(b) = self.backends[idx(Target::Replica)].as_mut() else {
            return Ok(());
        };
        b.pending.push_back(Pending {
            extended: true,
            ..Pending::own(self.seq)
        });
        self.send_raw(Target::Replica, &[Bytes::from_static(SYNC)])
            .await
    }

    /// A Parse/Describe sent ahead to the replica, never executed (asyncpg
    /// prepares to learn a COPY's columns, then runs it): if what comes
    /// next (`class`) needs the primary, it is ended there first.
    pub(super) async fn unbind_soft_for(&mut self, class: &Class) -> Result<(), Error> {
        if self.bound_soft && self.bound == Some(Target::Replica) && self.tx.open.is_none() {
            let unbound = SessionState {
                bound: None,
                ..self.state()
            };
            if route::route(class, &unbound).choice == Choice::Primary {
                self.unbind_soft().await?;
            }
        }
        Ok(())
    }

    /// Whether the batch being dispatched runs a COPY (checked only for
    /// batches that write).
    pub(super) fn batch_has_copy(&self) -> bool {
        self.batch
            .frames
            .iter()
            .zip(&self.batch.meta)
            .any(|(f, m)| match *m {
                Meta::Parse { sql, .. } => effects::has_copy(batch::text(f, sql.0, sql.1)),
                Meta::Uses { start, end } => self
                    .stmts
                    .get(batch::text(f, start, end))
                    .and_then(|s| Parse::parse(&s.parse[frame::HEADER_BYTES..]).ok())
                    .is_some_and(|p| effects::has_copy(p.sql)),
                _ => false,
            })
    }

    /// Relays everything both backends still owe the client, before the
    /// proxy answers something itself.
    pub(super) async fn drain_all(&mut self) -> Result<(), Error> {
        self.drain(Target::Primary).await?;
        self.drain(Target::Replica).await
    }

    pub(super) async fn dispatch_batch(&mut self, synced: bool) -> Result<(), Error> {
        if self.retry.inflight.is_some() || self.retry.due {
            self.settle_retry().await?;
        }
        use tag::frontend as t;
        if !synced && self.batch.frames.iter().all(|f| f.tag() == t::FLUSH) {
            // A lone Flush (psycopg sends one leaving pipeline mode) asks for
            // nothing new: pass it to a server that still owes replies.
            return self.forward_flush().await;
        }
        // Parse/Describe only, sent ahead with a Flush (asyncpg's first run
        // of every statement): no effects yet, so it goes where its class
        // says and may still move before its Sync.
        let soft = !synced
            && self
                .batch
                .frames
                .iter()
                .all(|f| matches!(f.tag(), t::PARSE | t::DESCRIBE | t::FLUSH));
        let mut class = self.batch.class.unwrap_or(EMPTY);
        self.unbind_soft_for(&class).await?;
        if !synced
            && !soft
            && self.bound.is_none()
            && self.tx.open.is_none()
            && !class.kind.needs_primary()
        {
            // Part of a batch goes out before its Sync: the rest runs in the
            // same implicit transaction and may write, so it starts where
            // writes can run.
            class.kind = StmtKind::Write;
        }
        let closes_only = self.batch_only_closes();
        let named_closes_only = closes_only
            && synced
            && self.copy_in.is_none()
            && self
                .batch
                .meta
                .iter()
                .any(|m| matches!(m, Meta::CloseStatement { .. }))
            && self.batch.meta.iter().all(|m| match *m {
                Meta::CloseStatement { start, end } => end > start,
                Meta::Other => true,
                _ => false,
            });
        if (self.tx.failed && closes_only) || named_closes_only {
            // Closing statements works in a failed block, as on a server;
            // and it is not where the client learns its block was lost
            // (drivers drop these answers). A named statement's server
            // copies are only cache: closing it is the proxy's own business,
            // and costs no server a message (nor the replica a cycle in
            // flight that would keep the client's next read from being run
            // again elsewhere).
            self.drain_all().await?;
            for (f, m) in self.batch.frames.iter().zip(&self.batch.meta) {
                if let Meta::CloseStatement { start, end } = *m {
                    let name = batch::text(f, start, end).to_owned();
                    self.stmts.close(&name);
                }
            }
            let closes = self
                .batch
                .frames
                .iter()
                .filter(|f| f.tag() == tag::frontend::CLOSE)
                .count();
            for _ in 0..closes {
                self.push_own(|b| encode::message(b, tag::backend::CLOSE_COMPLETE, |_| {}));
            }
            self.batch.clear();
            if synced {
                self.push_ready();
            }
            return Ok(());
        }
        if self.tx.failed {
            self.drain_all().await?;
            if matches!(class.kind, StmtKind::Rollback | StmtKind::Commit) {
                // A failed block still parses the statement that ends it
                // (drivers prepare their ROLLBACK): it exists for the
                // client, on no server yet.
                for (f, m) in self.batch.frames.iter().zip(&self.batch.meta) {
                    if let Meta::Parse {
                        name_end, class, ..
                    } = *m
                    {
                        let name = batch::text(f, 0, name_end);
                        self.stmts.define_nowhere(name, f.raw().clone(), class);
                    }
                }
            }
            let frames = std::mem::take(&mut self.batch.frames);
            self.batch.clear();
            self.answer_failed_block(class.kind, Some(&frames));
            self.batch.frames = frames;
            self.batch.frames.clear();
            if !synced {
                self.skip_until_sync = true;
            }
            return Ok(());
        }
        if self.batch_is_local() {
            return self.answer_local_batch(synced).await;
        }
        let target = match self.target_for(&class).await {
            Ok(t) => t,
            Err(e) => {
                self.batch.clear();
                self.push_error(&e);
                if synced {
                    self.bound = None;
                    self.push_ready();
                } else {
                    self.skip_until_sync = true;
                }
                return Ok(());
            }
        };
        self.seq += 1;
        let seq = self.seq;
        let mut outgoing = std::mem::take(&mut self.outgoing);
        let wrap = synced
            && self.commits_write(class.kind, target)
            && self.wraps(class.kind, target)
            && self.batch_wrappable();
        if wrap {
            self.push_begin(target, seq, &mut outgoing);
        }
        {
            let b = self.backends[idx(target)].as_mut().expect("ensured");
            for (f, m) in self.batch.frames.iter().zip(&self.batch.meta) {
                // A named statement goes to the server under its server name.
                let mut as_sent = None;
                match *m {
                    Meta::Parse {
                        name_end,
                        sql,
                        class,
                    } => {
                        if matches!(class.kind, StmtKind::Session | StmtKind::Write) {
                            let fx = effects::of_query(batch::text(f, sql.0, sql.1), &class);
                            b.sets_in_flight.extend(fx.sets);
                            if !fx.resets.is_empty() {
                                b.prepared.clear();
                            }
                            b.resets_in_flight.extend(fx.resets);
                        }
                        let name = batch::text(f, 0, name_end);
                        let existing = (!name.is_empty()).then(|| self.stmts.get(name)).flatten();
                        let (existed, id, sent_as) = match existing {
                            Some(s) => {
                                // Sent as the existing statement, which the
                                // server must have, so it refuses the
                                // duplicate as one server would (42P05).
                                let old = s.id;
                                if !b.prepared.contains(&old) {
                                    inject_parse(b, &mut outgoing, seq, name, s);
                                }
                                let id = statements::content_id(f.body(), name_end);
                                let n = statements::server_name(old);
                                as_sent = Some(statements::renamed(f.raw(), 0, name_end, &n));
                                (true, id, old)
                            }
                            None => {
                                self.stmts.define(name, f.raw().clone(), class, target);
                                match self.stmts.get(name).filter(|_| !name.is_empty()) {
                                    Some(s) => {
                                        // A Close first: the connection
                                        // may hold it already.
                                        outgoing.push(statements::server_close(s.id));
                                        b.expect.push_back((seq, Expect::InjectedClose));
                                        b.prepared.insert(s.id);
                                        as_sent = Some(s.server.clone());
                                        (false, s.id, s.id)
                                    }
                                    None => (false, 0, 0),
                                }
                            }
                        };
                        b.expect.push_back((
                            seq,
                            Expect::ClientParse {
                                name: name.to_owned(),
                                raw: f.raw().clone(),
                                class,
                                existed,
                                id,
                                sent_as,
                            },
                        ));
                    }
                    Meta::Uses { start, end } => {
                        // A statement this batch does not parse itself, that
                        // exists for the client but not on this connection:
                        // its Parse goes first (its reply is swallowed).
                        // (Statements count as present from the moment their
                        // Parse is sent, so one parsed or injected earlier in
                        // this batch or a pipelined one is not sent twice.)
                        let name = batch::text(f, start, end);
                        if f.tag() == tag::frontend::BIND {
                            if let Some(replay) = bound_setting(&self.stmts, name, f) {
                                b.sets_in_flight.push(replay);
                            }
                        }
                        match self.stmts.get(name).filter(|s| !s.local) {
                            Some(s) if name.is_empty() && !s.on[idx(target)] => {
                                outgoing.push(s.parse.clone());
                                b.expect.push_back((
                                    seq,
                                    Expect::InjectedParse {
                                        name: String::new(),
                                        id: 0,
                                    },
                                ));
                                self.stmts.mark_on(name, target);
                            }
                            Some(_) if name.is_empty() => {}
                            Some(s) => {
                                if !b.prepared.contains(&s.id) {
                                    inject_parse(b, &mut outgoing, seq, name, s);
                                }
                                let n = statements::server_name(s.id);
                                as_sent = Some(statements::renamed(f.raw(), start, end, &n));
                            }
                            // Unknown: the server says so, naming it.
                            None => {}
                        }
                    }
                    Meta::CloseStatement { start, end } => {
                        let name = batch::text(f, start, end);
                        let taken = (!name.is_empty()).then(|| self.stmts.take(name)).flatten();
                        let close = match taken {
                            Some(s) => {
                                b.prepared.remove(&s.id);
                                let n = statements::server_name(s.id);
                                as_sent = Some(statements::renamed(f.raw(), start, end, &n));
                                Expect::ClientClose {
                                    statement: None,
                                    removed: Some(Box::new((name.to_owned(), s))),
                                }
                            }
                            None => Expect::ClientClose {
                                statement: Some(name.to_owned()),
                                removed: None,
                            },
                        };
                        b.expect.push_back((seq, close));
                    }
                    Meta::ClosePortal => {
                        b.expect.push_back((
                            seq,
                            Expect::ClientClose {
                                statement: None,
                                removed: None,
                            },
                        ));
                    }
                    Meta::Other => {}
                }
                match as_sent {
                    Some(m) => outgoing.push(m),
                    None => vectored::push_joined(&mut outgoing, &self.block, f.raw()),
                }
            }
            self.cancel.set_active(Some(idx(target)));
        }
        if synced {
            let executes = self
                .batch
                .frames
                .iter()
                .filter(|f| {
                    matches!(
                        f.tag(),
                        tag::frontend::EXECUTE | tag::frontend::FUNCTION_CALL
                    )
                })
                .count();
            // A batch that only prepares or describes runs nothing.
            let writes = self.commits_write(class.kind, target) && executes > 0;
            let wants_xid = self.wants_xid(&class, target);
            let has_copy = (writes || wants_xid) && self.batch_has_copy();
            let copy = writes && has_copy;
            // A read outside a block may be refused by the replica as a
            // write (25006): keep the batch to run it again on the primary.
            let retryable = self.retryable_read(target)
                && !self.batch.frames.iter().any(|f| {
                    matches!(f.tag(), tag::frontend::CLOSE | tag::frontend::FUNCTION_CALL)
                });
            if retryable {
                // Kept (below) by swapping buffers with the batch: no copy,
                // no allocation.
                self.retry.inflight = Some(Retry::Batch);
            }
            // Should its answer be lost and the commit be resolved.
            let answer = (class.kind == StmtKind::Commit && executes > 0)
                .then(|| resolution::extended_commit_answer(&self.batch.frames));
            let b = self.client_cycle(
                target,
                Pending {
                    wrapped: wrap,
                    writes: writes && !wrap,
                    // Statements are counted per message that names them.
                    single: executes <= 1,
                    runs: executes > 0
                        || self
                            .batch
                            .frames
                            .iter()
                            .any(|f| f.tag() == tag::frontend::PARSE),
                    ..Pending::client(seq, true, &class, writes, copy, retryable)
                },
            );
            if let Some(answer) = answer.filter(|_| b.xid.is_some()) {
                b.commit_answer = Some((seq, answer));
            }
            let xid = wrap || (wants_xid && !has_copy);
            if (writes && !copy) || xid {
                self.push_own_query(target, seq, &mut outgoing, writes && !wrap, xid);
            }
            if retryable {
                std::mem::swap(&mut self.retry.frames, &mut self.batch.frames);
                std::mem::swap(&mut self.retry.meta, &mut self.batch.meta);
            }
        }
        self.batch.clear();
        self.bound_soft = !synced && soft && (self.bound.is_none() || self.bound_soft);
        self.bound = if synced { None } else { Some(target) };
        let res = self.send_raw(target, &outgoing).await;
        outgoing.clear();
        self.outgoing = outgoing;
        res?;
        if wrap {
            self.finish_wrap(target, seq).await?;
        }
        Ok(())
    }

    /// Whether the batch being dispatched only closes statements or
    /// portals (besides Sync/Flush).
    pub(super) fn batch_only_closes(&self) -> bool {
        use tag::frontend as ft;
        self.batch
            .frames
            .iter()
            .all(|f| matches!(f.tag(), ft::CLOSE | ft::SYNC | ft::FLUSH))
    }
}

/// Sends a named statement's Parse, under its server name, to a
/// connection that lacks it (a Close first, in case it has it after all);
/// both replies are swallowed.
pub(super) fn inject_parse(
    b: &mut Backend,
    outgoing: &mut Vec<Bytes>,
    seq: u64,
    name: &str,
    s: &Stmt,
) {
    outgoing.push(statements::server_close(s.id));
    b.expect.push_back((seq, Expect::InjectedClose));
    outgoing.push(s.server.clone());
    b.expect.push_back((
        seq,
        Expect::InjectedParse {
            name: name.to_owned(),
            id: s.id,
        },
    ));
    b.prepared.insert(s.id);
}

/// For a Bind of `SELECT set_config('name', $n, false)`: the statement that
/// replays it with the value bound.
pub(super) fn bound_setting(stmts: &Statements, stmt: &str, bind: &Frame) -> Option<String> {
    let s = stmts.get(stmt)?;
    if s.class.kind != StmtKind::Session {
        return None;
    }
    let p = Parse::parse(&s.parse[frame::HEADER_BYTES..]).ok()?;
    let (name, n) = effects::set_config_param(p.sql)?;
    let params = frontend::bind_params(bind.body()).ok()?;
    let (_, value) = params.get(n)?;
    effects::set_config_replay(name, *value)
}
