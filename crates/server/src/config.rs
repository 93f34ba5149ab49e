//! The proxy's configuration: one struct, loaded from TOML, overridden from
//! the command line, then validated. Unknown keys are errors, durations are
//! written `5s` / `200ms`, and an invalid setup is an `Err`, never a warning.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration was refused; each message names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid --set {0:?}: expected section.key=value")]
    BadOverride(String),
    #[error("invalid URL for {which}: {reason}")]
    BadUrl { which: &'static str, reason: String },
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// Everything the proxy needs to run.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to (the app's `DATABASE_URL` points here).
    pub listen: SocketAddr,
    /// The primary, usually reached through the SSH tunnel on 5433.
    pub primary: BackendAddr,
    /// The local streaming replica.
    pub replica: BackendAddr,
    /// Largest message accepted from a client after authentication.
    pub max_message_bytes: usize,
    /// Client connections accepted at once; more get FATAL 53300.
    pub max_client_connections: usize,
    /// Worker threads, each a single-threaded runtime owning its sessions.
    /// 0 (the default) means half the CPU cores, at least one: pgsplit runs
    /// on the app node beside the app and the replica, and one worker
    /// relays as fast as PgBouncer's single thread.
    pub workers: usize,
    pub timeouts: Timeouts,
    /// Server connection pools (`[pool]`).
    pub pool: Pool,
    pub routing: Routing,
    pub monitor: Monitor,
    pub admin: Admin,
    /// TLS for clients (`[tls]`).
    pub tls: Tls,
    /// Passwords from the server (`[auth]`).
    pub auth: Auth,
    /// Users clients may log in as.
    pub users: Vec<User>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:6432".parse().expect("literal"),
            primary: BackendAddr {
                host: "127.0.0.1".into(),
                port: 5433,
                hosts: Vec::new(),
                sslmode: SslMode::Disable,
                sslrootcert: None,
            },
            replica: BackendAddr {
                host: "127.0.0.1".into(),
                port: 5432,
                hosts: Vec::new(),
                sslmode: SslMode::Disable,
                sslrootcert: None,
            },
            max_message_bytes: pgsplit_protocol::DEFAULT_MAX_MESSAGE_BYTES,
            max_client_connections: 1000,
            workers: 0,
            timeouts: Timeouts::default(),
            pool: Pool::default(),
            routing: Routing::default(),
            monitor: Monitor::default(),
            admin: Admin::default(),
            tls: Tls::default(),
            auth: Auth::default(),
            users: Vec::new(),
        }
    }
}

/// Where a backend server listens.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
    /// Primary only: the candidates to follow a promotion among
    /// (`"host:port"`; `host` and `port` are then the first of them). See
    /// [`failover`](crate::failover).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// TLS to this server (`disable`, the default: the tunnel already
    /// encrypts, and `prefer` would cost an SSLRequest round trip per
    /// connect). Ignored for a unix-socket host, as libpq does.
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA certificates (PEM) to verify the server with. As in libpq,
    /// `require` with a root certificate file given verifies the chain
    /// (acts as `verify-ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
}

/// `sslmode` to a server, with libpq's names and meanings (minus `allow`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    #[default]
    Disable,
    /// TLS when the server offers it, else plaintext; not verified.
    Prefer,
    /// TLS or no connection; verified only when `sslrootcert` is given.
    Require,
    /// TLS with the chain verified against `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the host name (or IP) must match the certificate.
    VerifyFull,
}

impl SslMode {
    /// From a URL's `sslmode` parameter.
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

impl BackendAddr {
    /// The TLS settings of `other` (a candidate parsed from `hosts` takes
    /// its section's).
    pub fn with_tls_of(mut self, other: &BackendAddr) -> BackendAddr {
        self.sslmode = other.sslmode;
        self.sslrootcert.clone_from(&other.sslrootcert);
        self
    }
    /// `"host:port"` (a bracketed IPv6 address, a bare host for port 5432,
    /// or a unix socket directory, which takes port 5432 unless given
    /// after a colon).
    ///
    /// # Errors
    /// A reason for an empty host or a bad port.
    pub fn parse(s: &str) -> Result<BackendAddr, String> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed ["))?;
            (h, after.strip_prefix(':'))
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                _ => (s, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: missing host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?}: bad port {p:?}"))?,
            None => 5432,
        };
        Ok(BackendAddr {
            host: host.to_owned(),
            port,
            hosts: Vec::new(),
            sslmode: SslMode::Disable,
            sslrootcert: None,
        })
    }
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Every wait the proxy does is bounded by one of these.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect plus authentication to a backend.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub connect_timeout: Duration,
    /// A client must finish its startup and authentication within this.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub client_auth_timeout: Duration,
    /// How long shutdown waits for sessions to reach a transaction boundary.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub shutdown_grace: Duration,
    /// A statement (or extended-protocol batch) running longer is
    /// cancelled by the proxy; 0 = off, as in PostgreSQL.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub statement_timeout: Duration,
    /// After a write's or COMMIT's deadline (or the loss of its
    /// connection) the proxy tries this long to learn whether it committed
    /// before answering 08007.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub commit_resolution_timeout: Duration,
    /// Which lost commits the proxy resolves through the transaction's id
    /// (see [`CommitResolution`]).
    pub commit_resolution: CommitResolution,
    /// A client idle inside a transaction block longer than this has its
    /// transaction rolled back and its session ended (FATAL 25P03); 0 = off.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub idle_in_transaction_timeout: Duration,
    /// A session's backend connection unused for this long is closed (and
    /// opened again when needed); 0 = never.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub server_idle_timeout: Duration,
    /// A backend connection older than this is replaced at its next idle
    /// moment; 0 = never.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub server_lifetime: Duration,
    /// Overrides for connections to the primary.
    pub primary: TargetTimeouts,
    /// Overrides for connections to the replica.
    pub replica: TargetTimeouts,
}

