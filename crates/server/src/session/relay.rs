//! Backend → client relay.
//!
//! Scans the backend's read buffer in place and hands the client whole runs
//! of bytes as `Bytes` slices of that buffer: no copy, no re-encode. Only a
//! few messages are looked at (ReadyForQuery, ParseComplete/CloseComplete,
//! ErrorResponse, CopyInResponse); every other message — rows above all —
//! is streamed through as it arrives, even before it is complete, so a
//! large row is never buffered whole.

use pgsplit_protocol::backend::{self as msg, ErrorFields, TxStatus};
use pgsplit_protocol::{encode, frame, tag};
use pgsplit_router::Target;
use tracing::{debug, warn};

use bytes::Bytes;

use super::resolution::{self, Resolution};
use super::statements::idx;
use super::{CopyIn, Expect, Reset, Session};
use crate::error::Error;
use crate::replication::parse_lsn;
use pgsplit_protocol::sqlstate::READ_ONLY_SQL_TRANSACTION;

/// Backend messages the relay must see whole are small; a larger one of
/// those kinds means the stream is broken.
const MAX_INSPECTED_BYTES: usize = 1 << 30;

/// Backend messages the relay looks at outside a held or own answer; the
/// others go to the client as they are.
#[inline]
fn inspected(tag: u8) -> bool {
    use tag::backend as bt;
    matches!(
        tag,
        bt::READY_FOR_QUERY
            | bt::PARSE_COMPLETE
            | bt::CLOSE_COMPLETE
            | bt::ERROR_RESPONSE
            | bt::COPY_IN_RESPONSE
    )
}

