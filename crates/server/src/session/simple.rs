//! A simple-protocol cycle: one Query message (one or more statements),
//! routed as a whole, wrapped or retried as its class requires.

use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::frontend;
use pgsplit_protocol::{encode, Frame};
use pgsplit_router::StmtKind;

use super::effects::Reset;
use super::statements::idx;
use super::*;
use crate::error::Error;

impl Session {
    pub(super) async fn on_query(&mut self, f: Frame) -> Result<(), Error> {
        if self.retry.inflight.is_some() || self.retry.due {
            self.settle_retry().await?;
        }
        let sql = frontend::query(f.body())?;
        let class = self.classify(sql);
        self.shared.stats.count_class(&class);
        if self.tx.failed {
            self.drain_all().await?;
            self.answer_failed_block(class.kind, None);
            return Ok(());
        }
        if matches!(class.kind, StmtKind::Read | StmtKind::Session) && class.statements == 1 {
            if let Some(cmd) = vars::parse(sql) {
                self.drain_all().await?;
                self.answer_var(cmd);
                return Ok(());
            }
        }
        self.unbind_soft_for(&class).await?;
        if class.kind == StmtKind::Write {
            self.close_idle_for_database_ddl(sql);
        }
        let fx = effects::of_query(sql, &class);
        if (self.pin.held || class.kind == StmtKind::Pin) && effects::may_unpin(sql) {
            self.pin.releasing = true;
        }
        if class.kind == StmtKind::Pin && effects::sticky_pin(sql) {
            self.pin.sticky = true;
        }
        if let [Reset::Deallocate(name)] = fx.resets.as_slice() {
            if class.statements == 1 && self.stmts.get(name).is_some() {
                // A protocol-level statement lives on whichever backends
                // needed it: the proxy closes it there itself.
                let name = name.clone();
                self.drain_all().await?;
                if self.client_status() != TxStatus::Failed {
                    self.stmts.close(&name);
                    self.push_own(|b| encode::command_complete(b, "DEALLOCATE"));
                    self.push_ready();
                    return Ok(());
                }
            }
        }
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
        let writes = self.commits_write(class.kind, target);
        let copy = writes && effects::has_copy(sql);
        let retryable = self.retryable_read(target);
        if retryable {
            self.retry.inflight = Some(Retry::Query(f.raw().clone()));
        }
        let wrap = writes
            && !copy
            && class.statements == 1
            && self.wraps(class.kind, target)
            && effects::wrappable_write(sql);
        let mut outgoing = std::mem::take(&mut self.outgoing);
        if wrap {
            self.push_begin(target, seq, &mut outgoing);
        }
        // Recorded before the write, so a failed write answers this query.
        let b = self.client_cycle(
            target,
            Pending {
                wrapped: wrap,
                writes: writes && !wrap,
                single: class.statements <= 1 && !(writes && effects::commits_on_its_own(sql)),
                ..Pending::client(seq, false, &class, writes, copy, retryable)
            },
        );
        b.sets_in_flight.extend(fx.sets);
        if !fx.resets.is_empty() {
            // DEALLOCATE or DISCARD ALL there: what the connection keeps
            // is known again when it is next used.
            b.prepared.clear();
        }
        b.resets_in_flight.extend(fx.resets);
        self.cancel.set_active(Some(idx(target)));
        // A simple query ends the unnamed prepared statement on that server,
        // and ends an extended-protocol batch sent in part before it.
        self.stmts.mark_off("", target);
        self.bound = None;
        // A client may send its COPY data right behind the COPY, before the
        // server's CopyInResponse (asyncpg does): from now on its CopyData
        // goes to this server. (Should the COPY fail instead, the server
        // ignores stray CopyData, and the client's next message ends this.)
        if class.kind.needs_primary() && effects::has_copy(sql) {
            self.copy_in = Some(CopyIn {
                target,
                extended: false,
                seq,
            });
        }
        let xid = wrap || (self.wants_xid(&class, target) && !effects::has_copy(sql));
        outgoing.push(f.into_bytes());
        if (writes && !copy) || xid {
            self.push_own_query(target, seq, &mut outgoing, writes && !wrap, xid);
        }
        let res = self.send_raw(target, &outgoing).await;
        outgoing.clear();
        self.outgoing = outgoing;
        res?;
        if wrap {
            self.finish_wrap(target, seq).await?;
        }
        Ok(())
    }
}
