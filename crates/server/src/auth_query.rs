//! Passwords from the server (`[auth] mode = "auth_query"`), as
//! PgBouncer's `auth_query`: a user not in `[[users]]` logs in against the
//! secret PostgreSQL stores for it, read with `auth_query` by `auth_user`.
//!
//! - The secret is read from the local replica (no trip through the
//!   tunnel) and kept for `cache_ttl`; when the replica cannot be asked,
//!   from the primary.
//! - A login that fails reads it again from the primary, once: the replica
//!   (or the cache) may not have a changed password yet. The failed
//!   attempt stays failed (a SCRAM proof was made with the salt already
//!   sent); the next one uses what the primary holds.
//! - A user with no secret (no such role, no password, NULL for an expired
//!   one) goes through the same fake SCRAM exchange as an unknown user and
//!   gets the same `28P01`.
//! - The servers are then logged in to without the password: SCRAM
//!   passthrough with the ClientKey the client's proof revealed, or the
//!   stored MD5 hash. So a pool of such a user opens connections only after
//!   the user's first login since pgsplit started, and `min_idle` is kept
//!   for it from then on.
//!
//! Secrets, keys and proofs live in memory only and are never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use pgsplit_protocol::scram::ScramSecret;
use pgsplit_router::Target;

use crate::backend::{BackendConn, Login};
use crate::config::{AuthMethod, BackendKeys, User};
use crate::error::Error;
use crate::Shared;

/// A stored secret as `pg_authid.rolpassword` holds it.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(ScramSecret),
    Md5(String),
}

struct Entry {
    /// `None`: no such login (or no usable secret).
    secret: Option<Secret>,
    read_at: Instant,
    /// What the user's last successful login left for server logins.
    keys: Option<BackendKeys>,
}

/// The secrets read so far, by user name.
#[derive(Default)]
pub struct AuthQuery {
    entries: Mutex<HashMap<String, Entry>>,
}

/// Entries kept at most (names that do not exist are cached too, so a
/// stream of made-up names cannot grow it without bound).
const MAX_ENTRIES: usize = 10_000;

impl AuthQuery {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The user as sessions and pools need it, once it has logged in.
    pub fn user(&self, name: &str) -> Option<User> {
        let map = self.lock();
        let e = map.get(name)?;
        let keys = e.keys.clone()?;
        Some(User {
            name: name.to_owned(),
            password: None,
            auth: match keys {
                BackendKeys::Md5(_) => AuthMethod::Md5,
                BackendKeys::Scram(_) => AuthMethod::ScramSha256,
            },
            server_user: None,
            server_password: None,
            admin: false,
            keys: Some(keys),
        })
    }

    /// Records a successful login's keys.
    pub fn remember(&self, name: &str, keys: BackendKeys) {
        if let Some(e) = self.lock().get_mut(name) {
            e.keys = Some(keys);
        }
    }

    /// The user's secret: cached within `cache_ttl`, else read from the
    /// replica (the primary when the replica cannot be asked).
    ///
    /// # Errors
    /// `AuthQueryFailed` when neither server answers the query.
    pub async fn secret(
        &self,
        shared: &Shared,
        name: &str,
        database: &str,
    ) -> Result<Option<Secret>, Error> {
        let ttl = shared.config().auth.cache_ttl;
        if let Some(e) = self.lock().get(name) {
            if e.read_at.elapsed() < ttl {
                return Ok(e.secret.clone());
            }
        }
        let secret = match fetch(shared, Target::Replica, name, database).await {
            Ok(s) => s,
            Err(replica) => {
                tracing::warn!(cause = %replica, "auth_query on the replica failed; asking the primary");
                fetch(shared, Target::Primary, name, database)
                    .await
                    .map_err(Error::AuthQueryFailed)?
            }
        };
        self.store(name, secret.clone());
        Ok(secret)
    }

    /// After a failed login: the secret as the primary has it now, when
    /// it differs from what was used.
    pub async fn refresh_from_primary(
        &self,
        shared: &Shared,
        name: &str,
        database: &str,
        used: Option<&Secret>,
    ) -> Option<Secret> {
        match fetch(shared, Target::Primary, name, database).await {
            Ok(fresh) => {
                self.store(name, fresh.clone());
                fresh.filter(|f| Some(f) != used)
            }
            Err(e) => {
                tracing::warn!(cause = %e, "auth_query on the primary failed");
                None
            }
        }
    }

    fn store(&self, name: &str, secret: Option<Secret>) {
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES && !map.contains_key(name) {
            map.retain(|_, e| e.keys.is_some());
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        let keys = map
            .get(name)
            .filter(|e| e.secret == secret)
            .and_then(|e| e.keys.clone());
        map.insert(
            name.to_owned(),
            Entry {
                secret,
                read_at: Instant::now(),
                keys,
            },
        );
    }
}

/// `s` as an SQL string literal (`E'…'`, quotes and backslashes escaped).
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Reads one secret with `auth_query` on `t`.
async fn fetch(
    shared: &Shared,
    t: Target,
    name: &str,
    database: &str,
) -> Result<Option<Secret>, String> {
    let cfg = shared.config();
    let a = &cfg.auth;
    let auth_user = a.auth_user.as_deref().ok_or("no auth_user configured")?;
    let (addr, _) = shared.server_addr(t).map_err(|e| e.to_string())?;
    let params = vec![(
        "application_name".to_owned(),
        "pgsplit auth_query".to_owned(),
    )];
    let login = Login {
        user: auth_user,
        password: a.auth_password.as_deref(),
        database: a.auth_database.as_deref().unwrap_or(database),
        params: &params,
        keys: None,
    };
    let timeout = cfg
        .timeouts
        .for_target(t == Target::Primary)
        .connect_timeout;
    let mut conn = BackendConn::connect(t, &addr, &login, timeout)
        .await
        .map_err(|e| format!("auth_user {auth_user}: {e}"))?;
    let sql = a.auth_query.replace("$1", &literal(name));
    let row = tokio::time::timeout(timeout, conn.query_row(&sql, &mut Vec::new()))
        .await
        .map_err(|_| format!("auth_query: no answer within {timeout:?}"))?
        .map_err(|e| format!("auth_query: {e}"))?
        .map_err(|code| format!("auth_query failed with SQLSTATE {code}"))?;
    conn.terminate().await;
    Ok(row.get(1).cloned().flatten().and_then(|s| parse(&s)))
}

/// A stored secret, or `None` for one pgsplit cannot check (plaintext).
fn parse(s: &str) -> Option<Secret> {
    if let Some(v) = ScramSecret::parse_verifier(s) {
        return Some(Secret::Scram(v));
    }
    (s.len() == 35 && s.starts_with("md5")).then(|| Secret::Md5(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_as_literals() {
        assert_eq!(literal("app"), "E'app'");
        assert_eq!(literal("o'brien"), "E'o''brien'");
        assert_eq!(literal("a\\'; DROP"), "E'a\\\\''; DROP'");
    }

    #[test]
    fn secrets_parse_by_kind() {
        assert!(matches!(
            parse("md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            Some(Secret::Md5(_))
        ));
        assert!(parse("plaintext").is_none());
        assert!(parse("md5short").is_none());
    }
}