impl Session {
    /// Relays what arrived from `t`.
    pub(super) fn on_backend_data(&mut self, t: Target) -> Result<(), Error> {
        let mut run = self.backends[idx(t)].as_ref().map_or(0, |b| b.held);
        loop {
            let b = self.backends[idx(t)]
                .as_mut()
                .expect("reading backend exists");
            let avail = b.conn.rbuf.len() - run;
            if b.passthrough > 0 {
                let n = b.passthrough.min(avail);
                run += n;
                b.passthrough -= n;
                if b.passthrough > 0 {
                    break;
                }
                continue;
            }
            let Ok(head) = frame::peek(&b.conn.rbuf[run..], MAX_INSPECTED_BYTES) else {
                warn!(target = ?t, "invalid message from backend");
                self.flush_run(t, &mut run);
                return self.backend_lost(t);
            };
            let Some((tag, len)) = head else { break };
            use tag::backend as bt;
            if b.hold || b.retrying {
                if avail < len {
                    break;
                }
                if b.retrying {
                    // The refused read's answer: dropped, up to its end.
                    let f = b.conn.rbuf.split_to(len);
                    if tag == bt::READY_FOR_QUERY {
                        b.retrying = false;
                        b.status = msg::ready_for_query(&f[frame::HEADER_BYTES..])?;
                        let done = b.pending.pop_front();
                        b.errored = false;
                        if let Some(p) = done {
                            self.undo_unconfirmed(t, p.seq);
                        }
                        self.retry.due = true;
                        self.rearm(t);
                    }
                    continue;
                }
                match tag {
                    bt::ROW_DESCRIPTION
                    | bt::NOTICE_RESPONSE
                    | bt::PARAMETER_STATUS
                    | bt::PARAMETER_DESCRIPTION
                    | bt::NO_DATA
                    | bt::BIND_COMPLETE => {
                        run += len;
                        continue;
                    }
                    bt::PARSE_COMPLETE | bt::CLOSE_COMPLETE => {
                        // Bookkeeping now; the bytes are held (or dropped,
                        // for a Parse or Close the proxy injected).
                        if self.on_complete(t, tag) {
                            run += len;
                        } else {
                            let b = self.backends[idx(t)].as_mut().expect("exists");
                            let mut kept = b.conn.rbuf.split_to(run);
                            let _ = b.conn.rbuf.split_to(len);
                            kept.unsplit(std::mem::take(&mut b.conn.rbuf));
                            b.conn.rbuf = kept;
                        }
                        continue;
                    }
                    bt::ERROR_RESPONSE => {
                        let body = &b.conn.rbuf[run + frame::HEADER_BYTES..run + len];
                        let code = ErrorFields::parse(body)?.code;
                        let missing = crate::stats::MISSING.iter().position(|c| *c == code);
                        let read_only = code == READ_ONLY_SQL_TRANSACTION;
                        let missing = missing.filter(|_| {
                            t == Target::Replica
                                && Session::replica_may_lack(
                                    &self.shared.replication,
                                    self.retry.sent,
                                )
                        });
                        b.hold = false;
                        if read_only || missing.is_some() {
                            self.retry.missing = missing;
                            let _ = b.conn.rbuf.split_to(run + len);
                            run = 0;
                            b.retrying = true;
                            continue;
                        }
                    }
                    // Rows, a command tag, COPY: the answer stands.
                    _ => b.hold = false,
                }
            }
            if let Some(quiet) = b
                .pending
                .front()
                .filter(|p| p.own || p.quiet)
                .map(|p| p.quiet)
            {
                // The proxy's own query: consumed here, never relayed. Of
                // the COMMIT ending a wrapped write, only an error and the
                // ReadyForQuery are the client's.
                if avail < len {
                    break;
                }
                self.flush_run(t, &mut run);
                let b = self.backends[idx(t)].as_mut().expect("exists");
                let f = b.conn.rbuf.split_to(len);
                let body = &f[frame::HEADER_BYTES..];
                match tag {
                    bt::DATA_ROW if !quiet => {
                        if let Some(lsn) = column_text(body, 0).and_then(parse_lsn) {
                            if !self.ignore_lsn {
                                self.write_lsn = self.write_lsn.max(lsn);
                                self.shared.replication.note_write(lsn);
                            }
                        }
                        if let Some(xid) = column_text(body, 1).and_then(|x| x.parse().ok()) {
                            b.xid = Some(xid);
                        }
                    }
                    bt::ERROR_RESPONSE if quiet => {
                        if ErrorFields::parse(body)?.is_fatal() {
                            // The server is closing the connection (a
                            // shutdown) in place of the COMMIT's answer:
                            // whether it committed is for the loss of the
                            // connection to settle (commit resolution),
                            // never a FATAL relayed to a session that
                            // goes on.
                            debug!(target = ?t, "backend sent FATAL in place of a wrapped write's COMMIT");
                            continue;
                        }
                        b.errored = true;
                        self.out.push_back(f.freeze());
                    }
                    bt::READY_FOR_QUERY => {
                        let status = msg::ready_for_query(body)?;
                        if quiet {
                            self.out.push_back(f.freeze());
                        }
                        self.on_ready(t, status);
                    }
                    _ => {}
                }
                continue;
            }
            if !inspected(tag) {
                // Relayed as is, and so are the messages after it up to the
                // next one the relay must look at: the answer cannot change
                // hands before that, so they are skipped over in one go.
                let buf = &b.conn.rbuf[..];
                let mut end = run + len;
                while end < buf.len() {
                    match frame::peek(&buf[end..], MAX_INSPECTED_BYTES) {
                        Ok(Some((next_tag, next_len))) if !inspected(next_tag) => {
                            end += next_len;
                        }
                        // Looked at (or broken, or cut in its header) by
                        // the general loop.
                        _ => break,
                    }
                }
                if end > buf.len() {
                    b.passthrough = end - buf.len();
                    run = buf.len();
                } else {
                    run = end;
                }
                continue;
            }
            if avail < len {
                break; // wait for the whole message
            }
            let body_at = run + frame::HEADER_BYTES;
            match tag {
                bt::READY_FOR_QUERY => {
                    let status = msg::ready_for_query(&b.conn.rbuf[body_at..run + len])?;
                    if b.pending.front().is_some_and(|p| p.wrapped) {
                        // Not the end of the client's cycle yet: the
                        // proxy's COMMIT is, and its ReadyForQuery goes out.
                        self.flush_run(t, &mut run);
                        self.skip(t, len);
                        self.tx.wrap_unended = true;
                    } else {
                        run += len;
                    }
                    self.on_ready(t, status);
                }
                bt::PARSE_COMPLETE | bt::CLOSE_COMPLETE => {
                    if self.on_complete(t, tag) {
                        run += len;
                    } else {
                        self.flush_run(t, &mut run);
                        self.skip(t, len);
                    }
                }
                bt::ERROR_RESPONSE => {
                    let fatal = {
                        let e = ErrorFields::parse(&b.conn.rbuf[body_at..run + len])?;
                        b.errored = true;
                        e.is_fatal()
                            .then(|| (e.code.to_owned(), e.message.to_owned()))
                    };
                    match fatal {
                        None => run += len,
                        Some((code, message)) => {
                            // The server is closing this connection; the client's
                            // session goes on, so it sees an ERROR.
                            debug!(target = ?t, code, "backend sent FATAL");
                            self.flush_run(t, &mut run);
                            self.skip(t, len);
                            let b = self.backends[idx(t)].as_mut().expect("exists");
                            // In place of a COMMIT's answer (a shutdown):
                            // whether it committed is for the loss of the
                            // connection to settle (commit resolution, or
                            // 08007), never this error's guess.
                            let outcome_in_question = b
                                .pending
                                .iter()
                                .find(|p| !p.own)
                                .is_some_and(|p| p.writes && p.commits);
                            if outcome_in_question {
                                continue;
                            }
                            b.dead = true;
                            // Told only to a statement waiting for this
                            // server: one that ended while the client was
                            // idle (a shutdown) is nobody's error, and an
                            // unasked ErrorResponse breaks drivers.
                            let owed = !b.pending.is_empty() || self.bound == Some(t);
                            if owed {
                                self.push_own(|w| {
                                    encode::error_response(
                                        w,
                                        encode::Severity::Error,
                                        &code,
                                        &message,
                                    )
                                });
                            }
                        }
                    }
                }
                bt::COPY_IN_RESPONSE => {
                    run += len;
                    let extended = b.pending.front().is_some_and(|p| p.extended);
                    let seq = b.pending.front().map_or(0, |p| p.seq);
                    if extended {
                        // A Sync sent behind the Execute is ignored by the
                        // server during COPY; the client sends another after
                        // CopyDone, and that one is answered.
                        b.pending.pop_front();
                        self.copy_in = Some(CopyIn {
                            target: t,
                            extended,
                            seq,
                        });
                    }
                    // A simple-protocol COPY entered copy mode when it was
                    // sent (its data may follow it at once), and the client
                    // may have finished it already. One the proxy did not
                    // see coming (a later COPY of the same Query, once the
                    // client sent something else) gets the client's data too:
                    // the server waits for it.
                    if !extended && self.copy_in.is_none() {
                        self.copy_in = Some(CopyIn {
                            target: t,
                            extended,
                            seq,
                        });
                    }
                }
                _ => unreachable!("only inspected tags reach here"),
            }
        }
        let b = self.backends[idx(t)].as_mut().expect("exists");
        if b.hold {
            // Not flushed yet: the read may still be refused and retried.
            b.held = run;
            return Ok(());
        }
        b.held = 0;
        self.flush_run(t, &mut run);
        let b = self.backends[idx(t)].as_ref().expect("exists");
        if b.dead {
            return self.backend_lost(t);
        }
        Ok(())
    }

