//! Autocommit writes run as blocks of one statement
//! (`commit_resolution = "all"`), so a lost commit can be resolved.
//!
//! An autocommit write carries its own commit: there is no moment to learn
//! its transaction id before it. So the proxy sends `BEGIN`, the write and
//! its own query for the id in one round trip, holds back the write's
//! ReadyForQuery, and once the answers are in sends `COMMIT` (or `ROLLBACK`
//! if the write failed), whose ReadyForQuery the client gets. Lost before
//! that COMMIT, the write is known rolled back; lost after, it is resolved
//! like any COMMIT (see `resolution`). Only plain DML is wrapped
//! (`effects::wrappable_write`): it behaves the same inside a block.

use bytes::Bytes;
use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::frontend::{Bind, Parse};
use pgsplit_protocol::{frame, tag, Frame};
use pgsplit_router::{StmtKind, Target};

use super::statements::idx;
use super::{effects, Pending, Session};
use crate::error::Error;

/// The proxy's own statements around a wrapped autocommit write.
const BEGIN_QUERY: &[u8] = b"Q\0\0\0\x0aBEGIN\0";
const COMMIT_QUERY: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
const ROLLBACK_QUERY: &[u8] = b"Q\0\0\0\x0dROLLBACK\0";

impl Session {
    /// Whether an autocommit write of `class` to `t` runs as a block of one
    /// statement, so that its transaction id is known before its commit
    /// (`commit_resolution = "all"`): BEGIN, the write and the id go in one
    /// round trip, COMMIT in a second.
    /// (A batch counts its statements per message; the caller checks it
    /// runs one.)
    pub(super) fn wraps(&self, kind: StmtKind, t: Target) -> bool {
        use crate::config::CommitResolution;
        t == Target::Primary
            && self.cfg.timeouts.commit_resolution == CommitResolution::All
            && kind == StmtKind::Write
            && self.tx.open.is_none()
            && self.bound.is_none()
    }

    /// Opens the block a wrapped write runs in. (Its cycle number is the
    /// one before the write's, so its ReadyForQuery undoes nothing of the
    /// write's bookkeeping.)
    pub(super) fn push_begin(&mut self, t: Target, seq: u64, out: &mut Vec<Bytes>) {
        let b = self.backends[idx(t)].as_mut().expect("ensured");
        b.pending.push_back(Pending::own(seq - 1));
        out.push(Bytes::from_static(BEGIN_QUERY));
        self.stmts.mark_off("", t);
    }

    /// Once a wrapped write has answered (its transaction id asked for
    /// behind it): the proxy's COMMIT, or ROLLBACK if it failed. The
    /// client's ReadyForQuery is that statement's, and a lost COMMIT is
    /// resolved by the id.
    pub(super) async fn finish_wrap(&mut self, t: Target, seq: u64) -> Result<(), Error> {
        self.drain(t).await?;
        let unended = std::mem::take(&mut self.tx.wrap_unended);
        let Some(b) = self.backends[idx(t)].as_mut() else {
            if unended {
                // Lost after the write answered, before the proxy's COMMIT
                // was sent: nothing of it committed.
                self.push_error(&Error::WriteRolledBack);
                self.push_ready();
            }
            // (Lost earlier: the write itself was answered with the error.)
            return Ok(());
        };
        let commit = match b.status {
            TxStatus::InBlock => true,
            TxStatus::Failed => false,
            TxStatus::Idle => {
                self.push_ready();
                return Ok(());
            }
        };
        // Without a transaction id the write changed nothing: losing the
        // COMMIT's answer then loses nothing either.
        let wrote = commit && b.xid.is_some();
        b.pending.push_back(Pending {
            own: false,
            quiet: true,
            commits: commit,
            writes: wrote,
            single: true,
            ..Pending::own(seq)
        });
        let mut out = std::mem::take(&mut self.outgoing);
        out.push(Bytes::from_static(if commit {
            COMMIT_QUERY
        } else {
            ROLLBACK_QUERY
        }));
        self.push_own_query(t, seq, &mut out, wrote, false);
        let res = self.send_raw(t, &out).await;
        out.clear();
        self.outgoing = out;
        res
    }

    /// Whether the batch being dispatched is one statement, executed once,
    /// that may run inside a block (see `effects::wrappable_write`).
    pub(super) fn batch_wrappable(&self) -> bool {
        let frames = &self.batch.frames;
        let executes = frames
            .iter()
            .filter(|f| f.tag() == tag::frontend::EXECUTE)
            .count();
        let syncs = frames
            .iter()
            .filter(|f| f.tag() == tag::frontend::SYNC)
            .count();
        if executes != 1 || syncs != 1 || frames.last().map(Frame::tag) != Some(tag::frontend::SYNC)
        {
            return false;
        }
        if frames
            .iter()
            .any(|f| f.tag() == tag::frontend::FUNCTION_CALL)
        {
            return false;
        }
        let Some(bind) = frames.iter().find(|f| f.tag() == tag::frontend::BIND) else {
            return false;
        };
        let Ok(bind) = Bind::parse(bind.body()) else {
            return false;
        };
        // The statement bound: parsed in this batch (the last Parse of that
        // name), or earlier.
        let parsed = frames
            .iter()
            .rev()
            .filter(|f| f.tag() == tag::frontend::PARSE)
            .find_map(|f| {
                Parse::parse(f.body())
                    .ok()
                    .filter(|p| p.name == bind.statement)
            })
            .map(|p| p.sql);
        let sql = match parsed {
            Some(sql) => sql,
            None => match self.stmts.get(bind.statement) {
                Some(s) => match Parse::parse(&s.parse[frame::HEADER_BYTES..]) {
                    Ok(p) => return effects::wrappable_write(p.sql),
                    Err(_) => return false,
                },
                None => return false,
            },
        };
        effects::wrappable_write(sql)
    }
}
