//! A primary and a streaming replica of it, built from the cached template, optionally with the
//! replication connection running through a [`Tunnel`] as it crosses the SSH tunnel in
//! production.
//!
//! Lab directory layout:
//!
//! ```text
//! <base>/pgsplit-lab-<pid>-<seq>/
//!     primary/        data directory, copied from the template
//!     primary.log     the primary's stdout + stderr
//!     replica/        data directory, from pg_basebackup of the primary
//!     replica.log
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::account::ServerAccount;
use crate::binaries::PgBinaries;
use crate::command::{self, pg_command};
use crate::conf::{self, REPLICA_NAME, REPLICA_SLOT, SUPERUSER};
use crate::labdir::{self, LabDir};
use crate::quote::sql_literal;
use crate::server::PgServer;
use crate::{template, LabError, LabOptions, Tunnel};

/// How long the replica may take to start streaming after it starts.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(30);

/// Limits for copying the template and taking the base backup.
const COPY_TIMEOUT: Duration = Duration::from_secs(120);

/// Pause between polls of the servers' state.
const POLL: Duration = Duration::from_millis(20);

/// One of the two servers of a [`Cluster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Primary,
    Replica,
}

/// A running primary and a hot-standby replica streaming from it, on loopback ports.
///
/// Dropping the cluster stops both servers (fast shutdown, SIGKILL after a grace period) and
/// deletes its directory. If the process dies without dropping it, the servers still die
/// (parent-death signal) and the next lab deletes the directory.
pub struct Cluster {
    // Field order is drop order: servers first, then the tunnel, then the directory.
    replica: PgServer,
    primary: PgServer,
    tunnel: Option<Tunnel>,
    opts: LabOptions,
    dir: LabDir,
}

impl Cluster {
    /// Starts a primary and a streaming replica and waits until the replica streams.
    ///
    /// The primary's data directory is copied from a cached template (built on first use with
    /// `initdb`, the role and the database); the replica is a `pg_basebackup` of the running
    /// primary streaming from the replication slot `pgsplit_replica`, through a [`Tunnel`] when
    /// [`LabOptions::replicate_through_tunnel`] is set.
    ///
    /// # Errors
    ///
    /// Any step failing: binaries missing, a server not starting (the error quotes its log),
    /// a command failing (with its stderr), or the replica not streaming within 30 s. Whatever
    /// was started is stopped and the directory removed.
    ///
    /// This blocks (about 0.3 s with a warm template on tmpfs); from async code, call it before
    /// entering the runtime or in `spawn_blocking`.
    pub fn start(opts: LabOptions) -> Result<Cluster, LabError> {
        let bins = PgBinaries::locate()?;
        let account = ServerAccount::for_this_process()?;
        let template = template::ensure(&bins, account, &opts)?;
        let base = opts.base_dir.clone().unwrap_or_else(labdir::default_root);
        let dir = LabDir::create(&base, account)?;

        let primary_data = dir.path().join("primary");
        let mut cp = pg_command("cp");
        cp.arg("-a").arg(&template).arg(&primary_data);
        command::run_ok(&mut cp, None, COPY_TIMEOUT)?;

        let mut settings = conf::base_settings(&opts);
        settings.extend(opts.extra_conf.iter().cloned());
        let mut primary = PgServer::new(
            "primary",
            bins.clone(),
            account,
            primary_data,
            dir.path().join("primary.log"),
            settings.clone(),
            &opts.password,
        )?;
        primary.start_on_free_port()?;

        let tunnel = opts
            .replicate_through_tunnel
            .then(|| Tunnel::start(primary.addr()))
            .transpose()
            .map_err(LabError::io("start the replication tunnel"))?;
        let upstream_port = tunnel
            .as_ref()
            .map_or(primary.port(), |tunnel| tunnel.addr().port());

        let replica_data = dir.path().join("replica");
        base_backup(&bins, account, &opts, &primary, &replica_data, dir.path())?;
        account.write_private_file(&replica_data.join("standby.signal"), "")?;
        // The replica shares the primary's settings and adds where to stream from.
        settings.extend(conf::replica_settings(&opts, upstream_port));
        let mut replica = PgServer::new(
            "replica",
            bins,
            account,
            replica_data,
            dir.path().join("replica.log"),
            settings,
            &opts.password,
        )?;
        replica.start_on_free_port()?;

        let cluster = Cluster {
            replica,
            primary,
            tunnel,
            opts,
            dir,
        };
        cluster.wait_streaming(STREAMING_TIMEOUT)?;
        Ok(cluster)
    }

    /// The primary, directly (not through the replication tunnel).
    pub fn primary_addr(&self) -> SocketAddr {
        self.primary.addr()
    }

    pub fn replica_addr(&self) -> SocketAddr {
        self.replica.addr()
    }

    pub fn options(&self) -> &LabOptions {
        &self.opts
    }