    /// Moves the first `run` bytes of `t`'s buffer to the client queue.
    fn flush_run(&mut self, t: Target, run: &mut usize) {
        if *run == 0 {
            return;
        }
        let b = self.backends[idx(t)].as_mut().expect("exists");
        let chunk = b.conn.rbuf.split_to(*run).freeze();
        self.out.push_back(chunk);
        *run = 0;
    }

    /// Drops one message from the front of `t`'s buffer.
    fn skip(&mut self, t: Target, len: usize) {
        let b = self.backends[idx(t)].as_mut().expect("exists");
        let _ = b.conn.rbuf.split_to(len);
    }

    /// ParseComplete/CloseComplete: updates the statement map; returns
    /// whether the client should see it (injected ones are swallowed).
    fn on_complete(&mut self, t: Target, tag: u8) -> bool {
        let b = self.backends[idx(t)].as_mut().expect("exists");
        let want_parse = tag == tag::backend::PARSE_COMPLETE;
        let pos = b.expect.iter().position(|(_, e)| {
            matches!(e, Expect::ClientParse { .. } | Expect::InjectedParse { .. }) == want_parse
        });
        let Some((_, e)) = pos.and_then(|p| b.expect.remove(p)) else {
            return true;
        };
        match e {
            // Both were recorded when sent; completion confirms them. A
            // name thought taken was accepted after all (an earlier Parse of
            // it in the same pipeline failed): it now holds this definition,
            // and the server statement it went as holds another's name.
            Expect::ClientParse {
                name,
                raw,
                class,
                existed: true,
                sent_as,
                ..
            } => {
                if !name.is_empty() {
                    b.prepared.remove(&sent_as);
                    self.stmts.poisoned(t, sent_as);
                }
                self.stmts.define(&name, raw, class, t);
                true
            }
            Expect::ClientParse { .. } => true,
            Expect::InjectedParse { .. } | Expect::InjectedClose => false,
            Expect::ClientClose { statement, .. } => {
                if let Some(name) = statement {
                    self.stmts.close(&name);
                }
                true
            }
        }
    }

