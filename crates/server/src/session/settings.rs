//! The session's settings log: the SET/RESET/DISCARD statements that hold
//! for the session, in order, replayed on a backend that has not seen them.
//!
//! The log keeps only what still matters: a statement for a parameter
//! drops the earlier ones for it (`SET app.user_id = …` per request stays
//! one entry; `SET ROLE x` then `RESET ROLE` leaves `RESET ROLE`, so a
//! connection leased after `DROP ROLE x` is never asked to become `x`).
//! `DISCARD ALL` drops everything before it, `RESET ALL` every parameter
//! but the role and the session authorization (which it does not reset),
//! and a session authorization also ends an earlier role, as on a server.
//! `DateStyle` is the exception: `SET datestyle TO ymd` changes the order
//! and keeps the output style an earlier `SET datestyle TO iso` chose, so
//! a later setting of it drops nothing; only its reset does.
//! The statements left keep their order, so replaying the log on a fresh
//! connection gives what the whole history gave.

use std::collections::HashSet;

/// What a settings statement affects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// One parameter (lower-cased name).
    Param(String),
    /// `RESET ALL`: every parameter but the role and the session
    /// authorization.
    ResetAll,
    /// `DISCARD ALL`: everything.
    DiscardAll,
    /// Not understood: kept as is and never dropped.
    Other,
}

const ROLE: &str = "role";
const DATESTYLE: &str = "datestyle";
const SESSION_AUTHORIZATION: &str = "session_authorization";

/// Which parameter `sql` sets or resets.
fn scope(sql: &str) -> Scope {
    let lower = sql.trim().trim_end_matches(';').to_ascii_lowercase();
    let mut words = lower.split_whitespace();
    let first = words.next().unwrap_or("");
    let mut second = words.next().unwrap_or("");
    match first {
        "set" => {
            if second == "session" {
                second = words.next().unwrap_or("");
                if second == "authorization" {
                    return Scope::Param(SESSION_AUTHORIZATION.into());
                }
            }
            match second {
                "" | "local" | "transaction" | "constraints" => Scope::Other,
                "time" => Scope::Param("timezone".into()),
                name => Scope::Param(name.split(['=', ' ']).next().unwrap_or(name).to_owned()),
            }
        }
        "reset" => match second {
            "all" => Scope::ResetAll,
            "" => Scope::Other,
            "session" => Scope::Param(SESSION_AUTHORIZATION.into()),
            "time" => Scope::Param("timezone".into()),
            name => Scope::Param(name.to_owned()),
        },
        "discard" if second == "all" => Scope::DiscardAll,
        // SELECT set_config('name', 'value', false)
        "select" if second.starts_with("set_config(") || second == "set_config" => lower
            .split_once('\'')
            .and_then(|(_, rest)| rest.split_once('\''))
            .map_or(Scope::Other, |(name, _)| Scope::Param(name.to_owned())),
        _ => Scope::Other,
    }
}

/// Whether `sql` (a statement about one parameter) puts it back to its
/// default: `RESET x`, `SET x TO DEFAULT`, `SET x = DEFAULT`.
fn resets_to_default(sql: &str) -> bool {
    let lower = sql.trim().trim_end_matches(';').trim().to_ascii_lowercase();
    lower.starts_with("reset") || lower.ends_with(" default") || lower.ends_with("=default")
}

/// The log itself.
#[derive(Debug, Default)]
pub(super) struct SettingsLog {
    entries: Vec<String>,
}

impl SettingsLog {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries from `from` on.
    pub fn since(&self, from: usize) -> &[String] {
        &self.entries[from.min(self.entries.len())..]
    }

    /// Appends. When that drops earlier entries, returns for every `k` up
    /// to the old length how many of the first `k` old entries are left: a
    /// connection that had applied `k` entries has applied that many of
    /// the new log (what it applied of the dropped ones is overridden by
    /// what follows).
    pub fn extend(&mut self, sets: Vec<String>) -> Option<Vec<usize>> {
        let old = self.entries.len();
        self.entries.extend(sets);
        let keep = self.compact();
        if keep.iter().all(|k| *k) {
            return None;
        }
        let mut left = Vec::with_capacity(old + 1);
        let mut n = 0;
        left.push(0);
        for k in &keep[..old] {
            n += usize::from(*k);
            left.push(n);
        }
        let mut k = keep.into_iter();
        self.entries.retain(|_| k.next().unwrap_or(true));
        Some(left)
    }

