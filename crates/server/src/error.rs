//! The proxy's errors, and the one place that turns them into the
//! ErrorResponse a client sees. SQLSTATEs are part of the contract, so no
//! other module picks a code.

use bytes::BytesMut;
use pgsplit_protocol::encode::{self, Severity};
use pgsplit_protocol::sqlstate::*;
use pgsplit_protocol::ProtoError;
use pgsplit_router::Target;

use crate::backend::BackendError;
use crate::replication::Stale;

/// Everything that can go wrong in a session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client broke the protocol (bad length, unknown message, …).
    #[error("{0}")]
    Protocol(#[from] ProtoError),
    /// The client's socket failed; nothing can be sent to it.
    #[error("client connection: {0}")]
    ClientIo(#[source] std::io::Error),
    /// The client went away mid-session (EOF).
    #[error("client disconnected")]
    ClientGone,
    /// The startup packet had no user.
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// Unknown user or wrong password: deliberately the same message.
    #[error("password authentication failed for user \"{user}\"")]
    AuthFailed { user: String },
    #[error("replication connections are not supported by pgsplit")]
    Replication,
    #[error("sorry, too many clients already")]
    TooManyClients,
    #[error("canceling authentication due to timeout")]
    AuthTimeout,
    #[error("terminating connection due to administrator command")]
    ShuttingDown,
    /// A statement needs the primary and it cannot be reached.
    #[error("primary unreachable: writes are unavailable; reads continue")]
    PrimaryUnreachable(#[source] BackendError),
    /// Neither server can be reached.
    #[error("no server reachable: primary and replica are both unavailable")]
    NothingReachable(#[source] BackendError),
    /// A server refused the login with its own error (3D000, 28P01 for the
    /// proxy's backend credentials, 53300, 57P03, …): passed on as is.
    #[error("{message}")]
    BackendRefused {
        target: Target,
        code: String,
        message: String,
    },
    /// A backend connection died while a statement was running on it.
    #[error("connection to the {} lost while running the statement", target_name(*target))]
    BackendLost { target: Target },
    /// The backend holding the client's transaction block died; the
    /// server rolled the transaction back.
    #[error("connection to the {} lost inside a transaction block; the transaction was rolled back", target_name(*target))]
    BackendLostInBlock { target: Target },
    /// The client's block was lost with its backend; statements are refused
    /// until the client ends the block, as in a failed block on one server.
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    InFailedBlock,
    /// The pinned primary connection died: the session's LISTENs, temporary
    /// tables and session locks are gone, so the session ends as it would
    /// on one server.
    #[error("connection to the primary lost; session state (LISTEN, temporary tables, session locks) is gone")]
    PinnedStateLost,
    /// A backend died in the middle of a message already partly relayed;
    /// the client connection is closed without another word.
    #[error("connection to the {} lost in the middle of a message", target_name(*target))]
    StreamBroken { target: Target },
    /// Not implemented yet: refused rather than done wrong.
    #[error("{0} is not supported by pgsplit")]
    NotSupported(&'static str),
    /// The proxy's `statement_timeout` passed.
    #[error("canceling statement due to statement timeout")]
    StatementTimeout,
    /// A COMMIT whose answer was lost, resolved: the server rolled the
    /// transaction back.
    #[error("connection to the primary lost after the commit was sent; it did not commit: the transaction was rolled back")]
    CommitRolledBack,
    /// A write the proxy ran as a one-statement block lost its connection
    /// before the proxy sent COMMIT: nothing of it committed.
    #[error("connection to the primary lost before the write committed; the transaction was rolled back")]
    WriteRolledBack,
    /// A write or COMMIT whose outcome could not be learned in time.
    #[error("the outcome of the transaction is unknown: the connection to the primary was lost after the commit was sent and it could not be resolved in time")]
    TransactionResolutionUnknown,
    #[error("terminating connection due to idle-in-transaction timeout")]
    IdleInTransactionTimeout,
    #[error("prepared statement \"{0}\" already exists")]
    DuplicateStatement(String),
    #[error("prepared statement \"{0}\" does not exist")]
    UnknownStatement(String),
    #[error("portal \"{0}\" does not exist")]
    UnknownPortal(String),
    #[error("unrecognized configuration parameter \"pgsplit.{0}\"")]
    UnknownVariable(String),
    #[error("invalid value for parameter \"pgsplit.{name}\": \"{value}\"")]
    InvalidVariable {
        name: String,
        value: String,
        expected: &'static str,
    },
    #[error("parameter \"pgsplit.{0}\" cannot be changed")]
    ReadOnlyVariable(String),
    /// A session setting that holds for the client could not be applied on
    /// the server that would run the next statement: the statement is not
    /// run there under other settings than the client's. The server's own
    /// SQLSTATE is passed on.
    #[error("session setting `{setting}` could not be applied on the {}: the statement was not run", target_name(*target))]
    SettingNotApplied {
        setting: String,
        target: Target,
        code: String,
        message: String,
    },
    /// No server connection of the session's pool was free in time.
    #[error("no server connection free in the {} pool within {waited:?} (pool size {size}): the statement was not sent", target_name(*target))]
    PoolFull {
        target: Target,
        waited: std::time::Duration,
        size: usize,
    },
    /// `[tls] mode = "require"` and the client did not ask for TLS.
    #[error(
        "TLS required: pgsplit accepts only encrypted connections (connect with sslmode=require)"
    )]
    TlsRequired,
    /// A login to the console by a user without `admin = true`.
    #[error(
        "permission denied: only admin users ([[users]] admin = true) may use the pgsplit console"
    )]
    NotAdmin,
    /// A console command that does not exist.
    #[error("unknown console command: {0}")]
    ConsoleUnknown(String),
    /// `KILL_CLIENT` of a client that is not connected.
    #[error("no client with id {0}")]
    NoSuchClient(String),
    /// `auth_query` could not be run on either server: the password
    /// cannot be checked.
    #[error("cannot check the password: {0}")]
    AuthQueryFailed(String),
    /// `RELOAD` (or SIGHUP) found a configuration that does not load.
    #[error("configuration not reloaded: {0}")]
    ReloadFailed(String),
    /// `PAUSE` waited its limit for transactions to end.
    #[error("{0} sessions are still inside a transaction after {1:?}; new transactions stay held")]
    PauseIncomplete(usize, std::time::Duration),
    /// `RESUME` without a `PAUSE`.
    #[error("pgsplit is not paused")]
    NotPaused,
    /// Ended from the console (`KILL_CLIENT`).
    #[error("terminating connection due to administrator command (KILL_CLIENT from the pgsplit console)")]
    Killed,
    /// `on_stale = "error"` and the replica is past the session's bound.
    #[error("read refused: {0} (max staleness {1:?})")]
    StaleReplica(Stale, std::time::Duration),
}