    /// Whatever cycle `seq` on `t` did not confirm was skipped after an
    /// error: undo the optimistic bookkeeping.
    fn undo_unconfirmed(&mut self, t: Target, seq: u64) {
        let Some(b) = self.backends[idx(t)].as_mut() else {
            return;
        };
        while b.expect.front().is_some_and(|(s, _)| *s <= seq) {
            match b.expect.pop_front().map(|(_, e)| e) {
                Some(Expect::ClientParse {
                    name,
                    raw,
                    existed: false,
                    id,
                    ..
                }) => {
                    b.prepared.remove(&id);
                    self.stmts.forget_if(&name, &raw);
                }
                Some(Expect::InjectedParse { name, id }) => {
                    b.prepared.remove(&id);
                    self.stmts.mark_off(&name, t);
                }
                Some(Expect::ClientClose {
                    removed: Some(r), ..
                }) => {
                    let (name, stmt) = *r;
                    self.stmts.restore(name, stmt);
                }
                _ => {}
            }
        }
    }

    /// ReadyForQuery: one cycle on `t` finished.
    fn on_ready(&mut self, t: Target, status: TxStatus) {
        let b = self.backends[idx(t)].as_mut().expect("exists");
        let done = b.pending.pop_front();
        if let Some((sent, reason)) = done.and_then(|p| p.timed) {
            self.shared.stats.latency[usize::from(t == Target::Replica)][usize::from(reason)]
                .observe(sent.elapsed());
        }
        if let (Some(c), Some(p)) = (self.copy_in, done) {
            if c.target == t && !c.extended && !p.own && p.seq >= c.seq {
                // The simple Query that ran one or more COPYs is over.
                self.copy_in = None;
            }
        }
        if done.is_some_and(|p| p.retryable) {
            self.retry.inflight = None;
            // Drop the frames' references now, so the client's read buffer
            // can be reused rather than reallocated.
            self.retry.frames.clear();
        }
        if let Some(p) = done {
            self.undo_unconfirmed(t, p.seq);
        }
        let b = self.backends[idx(t)].as_mut().expect("exists");
        if let Some(p) = done.filter(|p| p.writes) {
            // A single statement that failed committed nothing.
            let failed = b.errored && p.single;
            self.ignore_lsn = failed;
            if !failed {
                self.wrote_at = Some(std::time::Instant::now());
                if p.copy {
                    self.lsn_due = Some(t);
                }
            }
        }
        let b = self.backends[idx(t)].as_mut().expect("exists");
        if done.is_some_and(|p| p.wrapped || (p.own && status != TxStatus::Idle)) {
            // Inside a write the proxy wrapped in a block of its own (or its
            // own query in the client's block): the client's view of the
            // block does not change.
            b.status = status;
            b.errored = false;
            self.rearm(t);
            return;
        }
        let was_in_block = b.status == TxStatus::InBlock;
        let commits = done.is_some_and(|p| p.commits);
        b.status = status;
        if status == TxStatus::Idle {
            b.xid = None;
        }
        let ok = !b.errored;
        b.errored = false;
        let mut sets = std::mem::take(&mut b.sets_in_flight);
        let resets = std::mem::take(&mut b.resets_in_flight);
        if ok {
            for r in resets {
                match r {
                    Reset::DiscardAll => {
                        self.stmts.discard_all();
                        self.pin.held = false;
                        self.pin.sticky = false;
                        self.pin.check = false;
                    }
                    Reset::Deallocate(name) => self.stmts.close(&name),
                    Reset::DeallocateAll => self.stmts.close_all(),
                }
            }
        }
        let b = self.backends[idx(t)].as_mut().expect("exists");
        match status {
            TxStatus::Idle => {
                if self.tx.open == Some(t) {
                    self.tx.open = None;
                }
                // Settings made inside a block hold for the session only if
                // the block committed.
                let block = std::mem::take(&mut self.tx.sets);
                if ok && was_in_block && commits {
                    sets.splice(0..0, block);
                }
                if ok && !sets.is_empty() {
                    // Settings made outside a block now hold for the session:
                    // log them so every other backend gets them before its
                    // next statement. (This one already has them.)
                    let caught_up = b.applied_sets == self.settings_log.len();
                    if let Some(left) = self.settings_log.extend(sets) {
                        // Earlier entries dropped: what each connection
                        // applied, counted in the new log.
                        for other in self.backends.iter_mut().flatten() {
                            other.applied_sets = left[other.applied_sets.min(left.len() - 1)];
                        }
                    }
                    let b = self.backends[idx(t)].as_mut().expect("exists");
                    if caught_up {
                        b.applied_sets = self.settings_log.len();
                    }
                }
            }
            TxStatus::InBlock | TxStatus::Failed => {
                self.tx.open = Some(t);
                if ok {
                    self.tx.sets.extend(sets);
                }
            }
        }
        self.rearm(t);
        let idle = self.backends.iter().flatten().all(|b| b.pending.is_empty());
        if idle && self.bound.is_none() {
            self.cancel.set_active(None);
        }
    }

