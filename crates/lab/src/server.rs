//! One PostgreSQL server process: writing its per-start settings, starting `postgres -D`
//! directly (so it stays our child), waiting until it accepts connections, and stopping it.
//!
//! The postmaster is never daemonised (no `pg_ctl start`): it is forked from the server's own
//! spawner thread with a parent-death signal, so it dies with its owner even when the test
//! process is killed. Its stdout and stderr go to a log file next to the data directory.

use std::fs::{self, File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::account::ServerAccount;
use crate::binaries::PgBinaries;
use crate::command::{self, pg_command};
use crate::conf::{self, SUPERUSER};
use crate::ports;
use crate::spawner::Spawner;
use crate::LabError;

/// How long a server may take to accept connections (a replica must first reach consistency).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a fast shutdown may take before the postmaster is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Limit for one psql run; set-up and inspection queries are small.
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

/// Fresh ports tried when the picked one turns out to be taken by the time the server binds.
const PORT_ATTEMPTS: usize = 5;

/// Log lines quoted in start-up errors.
const LOG_TAIL_LINES: usize = 30;

/// A PostgreSQL server (postmaster) on a loopback port, owned by this process. Reach a
/// cluster's servers with [`Cluster::server`](crate::Cluster::server).
///
/// Dropping it stops the server (fast shutdown, then SIGKILL after a grace period).
pub struct PgServer {
    /// "primary", "replica" or "template": names the server in errors and logs.
    name: String,
    bins: PgBinaries,
    account: ServerAccount,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    /// Written to [`conf::LAB_CONF`] before every start.
    settings: Vec<(String, String)>,
    /// Password of the bootstrap superuser, for [`PgServer::psql`].
    superuser_password: String,
    /// The running postmaster; `None` while stopped.
    postmaster: Option<Child>,
    spawner: Spawner,
}

impl PgServer {
    pub(crate) fn new(
        name: &str,
        bins: PgBinaries,
        account: ServerAccount,
        data_dir: PathBuf,
        log_path: PathBuf,
        settings: Vec<(String, String)>,
        superuser_password: &str,
    ) -> Result<Self, LabError> {
        let spawner = Spawner::new(name).map_err(LabError::io(format!(
            "start the {name} server's spawner thread"
        )))?;
        Ok(PgServer {
            name: name.to_owned(),
            bins,
            account,
            data_dir,
            log_path,
            port: 0,
            settings,
            superuser_password: superuser_password.to_owned(),
            postmaster: None,
            spawner,
        })
    }

    /// "primary", "replica" or "template".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        ports::loopback(self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process id of the postmaster, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory of the server's unix socket (`.s.PGSQL.<port>`): the lab
    /// directory, shared by both servers of a lab, which listen on
    /// different ports.
    pub fn socket_dir(&self) -> &Path {
        self.data_dir.parent().unwrap_or(&self.data_dir)
    }

    /// Where the server's stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server log (empty if there is none yet).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `sql` (one or more statements, each in its own transaction) with psql as the
    /// bootstrap superuser in `database`; returns unaligned, tuples-only output.
    ///
    /// # Errors
    ///
    /// [`LabError::Command`] with psql's stderr if any statement fails.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, LabError> {
        let mut cmd = pg_command(self.bins.tool("psql"));
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(["-U", SUPERUSER, "-d", database, "-f", "-"])
        .env("PGPASSWORD", &self.superuser_password);
        let out = command::run_ok(&mut cmd, Some(sql), PSQL_TIMEOUT)?;
        Ok(out.trim_end_matches('\n').to_owned())
    }

    /// Starts on a fresh free port, retrying with another port if the picked one was taken
    /// before the server could bind it.
    pub(crate) fn start_on_free_port(&mut self) -> Result<(), LabError> {
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            self.port = ports::free_port().map_err(LabError::io("pick a free loopback port"))?;
            match self.start() {
                Err(err) if is_port_conflict(&err) => {
                    tracing::debug!(server = %self.name, port = self.port, "port taken, retrying");
                    last = Some(err);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| LabError::Timeout {
            what: format!("a free port for the {} server", self.name),
        }))
    }

    /// Starts the server on its current port and waits until it accepts connections.
    /// Does nothing if it is already running.
    pub(crate) fn start(&mut self) -> Result<(), LabError> {
        if self.postmaster.is_some() {
            return Ok(());
        }
        self.account.write_private_file(
            &self.data_dir.join(conf::LAB_CONF),
            &conf::render(&self.settings, self.port, self.socket_dir()),
        )?;
        let log = open_log(&self.log_path)?;
        let log_err = log
            .try_clone()
            .map_err(LabError::io(format!("open {}", self.log_path.display())))?;

        let mut cmd = pg_command(self.bins.tool("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .current_dir(&self.data_dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        self.account.apply(&mut cmd);
        let child = self
            .spawner
            .spawn(cmd)
            .map_err(LabError::io(format!("start the {} server", self.name)))?;
        tracing::debug!(server = %self.name, pid = child.id(), port = self.port, "postmaster started");
        self.postmaster = Some(child);

        if let Err(err) = self.wait_ready() {
            self.kill();
            return Err(err);
        }
        Ok(())
    }

    /// Polls `pg_isready` until the server accepts connections, failing early if it exits.
    fn wait_ready(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.postmaster.as_mut().and_then(|c| c.try_wait().ok()?) {
                self.postmaster = None;
                return Err(self.start_error(format!("postmaster exited ({status})")));
            }
            let mut probe = pg_command(self.bins.tool("pg_isready"));
            probe
                .args(["-q", "-t", "2", "-h", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .args(["-U", SUPERUSER]);
            let finished = command::run(&mut probe, None, Duration::from_secs(5))?;
            if finished.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(
                    self.start_error(format!("not accepting connections after {READY_TIMEOUT:?}"))
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn start_error(&self, reason: String) -> LabError {
        LabError::ServerStart {
            name: self.name.clone(),
            reason,
            log_tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// Asks for a fast shutdown without waiting; [`PgServer::stop`] then waits. Lets a
    /// cluster shut both servers down at once.
    pub(crate) fn request_stop(&mut self) {
        if let Some(pid) = self.pid() {
            // SIGINT is PostgreSQL's "fast" shutdown: abort sessions, checkpoint, exit.
            let _ = crate::sys::send_signal(pid, libc::SIGINT);
        }
    }

    /// Fast shutdown, waiting up to a grace period before SIGKILL. Returns whether the server
    /// shut down cleanly (a killed server needs crash recovery on its next start).
    pub(crate) fn stop(&mut self) -> Result<bool, LabError> {
        let Some(child) = self.postmaster.as_mut() else {
            return Ok(true);
        };
        let context = || format!("stop the {} server", self.name);
        if child.try_wait().map_err(LabError::io(context()))?.is_none() {
            let _ = crate::sys::send_signal(child.id(), libc::SIGINT);
        }
        let deadline = Instant::now() + STOP_GRACE;
        let clean = loop {
            if child.try_wait().map_err(LabError::io(context()))?.is_some() {
                break true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(server = %self.name, "fast shutdown timed out, killing postmaster");
                child.kill().map_err(LabError::io(context()))?;
                child.wait().map_err(LabError::io(context()))?;
                break false;
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.postmaster = None;
        tracing::debug!(server = %self.name, clean, "postmaster stopped");
        Ok(clean)
    }

    /// SIGKILL and reap, for start-up failures.
    fn kill(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!(server = %self.name, error = %err, "could not stop server");
            self.kill();
        }
    }
}

fn open_log(path: &Path) -> Result<File, LabError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(LabError::io(format!("open {}", path.display())))
}

/// Whether a start failed because another process bound the port first.
fn is_port_conflict(err: &LabError) -> bool {
    matches!(err, LabError::ServerStart { log_tail, .. }
        if log_tail.contains("could not bind") || log_tail.contains("Address already in use"))
}