/// Warnings the proxy sends the client (NoticeResponse, SQLSTATE 01000)
/// when it served a read it would rather not have.
#[derive(Debug, thiserror::Error)]
pub enum Warning {
    #[error("pgsplit: read served by a stale replica: {0}")]
    ServedStale(Stale),
    #[error("pgsplit: primary unreachable; read served by the replica, which has not replayed this session's last write")]
    ServedBehindWrites,
}

impl Warning {
    /// Appends this warning as a NoticeResponse.
    pub fn write_to(&self, buf: &mut BytesMut) {
        encode::notice_response(buf, Severity::Warning, WARNING, &self.to_string());
    }
}

/// "primary" / "replica", for messages.
pub fn target_name(t: Target) -> &'static str {
    match t {
        Target::Primary => "primary",
        Target::Replica => "replica",
    }
}

impl Error {
    /// Severity and SQLSTATE the client sees for this error.
    pub fn client_code(&self) -> (Severity, &str) {
        match self {
            Error::Protocol(ProtoError::UnsupportedProtocol { .. }) => {
                (Severity::Fatal, FEATURE_NOT_SUPPORTED)
            }
            Error::PinnedStateLost | Error::StreamBroken { .. } => {
                (Severity::Fatal, CONNECTION_FAILURE)
            }
            Error::Protocol(_) | Error::ClientIo(_) | Error::ClientGone => {
                (Severity::Fatal, PROTOCOL_VIOLATION)
            }
            Error::NoUser => (Severity::Fatal, INVALID_AUTHORIZATION_SPECIFICATION),
            Error::AuthFailed { .. } => (Severity::Fatal, INVALID_PASSWORD),
            Error::Replication => (Severity::Fatal, FEATURE_NOT_SUPPORTED),
            Error::TooManyClients => (Severity::Fatal, TOO_MANY_CONNECTIONS),
            Error::PoolFull { .. } => (Severity::Error, TOO_MANY_CONNECTIONS),
            Error::AuthTimeout => (Severity::Fatal, QUERY_CANCELED),
            Error::ShuttingDown => (Severity::Fatal, ADMIN_SHUTDOWN),
            Error::PrimaryUnreachable(_) | Error::NothingReachable(_) => {
                (Severity::Error, SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)
            }
            Error::BackendRefused { code, .. } | Error::SettingNotApplied { code, .. } => {
                (Severity::Error, code.as_str())
            }
            Error::BackendLost { .. }
            | Error::BackendLostInBlock { .. }
            | Error::CommitRolledBack
            | Error::WriteRolledBack => (Severity::Error, CONNECTION_FAILURE),
            Error::NotSupported(_) => (Severity::Error, FEATURE_NOT_SUPPORTED),
            Error::InFailedBlock => (Severity::Error, IN_FAILED_SQL_TRANSACTION),
            Error::UnknownVariable(_) => (Severity::Error, UNDEFINED_OBJECT),
            Error::StatementTimeout => (Severity::Error, QUERY_CANCELED),
            Error::TransactionResolutionUnknown => {
                (Severity::Error, TRANSACTION_RESOLUTION_UNKNOWN)
            }
            Error::IdleInTransactionTimeout => {
                (Severity::Fatal, IDLE_IN_TRANSACTION_SESSION_TIMEOUT)
            }
            Error::DuplicateStatement(_) => (Severity::Error, DUPLICATE_PREPARED_STATEMENT),
            Error::UnknownStatement(_) => (Severity::Error, INVALID_SQL_STATEMENT_NAME),
            Error::UnknownPortal(_) => (Severity::Error, INVALID_CURSOR_NAME),
            Error::InvalidVariable { .. } => (Severity::Error, INVALID_PARAMETER_VALUE),
            Error::ReadOnlyVariable(_) => (Severity::Error, CANT_CHANGE_RUNTIME_PARAM),
            Error::StaleReplica(..) => (Severity::Error, OBJECT_NOT_IN_PREREQUISITE_STATE),
            Error::NotAdmin | Error::TlsRequired => {
                (Severity::Fatal, INVALID_AUTHORIZATION_SPECIFICATION)
            }
            Error::ConsoleUnknown(_) => (Severity::Error, SYNTAX_ERROR),
            Error::NoSuchClient(_) => (Severity::Error, UNDEFINED_OBJECT),
            Error::Killed => (Severity::Fatal, ADMIN_SHUTDOWN),
            Error::ReloadFailed(_) => (Severity::Error, CONFIG_FILE_ERROR),
            Error::AuthQueryFailed(_) => {
                (Severity::Fatal, SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)
            }
            Error::PauseIncomplete(..) | Error::NotPaused => {
                (Severity::Error, OBJECT_NOT_IN_PREREQUISITE_STATE)
            }
        }
    }