    /// If the first cycle `b` owes the client is a COMMIT (or the end of
    /// a wrapped write) whose transaction id is known, the answer it gets
    /// should it have committed.
    fn resolvable(&self, b: &super::Backend) -> Option<Bytes> {
        use crate::config::CommitResolution;
        if self.cfg.timeouts.commit_resolution == CommitResolution::Off
            || self.resolution.is_some()
            || b.dead
        {
            return None;
        }
        b.xid?;
        let p = b.pending.iter().find(|p| !p.own)?;
        if !p.writes || !(p.commits || p.quiet) || !p.single {
            return None;
        }
        if p.quiet {
            Some(Bytes::new())
        } else if p.extended {
            b.commit_answer
                .as_ref()
                .filter(|(seq, _)| *seq == p.seq)
                .map(|(_, a)| a.clone())
        } else {
            Some(resolution::simple_commit_answer())
        }
    }

    /// `t` died (EOF, I/O error, FATAL). Everything the client still waits
    /// for from it is answered with an error, and the session goes on.
    pub(super) fn backend_lost(&mut self, t: Target) -> Result<(), Error> {
        self.backend_lost_with(t, None)
    }

    /// As [`Session::backend_lost`], with `first` as the error of the
    /// statement that was running (a timeout, rather than a lost link).
    pub(super) fn backend_lost_with(
        &mut self,
        t: Target,
        mut first: Option<Error>,
    ) -> Result<(), Error> {
        let Some(b) = self.backends[idx(t)].take() else {
            return Ok(());
        };
        self.stmts.forget_backend(t);
        if b.passthrough > 0 {
            // Part of a message already reached the client; the stream to
            // it cannot be repaired, and nothing more may be written to it.
            return Err(Error::StreamBroken { target: t });
        }
        if self.pin.held && t == Target::Primary {
            return Err(Error::PinnedStateLost);
        }
        // A COMMIT or autocommit write the client is waiting for may have
        // committed: its outcome is unknown, never "failed" or "rolled back"
        // without proof, and the block (if any) is over either way.
        let unknown_outcome = b.pending.iter().find(|p| !p.own).is_some_and(|p| p.writes);
        if unknown_outcome && first.is_none() {
            first = Some(Error::TransactionResolutionUnknown);
        }
        let in_block = self.tx.open == Some(t) && !unknown_outcome;
        if self.tx.open == Some(t) {
            self.tx.open = None;
        }
        if in_block {
            self.tx.failed = true;
            if !matches!(first, Some(Error::StatementTimeout)) {
                self.tx.commit_refused = Some(t);
            }
            // Told to no statement of the client's (nothing was running,
            // or only a Close whose answer drivers drop): the next one is.
            if !b.pending.iter().any(|p| !p.own && p.runs) && self.bound != Some(t) {
                self.tx.lost_unreported = Some(t);
            }
        }
        let err = if in_block {
            Error::BackendLostInBlock { target: t }
        } else {
            Error::BackendLost { target: t }
        };
        let mut reported = b.dead;
        let mut resolvable = self.resolvable(&b);
        for p in b.pending.iter().filter(|p| !p.own) {
            if let Some(success) = resolvable.take() {
                // Its outcome is learned before the client is answered.
                self.resolution = Some(Resolution {
                    at: self.out.len(),
                    xid: b.xid.expect("resolvable"),
                    pid: b.conn.pid,
                    success,
                    started: std::time::Instant::now(),
                    generation: b.generation,
                });
                first = None;
                continue;
            }
            if p.quiet && !p.writes {
                // Ending a wrapped write that failed or wrote nothing:
                // the client already has its answer but the end.
                self.push_ready();
                continue;
            }
            if !reported {
                match first.take() {
                    Some(e) => self.push_error(&e),
                    None if p.wrapped => self.push_error(&Error::WriteRolledBack),
                    None => self.push_error(&err),
                }
            }
            reported = false;
            self.push_ready();
        }
        if self.bound == Some(t) {
            if !reported {
                self.push_error(&err);
            }
            self.bound = None;
            self.skip_until_sync = true;
        }
        if let Some(c) = self.copy_in.filter(|c| c.target == t) {
            self.copy_in = None;
            // A simple-protocol COPY was answered with its Query above; an
            // extended one owes an error, then ReadyForQuery at the client's
            // Sync (its pending entry went when the COPY began).
            if c.extended {
                if !reported {
                    self.push_error(&err);
                }
                self.skip_until_sync = true;
            }
        }
        self.cancel.set_active(None);
        Ok(())
    }
}

/// Column `n` of a DataRow body, as text (`None` for NULL or a short row).
fn column_text(body: &[u8], n: usize) -> Option<&str> {
    let mut at = 2;
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4 + usize::try_from(len).unwrap_or(0);
    }
    let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    std::str::from_utf8(body.get(at + 4..at + 4 + len)?).ok()
}