    /// The lab directory (see the module docs for its layout).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The tunnel the replica streams through, if [`LabOptions::replicate_through_tunnel`].
    pub fn replication_tunnel(&self) -> Option<&Tunnel> {
        self.tunnel.as_ref()
    }

    /// One of the servers: its pid, data directory, log.
    pub fn server(&self, which: Which) -> &PgServer {
        match which {
            Which::Primary => &self.primary,
            Which::Replica => &self.replica,
        }
    }

    /// Fast shutdown of the primary (SIGKILL if it takes over 10 s).
    ///
    /// # Errors
    ///
    /// [`LabError::Io`] if the process cannot be signalled or reaped.
    pub fn stop_primary(&mut self) -> Result<(), LabError> {
        self.primary.stop().map(drop)
    }

    /// Starts the primary again on the same port and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// [`LabError::ServerStart`] with the log tail, e.g. if the port was taken meanwhile.
    pub fn start_primary(&mut self) -> Result<(), LabError> {
        self.primary.start()
    }

    /// Fast shutdown of the replica.
    ///
    /// # Errors
    ///
    /// [`LabError::Io`] if the process cannot be signalled or reaped.
    pub fn stop_replica(&mut self) -> Result<(), LabError> {
        self.replica.stop().map(drop)
    }

    /// Starts the replica again on the same port and waits until it accepts connections. It
    /// resumes streaming on its own; use [`Cluster::wait_replica_caught_up`] to wait for that.
    ///
    /// # Errors
    ///
    /// [`LabError::ServerStart`] with the log tail.
    pub fn start_replica(&mut self) -> Result<(), LabError> {
        self.replica.start()
    }

    /// Runs `sql` with psql as the bootstrap superuser in [`LabOptions::database`]; returns its
    /// unaligned, tuples-only output (`-At`), without the trailing newline. Statements run one
    /// by one, each in its own transaction unless the SQL says otherwise.
    ///
    /// # Errors
    ///
    /// [`LabError::Command`] with psql's stderr if a statement fails.
    pub fn psql(&self, which: Which, sql: &str) -> Result<String, LabError> {
        self.server(which).psql(&self.opts.database, sql)
    }

    /// Blocks until the replica has replayed all WAL the primary had written when called.
    ///
    /// # Errors
    ///
    /// [`LabError::Timeout`] (with both positions) when `timeout` passes first; psql errors
    /// if either server is down.
    pub fn wait_replica_caught_up(&self, timeout: Duration) -> Result<(), LabError> {
        let target = self.psql(Which::Primary, "SELECT pg_current_wal_lsn()")?;
        let check = format!(
            "SELECT coalesce(pg_last_wal_replay_lsn() >= {}::pg_lsn, false), \
             pg_last_wal_replay_lsn()",
            sql_literal(&target)
        );
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.psql(Which::Replica, &check)?;
            if state.starts_with("t|") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let replayed = state.split('|').nth(1).unwrap_or("none");
                return Err(LabError::Timeout {
                    what: format!(
                        "the replica to replay up to {target} within {timeout:?} \
                         (replayed {replayed})"
                    ),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until the primary reports the replica as streaming.
    fn wait_streaming(&self, timeout: Duration) -> Result<(), LabError> {
        let check = format!(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = {} AND state = 'streaming'",
            sql_literal(REPLICA_NAME)
        );
        let deadline = Instant::now() + timeout;
        loop {
            if self.primary.psql("postgres", &check)? == "1" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!(
                        "the replica to stream from the primary within {timeout:?}; \
                         replica log:\n{}",
                        self.replica.log_tail(30)
                    ),
                });
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Signal both first so the two shutdowns overlap.
        self.replica.request_stop();
        self.primary.request_stop();
        for server in [&mut self.replica, &mut self.primary] {
            if let Err(err) = server.stop() {
                tracing::warn!(server = server.name(), error = %err, "could not stop server");
            }
        }
    }
}

/// `pg_basebackup` of the running primary into `target`, written as the server account, with
/// a replication slot created for the replica.
fn base_backup(
    bins: &PgBinaries,
    account: ServerAccount,
    opts: &LabOptions,
    primary: &PgServer,
    target: &Path,
    lab_dir: &Path,
) -> Result<(), LabError> {
    let mut cmd = pg_command(bins.tool("pg_basebackup"));
    cmd.arg("-D")
        .arg(target)
        .args(["-h", "127.0.0.1", "-p"])
        .arg(primary.port().to_string())
        .args(["-U", SUPERUSER, "-c", "fast", "-X", "stream", "--no-sync"])
        .args(["--create-slot", "--slot", REPLICA_SLOT])
        .env("PGPASSWORD", &opts.password)
        .current_dir(lab_dir);
    account.apply(&mut cmd);
    command::run_ok(&mut cmd, None, COPY_TIMEOUT).map(drop)
}

#[cfg(test)]
mod tests;
