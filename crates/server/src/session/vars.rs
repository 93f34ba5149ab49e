//! The session's own `pgsplit.*` variables, answered by the proxy:
//! `SET pgsplit.read_your_writes = …`, `SHOW pgsplit.replica_lag`, …
//!
//! They never reach a server, so a `SHOW` costs no round trip (it works
//! while both servers are down) and a `SET` changes only how this session
//! is routed.

use std::time::Duration;

use crate::config::{parse_duration, Config, ReadYourWrites};
use crate::replication::parse_lsn;

/// Per-session routing preferences, starting from the configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct Vars {
    pub read_your_writes: ReadYourWrites,
    pub window: Duration,
    pub max_staleness: Duration,
    /// How long a read may wait for the replica to catch up with the
    /// session before it goes to the primary instead.
    pub max_wait: Duration,
    /// Reads wait for (or avoid a replica short of) this WAL position: a
    /// causal token from another node's `SHOW pgsplit.write_lsn`.
    pub min_lsn: u64,
}

impl Vars {
    pub fn new(cfg: &Config) -> Vars {
        Vars {
            read_your_writes: cfg.routing.read_your_writes,
            window: cfg.routing.read_your_writes_window,
            max_staleness: cfg.routing.max_replica_lag,
            max_wait: cfg.routing.max_wait_for_replica,
            min_lsn: 0,
        }
    }

    /// A reload changed the defaults: what still has the old default
    /// (the session did not set it, or set it to that value) takes the new.
    pub fn rebase(&mut self, old: &Config, new: &Config) {
        let (o, n) = (&old.routing, &new.routing);
        if self.read_your_writes == o.read_your_writes {
            self.read_your_writes = n.read_your_writes;
        }
        if self.window == o.read_your_writes_window {
            self.window = n.read_your_writes_window;
        }
        if self.max_staleness == o.max_replica_lag {
            self.max_staleness = n.max_replica_lag;
        }
        if self.max_wait == o.max_wait_for_replica {
            self.max_wait = n.max_wait_for_replica;
        }
    }
}

/// A statement about a `pgsplit.*` variable.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Command {
    Show(String),
    Set(String, String),
    Reset(String),
}

/// Recognises `SHOW pgsplit.x`, `SET [SESSION] pgsplit.x {=|TO} v` and
/// `RESET pgsplit.x` (one statement, any case, quotes optional).
pub(super) fn parse(sql: &str) -> Option<Command> {
    // Cheap rejection first, on bytes: this runs for every read.
    if !starts_with_verb(sql) {
        return None;
    }
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let (verb, rest) = split_word(sql)?;
    let verb = ["show", "set", "reset"]
        .into_iter()
        .find(|v| verb.eq_ignore_ascii_case(v))?;
    let rest = match verb {
        "set" => match split_word(rest) {
            Some((w, r)) if w.eq_ignore_ascii_case("session") => r,
            _ => rest,
        },
        _ => rest,
    };
    let rest = rest.trim_start();
    let name_end = rest
        .find(|c: char| c.is_ascii_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let full = &rest[..name_end];
    let name = full
        .get(..8)
        .filter(|p| p.eq_ignore_ascii_case("pgsplit."))
        .map(|_| full[8..].to_ascii_lowercase())?;
    let tail = rest[name_end..].trim_start();
    match verb {
        "show" | "reset" if tail.is_empty() => Some(if verb == "show" {
            Command::Show(name)
        } else {
            Command::Reset(name)
        }),
        "set" => {
            let value = if let Some(v) = tail.strip_prefix('=') {
                v
            } else {
                let (to, v) = split_word(tail)?;
                if !to.eq_ignore_ascii_case("to") {
                    return None;
                }
                v
            };
            let v = value.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|x| x.strip_suffix('\''))
                .map_or_else(|| v.to_owned(), |x| x.replace("''", "'"));
            Some(Command::Set(name, v))
        }
        _ => None,
    }
}

/// Whether the first word of `sql` is SHOW, SET or RESET (any case).
fn starts_with_verb(sql: &str) -> bool {
    let s = sql.trim_ascii_start().as_bytes();
    let word = s
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .map_or(s, |end| &s[..end]);
    [&b"show"[..], b"set", b"reset"]
        .iter()
        .any(|v| word.eq_ignore_ascii_case(v))
}

fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(|c: char| c.is_ascii_whitespace()).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// Why a `SET pgsplit.…` was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SetError {
    Unknown,
    ReadOnly,
    Invalid(&'static str),
}

