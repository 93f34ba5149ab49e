//! Which function calls make a query unfit for a replica.
//!
//! A `SELECT` is only a read if the functions it calls are. PostgreSQL knows
//! each function's volatility, but the proxy has no catalog access on the hot
//! path, so — like pgpool-II's default — **every function not listed here is
//! assumed to be a read**. A user-defined function that writes is therefore
//! sent to a replica unless the operator lists it in
//! [`ClassifierConfig::write_functions`](crate::ClassifierConfig) or the
//! client adds a `/* pgsplit:primary */` hint. If it does slip through, the
//! replica rejects it with SQLSTATE 25006 (read-only transaction) and the
//! server retries the statement once on the primary, so the cost of a miss
//! is one round trip, not a wrong answer.
//!
//! The built-in list covers functions that write, that fail on a standby, or
//! that leave state in the backend that later statements depend on:
//!
//! - sequences: `nextval`, `setval`, and `currval` / `lastval` (they read
//!   state that only the `nextval` call's backend has);
//! - transaction ids and WAL positions that only the primary has:
//!   `txid_current`, `pg_current_xact_id`, `pg_current_wal_*lsn`;
//! - transaction-level advisory locks (`pg_advisory_xact_lock*`,
//!   `pg_try_advisory_xact_lock*`): a write, the lock ends with the
//!   transaction;
//! - session-level advisory locks and their unlocks (`pg_advisory_lock*`,
//!   `pg_try_advisory_lock*`, `pg_advisory_unlock*`): they outlive the
//!   statement, so the session is pinned to the primary;
//! - `pg_notify`, WAL and backup control (`pg_switch_wal`,
//!   `pg_create_restore_point`, `pg_start_backup`, `pg_backup_start`, …),
//!   replication slots and origins, `pg_logical_emit_message`,
//!   `pg_stat_reset*`;
//! - large objects (`lo_create`, `lo_open`, `lo_write`, …) and `dblink_exec`;
//! - index maintenance that writes (`gin_clean_pending_list`,
//!   `brin_summarize_*`, `brin_desummarize_range`), and the standby
//!   controls `pg_promote`, `pg_wal_replay_pause`/`_resume` (sent to the
//!   primary, which refuses them as a single server not in recovery would:
//!   a client of pgsplit must never promote or pause the replica);
//! - `set_config(name, value, is_local)`: with `is_local` literally `true`
//!   it only affects the current transaction; with string literals and
//!   `false` it is a session setting the proxy replays like `SET` (Django
//!   sends `SELECT set_config('TimeZone', 'UTC', false)` on every
//!   connection); anything else (a parameter, an expression) changes the
//!   session in a way the proxy cannot replay, so the session is pinned.
//!
//! Names are compared case-insensitively and whatever schema they are
//! qualified with (a call of `myschema.nextval(…)` counts as `nextval`); a
//! false match only costs a trip to the primary.
//!
//! Configured patterns are globs (`*` any run, `?` one character). A pattern
//! without a dot matches the function name however the call is qualified; a
//! pattern with a dot (`billing.touch_*`) matches a call qualified with a
//! matching schema, and also an unqualified call whose name matches (the
//! search path may well resolve it to that schema). Patterns only add
//! functions: a built-in entry keeps its own effect.

use crate::StmtKind;

/// What calling a function means for routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The call writes or needs the primary; the statement is a write.
    Write,
    /// The call leaves session state behind; the session must stay on the
    /// primary.
    Pin,
    /// `set_config`: depends on its third argument, see the module docs.
    SetConfig,
}

/// The shape of a `set_config` call's arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetConfigArgs {
    /// `is_local` is literally `true`: the current transaction only.
    Local,
    /// Name and value are string literals and `is_local` is `false`: a
    /// session setting that can be replayed as written.
    SessionLiterals,
    /// A literal name, a parameter (`$n`) for the value, and `false`: a
    /// session setting the proxy replays with the value the client bound.
    SessionParam,
    /// Anything else (parameters, expressions).
    Other,
}

impl Effect {
    /// The statement kind a call implies, given for `set_config` the shape
    /// of its arguments.
    pub fn kind(self, args: SetConfigArgs) -> StmtKind {
        match self {
            Effect::Write => StmtKind::Write,
            Effect::Pin => StmtKind::Pin,
            Effect::SetConfig => match args {
                SetConfigArgs::Local => StmtKind::TxnScoped,
                SetConfigArgs::SessionLiterals | SetConfigArgs::SessionParam => StmtKind::Session,
                SetConfigArgs::Other => StmtKind::Pin,
            },
        }
    }
}

