//! The session's inputs to `router::route`: its block, pins, freshness
//! (read-your-writes) and hints; and the waits routing may decide on (a
//! brief wait for the replica, the pin check on the primary).

use std::time::Instant;

use pgsplit_protocol::encode;
use pgsplit_router::route::{self, Choice, Freshness, Reason, SessionState};
use pgsplit_router::{Class, StmtKind, Target};
use tracing::{debug, warn};

use super::statements::idx;
use super::*;
use crate::config::{OnStale, ReadYourWrites, ReadYourWritesScope};
use crate::error::{Error, Warning};

impl Session {
    /// Classifies a statement, remembering the last few.
    pub(super) fn classify(&mut self, sql: &str) -> Class {
        let classifier = &self.shared.classifier;
        self.memo.class(
            sql,
            |s| classifier.classify(s),
            |s| classifier.learned_write(s),
        )
    }

    pub(super) fn statement_class(&self, name: &str) -> Option<Class> {
        self.batch
            .local_class(name)
            .or_else(|| self.stmts.get(name).map(|s| s.class))
    }

    pub(super) fn state(&self) -> SessionState {
        SessionState {
            txn: self.tx.open,
            pinned: self.pin.held,
            bound: self.bound,
            replica: self.freshness(),
        }
    }

    /// Whether the replica may serve this session's reads now.
    pub(super) fn freshness(&self) -> Freshness {
        let rep = &self.shared.replication;
        if self.cfg.routing.on_stale != OnStale::Replica
            && rep.stale(self.vars.max_staleness).is_some()
        {
            return Freshness::Stale;
        }
        let behind = match self.vars.read_your_writes {
            ReadYourWrites::Lsn => {
                let lsn = if self.cfg.routing.read_your_writes_scope == ReadYourWritesScope::Proxy {
                    self.write_lsn.max(rep.written_lsn())
                } else {
                    self.write_lsn
                };
                lsn > 0 && !rep.replayed(lsn)
            }
            ReadYourWrites::Session => self.wrote_at.is_some(),
            ReadYourWrites::Window => self
                .wrote_at
                .is_some_and(|at| at.elapsed() < self.vars.window),
            ReadYourWrites::Off => false,
        };
        if behind || (self.vars.min_lsn > 0 && !rep.replayed(self.vars.min_lsn)) {
            Freshness::BehindWrites
        } else {
            Freshness::Fresh
        }
    }

    /// Whether a statement just routed to `target` is a read the replica
    /// may refuse and the proxy can run again on the primary: outside a
    /// block, routed as a read, and nothing else in flight there.
    pub(super) fn retryable_read(&self, target: Target) -> bool {
        target == Target::Replica
            && self.tx.open.is_none()
            && self.last_route.1 == Reason::Read
            && self.backends[idx(target)]
                .as_ref()
                .is_some_and(|b| b.pending.is_empty())
    }

    /// Whether a cycle of `kind` sent to `t` may commit a write.
    pub(super) fn commits_write(&self, kind: StmtKind, t: Target) -> bool {
        t == Target::Primary
            && match kind {
                StmtKind::Commit => true,
                StmtKind::Write | StmtKind::Pin | StmtKind::Unknown => self.tx.open.is_none(),
                _ => false,
            }
    }

    /// Whether the id of the primary's open transaction is worth asking
    /// for behind a cycle of `class`: it may write inside a block (or open
    /// one and write), and the id is not known yet.
    pub(super) fn wants_xid(&self, class: &Class, t: Target) -> bool {
        use crate::config::CommitResolution;
        t == Target::Primary
            && self.cfg.timeouts.commit_resolution != CommitResolution::Off
            && matches!(
                class.kind,
                StmtKind::Write | StmtKind::Pin | StmtKind::Unknown
            )
            && (self.tx.open == Some(t) || class.statements > 1)
            && self.backends[idx(t)]
                .as_ref()
                .is_some_and(|b| b.xid.is_none())
    }

    /// Picks the backend for a decision, preferring an open connection
    /// when any will do.
    pub(super) fn resolve(&self, choice: Choice) -> Target {
        match choice {
            Choice::Primary => Target::Primary,
            Choice::Replica => Target::Replica,
            Choice::AnyOpen => {
                // A backend still answering keeps replies in order for free.
                if self.busy(Target::Primary) {
                    Target::Primary
                } else if self.busy(Target::Replica)
                    || self.backends[idx(Target::Replica)].is_some()
                {
                    Target::Replica
                } else if self.backends[idx(Target::Primary)].is_some() {
                    Target::Primary
                } else {
                    Target::Replica
                }
            }
        }
    }

