//! The client's side of the session: reading its messages (a Query, an
//! extended-protocol batch up to Sync, COPY data) and writing what it is
//! owed back, relayed chunks and the proxy's own messages in order.

use bytes::{Bytes, BytesMut};
use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::{encode, frame, tag, Frame, ProtoError};
use pgsplit_router::{Class, StmtKind, Target};

use super::batch::Meta;
use super::statements::idx;
use super::*;
use crate::error::Error;

impl Session {
    /// Handles every whole frame in the client buffer.
    pub(super) async fn process_client(&mut self) -> Result<Flow, Error> {
        let max = self.cfg.max_message_bytes;
        let flow = 'read: loop {
            let Some(mut block) = frame::decode_block(&mut self.cbuf, max)? else {
                break Flow::Continue;
            };
            if self.steady_read(&block) {
                if self.steady_parts.is_empty() {
                    self.send_raw(Target::Replica, std::slice::from_ref(&block))
                        .await?;
                } else {
                    let parts = std::mem::take(&mut self.steady_parts);
                    let res = self.send_raw(Target::Replica, &parts).await;
                    self.steady_parts = parts;
                    self.steady_parts.clear();
                    res?;
                }
                continue;
            }
            self.block = block.clone();
            while let Some(f) = frame::next_in(&mut block) {
                let cap = self.cfg.routing.batch_buffer_bytes;
                if self.only_batches(&f) && self.batch.bytes + f.len() <= cap {
                    // The common case, without an await: a message held
                    // for the batch its Sync will dispatch.
                    self.batch_push(f)?;
                    continue;
                }
                if let Flow::Exit = self.on_client_frame(f).await? {
                    break 'read Flow::Exit;
                }
            }
            // Not kept past its frames: an idle session would hold the
            // last (possibly large) read.
            self.block = Bytes::new();
        };
        if !self.copy_data.is_empty() {
            self.flush_copy().await?;
        }
        Ok(flow)
    }

    /// Writes the COPY data gathered from one read of the client in one go.
    pub(super) async fn flush_copy(&mut self) -> Result<(), Error> {
        if self.copy_data.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.copy_data);
        self.copy_data_bytes = 0;
        let res = match self.copy_in {
            Some(c) if self.backends[idx(c.target)].is_some() => {
                self.send_raw(c.target, &chunks).await
            }
            _ => Ok(()),
        };
        self.copy_data = chunks;
        self.copy_data.clear();
        res
    }

    pub(super) async fn on_client_frame(&mut self, f: Frame) -> Result<Flow, Error> {
        use tag::frontend as t;
        if let Some(copy) = self.copy_in {
            match f.tag() {
                t::COPY_DATA | t::COPY_DONE | t::COPY_FAIL | t::SYNC | t::FLUSH => {
                    let ends = matches!(f.tag(), t::COPY_DONE | t::COPY_FAIL);
                    self.copy_data_bytes += f.len();
                    vectored::push_joined(&mut self.copy_data, &self.block, f.raw());
                    if ends || self.copy_data_bytes >= COPY_FLUSH_BYTES {
                        self.flush_copy().await?;
                    }
                    if ends && copy.extended {
                        self.copy_in = None;
                        // The Sync that follows belongs to the copy's backend.
                        self.bound = Some(copy.target);
                    }
                    // A simple Query may hold several COPYs (`copy a from
                    // stdin; copy b from stdin`): its copy data keeps going
                    // to that server until the Query's ReadyForQuery, or
                    // until the client sends something else.
                    return Ok(Flow::Continue);
                }
                _ => {
                    self.flush_copy().await?;
                    self.copy_in = None;
                }
            }
        }
        if self.skip_until_sync {
            if f.tag() == t::SYNC {
                self.skip_until_sync = false;
                self.bound = None;
                self.batch.clear();
                self.drain_all().await?;
                self.push_ready();
            }
            return Ok(Flow::Continue);
        }
        match f.tag() {
            t::QUERY => {
                if !self.batch.is_empty() {
                    self.dispatch_batch(false).await?;
                }
                self.on_query(f).await?;
            }
            t::PARSE | t::BIND | t::DESCRIBE | t::EXECUTE | t::CLOSE => {
                self.batch_push(f)?;
                if self.batch.bytes > self.cfg.routing.batch_buffer_bytes {
                    self.dispatch_batch(false).await?;
                }
            }
            t::SYNC => {
                self.batch_push(f)?;
                self.dispatch_batch(true).await?;
            }
            t::FLUSH => {
                self.batch_push(f)?;
                self.dispatch_batch(false).await?;
            }
            t::FUNCTION_CALL => {
                // Fast-path calls (large objects) may write.
                let class = Class {
                    kind: StmtKind::Write,
                    ..EMPTY
                };
                self.batch.add_class(class);
                self.batch_push(f)?;
                self.dispatch_batch(true).await?;
            }
            t::TERMINATE => return Ok(Flow::Exit),
            // Outside COPY a server ignores these too.
            t::COPY_DATA | t::COPY_DONE | t::COPY_FAIL => {}
            _ => {
                return Err(ProtoError::Malformed {
                    what: "frontend (invalid message type)",
                }
                .into())
            }
        }
        Ok(Flow::Continue)
    }

    /// Whether `f` is only added to the batch (see `on_client_frame`).
    pub(super) fn only_batches(&self, f: &Frame) -> bool {
        use tag::frontend as t;
        self.copy_in.is_none()
            && !self.skip_until_sync
            && matches!(
                f.tag(),
                t::PARSE | t::BIND | t::DESCRIBE | t::EXECUTE | t::CLOSE
            )
    }

    pub(super) fn batch_push(&mut self, f: Frame) -> Result<(), Error> {
        let (mut meta, text) = batch::locate(f.tag(), f.body(), EMPTY)?;
        match &mut meta {
            Meta::Parse { class, .. } => {
                let sql = text;
                *class = self.classify(sql);
                if matches!(class.kind, StmtKind::Read | StmtKind::Session)
                    && vars::parse(sql).is_some()
                {
                    self.batch.local = true;
                }
                if (self.pin.held || class.kind == StmtKind::Pin) && effects::may_unpin(sql) {
                    self.pin.releasing = true;
                }
                if class.kind == StmtKind::Pin && effects::sticky_pin(sql) {
                    self.pin.sticky = true;
                }
                if class.kind == StmtKind::Write {
                    self.close_idle_for_database_ddl(sql);
                }
                self.shared.stats.count_class(class);
                self.batch.add_class(*class);
            }
            Meta::Uses { .. } => {
                let name = text;
                if let Some(c) = self.statement_class(name) {
                    self.batch.add_class(c);
                }
                if self.stmts.get(name).is_some_and(|s| s.local) {
                    self.batch.local = true;
                }
            }
            _ => {}
        }
        self.batch.push(f, meta);
        Ok(())
    }

    /// The session's transaction status as the client must see it.
    pub(super) fn client_status(&self) -> TxStatus {
        if self.tx.failed {
            return TxStatus::Failed;
        }
        match self.tx.open.and_then(|t| self.backends[idx(t)].as_ref()) {
            Some(b) => b.status,
            None => TxStatus::Idle,
        }
    }

    pub(super) fn push_own(&mut self, write: impl FnOnce(&mut BytesMut)) {
        write(&mut self.scratch);
        let b = self.scratch.split().freeze();
        self.out.push_back(b);
    }

    pub(super) fn push_error(&mut self, e: &Error) {
        self.push_own(|b| e.write_to(b, false));
    }

    pub(super) fn push_ready(&mut self) {
        let s = self.client_status();
        self.push_own(|b| encode::ready_for_query(b, s));
    }

    pub(super) async fn flush_client(&mut self) -> Result<(), Error> {
        if let Some(r) = self.resolution.take() {
            self.settle_resolution(r).await?;
        }
        if self.out.is_empty() {
            return Ok(());
        }
        if let [one] = self.out.make_contiguous() {
            // The usual case: one run of replies, taken by the socket at once.
            match self.client.try_write(one) {
                Ok(n) if n == one.len() => {
                    self.out.clear();
                    return Ok(());
                }
                Ok(n) => *one = one.slice(n..),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::ClientIo(e)),
            }
        }
        let res = write_all_vectored(&mut self.client, self.out.make_contiguous()).await;
        self.out.clear();
        res.map_err(Error::ClientIo)
    }
}