/// Built-in functions by exact lower-case name, sorted for binary search.
const BUILTIN: &[(&str, Effect)] = &[
    ("brin_desummarize_range", Effect::Write),
    ("brin_summarize_new_values", Effect::Write),
    ("brin_summarize_range", Effect::Write),
    ("currval", Effect::Write),
    ("dblink_exec", Effect::Write),
    ("gin_clean_pending_list", Effect::Write),
    ("lastval", Effect::Write),
    ("lo_creat", Effect::Write),
    ("lo_create", Effect::Write),
    ("lo_export", Effect::Write),
    ("lo_from_bytea", Effect::Write),
    ("lo_import", Effect::Write),
    ("lo_open", Effect::Write),
    ("lo_put", Effect::Write),
    ("lo_truncate", Effect::Write),
    ("lo_truncate64", Effect::Write),
    ("lo_unlink", Effect::Write),
    ("lo_write", Effect::Write),
    ("lowrite", Effect::Write),
    ("nextval", Effect::Write),
    ("pg_advisory_lock", Effect::Pin),
    ("pg_advisory_lock_shared", Effect::Pin),
    ("pg_advisory_unlock", Effect::Pin),
    ("pg_advisory_unlock_all", Effect::Pin),
    ("pg_advisory_unlock_shared", Effect::Pin),
    ("pg_advisory_xact_lock", Effect::Write),
    ("pg_advisory_xact_lock_shared", Effect::Write),
    ("pg_backup_start", Effect::Write),
    ("pg_backup_stop", Effect::Write),
    ("pg_create_restore_point", Effect::Write),
    ("pg_current_wal_flush_lsn", Effect::Write),
    ("pg_current_wal_insert_lsn", Effect::Write),
    ("pg_current_wal_lsn", Effect::Write),
    ("pg_current_xact_id", Effect::Write),
    ("pg_drop_replication_slot", Effect::Write),
    ("pg_logical_emit_message", Effect::Write),
    ("pg_notify", Effect::Write),
    ("pg_promote", Effect::Write),
    ("pg_replication_slot_advance", Effect::Write),
    ("pg_start_backup", Effect::Write),
    ("pg_stop_backup", Effect::Write),
    ("pg_switch_wal", Effect::Write),
    ("pg_try_advisory_lock", Effect::Pin),
    ("pg_try_advisory_lock_shared", Effect::Pin),
    ("pg_try_advisory_xact_lock", Effect::Write),
    ("pg_try_advisory_xact_lock_shared", Effect::Write),
    ("pg_wal_replay_pause", Effect::Write),
    ("pg_wal_replay_resume", Effect::Write),
    ("set_config", Effect::SetConfig),
    ("setval", Effect::Write),
    ("txid_current", Effect::Write),
];

/// Built-in families, as globs over the lower-case name; all start `pg_`.
const BUILTIN_GLOBS: &[(&str, Effect)] = &[
    ("pg_create_*_replication_slot", Effect::Write),
    ("pg_copy_*_replication_slot", Effect::Write),
    ("pg_replication_origin_*", Effect::Write),
    ("pg_stat_reset*", Effect::Write),
];

/// Longest name a built-in can have; PostgreSQL truncates identifiers to 63
/// bytes anyway.
const MAX_NAME: usize = 63;

fn builtin(name: &[u8]) -> Option<Effect> {
    if name.len() > MAX_NAME {
        return None;
    }
    let mut buf = [0u8; MAX_NAME];
    let lower = &mut buf[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    let lower = &*lower;
    if let Ok(i) = BUILTIN.binary_search_by(|(n, _)| n.as_bytes().cmp(lower)) {
        return Some(BUILTIN[i].1);
    }
    if !lower.starts_with(b"pg_") {
        return None;
    }
    BUILTIN_GLOBS
        .iter()
        .find(|(pattern, _)| glob(pattern.as_bytes(), lower))
        .map(|&(_, effect)| effect)
}

/// The built-in list plus the operator's patterns, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct WriteFunctions<'a> {
    extra: &'a [String],
}

impl<'a> WriteFunctions<'a> {
    /// The built-in list extended by `extra` glob patterns.
    pub fn new(extra: &'a [String]) -> Self {
        WriteFunctions { extra }
    }

    /// True when the operator configured patterns of their own.
    pub fn has_extra(&self) -> bool {
        !self.extra.is_empty()
    }