impl Vars {
    /// Applies `SET pgsplit.name = value`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), SetError> {
        match name {
            "read_your_writes" => {
                self.read_your_writes = value
                    .parse()
                    .map_err(|()| SetError::Invalid("lsn, session, window or off"))?;
            }
            "max_staleness" => {
                self.max_staleness = parse_duration(value)
                    .map_err(|_| SetError::Invalid("a duration such as 500ms or 5s"))?;
            }
            "read_your_writes_window" => {
                self.window = parse_duration(value)
                    .map_err(|_| SetError::Invalid("a duration such as 500ms or 5s"))?;
            }
            "max_wait_for_replica" => {
                self.max_wait = parse_duration(value)
                    .map_err(|_| SetError::Invalid("a duration such as 50ms"))?;
            }
            "min_lsn" => {
                self.min_lsn = parse_lsn(value)
                    .ok_or(SetError::Invalid("a WAL position such as 0/3000148"))?;
            }
            "write_lsn" | "replica_lag" | "last_route" => return Err(SetError::ReadOnly),
            _ => return Err(SetError::Unknown),
        }
        Ok(())
    }

    /// Applies `RESET pgsplit.name`.
    pub fn reset(&mut self, name: &str, cfg: &Config) -> Result<(), SetError> {
        let d = Vars::new(cfg);
        match name {
            "read_your_writes" => self.read_your_writes = d.read_your_writes,
            "max_staleness" => self.max_staleness = d.max_staleness,
            "read_your_writes_window" => self.window = d.window,
            "max_wait_for_replica" => self.max_wait = d.max_wait,
            "min_lsn" => self.min_lsn = 0,
            "write_lsn" | "replica_lag" | "last_route" => return Err(SetError::ReadOnly),
            _ => return Err(SetError::Unknown),
        }
        Ok(())
    }
}

/// A boolean option value as PostgreSQL spells it.
pub(super) fn is_on(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "on" | "true" | "yes" | "1"
    )
}

/// Formats a duration the way `SHOW` prints one (`500ms`, `5s`).
pub(super) fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 && ms > 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// What a `pgsplit.*` statement returns: rows of text columns (none for
/// SET and RESET), and a command tag.
pub(super) struct Answer {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub tag: &'static str,
}

/// The columns of `SHOW pgsplit.pools`.
const POOL_COLUMNS: [&str; 9] = [
    "target", "user", "database", "size", "open", "idle", "leased", "waiting", "mode",
];

/// The columns `SHOW pgsplit.<name>` answers with.
pub(super) fn show_columns(name: &str) -> Vec<String> {
    if name == "pools" {
        POOL_COLUMNS.iter().map(|c| (*c).to_owned()).collect()
    } else if name == "primaries" {
        crate::failover::COLUMNS
            .iter()
            .map(|c| (*c).to_owned())
            .collect()
    } else {
        vec![format!("pgsplit.{name}")]
    }
}

impl super::Session {
    /// Runs a `pgsplit.*` statement against the session.
    pub(super) fn run_var(&mut self, cmd: Command) -> Result<Answer, crate::error::Error> {
        use crate::error::Error;
        use crate::replication::format_lsn;

        let refused = |name: String, value: String, e: SetError| match e {
            SetError::Unknown => Error::UnknownVariable(name),
            SetError::ReadOnly => Error::ReadOnlyVariable(name),
            SetError::Invalid(expected) => Error::InvalidVariable {
                name,
                value,
                expected,
            },
        };
        match cmd {
            Command::Set(name, value) => match self.vars.set(&name, &value) {
                Ok(()) => Ok(Answer {
                    columns: Vec::new(),
                    rows: Vec::new(),
                    tag: "SET",
                }),
                Err(e) => Err(refused(name, value, e)),
            },
            Command::Reset(name) => {
                let cfg = self.cfg.clone();
                match self.vars.reset(&name, &cfg) {
                    Ok(()) => Ok(Answer {
                        columns: Vec::new(),
                        rows: Vec::new(),
                        tag: "RESET",
                    }),
                    Err(e) => Err(refused(name, String::new(), e)),
                }
            }
            Command::Show(name) if name == "pools" => {
                let mut rows = Vec::new();
                for pools in [&self.shared.pools.primary, &self.shared.pools.replica] {
                    let mode = match pools.mode {
                        crate::config::PoolMode::Transaction => "transaction",
                        crate::config::PoolMode::Session => "session",
                    };
                    for r in pools.rows() {
                        rows.push(vec![
                            crate::error::target_name(r.target).to_owned(),
                            r.user,
                            r.database,
                            r.size.to_string(),
                            r.open.to_string(),
                            r.idle.to_string(),
                            r.leased.to_string(),
                            r.waiting.to_string(),
                            mode.to_owned(),
                        ]);
                    }
                }
                Ok(Answer {
                    columns: show_columns(&name),
                    rows,
                    tag: "SHOW",
                })
            }
            Command::Show(name) if name == "primaries" => Ok(Answer {
                columns: show_columns(&name),
                rows: self.shared.failover.report().rows(),
                tag: "SHOW",
            }),
            Command::Show(name) => {
                let rep = &self.shared.replication;
                let value = match name.as_str() {
                    "read_your_writes" => self.vars.read_your_writes.as_str().to_owned(),
                    "max_staleness" => show_duration(self.vars.max_staleness),
                    "read_your_writes_window" => show_duration(self.vars.window),
                    "max_wait_for_replica" => show_duration(self.vars.max_wait),
                    "min_lsn" => format_lsn(self.vars.min_lsn),
                    "write_lsn" => format_lsn(self.write_lsn),
                    "replica_lag" => {
                        if !rep.replica_up() {
                            "unknown (replica unreachable)".to_owned()
                        } else {
                            rep.lag_ms()
                                .map_or_else(|| "unknown".to_owned(), |ms| format!("{ms}ms"))
                        }
                    }
                    "last_route" => format!(
                        "{} ({})",
                        crate::error::target_name(self.last_route.0),
                        self.last_route.1.as_str()
                    ),
                    _ => return Err(Error::UnknownVariable(name)),
                };
                Ok(Answer {
                    columns: show_columns(&name),
                    rows: vec![vec![value]],
                    tag: "SHOW",
                })
            }
        }
    }