/// Per-target overrides of [`Timeouts`] (`[timeouts.primary]`,
/// `[timeouts.replica]`); unset keys use the global value.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TargetTimeouts {
    #[serde(
        deserialize_with = "some_duration",
        serialize_with = "show_some_duration"
    )]
    pub connect_timeout: Option<Duration>,
    #[serde(
        deserialize_with = "some_duration",
        serialize_with = "show_some_duration"
    )]
    pub statement_timeout: Option<Duration>,
    #[serde(
        deserialize_with = "some_duration",
        serialize_with = "show_some_duration"
    )]
    pub server_idle_timeout: Option<Duration>,
    #[serde(
        deserialize_with = "some_duration",
        serialize_with = "show_some_duration"
    )]
    pub server_lifetime: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_timeout: Duration::from_secs(5),
            client_auth_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            statement_timeout: Duration::ZERO,
            commit_resolution_timeout: Duration::from_secs(10),
            commit_resolution: CommitResolution::default(),
            idle_in_transaction_timeout: Duration::ZERO,
            server_idle_timeout: Duration::ZERO,
            server_lifetime: Duration::ZERO,
            primary: TargetTimeouts::default(),
            replica: TargetTimeouts::default(),
        }
    }
}

/// The timeouts that apply to one target, overrides resolved.
#[derive(Debug, Clone, Copy)]
pub struct Effective {
    pub connect_timeout: Duration,
    pub statement_timeout: Option<Duration>,
    pub server_idle_timeout: Option<Duration>,
    pub server_lifetime: Option<Duration>,
}

impl Timeouts {
    /// The timeouts for connections to the primary (`primary = true`) or
    /// the replica.
    pub fn for_target(&self, primary: bool) -> Effective {
        let o = if primary {
            &self.primary
        } else {
            &self.replica
        };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Effective {
            connect_timeout: o.connect_timeout.unwrap_or(self.connect_timeout),
            statement_timeout: nonzero(o.statement_timeout.unwrap_or(self.statement_timeout)),
            server_idle_timeout: nonzero(o.server_idle_timeout.unwrap_or(self.server_idle_timeout)),
            server_lifetime: nonzero(o.server_lifetime.unwrap_or(self.server_lifetime)),
        }
    }
}

/// How server connections are shared between client sessions.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A connection is leased for one cycle (an autocommit statement, a
    /// batch up to Sync, a whole block) and returned when the server is
    /// idle and nothing pins it.
    #[default]
    Transaction,
    /// A connection is leased until the client leaves, then returned.
    Session,
}

/// `[pool]`, with `[pool.primary]` / `[pool.replica]` overriding any key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Pool {
    pub mode: PoolMode,
    /// The most server connections in one pool (one per target, user,
    /// database and startup parameters).
    pub size: usize,
    /// The most server connections to one target over all its pools.
    pub max_server_connections: usize,
    /// Idle connections kept open per pool once it has been used; unset:
    /// 2 for the primary (no connect through the tunnel before a write),
    /// 0 for the local replica.
    pub min_idle: Option<usize>,
    /// How long a statement waits for a connection before 53300.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub checkout_timeout: Duration,
    pub primary: TargetPool,
    pub replica: TargetPool,
}

/// Per-target overrides of [`Pool`]; unset keys use the `[pool]` value.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TargetPool {
    pub mode: Option<PoolMode>,
    pub size: Option<usize>,
    pub max_server_connections: Option<usize>,
    pub min_idle: Option<usize>,
    #[serde(
        deserialize_with = "some_duration",
        serialize_with = "show_some_duration"
    )]
    pub checkout_timeout: Option<Duration>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            mode: PoolMode::Transaction,
            size: 20,
            max_server_connections: 50,
            min_idle: None,
            checkout_timeout: Duration::from_secs(5),
            primary: TargetPool::default(),
            replica: TargetPool::default(),
        }
    }
}

/// The pool settings of one target, overrides resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: usize,
    pub max_server_connections: usize,
    pub min_idle: usize,
    pub checkout_timeout: Duration,
}

impl Pool {
    /// The settings for the primary (`primary = true`) or the replica.
    pub fn for_target(&self, primary: bool) -> PoolSettings {
        let o = if primary {
            &self.primary
        } else {
            &self.replica
        };
        PoolSettings {
            mode: o.mode.unwrap_or(self.mode),
            size: o.size.unwrap_or(self.size),
            max_server_connections: o
                .max_server_connections
                .unwrap_or(self.max_server_connections),
            min_idle: o
                .min_idle
                .or(self.min_idle)
                .unwrap_or(if primary { 2 } else { 0 }),
            checkout_timeout: o.checkout_timeout.unwrap_or(self.checkout_timeout),
        }
    }
}