    /// The effect of calling `schema.name(…)` (`schema` empty when the call
    /// is unqualified), or `None` for a function assumed to read.
    pub fn effect(&self, schema: &[u8], name: &[u8]) -> Option<Effect> {
        let mut found = builtin(name);
        if found.is_none()
            && self
                .extra
                .iter()
                .any(|p| extra_matches(p.as_bytes(), schema, name))
        {
            found = Some(Effect::Write);
        }
        found
    }
}

fn extra_matches(pattern: &[u8], schema: &[u8], name: &[u8]) -> bool {
    match pattern.iter().rposition(|&b| b == b'.') {
        None => glob(pattern, name),
        Some(dot) => {
            let (schema_pat, name_pat) = (&pattern[..dot], &pattern[dot + 1..]);
            glob(name_pat, name) && (schema.is_empty() || glob(schema_pat, schema))
        }
    }
}

/// Case-insensitive glob match with `*` and `?`, without allocation.
///
/// The classic two-pointer algorithm: on a mismatch, backtrack to just after
/// the last `*` and let it swallow one more byte.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effect(extra: &[&str], schema: &str, name: &str) -> Option<Effect> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        WriteFunctions::new(&extra).effect(schema.as_bytes(), name.as_bytes())
    }

    #[test]
    fn glob_basics() {
        assert!(glob(b"audit_*", b"AUDIT_log"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"axxbyyc"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"ac"));
        assert!(!glob(b"audit_*", b"xaudit_log"));
        assert!(glob(
            b"pg_create_*_replication_slot",
            b"pg_create_logical_replication_slot"
        ));
        assert!(!glob(b"abc", b"abcd"));
        assert!(glob(b"*x", b"xxxx"));
    }

    #[test]
    fn builtins_by_name_any_case_any_schema() {
        assert_eq!(effect(&[], "", "NEXTVAL"), Some(Effect::Write));
        assert_eq!(effect(&[], "pg_catalog", "setval"), Some(Effect::Write));
        assert_eq!(effect(&[], "", "pg_advisory_lock"), Some(Effect::Pin));
        assert_eq!(
            effect(&[], "", "pg_advisory_xact_lock"),
            Some(Effect::Write)
        );
        assert_eq!(
            effect(&[], "", "pg_try_advisory_lock_shared"),
            Some(Effect::Pin)
        );
        assert_eq!(effect(&[], "", "pg_stat_reset_shared"), Some(Effect::Write));
        assert_eq!(effect(&[], "", "set_config"), Some(Effect::SetConfig));
        assert_eq!(effect(&[], "", "now"), None);
        assert_eq!(effect(&[], "", "pg_terminate_backend"), None);
        assert_eq!(effect(&[], "", "txid_current_if_assigned"), None);
        assert_eq!(effect(&[], "", "pg_sequence_last_value"), None);
    }

    #[test]
    fn configured_patterns() {
        let pats = ["audit_*", "billing.touch_*"];
        assert_eq!(effect(&pats, "", "audit_log"), Some(Effect::Write));
        assert_eq!(effect(&pats, "app", "Audit_Log"), Some(Effect::Write));
        assert_eq!(
            effect(&pats, "billing", "touch_invoice"),
            Some(Effect::Write)
        );
        assert_eq!(effect(&pats, "", "touch_invoice"), Some(Effect::Write));
        assert_eq!(effect(&pats, "other", "touch_invoice"), None);
        assert_eq!(effect(&pats, "", "read_things"), None);
        // A pattern never overrides a built-in entry.
        assert_eq!(effect(&["pg_*"], "", "pg_advisory_lock"), Some(Effect::Pin));
        assert_eq!(
            effect(&["set_*"], "", "set_config"),
            Some(Effect::SetConfig)
        );
    }

    #[test]
    fn builtin_table_is_sorted_lowercase_and_matches_itself() {
        assert!(BUILTIN.windows(2).all(|w| w[0].0 < w[1].0));
        for &(name, effect) in BUILTIN {
            assert_eq!(name, name.to_ascii_lowercase());
            assert_eq!(builtin(name.to_ascii_uppercase().as_bytes()), Some(effect));
        }
        assert_eq!(builtin(&[b'a'; 200]), None);
        assert_eq!(builtin(b""), None);
    }

    #[test]
    fn set_config_depends_on_is_local() {
        assert_eq!(
            Effect::SetConfig.kind(SetConfigArgs::Local),
            StmtKind::TxnScoped
        );
        assert_eq!(
            Effect::SetConfig.kind(SetConfigArgs::SessionLiterals),
            StmtKind::Session
        );
        assert_eq!(Effect::SetConfig.kind(SetConfigArgs::Other), StmtKind::Pin);
    }
}
