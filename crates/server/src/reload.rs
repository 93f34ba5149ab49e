//! The configuration in force, and reloading it without dropping sessions.
//!
//! SIGHUP and the console's `RELOAD` read the file (and the command line's
//! overrides) again. A file that does not load changes nothing: the error,
//! naming the key, is logged, counted and given back to `RELOAD`. A file
//! that loads is compared key by key with what is in force:
//! - keys fixed for the life of the process ([`RESTART_ONLY`]: sockets
//!   already bound, threads already started, the pool mode sessions were
//!   opened under, the classifier's compiled function list) keep their
//!   old value and are reported as needing a restart;
//! - everything else applies at once to new logins and server connections,
//!   and to each session from its next transaction: a session picks the
//!   new configuration up between transactions, never inside a block, so
//!   a block runs under one set of timeouts and routing rules.
//!
//! Sessions hold an `Arc` of the configuration they run under and compare
//! a generation number (one atomic load) between transactions, so the
//! relay path takes no lock.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};

use crate::auth::Secrets;
use crate::config::{Config, Overrides};
use crate::tls::ClientTls;

/// Keys a reload cannot change; a restart applies them.
pub const RESTART_ONLY: &[&str] = &[
    "listen",
    "workers",
    "max_client_connections",
    "admin.listen",
    "pool.mode",
    "pool.primary.mode",
    "pool.replica.mode",
    "routing.write_functions",
    "routing.parse_cache_entries",
];

/// Where the configuration came from, to read it again.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

/// The configuration in force and what is derived from it.
pub struct Live {
    config: RwLock<Arc<Config>>,
    secrets: RwLock<Arc<Secrets>>,
    tls: RwLock<Option<ClientTls>>,
    generation: AtomicU64,
    source: OnceLock<Source>,
    /// Serialises reloads (SIGHUP and `RELOAD` at once).
    reloading: std::sync::Mutex<()>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

/// One key a reload found changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
    /// False: the key needs a restart and keeps its old value.
    pub applied: bool,
}

/// What a successful reload did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub changes: Vec<Change>,
}

impl Report {
    /// The keys that need a restart, for a log line or a NOTICE.
    pub fn not_applied(&self) -> Vec<&str> {
        self.changes
            .iter()
            .filter(|c| !c.applied)
            .map(|c| c.key.as_str())
            .collect()
    }
}

impl Live {
    pub fn new(config: Arc<Config>) -> Live {
        Live {
            secrets: RwLock::new(Arc::new(Secrets::new(&config))),
            config: RwLock::new(config),
            tls: RwLock::new(None),
            generation: AtomicU64::new(0),
            source: OnceLock::new(),
            reloading: std::sync::Mutex::new(()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn tls(&self) -> Option<ClientTls> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_tls(&self, tls: Option<ClientTls>) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
    }

    /// Bumped by every reload that loaded.
    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// Records where the configuration came from; without it, a reload
    /// has nothing to read.
    pub fn set_source(&self, source: Source) {
        let _ = self.source.set(source);
    }

    /// Reads the configuration again and puts what may change in force.
    /// `apply` runs with the new configuration before it is published,
    /// for what lives outside (pool sizes, primary candidates).
    ///
    /// # Errors
    /// The load error (naming the file, key or value); nothing changed.
    pub(crate) fn reload(&self, apply: impl FnOnce(&Config, &Config)) -> Result<Report, String> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let res = self.reload_inner(apply);
        match &res {
            Ok(r) => {
                self.reloads.fetch_add(1, Relaxed);
                let restart = r.not_applied();
                tracing::info!(
                    changed = r.changes.len(),
                    needs_restart = ?restart,
                    "configuration reloaded"
                );
                for c in &r.changes {
                    tracing::info!(key = %c.key, old = %c.old, new = %c.new,
                        applied = c.applied, "configuration key changed");
                }
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "configuration reload failed; the old configuration stays in force");
            }
        }
        res
    }

    fn reload_inner(&self, apply: impl FnOnce(&Config, &Config)) -> Result<Report, String> {
        let Some(src) = self.source.get() else {
            return Err(
                "this process was not started from a configuration that can be read again".into(),
            );
        };
        let mut new =
            Config::load(src.path.as_deref(), &src.overrides).map_err(|e| e.to_string())?;
        if new.users.is_empty() {
            return Err("no users configured".into());
        }
        let old = self.config();
        let restart = wanted_restart(&old, &new);
        keep_restart_only(&old, &mut new);
        let tls = crate::tls::client_tls(&new)?;
        let mut changes = diff(&old, &new);
        changes.extend(restart);
        let secrets = self.secrets().rebuilt(&new);
        apply(&old, &new);
        *self.secrets.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(secrets);
        self.set_tls(tls);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        self.generation.fetch_add(1, Relaxed);
        Ok(Report { changes })
    }
}

/// Puts the old values of [`RESTART_ONLY`] keys back into `new`.
fn keep_restart_only(old: &Config, new: &mut Config) {
    new.listen = old.listen;
    new.workers = old.workers;
    new.max_client_connections = old.max_client_connections;
    new.admin.listen = old.admin.listen;
    new.pool.mode = old.pool.mode;
    new.pool.primary.mode = old.pool.primary.mode;
    new.pool.replica.mode = old.pool.replica.mode;
    new.routing.write_functions = old.routing.write_functions.clone();
    new.routing.parse_cache_entries = old.routing.parse_cache_entries;
}

/// The keys whose values differ (`new` already holds the old values of
/// restart-only keys: [`wanted_restart`] reports those).
fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let a: std::collections::BTreeMap<String, String> = old.settings().into_iter().collect();
    let b: std::collections::BTreeMap<String, String> = new.settings().into_iter().collect();
    let mut out = Vec::new();
    for (k, v) in &b {
        match a.get(k) {
            Some(o) if o == v => {}
            o => out.push(Change {
                key: k.clone(),
                old: o.cloned().unwrap_or_default(),
                new: v.clone(),
                applied: true,
            }),
        }
    }
    for (k, o) in &a {
        if !b.contains_key(k) {
            out.push(Change {
                key: k.clone(),
                old: o.clone(),
                new: String::new(),
                applied: true,
            });
        }
    }
    if old.users != new.users && !out.iter().any(|c| c.key == "users") {
        out.push(Change {
            key: "users".into(),
            old: "(passwords or flags)".into(),
            new: "(changed)".into(),
            applied: true,
        });
    }
    out
}

/// The restart-only keys the file changed, comparing what was asked for
/// with what is in force.
fn wanted_restart(old: &Config, asked: &Config) -> Vec<Change> {
    let a: std::collections::BTreeMap<String, String> = old.settings().into_iter().collect();
    let b: std::collections::BTreeMap<String, String> = asked.settings().into_iter().collect();
    RESTART_ONLY
        .iter()
        .filter_map(|k| {
            let (o, n) = (a.get(*k), b.get(*k));
            (o != n).then(|| Change {
                key: (*k).to_owned(),
                old: o.cloned().unwrap_or_default(),
                new: n.cloned().unwrap_or_default(),
                applied: false,
            })
        })
        .collect()
}