    /// Which entries a later one does not make irrelevant.
    fn compact(&self) -> Vec<bool> {
        let mut keep = vec![true; self.entries.len()];
        // Scanning backwards: what the entries after this one override.
        let mut later: HashSet<String> = HashSet::new();
        let mut reset_all = false;
        let mut discard_all = false;
        for (i, sql) in self.entries.iter().enumerate().rev() {
            let s = scope(sql);
            // A DateStyle setting merges with the value before it (see the
            // module doc): only a reset of it overrides what came before.
            let merges = matches!(&s, Scope::Param(p) if p == DATESTYLE) && !resets_to_default(sql);
            let overridden = match &s {
                _ if discard_all => true,
                Scope::Param(p) => {
                    later.contains(p)
                        || (reset_all && p != ROLE && p != SESSION_AUTHORIZATION)
                        || (p == ROLE && later.contains(SESSION_AUTHORIZATION))
                }
                Scope::ResetAll => reset_all,
                Scope::DiscardAll | Scope::Other => false,
            };
            keep[i] = !overridden;
            match s {
                Scope::Param(_) if merges => {}
                Scope::Param(p) => {
                    later.insert(p);
                }
                Scope::ResetAll => reset_all = true,
                Scope::DiscardAll => discard_all = true,
                Scope::Other => {}
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(
            scope("SET application_name = 'x'"),
            Scope::Param("application_name".into())
        );
        assert_eq!(
            scope("set SESSION search_path TO a, b"),
            Scope::Param("search_path".into())
        );
        assert_eq!(
            scope("SET app.user_id=7"),
            Scope::Param("app.user_id".into())
        );
        assert_eq!(
            scope("SET TIME ZONE 'UTC'"),
            Scope::Param("timezone".into())
        );
        assert_eq!(
            scope("SET SESSION AUTHORIZATION bob"),
            Scope::Param("session_authorization".into())
        );
        assert_eq!(
            scope("RESET search_path"),
            Scope::Param("search_path".into())
        );
        assert_eq!(scope("RESET ALL"), Scope::ResetAll);
        assert_eq!(scope("DISCARD ALL"), Scope::DiscardAll);
        assert_eq!(scope("SET TRANSACTION READ ONLY"), Scope::Other);
        assert_eq!(scope("DISCARD PLANS"), Scope::Other);
        assert_eq!(
            scope("SELECT set_config('TimeZone', 'UTC', false)"),
            Scope::Param("timezone".into())
        );
    }

    #[test]
    fn per_request_settings_stay_one_entry_and_keep_the_last_value() {
        let mut log = SettingsLog::default();
        log.extend(vec!["SET search_path = app".into()]);
        for i in 0..1000 {
            log.extend(vec![format!("SET app.user_id = {i}")]);
        }
        assert_eq!(
            log.since(0),
            ["SET search_path = app", "SET app.user_id = 999"]
        );
    }

    #[test]
    fn a_reset_role_leaves_no_role_to_become() {
        let mut log = SettingsLog::default();
        assert_eq!(log.extend(vec!["SET search_path = a".into()]), None);
        assert_eq!(log.extend(vec!["SET ROLE regress_gone".into()]), None);
        // A connection that applied 1 or 2 entries has applied 1 of the
        // new log (the role it took is then reset by what follows).
        assert_eq!(log.extend(vec!["RESET ROLE".into()]), Some(vec![0, 1, 1]));
        assert_eq!(log.since(0), ["SET search_path = a", "RESET ROLE"]);
        log.extend(vec![
            "SET ROLE r".into(),
            "SET SESSION AUTHORIZATION u".into(),
        ]);
        assert_eq!(
            log.since(0),
            ["SET search_path = a", "SET SESSION AUTHORIZATION u"],
            "a session authorization ends the role"
        );
    }

    #[test]
    fn reset_all_keeps_the_role_and_discard_all_does_not() {
        let mut log = SettingsLog::default();
        log.extend(vec!["SET ROLE r".into(), "SET p = 1".into()]);
        log.extend(vec!["RESET ALL".into(), "SET q = 2".into()]);
        assert_eq!(log.since(0), ["SET ROLE r", "RESET ALL", "SET q = 2"]);
        log.extend(vec!["RESET ALL".into()]);
        assert_eq!(log.since(0), ["SET ROLE r", "RESET ALL"]);
        log.extend(vec!["DISCARD ALL".into(), "SET r = 3".into()]);
        assert_eq!(log.since(0), ["DISCARD ALL", "SET r = 3"]);
    }

    #[test]
    fn a_datestyle_order_keeps_the_style_set_before_it() {
        let mut log = SettingsLog::default();
        log.extend(vec!["SET datestyle TO iso".into()]);
        log.extend(vec!["SET datestyle TO ymd".into()]);
        assert_eq!(
            log.since(0),
            ["SET datestyle TO iso", "SET datestyle TO ymd"]
        );
        log.extend(vec!["RESET datestyle".into()]);
        assert_eq!(log.since(0), ["RESET datestyle"]);
        log.extend(vec!["SET datestyle = 'sql, dmy'".into()]);
        log.extend(vec!["SET datestyle TO DEFAULT".into()]);
        assert_eq!(log.since(0), ["SET datestyle TO DEFAULT"]);
    }

    #[test]
    fn many_distinct_settings_are_all_kept() {
        let mut log = SettingsLog::default();
        for i in 0..1000 {
            assert_eq!(log.extend(vec![format!("SET p{i} = 1")]), None);
        }
        assert_eq!(log.len(), 1000);
    }
}