    /// Routes `class`, makes sure the backend is connected and caught up,
    /// and drains the other backend so replies stay in order.
    pub(super) async fn target_for(&mut self, class: &Class) -> Result<Target, Error> {
        // Replies must reach the client in order, and a reply still in flight
        // on the other backend can change the decision (its ReadyForQuery may
        // open or end a block), so that backend is drained first and the
        // decision taken again. Batches to the same backend stay pipelined.
        if self.pin.check && self.tx.open.is_none() && self.bound.is_none() {
            let unpinned = SessionState {
                pinned: false,
                ..self.state()
            };
            if route::route(class, &unpinned).choice != Choice::Primary {
                self.recheck_pin().await?;
            }
        }
        let mut waited = false;
        let (decision, wanted) = loop {
            let decision = route::route(class, &self.state());
            let wanted = self.resolve(decision.choice);
            if self.busy(other(wanted)) {
                self.drain(other(wanted)).await?;
                continue;
            }
            if self.lsn_due.is_some() && self.copy_in.is_none() {
                // A COPY just wrote: learn its WAL position before deciding.
                self.send_due_lsn_query().await?;
                continue;
            }
            if decision.reason == Reason::ReadYourWrites && !waited && !self.vars.max_wait.is_zero()
            {
                // Worth a short wait when the replica is about to catch up
                // and the primary is a slow tunnel away.
                waited = true;
                if self.wait_for_replica().await {
                    continue;
                }
            }
            break (decision, wanted);
        };
        self.shared.stats.count_route(&decision);
        let fallback = self.bound.is_none() && self.tx.open.is_none();
        let rep = &self.shared.replication;
        if decision.reason == Reason::Stale && self.cfg.routing.on_stale == OnStale::Error {
            if let Some(st) = rep.stale(self.vars.max_staleness) {
                return Err(Error::StaleReplica(st, self.vars.max_staleness));
            }
        }
        let target = match self.ensure(wanted, fallback).await {
            Ok(t) => t,
            // A read sent to the primary only for freshness: with the
            // primary gone, the replica serves it, and says so.
            Err(Error::PrimaryUnreachable(cause))
                if matches!(decision.reason, Reason::ReadYourWrites | Reason::Stale) =>
            {
                match Box::pin(self.ensure(Target::Replica, false)).await {
                    Ok(t) => {
                        let w = match self.shared.replication.stale(self.vars.max_staleness) {
                            Some(st) => Warning::ServedStale(st),
                            None => Warning::ServedBehindWrites,
                        };
                        self.push_own(|b| w.write_to(b));
                        t
                    }
                    Err(_) => return Err(Error::NothingReachable(cause)),
                }
            }
            Err(e) => return Err(e),
        };
        if target == Target::Replica
            && self.cfg.routing.on_stale == OnStale::Replica
            && !class.kind.needs_primary()
        {
            if let Some(st) = self.shared.replication.stale(self.vars.max_staleness) {
                self.push_own(|b| Warning::ServedStale(st).write_to(b));
            }
        }
        self.last_route = (target, decision.reason);
        if self.report_lag {
            let lag = self.shared.replication.lag_ms();
            if self.reported_lag != Some(lag) {
                self.reported_lag = Some(lag);
                let v = lag.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
                self.push_own(|b| encode::parameter_status(b, "pgsplit_replica_lag_ms", &v));
            }
        }
        if decision.pin {
            self.pin.held = true;
        }
        if std::mem::take(&mut self.pin.releasing) && self.pin.held {
            self.pin.check = true;
        }
        debug!(target = ?target, reason = decision.reason.as_str(), kind = ?class.kind, "routed");
        match self.prepare_backend(target).await {
            Ok(()) => Ok(target),
            // The replica cannot take a setting the primary holds (`SET
            // ROLE` of a role it has not replayed yet): the statement runs
            // on the primary, never on the replica under other settings.
            Err(Error::SettingNotApplied { .. })
                if target == Target::Replica && fallback && !class.kind.needs_primary() =>
            {
                self.drain(Target::Replica).await?;
                let t = Box::pin(self.ensure(Target::Primary, false)).await?;
                self.prepare_backend(t).await?;
                self.last_route = (t, Reason::Setting);
                Ok(t)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `max_wait_for_replica` for the replica to reach this
    /// session's writes; true when it did.
    pub(super) async fn wait_for_replica(&mut self) -> bool {
        let deadline = Instant::now() + self.vars.max_wait;
        let shared = self.shared.clone();
        let _waiting = shared.replication.wait_for_replay();
        loop {
            if self.freshness() == Freshness::Fresh {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(std::time::Duration::from_millis(2));
            tokio::time::sleep(step).await;
        }
    }

    /// Asks the primary whether the state that pinned the session is still
    /// there; unpins it when nothing is left.
    pub(super) async fn recheck_pin(&mut self) -> Result<(), Error> {
        self.pin.check = false;
        if !self.pin.held || self.pin.sticky {
            return Ok(());
        }
        self.drain(Target::Primary).await?;
        let Some(b) = self.backends[idx(Target::Primary)].as_mut() else {
            return Ok(());
        };
        let mut notifications = Vec::new();
        let res = b.conn.query_row(PIN_PROBE, &mut notifications).await;
        self.out.extend(notifications);
        match res {
            Ok(Ok(row)) if row.first().is_some_and(|n| n.as_deref() == Some("0")) => {
                debug!("pinned state released; reads return to the replica");
                self.pin.held = false;
            }
            Ok(Ok(_)) => {}
            Ok(Err(code)) => warn!(code, "checking the session's pin failed"),
            Err(_) => {
                self.backends[idx(Target::Primary)] = None;
                self.stmts.forget_backend(Target::Primary);
                return Err(Error::PinnedStateLost);
            }
        }
        Ok(())
    }
}