    /// A hint line for the client, where one helps.
    fn hint(&self) -> Option<String> {
        match self {
            Error::PrimaryUnreachable(cause) | Error::NothingReachable(cause) => {
                Some(format!("cause: {cause}"))
            }
            Error::InvalidVariable { expected, .. } => Some(format!("expected {expected}")),
            Error::SettingNotApplied { message, .. } => Some(format!(
                "the server said: {message}; RESET the setting, or retry once the server has what it names"
            )),
            Error::ReloadFailed(_) => {
                Some("the configuration in force is unchanged; fix the file and RELOAD again".into())
            }
            Error::PauseIncomplete(..) => Some(
                "PAUSE again to go on waiting, SHOW CLIENTS to see who, or RESUME".into(),
            ),
            Error::ConsoleUnknown(_) => Some(format!(
                "the console knows: {}",
                crate::console::COMMANDS.join(", ")
            )),
            Error::StaleReplica(..) => Some(
                "SET pgsplit.max_staleness to accept older data, or send the read to the \
                 primary with /* pgsplit:primary */"
                    .into(),
            ),
            _ => None,
        }
    }

    /// Appends this error as an ErrorResponse. `fatal` forces FATAL (used
    /// during startup, where every error ends the connection).
    pub fn write_to(&self, buf: &mut BytesMut, fatal: bool) {
        let (sev, code) = self.client_code();
        let sev = if fatal { Severity::Fatal } else { sev };
        let msg = self.to_string();
        match self.hint() {
            Some(h) => encode::error_response_hint(buf, sev, code, &msg, &h),
            None => encode::error_response(buf, sev, code, &msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_codes() {
        let unreachable = Error::PrimaryUnreachable(BackendError::Closed);
        assert_eq!(unreachable.client_code().1, "08001");
        assert!(unreachable.to_string().contains("reads continue"));
        let a = Error::AuthFailed { user: "x".into() };
        assert_eq!(a.client_code(), (Severity::Fatal, "28P01"));
        assert_eq!(
            Error::Protocol(ProtoError::BadLength { len: 1, max: 2 }).client_code(),
            (Severity::Fatal, "08P01")
        );
        assert_eq!(
            Error::BackendLostInBlock {
                target: Target::Primary
            }
            .client_code()
            .1,
            "08006"
        );
        let refused = Error::BackendRefused {
            target: Target::Replica,
            code: "3D000".into(),
            message: "database \"nope\" does not exist".into(),
        };
        let mut b = BytesMut::new();
        refused.write_to(&mut b, true);
        let f = pgsplit_protocol::decode(&mut b, 1 << 16).unwrap().unwrap();
        let e = pgsplit_protocol::backend::ErrorFields::parse(f.body()).unwrap();
        assert_eq!((e.severity, e.code), ("FATAL", "3D000"));
    }
}
