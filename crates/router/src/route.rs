//! The routing decision: a statement's class plus the session's state in,
//! a target out. Pure: no I/O, no clock, no configuration lookups, so every
//! rule is unit- and property-tested without a server.

use crate::{Class, Stage, StmtKind, Target};

/// What the session knows that routing depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionState {
    /// The backend that holds the client's open transaction block.
    pub txn: Option<Target>,
    /// The session holds state that cannot be replayed (LISTEN, temporary
    /// tables, …) and must stay on the primary.
    pub pinned: bool,
    /// Part of the current extended-protocol batch was already sent (a
    /// Flush came before Sync), so the rest must follow it.
    pub bound: Option<Target>,
    /// Whether the replica may serve this session's reads.
    pub replica: Freshness,
}

/// The replica as one session's reads see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Freshness {
    /// Within the staleness bound and caught up with the session.
    #[default]
    Fresh,
    /// Has not replayed the session's last write yet.
    BehindWrites,
    /// Past the staleness bound, down or not replaying.
    Stale,
}

/// Where a statement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Primary,
    Replica,
    /// Harmless anywhere (SET outside a block, a stray COMMIT): the server
    /// uses a backend it already has open, the replica first.
    AnyOpen,
}

/// Why, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Bound,
    Transaction,
    Pinned,
    Hint,
    Read,
    Write,
    ReadOnlyTransaction,
    Unclassified,
    Anywhere,
    ReadYourWrites,
    Stale,
    /// A session setting the replica could not take holds on the primary.
    Setting,
}

impl Reason {
    /// A stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Bound => "bound",
            Reason::Transaction => "transaction",
            Reason::Pinned => "pinned",
            Reason::Hint => "hint",
            Reason::Read => "read",
            Reason::Write => "write",
            Reason::ReadOnlyTransaction => "read_only_transaction",
            Reason::Unclassified => "unclassified",
            Reason::Anywhere => "anywhere",
            Reason::ReadYourWrites => "read_your_writes",
            Reason::Stale => "stale_replica",
            Reason::Setting => "setting_not_on_replica",
        }
    }
}

/// The decision for one statement or batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub choice: Choice,
    pub reason: Reason,
    /// From now on the session must stay on the primary.
    pub pin: bool,
}

fn to(target: Target) -> Choice {
    match target {
        Target::Primary => Choice::Primary,
        Target::Replica => Choice::Replica,
    }
}

/// Combines the classes of the statements of one extended-protocol batch
/// (they run as one implicit transaction, so on one backend).
pub fn combine(a: &Class, b: &Class) -> Class {
    // Statements after a BEGIN in the same batch run inside its block,
    // where hints give way to the block's server, as in a later batch.
    let in_block = matches!(a.kind, StmtKind::Begin { .. });
    Class {
        kind: a.kind.combine(b.kind),
        hint: if in_block { a.hint } else { b.hint.or(a.hint) },
        statements: a.statements.saturating_add(b.statements),
        stage: if a.stage == Stage::Parser || b.stage == Stage::Parser {
            Stage::Parser
        } else {
            Stage::Lexer
        },
    }
}

