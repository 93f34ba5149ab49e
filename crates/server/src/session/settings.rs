//! The session's settings log: the SET/RESET/DISCARD statements that hold
//! for the session, in order, replayed on a backend that has not seen them.
//!
//! An app that sets a parameter per request (`SET app.user_id = …`) would
//! grow the log forever, so past a few dozen entries it is compacted: a
//! later statement for the same parameter replaces the earlier one, and
//! `RESET ALL` / `DISCARD ALL` drop everything before them. Replaying the
//! compacted log from its start on any backend gives the same settings as
//! replaying the whole history, so after compaction every backend simply
//! starts over from the beginning.

/// Compaction starts past this many entries.
const COMPACT_AT: usize = 32;

/// What a settings statement affects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// One parameter (lower-cased name).
    Param(String),
    /// Every parameter: `RESET ALL`, `DISCARD ALL`.
    All,
    /// Not understood: kept as is and never dropped.
    Other,
}

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
                    return Scope::Param("session_authorization".into());
                }
            }
            match second {
                "" | "local" | "transaction" | "constraints" => Scope::Other,
                "time" => Scope::Param("timezone".into()),
                name => Scope::Param(name.split(['=', ' ']).next().unwrap_or(name).to_owned()),
            }
        }
        "reset" => match second {
            "all" => Scope::All,
            "" => Scope::Other,
            "session" => Scope::Param("session_authorization".into()),
            "time" => Scope::Param("timezone".into()),
            name => Scope::Param(name.to_owned()),
        },
        "discard" if second == "all" => Scope::All,
        // SELECT set_config('name', 'value', false)
        "select" if second.starts_with("set_config(") || second == "set_config" => lower
            .split_once('\'')
            .and_then(|(_, rest)| rest.split_once('\''))
            .map_or(Scope::Other, |(name, _)| Scope::Param(name.to_owned())),
        _ => Scope::Other,
    }
}

/// The log itself.
#[derive(Debug, Default)]
pub(super) struct SettingsLog {
    entries: Vec<String>,
    /// Length past which the next compaction runs: twice what the last one
    /// left, so a session with many distinct settings does not compact on
    /// every append.
    compact_at: usize,
}

impl SettingsLog {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries from `from` on.
    pub fn since(&self, from: usize) -> &[String] {
        &self.entries[from.min(self.entries.len())..]
    }

    /// Appends; returns true when the log was compacted, in which case
    /// every backend must replay it from the start.
    pub fn extend(&mut self, sets: Vec<String>) -> bool {
        self.entries.extend(sets);
        if self.entries.len() <= self.compact_at.max(COMPACT_AT) {
            return false;
        }
        self.compact();
        self.compact_at = 2 * self.entries.len();
        true
    }

    /// Drops every entry a later one makes irrelevant.
    fn compact(&mut self) {
        let scopes: Vec<Scope> = self.entries.iter().map(|s| scope(s)).collect();
        let last_all = scopes.iter().rposition(|s| *s == Scope::All);
        let mut keep = vec![true; self.entries.len()];
        for (i, s) in scopes.iter().enumerate() {
            let superseded = last_all.is_some_and(|a| i < a)
                || match s {
                    Scope::Param(p) => scopes[i + 1..]
                        .iter()
                        .any(|l| matches!(l, Scope::Param(q) if q == p)),
                    Scope::All | Scope::Other => false,
                };
            keep[i] = !superseded;
        }
        let mut k = keep.into_iter();
        self.entries.retain(|_| k.next().unwrap_or(true));
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
        assert_eq!(scope("RESET ALL"), Scope::All);
        assert_eq!(scope("DISCARD ALL"), Scope::All);
        assert_eq!(scope("SET TRANSACTION READ ONLY"), Scope::Other);
        assert_eq!(scope("DISCARD PLANS"), Scope::Other);
        assert_eq!(
            scope("SELECT set_config('TimeZone', 'UTC', false)"),
            Scope::Param("timezone".into())
        );
    }

    #[test]
    fn per_request_settings_stay_bounded_and_keep_the_last_value() {
        let mut log = SettingsLog::default();
        log.extend(vec!["SET search_path = app".into()]);
        for i in 0..1000 {
            log.extend(vec![format!("SET app.user_id = {i}")]);
        }
        assert!(log.len() <= COMPACT_AT + 1, "{}", log.len());
        log.compact();
        assert_eq!(
            log.since(0),
            ["SET search_path = app", "SET app.user_id = 999"]
        );
    }

    #[test]
    fn reset_all_drops_what_came_before_it() {
        let mut log = SettingsLog::default();
        for i in 0..40 {
            log.extend(vec![format!("SET p{i} = 1")]);
        }
        log.extend(vec![
            "RESET ALL".into(),
            "SET q = 2".into(),
            "SET r = 3".into(),
        ]);
        log.compact();
        assert_eq!(log.since(0), ["RESET ALL", "SET q = 2", "SET r = 3"]);
    }

    #[test]
    fn many_distinct_settings_compact_rarely() {
        let mut log = SettingsLog::default();
        let compactions = (0..1000)
            .filter(|i| log.extend(vec![format!("SET p{i} = 1")]))
            .count();
        assert_eq!(log.len(), 1000, "nothing to drop");
        assert!(compactions <= 6, "{compactions} compactions");
    }
}
