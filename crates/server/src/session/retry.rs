//! Reads run again on the primary: a read the replica refused as a write
//! (25006), or failed for an object it may not have replayed yet (42P01
//! and kin). Only before anything of the cycle reached the client.

use pgsplit_protocol::frame;
use pgsplit_protocol::frontend;
use pgsplit_router::{Class, StmtKind, Target};
use tracing::debug;

use super::batch::Meta;
use super::statements::idx;
use super::*;
use crate::error::Error;

impl Session {
    /// Before the next statement: a retryable read still on the replica is
    /// answered first, and if the replica refused it, it runs again on the
    /// primary, so replies stay in order.
    pub(super) async fn settle_retry(&mut self) -> Result<(), Error> {
        if self.retry.inflight.is_some() {
            self.drain(Target::Replica).await?;
        }
        self.run_due_retry().await
    }

    /// Runs the read the replica refused with 25006 on the primary, and
    /// remembers its text as a write.
    pub(super) async fn run_due_retry(&mut self) -> Result<(), Error> {
        if !std::mem::take(&mut self.retry.due) {
            return Ok(());
        }
        let raw = match self.retry.inflight.take() {
            None => return Ok(()),
            Some(Retry::Batch) => return self.retry_batch().await,
            Some(Retry::Block(block)) => {
                self.unpack_steady(block);
                return self.retry_batch().await;
            }
            Some(Retry::Query(raw)) => raw,
        };
        let Ok(sql) = frontend::query(&raw[frame::HEADER_BYTES..]) else {
            return Ok(());
        };
        let missing = self.retry.missing.take();
        self.count_retry(missing);
        let class = if missing.is_some() {
            debug!("the replica lacks what a read names; running it on the primary");
            Class {
                kind: StmtKind::Read,
                hint: Some(Target::Primary),
                statements: 1,
                ..EMPTY
            }
        } else {
            debug!("the replica refused a read as a write; running it on the primary");
            self.shared.classifier.learn_write(sql);
            self.memo.forget(sql);
            Class {
                kind: StmtKind::Write,
                statements: 1,
                ..EMPTY
            }
        };
        let target = match self.target_for(&class).await {
            Ok(t) => t,
            Err(e) => {
                self.push_error(&e);
                self.push_ready();
                return Ok(());
            }
        };
        self.seq += 1;
        let seq = self.seq;
        let b = self.backends[idx(target)].as_mut().expect("ensured");
        let writes = missing.is_none();
        b.pending.push_back(Pending {
            writes,
            own: false,
            single: true,
            ..Pending::own(seq)
        });
        self.cancel.set_active(Some(idx(target)));
        self.stmts.mark_off("", target);
        let mut out = vec![raw];
        self.push_own_query(target, seq, &mut out, writes, false);
        self.send_raw(target, &out).await
    }

    /// Counts a read run again on the primary, by why.
    pub(super) fn count_retry(&self, missing: Option<usize>) {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.shared.stats;
        match missing {
            Some(i) => stats.retried_missing[i].fetch_add(1, Relaxed),
            None => stats.retried_on_primary.fetch_add(1, Relaxed),
        };
    }

    /// Whether the replica may have failed the retryable read in flight
    /// only for want of what it has not replayed yet: unless a primary
    /// position read after the read was sent is no further than what the
    /// replica had replayed before it, or nothing can be asked of the
    /// primary.
    pub(super) fn replica_may_lack(
        rep: &crate::replication::Replication,
        sent: (u64, u64),
    ) -> bool {
        if rep.primary_link_down() {
            return false;
        }
        let (polls, replayed) = sent;
        !rep.primary_sampled_after(polls)
            .is_some_and(|p| p <= replayed && replayed > 0)
    }

    /// An extended-protocol batch the replica refused (25006): its
    /// statements are learned as writes, forgotten on the replica, and the
    /// batch runs again on the primary.
    pub(super) async fn retry_batch(&mut self) -> Result<(), Error> {
        let frames = std::mem::take(&mut self.retry.frames);
        let mut meta = std::mem::take(&mut self.retry.meta);
        let missing = self.retry.missing.take();
        self.count_retry(missing);
        if missing.is_some() {
            debug!("the replica lacks what a batch names; running it on the primary");
            for (f, m) in frames.iter().zip(&meta) {
                if let Meta::Parse { name_end, .. } = *m {
                    // Parsed afresh on the primary by this batch's own Parse.
                    self.stmts.close(batch::text(f, 0, name_end));
                }
            }
            let current = std::mem::take(&mut self.batch);
            self.batch.frames = frames;
            self.batch.meta = meta;
            self.batch.class = Some(Class {
                kind: StmtKind::Read,
                hint: Some(Target::Primary),
                statements: 1,
                ..EMPTY
            });
            let res = Box::pin(self.dispatch_batch(true)).await;
            self.batch = current;
            return res;
        }
        debug!("the replica refused a batch as a write; running it on the primary");
        for (f, m) in frames.iter().zip(meta.iter_mut()) {
            match m {
                Meta::Parse {
                    name_end,
                    sql,
                    class,
                } => {
                    let text = batch::text(f, sql.0, sql.1);
                    self.shared.classifier.learn_write(text);
                    self.memo.forget(text);
                    class.kind = StmtKind::Write;
                    // Defined on the replica by this batch: start afresh, so
                    // the primary gets it from this batch's own Parse.
                    self.stmts.close(batch::text(f, 0, *name_end));
                }
                Meta::Uses { start, end } => self.stmts.mark_write(batch::text(f, *start, *end)),
                _ => {}
            }
        }
        // The batch being assembled (this retry may run just before it is
        // dispatched) waits its turn.
        let current = std::mem::take(&mut self.batch);
        self.batch.frames = frames;
        self.batch.meta = meta;
        self.batch.class = Some(Class {
            kind: StmtKind::Write,
            statements: 1,
            ..EMPTY
        });
        let res = Box::pin(self.dispatch_batch(true)).await;
        self.batch = current;
        res
    }
}