/// Decides where `class` runs given the session's state.
///
/// Order of precedence: a batch already bound to a backend, the backend
/// of an open transaction block, a pinned session, a comment hint (a
/// replica hint never moves a statement that needs the primary, and it
/// accepts a replica that is behind), then the statement's own class,
/// where a read goes to the primary while the replica is behind the
/// session's writes or stale.
pub fn route(class: &Class, s: &SessionState) -> Decision {
    let pin = class.kind == StmtKind::Pin;
    let d = |choice, reason| Decision {
        choice,
        reason,
        pin,
    };
    if let Some(t) = s.bound {
        return d(to(t), Reason::Bound);
    }
    if let Some(t) = s.txn {
        return d(to(t), Reason::Transaction);
    }
    if s.pinned || pin {
        return d(Choice::Primary, Reason::Pinned);
    }
    match class.hint {
        Some(Target::Primary) => return d(Choice::Primary, Reason::Hint),
        // Pins returned above, so only reads and the unclassifiable (which
        // the hint vouches for) can follow a replica hint.
        Some(Target::Replica) if !class.kind.needs_primary() || class.kind == StmtKind::Unknown => {
            return d(Choice::Replica, Reason::Hint);
        }
        _ => {}
    }
    let read = |reason| match s.replica {
        Freshness::Fresh => d(Choice::Replica, reason),
        Freshness::BehindWrites => d(Choice::Primary, Reason::ReadYourWrites),
        Freshness::Stale => d(Choice::Primary, Reason::Stale),
    };
    match class.kind {
        StmtKind::Empty | StmtKind::Read => read(Reason::Read),
        StmtKind::Begin { read_only: true } => read(Reason::ReadOnlyTransaction),
        StmtKind::Begin { read_only: false } | StmtKind::Write | StmtKind::Pin => {
            d(Choice::Primary, Reason::Write)
        }
        StmtKind::Unknown => d(Choice::Primary, Reason::Unclassified),
        // A setting can name what the session itself just created (`SET
        // ROLE` after `CREATE ROLE`, a `search_path` of a new schema): it
        // runs first where the session's writes are visible, as a read does.
        StmtKind::Session if s.replica == Freshness::BehindWrites => {
            d(Choice::Primary, Reason::ReadYourWrites)
        }
        StmtKind::Session | StmtKind::TxnScoped | StmtKind::Commit | StmtKind::Rollback => {
            d(Choice::AnyOpen, Reason::Anywhere)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn class(kind: StmtKind, hint: Option<Target>) -> Class {
        Class {
            kind,
            hint,
            statements: 1,
            stage: Stage::Lexer,
        }
    }

    #[test]
    fn hints_inside_a_block_the_batch_opens_give_way_to_it() {
        let begin = class(StmtKind::Begin { read_only: true }, None);
        let state_read = class(StmtKind::Read, Some(Target::Primary));
        let c = combine(&begin, &state_read);
        assert_eq!(c.hint, None);
        assert_eq!(route(&c, &SessionState::default()).choice, Choice::Replica);
        // Before the BEGIN, a hint still counts.
        assert_eq!(combine(&state_read, &begin).hint, Some(Target::Primary));
    }

    #[test]
    fn reads_go_to_the_replica_and_writes_to_the_primary() {
        let s = SessionState::default();
        assert_eq!(
            route(&class(StmtKind::Read, None), &s).choice,
            Choice::Replica
        );
        assert_eq!(
            route(&class(StmtKind::Write, None), &s).choice,
            Choice::Primary
        );
        assert_eq!(
            route(&class(StmtKind::Unknown, None), &s).reason,
            Reason::Unclassified
        );
        assert_eq!(
            route(&class(StmtKind::Begin { read_only: true }, None), &s).choice,
            Choice::Replica
        );
        assert_eq!(
            route(&class(StmtKind::Begin { read_only: false }, None), &s).choice,
            Choice::Primary
        );
        assert_eq!(
            route(&class(StmtKind::Session, None), &s).choice,
            Choice::AnyOpen
        );
    }

    #[test]
    fn an_open_block_keeps_its_backend() {
        let s = SessionState {
            txn: Some(Target::Primary),
            ..Default::default()
        };
        let d = route(&class(StmtKind::Read, None), &s);
        assert_eq!((d.choice, d.reason), (Choice::Primary, Reason::Transaction));
        let s = SessionState {
            txn: Some(Target::Replica),
            ..Default::default()
        };
        assert_eq!(
            route(&class(StmtKind::Write, None), &s).choice,
            Choice::Replica
        );
    }

    #[test]
    fn pins_and_hints() {
        let d = route(&class(StmtKind::Pin, None), &SessionState::default());
        assert!(d.pin);
        assert_eq!(d.choice, Choice::Primary);
        let pinned = SessionState {
            pinned: true,
            ..Default::default()
        };
        assert_eq!(
            route(&class(StmtKind::Read, None), &pinned).choice,
            Choice::Primary
        );
        let s = SessionState::default();
        assert_eq!(
            route(&class(StmtKind::Read, Some(Target::Primary)), &s).choice,
            Choice::Primary
        );
        assert_eq!(
            route(&class(StmtKind::Unknown, Some(Target::Replica)), &s).choice,
            Choice::Replica
        );
        assert_eq!(
            route(&class(StmtKind::Write, Some(Target::Replica)), &s).choice,
            Choice::Primary,
            "a hint never sends a write to the replica"
        );
    }

    #[test]
    fn reads_follow_writes_and_avoid_a_stale_replica() {
        let behind = SessionState {
            replica: Freshness::BehindWrites,
            ..Default::default()
        };
        let d = route(&class(StmtKind::Read, None), &behind);
        assert_eq!(
            (d.choice, d.reason),
            (Choice::Primary, Reason::ReadYourWrites)
        );
        let d = route(&class(StmtKind::Begin { read_only: true }, None), &behind);
        assert_eq!(d.choice, Choice::Primary);
        let stale = SessionState {
            replica: Freshness::Stale,
            ..Default::default()
        };
        let d = route(&class(StmtKind::Read, None), &stale);
        assert_eq!((d.choice, d.reason), (Choice::Primary, Reason::Stale));
        // Settings still go anywhere when the replica is only stale, but
        // follow the session's own writes; an explicit replica hint is obeyed.
        assert_eq!(
            route(&class(StmtKind::Session, None), &stale).choice,
            Choice::AnyOpen
        );
        assert_eq!(
            route(&class(StmtKind::Session, None), &behind).choice,
            Choice::Primary
        );
        assert_eq!(
            route(&class(StmtKind::TxnScoped, None), &behind).choice,
            Choice::AnyOpen
        );
        assert_eq!(
            route(&class(StmtKind::Read, Some(Target::Replica)), &behind).choice,
            Choice::Replica
        );
        // An open block on the replica keeps it.
        let s = SessionState {
            txn: Some(Target::Replica),
            ..behind
        };
        assert_eq!(
            route(&class(StmtKind::Read, None), &s).choice,
            Choice::Replica
        );
    }

    fn any_kind() -> impl Strategy<Value = StmtKind> {
        prop_oneof![
            Just(StmtKind::Empty),
            Just(StmtKind::Read),
            Just(StmtKind::Write),
            any::<bool>().prop_map(|read_only| StmtKind::Begin { read_only }),
            Just(StmtKind::Commit),
            Just(StmtKind::Rollback),
            Just(StmtKind::TxnScoped),
            Just(StmtKind::Session),
            Just(StmtKind::Pin),
            Just(StmtKind::Unknown),
        ]
    }

    fn any_target() -> impl Strategy<Value = Option<Target>> {
        prop_oneof![
            Just(None),
            Just(Some(Target::Primary)),
            Just(Some(Target::Replica))
        ]
    }

    proptest! {
        /// Outside a transaction block or a bound batch, nothing that needs
        /// the primary is ever sent to the replica, whatever the hints.
        #[test]
        fn writes_never_hit_the_replica(kind in any_kind(), hint in any_target(), pinned in any::<bool>()) {
            let s = SessionState { pinned, ..Default::default() };
            let d = route(&class(kind, hint), &s);
            if kind.needs_primary() && kind != StmtKind::Unknown {
                prop_assert_eq!(d.choice, Choice::Primary);
            }
            if pinned {
                prop_assert_eq!(d.choice, Choice::Primary);
            }
        }

        /// An open block or a bound batch always stays on its backend.
        #[test]
        fn blocks_stay_on_their_backend(kind in any_kind(), hint in any_target(), t in any_target(), b in any_target()) {
            let s = SessionState { txn: t, bound: b, ..Default::default() };
            let d = route(&class(kind, hint), &s);
            if let Some(b) = b {
                prop_assert_eq!(d.choice, to(b));
            } else if let Some(t) = t {
                prop_assert_eq!(d.choice, to(t));
            }
        }
    }
}
