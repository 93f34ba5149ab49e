//! Resolving a commit whose answer was lost.
//!
//! When the connection to the primary dies after a COMMIT (or a wrapped
//! autocommit write's COMMIT) was sent and before its answer arrived, the
//! transaction may or may not have committed. Telling the client "failed"
//! could make it retry a write that happened; telling it "done" could lose
//! one. So the proxy finds out, bounded by `commit_resolution_timeout`:
//!
//! 1. It knows the transaction's id, asked for behind the transaction's
//!    first write (never in the batch with the COMMIT, whose answer is
//!    the one lost).
//! 2. On a new connection to the primary it asks `pg_xact_status()`. While
//!    the orphaned server backend lives, the answer is "in progress": the
//!    proxy terminates that backend (it knows its pid, and matches its
//!    transaction id too, so a reused pid is never hit) and asks again.
//! 3. "committed": the client gets the success it would have got.
//!    "aborted": `08006`, saying the transaction was rolled back.
//!    Still unknown at the bound (the primary unreachable throughout):
//!    `08007`.
//!
//! The client's answer must stay in order with everything else the
//! session sends, so the lost cycle's place in the output queue is kept
//! and the queue is flushed only up to it until the outcome is known.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::{encode, tag, Frame};
use pgsplit_router::Target;
use tracing::{debug, info, warn};

use super::{write_all_vectored, Session};
use crate::error::Error;
use crate::replication::parse_lsn;

/// Pause between attempts to reach the primary or to see the orphan gone.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A lost commit waiting for its outcome.
#[derive(Debug)]
pub(super) struct Resolution {
    /// Where in the output queue its answer goes.
    pub at: usize,
    pub xid: u64,
    /// The server backend that ran it.
    pub pid: i32,
    /// What the client gets if it committed, before its ReadyForQuery.
    pub success: Bytes,
    pub started: Instant,
    /// The failover generation of the primary it ran on.
    pub generation: u64,
}

/// What the primary says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Committed; the WAL insert position when that was learned.
    Committed(Option<u64>),
    Aborted,
    Unknown,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Committed(_) => "committed",
            Outcome::Aborted => "aborted",
            Outcome::Unknown => "unknown",
        }
    }
}

/// The answer a successful extended-protocol COMMIT batch gets, message by
/// message, without its ReadyForQuery.
pub(super) fn extended_commit_answer(frames: &[Frame]) -> Bytes {
    extended_answer(frames, "COMMIT")
}

/// The answer a server gives a batch of one transaction-control statement
/// (`COMMIT`, `ROLLBACK`: no parameters, no rows) that succeeds, message by
/// message, without its ReadyForQuery. Describing a statement gets its
/// (empty) ParameterDescription before NoData, as drivers expect.
pub(super) fn extended_answer(frames: &[Frame], command: &str) -> Bytes {
    let mut b = BytesMut::new();
    for f in frames {
        match f.tag() {
            tag::frontend::PARSE => encode::parse_complete(&mut b),
            tag::frontend::BIND => encode::message(&mut b, tag::backend::BIND_COMPLETE, |_| {}),
            tag::frontend::DESCRIBE => {
                if f.body().first() == Some(&b'S') {
                    encode::message(&mut b, tag::backend::PARAMETER_DESCRIPTION, |w| {
                        w.extend_from_slice(&0i16.to_be_bytes());
                    });
                }
                encode::message(&mut b, tag::backend::NO_DATA, |_| {});
            }
            tag::frontend::EXECUTE => encode::command_complete(&mut b, command),
            tag::frontend::CLOSE => encode::message(&mut b, tag::backend::CLOSE_COMPLETE, |_| {}),
            _ => {}
        }
    }
    b.freeze()
}

/// The answer a successful simple-protocol COMMIT gets.
pub(super) fn simple_commit_answer() -> Bytes {
    let mut b = BytesMut::new();
    encode::command_complete(&mut b, "COMMIT");
    b.freeze()
}

impl Session {
    /// Writes what precedes the pending resolution's answer, learns the
    /// outcome, and puts the answer in its place.
    pub(super) async fn settle_resolution(&mut self, r: Resolution) -> Result<(), Error> {
        let rest = self.out.split_off(r.at.min(self.out.len()));
        if !self.out.is_empty() {
            let res = write_all_vectored(&mut self.client, self.out.make_contiguous()).await;
            self.out.clear();
            res.map_err(Error::ClientIo)?;
        }
        let outcome = self.outcome(&r).await;
        let waited = r.started.elapsed();
        info!(
            xid = r.xid,
            outcome = outcome.name(),
            ?waited,
            "lost commit resolved"
        );
        self.shared.stats.count_resolution(outcome.name());
        match outcome {
            Outcome::Committed(lsn) => {
                if let Some(lsn) = lsn {
                    self.write_lsn = self.write_lsn.max(lsn);
                    self.shared.replication.note_write(lsn);
                }
                self.wrote_at = Some(Instant::now());
                self.out.push_back(r.success);
            }
            Outcome::Aborted => self.push_error(&Error::CommitRolledBack),
            Outcome::Unknown => self.push_error(&Error::TransactionResolutionUnknown),
        }
        self.push_own(|b| encode::ready_for_query(b, TxStatus::Idle));
        self.out.extend(rest);
        Ok(())
    }