/// Routing policy knobs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Routing {
    /// Extra functions that write (glob patterns, e.g. `"app.touch_*"`).
    pub write_functions: Vec<String>,
    /// Extended-protocol messages are held until Sync so a batch runs on
    /// one backend; past this size the batch goes to the primary at once.
    pub batch_buffer_bytes: usize,
    /// Capacity of the cache for statements the full parser had to decide.
    pub parse_cache_entries: usize,
    /// How a session reads its own writes (see [`ReadYourWrites`]).
    pub read_your_writes: ReadYourWrites,
    /// In `window` mode, how long after a write the session's reads stay
    /// on the primary.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub read_your_writes_window: Duration,
    /// Whose writes a read must see in `lsn` mode (see
    /// [`ReadYourWritesScope`]).
    pub read_your_writes_scope: ReadYourWritesScope,
    /// Reads avoid a replica lagging more than this (per session:
    /// `SET pgsplit.max_staleness`).
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub max_replica_lag: Duration,
    /// What a read does when the replica is past the bound, down or not
    /// replaying.
    pub on_stale: OnStale,
    /// A read held back by read-your-writes (or `pgsplit.min_lsn`) waits
    /// up to this long for the replica to catch up before it goes to the
    /// primary: worth it when the tunnel's round trip is longer than the
    /// usual replay delay. 0 = never wait.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub max_wait_for_replica: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            write_functions: Vec::new(),
            batch_buffer_bytes: 256 * 1024,
            parse_cache_entries: 1024,
            read_your_writes: ReadYourWrites::Lsn,
            read_your_writes_window: Duration::from_secs(1),
            read_your_writes_scope: ReadYourWritesScope::Session,
            max_replica_lag: Duration::from_secs(5),
            on_stale: OnStale::Primary,
            max_wait_for_replica: Duration::ZERO,
        }
    }
}

/// Which commits the proxy can resolve when the answer to them is lost.
///
/// Resolving needs the transaction's id before the COMMIT is sent. In a
/// block it is asked for behind the block's first write, in the same round
/// trip; an autocommit write has no moment before its commit, so `all` runs
/// it as a one-statement block (BEGIN, the write and the id in one round
/// trip, then COMMIT): one more round trip to the primary per autocommit
/// write, which halves autocommit write throughput over a tunnel with
/// latency. So the default resolves blocks only.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CommitResolution {
    /// Explicit blocks and autocommit writes.
    All,
    /// Explicit blocks only: a lost autocommit write is `08007`.
    #[default]
    Blocks,
    /// Nothing: every lost commit is `08007`.
    Off,
}

/// When a session's reads follow its writes to the primary.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadYourWrites {
    /// Until the replica has replayed the WAL position of the session's
    /// last committed write; then back to the replica.
    #[default]
    Lsn,
    /// Every read after the session's first write.
    Session,
    /// For `read_your_writes_window` after each write.
    Window,
    /// Never: reads always go to the replica.
    Off,
}

impl ReadYourWrites {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadYourWrites::Lsn => "lsn",
            ReadYourWrites::Session => "session",
            ReadYourWrites::Window => "window",
            ReadYourWrites::Off => "off",
        }
    }
}

impl std::str::FromStr for ReadYourWrites {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lsn" => Ok(ReadYourWrites::Lsn),
            "session" => Ok(ReadYourWrites::Session),
            "window" => Ok(ReadYourWrites::Window),
            "off" => Ok(ReadYourWrites::Off),
            _ => Err(()),
        }
    }
}

/// Whose writes a read must see, in `lsn` mode.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadYourWritesScope {
    /// The session's own (the connection's): a new connection starts
    /// with none.
    #[default]
    Session,
    /// The latest write committed through this pgsplit process, whichever
    /// session made it: an app that opens a connection per request reads
    /// what its previous request wrote. Other nodes need the causal token
    /// (`pgsplit.write_lsn` / `pgsplit.min_lsn`).
    Proxy,
}

/// What a read does when the replica is stale.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStale {
    /// Go to the primary; if it is unreachable, serve from the replica
    /// with a warning.
    #[default]
    Primary,
    /// Serve from the replica anyway, with a warning.
    Replica,
    /// Refuse the read.
    Error,
}

/// Whether clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// SSLRequest is answered `N`.
    Disable,
    /// TLS when the client asks (the default once a certificate is set).
    Allow,
    /// A client that logs in without TLS gets `FATAL 28000`.
    Require,
}

/// Where the secrets of users not in `[[users]]` come from (`[auth]`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Only `[[users]]` may log in.
    #[default]
    Config,
    /// Others' stored secrets are read from the servers with `auth_query`.
    AuthQuery,
}

/// `[auth]`: passwords from the server, as PgBouncer's `auth_query`.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub mode: AuthMode,
    /// The login that runs `auth_query` (its own credentials here).
    pub auth_user: Option<String>,
    #[serde(skip_serializing)]
    pub auth_password: Option<String>,
    /// Returns (name, secret) for `$1`; the secret NULL or no row: no such
    /// login. The default calls the function the README gives.
    pub auth_query: String,
    /// Database `auth_query` runs in; default: the client's database.
    pub auth_database: Option<String>,
    /// How long a secret read is used before it is read again.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub cache_ttl: Duration,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            mode: AuthMode::Config,
            auth_user: None,
            auth_password: None,
            auth_query: "SELECT uname, phash FROM pgsplit.user_lookup($1)".into(),
            auth_database: None,
            cache_ttl: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for Auth {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .field("auth_user", &self.auth_user)
            .field("auth_query", &self.auth_query)
            .finish_non_exhaustive()
    }
}

