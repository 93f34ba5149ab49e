//! Answering a client whose transaction block was lost with its server
//! connection: every statement gets 25P02 (or the 08006 that explains it)
//! until the client ends the block, as one server would answer.

use pgsplit_protocol::{encode, tag, Frame};
use pgsplit_router::StmtKind;

use super::*;
use crate::error::Error;

impl Session {
    /// The client's block died with its backend: answer as a server does
    /// for a failed block — 25P02 until ROLLBACK/COMMIT, which end it.
    pub(super) fn answer_failed_block(&mut self, kind: StmtKind, frames: Option<&[Frame]>) {
        let ends = matches!(kind, StmtKind::Rollback | StmtKind::Commit);
        // A block lost while the client was idle is explained to the next
        // statement; after that, 25P02 as a server says.
        let unreported = self.tx.lost_unreported.take();
        let refused = unreported.or(self.tx.commit_refused);
        if let (Some(t), StmtKind::Commit) = (refused, kind) {
            // A COMMIT must not look like success (a server's "ROLLBACK"
            // tag for a failed block is read as success by most drivers)
            // unless the client surely saw its block fail: a lost
            // connection may have been reported to a statement whose
            // answer the driver had already taken as complete.
            self.tx.failed = false;
            self.tx.commit_refused = None;
            self.push_error(&Error::BackendLostInBlock { target: t });
            let ends_cycle = frames.is_none_or(|f| {
                f.last()
                    .is_some_and(|f| matches!(f.tag(), tag::frontend::SYNC))
            });
            if ends_cycle {
                self.push_ready();
            }
            return;
        }
        let failed = match unreported {
            Some(t) if !ends => Error::BackendLostInBlock { target: t },
            _ => Error::InFailedBlock,
        };
        let Some(frames) = frames else {
            if ends {
                self.tx.failed = false;
                self.tx.commit_refused = None;
                self.push_own(|b| encode::command_complete(b, "ROLLBACK"));
            } else {
                self.push_error(&failed);
            }
            self.push_ready();
            return;
        };
        if !ends {
            self.push_error(&failed);
            let ends_cycle =
                |f: &Frame| matches!(f.tag(), tag::frontend::SYNC | tag::frontend::FUNCTION_CALL);
            if frames.last().is_some_and(ends_cycle) {
                self.push_ready();
            }
            return;
        }
        // An extended-protocol ROLLBACK: answered message by message as a
        // server would.
        if frames.iter().any(|f| f.tag() == tag::frontend::EXECUTE) {
            self.tx.failed = false;
            self.tx.commit_refused = None;
        }
        self.out
            .push_back(resolution::extended_answer(frames, "ROLLBACK"));
        if frames.iter().any(|f| f.tag() == tag::frontend::SYNC) {
            self.push_ready();
        }
    }
}