    /// Asks the primary, until the bound, what became of transaction
    /// `r.xid`.
    async fn outcome(&self, r: &Resolution) -> Outcome {
        let deadline = r.started + self.cfg.timeouts.commit_resolution_timeout;
        let xid32 = r.xid & 0xffff_ffff;
        let pid = r.pid;
        // The orphan: the backend that ran the transaction, only while it
        // still holds it (a pid can be reused once it is gone).
        let orphan =
            format!("FROM pg_stat_activity WHERE pid = {pid} AND backend_xid::text = '{xid32}'");
        let ask = format!(
            "SELECT pg_xact_status('{}'::xid8)::text, pg_current_wal_insert_lsn()::text",
            r.xid
        );
        let terminate = format!("SELECT pg_terminate_backend(pid) {orphan}");
        let mut conn = None;
        let mut ignored = Vec::new();
        loop {
            if Instant::now() >= deadline {
                return Outcome::Unknown;
            }
            if conn.is_none() {
                match tokio::time::timeout_at(
                    deadline.into(),
                    self.connect(Target::Primary, r.generation),
                )
                .await
                {
                    Ok(Ok(c)) => conn = Some(c),
                    Ok(Err(e)) => {
                        debug!(cause = %e, "primary not reachable yet to resolve a commit");
                        pause(deadline).await;
                        continue;
                    }
                    Err(_) => return Outcome::Unknown,
                }
            }
            let c = conn.as_mut().expect("connected above");
            let answer =
                match tokio::time::timeout_at(deadline.into(), c.query_row(&ask, &mut ignored))
                    .await
                {
                    Err(_) => return Outcome::Unknown,
                    Ok(Err(_)) => {
                        conn = None;
                        pause(deadline).await;
                        continue;
                    }
                    Ok(Ok(Err(code))) => {
                        warn!(
                            code,
                            xid = r.xid,
                            "asking for a transaction's status failed"
                        );
                        return Outcome::Unknown;
                    }
                    Ok(Ok(Ok(row))) => row,
                };
            let status = answer.first().cloned().flatten();
            let lsn = answer.get(1).cloned().flatten().and_then(|l| parse_lsn(&l));
            match status.as_deref() {
                Some("committed") => return Outcome::Committed(lsn),
                Some("aborted") => return Outcome::Aborted,
                Some("in progress") => {
                    // The orphan still holds it (idle in its block, or its
                    // COMMIT not yet read): once it is gone, the status is
                    // final.
                    let ended = tokio::time::timeout_at(
                        deadline.into(),
                        c.query_row(&terminate, &mut ignored),
                    )
                    .await;
                    if !matches!(ended, Ok(Ok(_))) {
                        conn = None;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // NULL: too old to know (far behind the horizon).
                _ => return Outcome::Unknown,
            }
        }
    }
}

/// Waits before the next attempt, never past `deadline`.
async fn pause(deadline: Instant) {
    let until = (Instant::now() + RETRY_PAUSE).min(deadline);
    tokio::time::sleep_until(until.into()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgsplit_protocol::frame;

    fn frames(msgs: &[fn(&mut BytesMut)]) -> Vec<Frame> {
        let mut b = BytesMut::new();
        for m in msgs {
            m(&mut b);
        }
        let mut out = Vec::new();
        while let Some(f) = frame::decode(&mut b, 1 << 16).unwrap() {
            out.push(f);
        }
        out
    }

    fn tags(b: &Bytes) -> Vec<u8> {
        let mut b = BytesMut::from(&b[..]);
        let mut out = Vec::new();
        while let Some(f) = frame::decode(&mut b, 1 << 16).unwrap() {
            out.push(f.tag());
        }
        out
    }

    #[test]
    fn an_extended_commit_is_answered_message_by_message() {
        let batch = frames(&[
            |b| encode::parse(b, "", "COMMIT", &[]),
            |b| encode::bind(b, "", "", &[]),
            |b| encode::describe(b, b'P', ""),
            |b| encode::message(b, b'E', |w| w.extend_from_slice(b"\0\0\0\0\0")),
            |b| encode::message(b, b'S', |_| {}),
        ]);
        assert_eq!(tags(&extended_commit_answer(&batch)), b"12nC".to_vec());
        let described = frames(&[
            |b| encode::describe(b, b'S', "c"),
            |b| encode::message(b, b'S', |_| {}),
        ]);
        assert_eq!(tags(&extended_commit_answer(&described)), b"tn".to_vec());
    }

    #[test]
    fn a_simple_commit_is_one_command_complete() {
        assert_eq!(tags(&simple_commit_answer()), b"C".to_vec());
    }
}