/// Client-facing TLS (`[tls]`): a PEM certificate chain and key.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    /// Default: `allow` when `cert` is set, else `disable`.
    pub mode: Option<TlsMode>,
}

impl Tls {
    pub fn effective_mode(&self) -> TlsMode {
        self.mode.unwrap_or(if self.cert.is_some() {
            TlsMode::Allow
        } else {
            TlsMode::Disable
        })
    }
}

/// The admin HTTP endpoint: `/metrics` and `/health`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// Address to serve on; `"off"` disables it.
    #[serde(
        deserialize_with = "optional_addr",
        serialize_with = "show_optional_addr"
    )]
    pub listen: Option<SocketAddr>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Some("127.0.0.1:9930".parse().expect("literal")),
        }
    }
}

fn optional_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.trim()
        .parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid address {s:?}: {e}")))
}

/// The replication monitor.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Monitor {
    /// How often the WAL positions of both servers are polled.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub interval: Duration,
    /// The primary poll doubles as the heartbeat of the primary link: when
    /// it gets no answer within this, the link is down (a black-holed
    /// tunnel keeps TCP happy, so only an answer proves it alive).
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub heartbeat_timeout: Duration,
    /// Login for the monitor's connections; defaults to the first user's
    /// server credentials.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Database the monitor connects to.
    pub database: String,
    /// With several primary candidates: how long a newly writable one must
    /// stay writable before writes move to it.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub failover_grace: Duration,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_secs(3),
            user: None,
            password: None,
            database: "postgres".into(),
            failover_grace: Duration::from_secs(1),
        }
    }
}

/// How a client proves who it is.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

/// A user clients log in as, and the credentials pgsplit uses for it on
/// the backends.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Plaintext, or a stored verifier (`SCRAM-SHA-256$…`, `md5…`).
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    #[serde(default)]
    pub auth: AuthMethod,
    /// Backend login; defaults to `name`.
    #[serde(default)]
    pub server_user: Option<String>,
    /// Backend password; defaults to `password` when that is plaintext.
    #[serde(default, skip_serializing)]
    pub server_password: Option<String>,
    /// May use the console (the database `pgsplit`).
    #[serde(default)]
    pub admin: bool,
    /// A user whose secret came from `auth_query`: how to log in to the
    /// servers as it without a password (learned at its login).
    #[serde(skip)]
    pub keys: Option<BackendKeys>,
}

/// Credentials for a server login without the password.
#[derive(Clone, PartialEq, Eq)]
pub enum BackendKeys {
    /// SCRAM passthrough: the keys the client's own login revealed.
    Scram(pgsplit_protocol::scram::ClientKeys),
    /// The stored `md5…` hash, which an MD5 challenge needs.
    Md5(String),
}

impl std::fmt::Debug for User {
    /// Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("auth", &self.auth)
            .field("server_user", &self.server_user)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl User {
    /// True when `password` is a stored verifier rather than plaintext.
    pub fn password_is_verifier(&self) -> bool {
        self.password.as_deref().is_some_and(|p| {
            p.starts_with("SCRAM-SHA-256$") || (p.len() == 35 && p.starts_with("md5"))
        })
    }

    /// Login name on the backends.
    pub fn backend_user(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }

    /// Password for the backends, if one is known in plaintext.
    pub fn backend_password(&self) -> Option<&str> {
        self.server_password.as_deref().or_else(|| {
            if self.password_is_verifier() {
                None
            } else {
                self.password.as_deref()
            }
        })
    }
}

/// A duration as it is written in the file (`5s`, `200ms`, `0`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        "0".to_owned()
    } else if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

fn show_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn show_some_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => show_duration(d, s),
        None => s.serialize_str("unset"),
    }
}

fn show_optional_addr<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_str(&a.to_string()),
        None => s.serialize_str("off"),
    }
}

fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// Parses `5s`, `200ms`, `1m`, `0` (plain `0` means zero).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Command-line settings that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    /// `postgres://user:password@host:port/db` for the primary.
    pub primary_url: Option<String>,
    /// `postgres://user:password@host:port/db` for the replica.
    pub replica_url: Option<String>,
    /// `section.key=value` pairs, applied in order.
    pub set: Vec<String>,
}

impl Config {
    /// The primary candidates: `[primary] hosts` when given (the first of
    /// them is also `host`/`port`), otherwise the one primary.
    pub fn primary_candidates(&self) -> Vec<BackendAddr> {
        if self.primary.hosts.is_empty() {
            let mut p = self.primary.clone();
            p.hosts.clear();
            return vec![p];
        }
        self.primary
            .hosts
            .iter()
            .filter_map(|h| BackendAddr::parse(h).ok())
            .map(|a| a.with_tls_of(&self.primary))
            .collect()
    }