    /// Answers a `pgsplit.*` statement in the simple protocol.
    pub(super) fn answer_var(&mut self, cmd: Command) {
        use pgsplit_protocol::backend::TxStatus;
        use pgsplit_protocol::encode;

        if self.client_status() == TxStatus::Failed {
            self.push_error(&crate::error::Error::InFailedBlock);
            self.push_ready();
            return;
        }
        match self.run_var(cmd) {
            Ok(a) => self.push_own(|b| {
                if !a.columns.is_empty() {
                    let columns: Vec<&str> = a.columns.iter().map(String::as_str).collect();
                    encode::row_description_text(b, &columns);
                }
                for row in &a.rows {
                    let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
                    encode::data_row_text(b, &values);
                }
                encode::command_complete(b, a.tag);
            }),
            Err(e) => self.push_error(&e),
        }
        self.push_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_recognised() {
        assert_eq!(
            parse("SHOW pgsplit.replica_lag"),
            Some(Command::Show("replica_lag".into()))
        );
        assert_eq!(
            parse("show PGSPLIT.Last_Route ;"),
            Some(Command::Show("last_route".into()))
        );
        assert_eq!(
            parse("SET pgsplit.read_your_writes = 'session'"),
            Some(Command::Set("read_your_writes".into(), "session".into()))
        );
        assert_eq!(
            parse("set session pgsplit.max_staleness to 500ms"),
            Some(Command::Set("max_staleness".into(), "500ms".into()))
        );
        assert_eq!(
            parse("SET pgsplit.min_lsn='0/3000148'"),
            Some(Command::Set("min_lsn".into(), "0/3000148".into()))
        );
        assert_eq!(
            parse("RESET pgsplit.min_lsn"),
            Some(Command::Reset("min_lsn".into()))
        );
        assert_eq!(
            parse(" \t\nSHOW pgsplit.last_route"),
            Some(Command::Show("last_route".into()))
        );
        for other in [
            "SHOW search_path",
            "SET search_path = a",
            "SHOW pgsplit.x extra",
            "SET pgsplit.x",
            "SET LOCAL pgsplit.x = 1",
            "SELECT 'SHOW pgsplit.x'",
            "SHOWS pgsplit.x",
            "SETTING pgsplit.x = 1",
            "",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    #[test]
    fn values_are_checked() {
        let cfg = Config::default();
        let mut v = Vars::new(&cfg);
        assert_eq!(v.read_your_writes, ReadYourWrites::Lsn);
        v.set("read_your_writes", "Window").unwrap();
        assert_eq!(v.read_your_writes, ReadYourWrites::Window);
        assert!(matches!(
            v.set("read_your_writes", "sometimes"),
            Err(SetError::Invalid(_))
        ));
        v.set("max_staleness", "500ms").unwrap();
        assert_eq!(show_duration(v.max_staleness), "500ms");
        v.set("min_lsn", "1/0").unwrap();
        assert_eq!(v.min_lsn, 1 << 32);
        assert_eq!(v.set("write_lsn", "1/0"), Err(SetError::ReadOnly));
        assert_eq!(v.set("nope", "1"), Err(SetError::Unknown));
        v.reset("max_staleness", &cfg).unwrap();
        assert_eq!(show_duration(v.max_staleness), "5s");
    }
}
