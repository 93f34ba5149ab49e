//! The lab's error type: every variant names the step that failed and carries what is needed to
//! see why (the server log tail, the failing command's stderr) without digging through files.

use std::io;
use std::process::ExitStatus;

/// Something the lab could not do.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// No usable PostgreSQL installation was found.
    #[error(
        "PostgreSQL binaries not found (looked at: {searched}); install them with \
         `apt-get install -y postgresql`, or set PGSPLIT_PG_BINDIR to the directory holding \
         initdb, postgres, pg_basebackup, pg_isready and psql"
    )]
    BinariesMissing {
        /// The places that were tried, for the message.
        searched: String,
    },

    /// We are root, and PostgreSQL refuses to run as root, but the account to run it as is missing.
    #[error(
        "running as root, and there is no `{name}` OS account to run PostgreSQL as (it refuses to \
         run as root); installing the postgresql package creates it"
    )]
    NoServerAccount {
        /// The account that was looked up.
        name: String,
    },

    /// A file-system or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done, e.g. "create lab directory /tmp/pgsplit-lab-1-0".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The proxy configuration the lab built was refused.
    #[error("pgsplit configuration: {0}")]
    Config(String),

    /// A PostgreSQL server exited during start-up or never became ready.
    #[error("{name} server did not start: {reason}\n--- last lines of its log ---\n{log_tail}")]
    ServerStart {
        /// Which server ("primary", "replica", "template").
        name: String,
        /// What was observed (exit status, or how long we waited).
        reason: String,
        /// The end of the server's log, where PostgreSQL says why.
        log_tail: String,
    },

    /// A PostgreSQL client tool (initdb, psql, pg_basebackup, …) exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line, with the password left out.
        cmd: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },

    /// A bounded wait ran out.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited, with the last observed state where that helps.
        what: String,
    },
}

impl LabError {
    /// Adapter for `map_err`: wraps an `io::Error` with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}