    /// Worker threads to run with.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        }
    }

    /// Loads `path` (if any), applies `overrides` and validates.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, key or value at fault.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml(&text, overrides)
    }

    /// Parses TOML text, applies `overrides` and validates.
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn from_toml(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(one_line(&e.to_string())))?;
        let urls = [
            ("primary", overrides.primary_url.as_deref(), "--primary"),
            ("replica", overrides.replica_url.as_deref(), "--replica"),
        ]
        .map(|(section, u, flag)| (section, u.map(|u| parse_url(u, flag)).transpose()));
        // A URL sets its section's address; a `--set` of a key names
        // something more precise (a socket directory, say) and wins.
        let mut url_users = Vec::new();
        for (section, url) in urls {
            let Some(url) = url? else { continue };
            let t = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = t {
                t.insert("host".into(), toml::Value::String(url.addr.host));
                t.insert(
                    "port".into(),
                    toml::Value::Integer(i64::from(url.addr.port)),
                );
                for (k, v) in url.tls {
                    t.insert(k.into(), toml::Value::String(v));
                }
                if !url.hosts.is_empty() {
                    t.insert(
                        "hosts".into(),
                        toml::Value::Array(
                            url.hosts.into_iter().map(toml::Value::String).collect(),
                        ),
                    );
                }
            }
            url_users.push((url.user, url.password));
        }
        for kv in &overrides.set {
            apply_set(&mut table, kv)?;
        }
        // A backend section may give only the host or only the port.
        let defaults = Config::default();
        for (section, d) in [
            ("primary", &defaults.primary),
            ("replica", &defaults.replica),
        ] {
            if let Some(toml::Value::Table(t)) = table.get_mut(section) {
                t.entry("host")
                    .or_insert_with(|| toml::Value::String(d.host.clone()));
                t.entry("port")
                    .or_insert_with(|| toml::Value::Integer(i64::from(d.port)));
            }
        }
        let mut cfg: Config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Parse(one_line(&e.to_string())))?;
        if let Some(l) = overrides.listen {
            cfg.listen = l;
        }
        if let Some(first) = cfg.primary.hosts.first() {
            let first = BackendAddr::parse(first).map_err(|e| ConfigError::Invalid {
                key: "primary.hosts".into(),
                reason: e,
            })?;
            cfg.primary.host = first.host;
            cfg.primary.port = first.port;
        }
        for (user, password) in url_users {
            cfg.add_url_user(user, password);
        }
        cfg.validate()
    }

    /// Quick mode: the credentials in a backend URL are also what clients
    /// must present, so an app changes only host and port. That user is
    /// the one who runs the proxy, so it may use the console.
    fn add_url_user(&mut self, user: Option<String>, password: Option<String>) {
        let Some(name) = user else { return };
        if self.users.iter().any(|u| u.name == name) {
            return;
        }
        let auth = if password.is_some() {
            AuthMethod::ScramSha256
        } else {
            AuthMethod::Trust
        };
        self.users.push(User {
            name,
            password,
            auth,
            server_user: None,
            server_password: None,
            admin: true,
            keys: None,
        });
    }

    /// Every setting as `key = value` in file syntax (`timeouts.connect_timeout`,
    /// `5s`), in key order, for `SHOW CONFIG`; users by name and role only,
    /// never a secret.
    pub fn settings(&self) -> Vec<(String, String)> {
        fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                toml::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
                other => out.push((prefix.to_owned(), other.to_string())),
            }
        }
        let mut out = Vec::new();
        let mut shown = self.clone();
        shown.users.clear();
        if let Ok(v) = toml::Value::try_from(&shown) {
            flatten("", &v, &mut out);
        }
        let users: Vec<String> = self
            .users
            .iter()
            .map(|u| {
                if u.admin {
                    format!("{} (admin)", u.name)
                } else {
                    u.name.clone()
                }
            })
            .collect();
        out.push(("users".into(), users.join(", ")));
        out.sort();
        out
    }

    /// Checks what serde cannot.
    ///
    /// # Errors
    /// `Invalid` naming the key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid("tls", "cert and key go together"));
        }
        if self.tls.effective_mode() != TlsMode::Disable && self.tls.cert.is_none() {
            return Err(invalid(
                "tls.mode",
                "allow and require need tls.cert and tls.key",
            ));
        }
        if self.auth.mode == AuthMode::AuthQuery && self.auth.auth_user.is_none() {
            return Err(invalid(
                "auth.auth_user",
                "auth_query needs the login that runs it",
            ));
        }
        for (section, a) in [("primary", &self.primary), ("replica", &self.replica)] {
            if matches!(a.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
                && a.sslrootcert.is_none()
            {
                return Err(invalid(
                    &format!("{section}.sslrootcert"),
                    "sslmode verify-ca and verify-full need the CA certificate to verify with",
                ));
            }
        }
        if !self.replica.hosts.is_empty() {
            return Err(invalid(
                "replica.hosts",
                "only the primary has candidates; the replica is one server",
            ));
        }
        for h in &self.primary.hosts {
            BackendAddr::parse(h).map_err(|e| invalid("primary.hosts", &e))?;
        }
        if self.primary == self.replica {
            return Err(invalid(
                "replica",
                "the replica is the same address as the primary",
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(invalid("max_message_bytes", "must be at least 1024"));
        }
        if self.max_client_connections == 0 {
            return Err(invalid("max_client_connections", "must be at least 1"));
        }
        for (key, t) in [
            (
                "timeouts.primary.connect_timeout",
                self.timeouts.primary.connect_timeout,
            ),
            (
                "timeouts.replica.connect_timeout",
                self.timeouts.replica.connect_timeout,
            ),
        ] {
            if t.is_some_and(|t| t.is_zero()) {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.monitor.heartbeat_timeout.is_zero() {
            return Err(invalid(
                "monitor.heartbeat_timeout",
                "must be greater than 0",
            ));
        }
        if self.timeouts.connect_timeout.is_zero() {
            return Err(invalid(
                "timeouts.connect_timeout",
                "must be greater than 0",
            ));
        }
        if self.monitor.interval < Duration::from_millis(10) {
            return Err(invalid("monitor.interval", "must be at least 10ms"));
        }
        for (name, primary) in [("primary", true), ("replica", false)] {
            let p = self.pool.for_target(primary);
            let key = |k: &str| {
                let over = if primary {
                    &self.pool.primary
                } else {
                    &self.pool.replica
                };
                let set = match k {
                    "size" => over.size.is_some(),
                    "max_server_connections" => over.max_server_connections.is_some(),
                    "min_idle" => over.min_idle.is_some(),
                    _ => over.checkout_timeout.is_some(),
                };
                if set {
                    format!("pool.{name}.{k}")
                } else {
                    format!("pool.{k}")
                }
            };
            if p.size == 0 {
                return Err(invalid(&key("size"), "must be at least 1"));
            }
            if p.max_server_connections == 0 {
                return Err(invalid(
                    &key("max_server_connections"),
                    "must be at least 1",
                ));
            }
            if p.min_idle > p.size {
                return Err(invalid(&key("min_idle"), "must not exceed the pool size"));
            }
            if p.checkout_timeout.is_zero() {
                return Err(invalid(&key("checkout_timeout"), "must be greater than 0"));
            }
        }
        if self.routing.batch_buffer_bytes == 0 {
            return Err(invalid(
                "routing.batch_buffer_bytes",
                "must be greater than 0",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() {
                return Err(invalid("users.name", "must not be empty"));
            }
            if !seen.insert(&u.name) {
                return Err(invalid(
                    "users.name",
                    &format!("duplicate user {:?}", u.name),
                ));
            }
            match u.auth {
                AuthMethod::Trust => {}
                AuthMethod::ScramSha256 | AuthMethod::Md5 if u.password.is_none() => {
                    return Err(invalid(
                        "users.password",
                        &format!("user {:?} needs a password for {:?}", u.name, u.auth),
                    ));
                }
                AuthMethod::Md5
                    if u.password
                        .as_deref()
                        .is_some_and(|p| p.starts_with("SCRAM-SHA-256$")) =>
                {
                    return Err(invalid(
                        "users.auth",
                        &format!("user {:?}: md5 cannot use a SCRAM verifier", u.name),
                    ));
                }
                _ => {}
            }
        }
        Ok(self)
    }

    /// The monitor's backend login: `[monitor] user`/`password`, else the
    /// first user's server credentials.
    pub fn monitor_login(&self) -> Option<(String, Option<String>)> {
        if let Some(u) = &self.monitor.user {
            return Some((u.clone(), self.monitor.password.clone()));
        }
        let u = self.users.first()?;
        Some((
            u.backend_user().to_owned(),
            u.backend_password().map(str::to_owned),
        ))
    }

    /// Looks a user up by name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Applies `section.key=value` to the parsed file, as `postgres -c` does.
fn apply_set(table: &mut toml::Table, kv: &str) -> Result<(), ConfigError> {
    let (path, raw) = kv
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride(kv.to_owned()))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(ConfigError::BadOverride(kv.to_owned()));
    }
    // A value that parses as TOML (number, bool, array, quoted string) is
    // taken as such; anything else is a bare string (`5s`, `127.0.0.1:1`).
    let value = toml::from_str::<BTreeMap<String, toml::Value>>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut m| m.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut t = table;
    for k in &keys[..keys.len() - 1] {
        let entry = t
            .entry((*k).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| ConfigError::Invalid {
            key: path.to_owned(),
            reason: format!("{k} is not a section"),
        })?;
    }
    t.insert(keys[keys.len() - 1].to_owned(), value);
    Ok(())
}

/// libpq's multi-host URL (`postgres://u:p@h1:5433,h2:5432/db`): the URL
/// with only its first host, and all the hosts when there are several.
fn split_hosts(s: &str) -> (String, Vec<String>) {
    let Some((scheme, rest)) = s.split_once("://") else {
        return (s.to_owned(), Vec::new());
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostlist) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    if !hostlist.contains(',') {
        return (s.to_owned(), Vec::new());
    }
    let hosts: Vec<String> = hostlist.split(',').map(str::to_owned).collect();
    (format!("{scheme}://{userinfo}{}{tail}", hosts[0]), hosts)
}

/// A parsed `postgres://` URL.
struct BackendUrl {
    addr: BackendAddr,
    /// Every host of a libpq multi-host URL (`h1:5433,h2:5432`), when
    /// there are several.
    hosts: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    /// `sslmode` and `sslrootcert` parameters.
    tls: Vec<(&'static str, String)>,
}

fn parse_url(s: &str, which: &'static str) -> Result<BackendUrl, ConfigError> {
    let bad = |reason: &str| ConfigError::BadUrl {
        which,
        reason: reason.to_owned(),
    };
    // `url::Url` rejects libpq's multi-host form: keep the first host for
    // it and the list for the candidates.
    let (s, hosts) = split_hosts(s);
    let url = url::Url::parse(&s).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(bad("scheme must be postgres:// or postgresql://"));
    }
    // Percent-decoding only: a '+' is itself, not a space, in a URL's
    // user, password or host.
    let decode = |v: &str| {
        let v = v.replace('+', "%2B");
        url::form_urlencoded::parse(format!("x={v}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    // As in libpq: a host that decodes to an absolute path, or a `host`
    // parameter, names a unix socket directory.
    let param = url
        .query_pairs()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.into_owned());
    let host = match (param, url.host_str()) {
        (Some(h), _) => h,
        (None, Some(h)) => decode(h),
        (None, None) => String::new(),
    };
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    let user = (!url.username().is_empty()).then(|| decode(url.username()));
    let password = url.password().map(decode);
    for h in &hosts {
        BackendAddr::parse(h).map_err(|e| bad(&e))?;
    }
    let mut tls = Vec::new();
    for (k, v) in url.query_pairs() {
        match &*k {
            "sslmode" => {
                if SslMode::parse(&v).is_none() {
                    return Err(bad(&format!(
                        "sslmode {v:?}: use disable, prefer, require, verify-ca or verify-full"
                    )));
                }
                tls.push(("sslmode", v.into_owned()));
            }
            "sslrootcert" => tls.push(("sslrootcert", v.into_owned())),
            _ => {}
        }
    }
    Ok(BackendUrl {
        hosts,
        addr: BackendAddr {
            host,
            port: url.port().unwrap_or(5432),
            hosts: Vec::new(),
            sslmode: SslMode::Disable,
            sslrootcert: None,
        },
        user,
        password,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_deployment() {
        let c = Config::from_toml("", &Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6432");
        assert_eq!(c.replica.port, 5432);
        assert_eq!(c.primary.port, 5433);
        assert_eq!(c.timeouts.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn sslmode_comes_from_the_url_or_the_section_and_verify_needs_a_root() {
        let o = Overrides {
            primary_url: Some(
                "postgres://a:b@db.example:5433/app?sslmode=verify-full&sslrootcert=/etc/ca.pem"
                    .into(),
            ),
            ..Default::default()
        };
        let c = Config::from_toml("", &o).unwrap();
        assert_eq!(c.primary.sslmode, SslMode::VerifyFull);
        assert_eq!(
            c.primary.sslrootcert.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        assert_eq!(c.replica.sslmode, SslMode::Disable, "the default");
        // Candidates carry their section's TLS settings.
        let c = Config::from_toml(
            "[primary]\nhosts = [\"a:1\", \"b:2\"]\nsslmode = \"require\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert!(c
            .primary_candidates()
            .iter()
            .all(|a| a.sslmode == SslMode::Require));
        let e = Config::from_toml(
            "[replica]\nsslmode = \"verify-ca\"\n",
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("replica.sslrootcert"), "{e}");
        let bad = Overrides {
            replica_url: Some("postgres://a@h/d?sslmode=allow".into()),
            ..Default::default()
        };
        let e = Config::from_toml("", &bad).unwrap_err().to_string();
        assert!(e.contains("sslmode"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml(
            "[timeouts]\nconect_timeout = \"1s\"\n",
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("conect_timeout"), "{e}");
        assert!(!e.contains('\n'));
        let e = Config::from_toml("bogus = 1", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn set_overrides_any_key_with_durations() {
        let o = Overrides {
            set: vec![
                "timeouts.connect_timeout=200ms".into(),
                "max_message_bytes=4096".into(),
                "primary.port=7000".into(),
            ],
            ..Default::default()
        };
        let c = Config::from_toml("", &o).unwrap();
        assert_eq!(c.timeouts.connect_timeout, Duration::from_millis(200));
        assert_eq!(c.max_message_bytes, 4096);
        assert_eq!(c.primary.port, 7000);
        let bad = Overrides {
            set: vec!["timeouts.connect_timeout=soon".into()],
            ..Default::default()
        };
        let e = Config::from_toml("", &bad).unwrap_err().to_string();
        assert!(e.contains("soon"), "{e}");
        let bad = Overrides {
            set: vec!["nokey".into()],
            ..Default::default()
        };
        assert!(matches!(
            Config::from_toml("", &bad),
            Err(ConfigError::BadOverride(_))
        ));
    }

    #[test]
    fn quick_mode_urls_become_users() {
        let o = Overrides {
            primary_url: Some("postgres://app:s%40cret@10.0.0.1:5433/app".into()),
            replica_url: Some("postgresql://app:s%40cret@127.0.0.1:5432/app".into()),
            ..Default::default()
        };
        let c = Config::from_toml("", &o).unwrap();
        assert_eq!(c.primary.host, "10.0.0.1");
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].password.as_deref(), Some("s@cret"));
        assert_eq!(c.users[0].backend_password(), Some("s@cret"));
        assert!(
            !format!("{:?}", c.users[0]).contains("cret"),
            "secrets never printed"
        );
        let bad = Overrides {
            primary_url: Some("mysql://x@y".into()),
            ..Default::default()
        };
        assert!(Config::from_toml("", &bad).is_err());
    }

    #[test]
    fn urls_name_socket_directories_and_set_keys_beat_them() {
        let o = Overrides {
            primary_url: Some("postgres://app:pw@10.0.0.1:5433/app?host=/run/pg".into()),
            replica_url: Some("postgres://app:pw@%2Fvar%2Frun%2Fpostgresql:5499/app".into()),
            ..Default::default()
        };
        let c = Config::from_toml("", &o).unwrap();
        assert_eq!(c.primary.host, "/run/pg");
        assert_eq!(c.primary.port, 5433);
        assert_eq!(c.replica.host, "/var/run/postgresql");
        assert_eq!(c.replica.port, 5499);
        let o = Overrides {
            replica_url: Some("postgres://app:p+w@127.0.0.1:5432/app".into()),
            set: vec!["replica.host=\"/tmp/sockets\"".into()],
            ..Default::default()
        };
        let c = Config::from_toml("", &o).unwrap();
        assert_eq!(c.replica.host, "/tmp/sockets");
        assert_eq!(c.replica.port, 5432, "the rest of the URL stands");
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].password.as_deref(), Some("p+w"));
        let empty = Overrides {
            replica_url: Some("postgres://app:pw@127.0.0.1:5432/app?host=".into()),
            ..Default::default()
        };
        let e = Config::from_toml("", &empty).unwrap_err().to_string();
        assert!(e.contains("--replica") && e.contains("missing host"), "{e}");
    }

    #[test]
    fn validation_rejects_nonsense() {
        let e = Config::from_toml(
            "[replica]\nhost=\"127.0.0.1\"\nport=5433\n",
            &Overrides::default(),
        );
        assert!(e.unwrap_err().to_string().contains("replica"));
        let e = Config::from_toml("[[users]]\nname=\"a\"\n", &Overrides::default());
        assert!(e.unwrap_err().to_string().contains("password"));
        let ok = Config::from_toml(
            "[[users]]\nname=\"a\"\nauth=\"trust\"\n",
            &Overrides::default(),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn a_multi_host_url_lists_the_primary_candidates() {
        let c = Config::from_toml(
            "",
            &Overrides {
                primary_url: Some("postgres://u:p%40@h1:5433,[::1]:6000,h3/db".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        let got: Vec<String> = c
            .primary_candidates()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["h1:5433", "::1:6000", "h3:5432"]);
        assert_eq!((c.primary.host.as_str(), c.primary.port), ("h1", 5433));
        assert_eq!(c.user("u").unwrap().password.as_deref(), Some("p@"));
        let one = Config::from_toml("", &Overrides::default()).unwrap();
        assert_eq!(one.primary_candidates().len(), 1);
        let set = Config::from_toml(
            "[primary]\nhosts = [\"10.0.0.1:5433\", \"127.0.0.1:5432\"]\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            (set.primary.host.as_str(), set.primary.port),
            ("10.0.0.1", 5433)
        );
        for bad in [
            "[primary]\nhosts = [\"h:0\"]\n",
            "[replica]\nhosts = [\"h:1\"]\n",
        ] {
            let e = Config::from_toml(bad, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("hosts"), "{e}");
        }
    }

    /// The shipped example configuration, which the mutations start from.
    const SHIPPED: &str = include_str!("../../../proxy.toml");

    /// A value in place of another: right and wrong types, odd durations,
    /// odd addresses, broken quoting.
    fn odd_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            prop::sample::select(vec![
                "0",
                "-1",
                "99999999999999999999",
                "1.5",
                "true",
                "\"\"",
                "\"0s\"",
                "\"-5s\"",
                "\"1h\"",
                "\"999999999999d\"",
                "\"10 parsecs\"",
                "[]",
                "{}",
                "\"256.0.0.1:1\"",
                "\"[::1]:99999\"",
                "\"postgres://a@b:1/c\"",
                "\"",
                "'''",
                "\"\\u0000\"",
                "nan",
                "inf",
            ])
            .prop_map(str::to_string),
            "[ -~]{0,12}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(pgsplit_protocol::proptest_cases(1000)))]

        /// Any text is a configuration or a one-line error, never a panic.
        #[test]
        fn arbitrary_text_is_a_config_or_a_one_line_error(text in "\\PC{0,300}") {
            if let Err(e) = Config::from_toml(&text, &Overrides::default()) {
                proptest::prop_assert!(!e.to_string().contains('\n'), "{}", e);
            }
        }

        /// The shipped file with one line dropped, or one value replaced by
        /// an odd one, or an odd `--set`: a config or a one-line error.
        #[test]
        fn the_shipped_file_mutated_is_a_config_or_a_one_line_error(
            line in proptest::prelude::any::<proptest::sample::Index>(),
            drop_it in proptest::prelude::any::<bool>(),
            value in odd_value(),
            set in "[a-z_.]{0,24}=[ -~]{0,16}",
        ) {
            let lines: Vec<&str> = SHIPPED.lines().collect();
            let at = line.index(lines.len());
            let mut text = String::new();
            for (i, l) in lines.iter().enumerate() {
                if i == at {
                    if drop_it {
                        continue;
                    }
                    if let Some((key, _)) = l.split_once('=') {
                        text.push_str(&format!("{key}= {value}\n"));
                        continue;
                    }
                }
                text.push_str(l);
                text.push('\n');
            }
            for overrides in [
                Overrides::default(),
                Overrides { set: vec![set.clone()], ..Overrides::default() },
            ] {
                if let Err(e) = Config::from_toml(&text, &overrides) {
                    let msg = e.to_string();
                    proptest::prop_assert!(!msg.contains('\n'), "{}", msg);
                    proptest::prop_assert!(msg.len() < 400, "{}", msg);
                }
            }
        }
    }
}
