//! A local PostgreSQL primary with a streaming replica, and a fault-injecting TCP tunnel, for
//! pgsplit's tests, benches and `pgsplit lab`.
//!
//! Everything runs from the installed PostgreSQL programs on loopback ports picked at run time,
//! with unix sockets off, so any number of labs can run side by side. Servers are children of
//! the process that started them and die with it, even when it is killed.
//!
//! Environment: `PGSPLIT_PG_BINDIR` picks the PostgreSQL installation (see [`binaries`]);
//! `PGSPLIT_LAB_KEEP` keeps lab directories and server logs after the cluster is dropped.
//!
//! ```no_run
//! use std::time::Duration;
//! use pgsplit_lab::{Cluster, LabOptions, Which};
//!
//! let mut lab = Cluster::start(LabOptions::default())?;
//! lab.psql(Which::Primary, "CREATE TABLE t (id int); INSERT INTO t VALUES (1);")?;
//! lab.wait_replica_caught_up(Duration::from_secs(10))?;
//! assert_eq!(lab.psql(Which::Replica, "SELECT count(*) FROM t")?, "1");
//!
//! // Replication crosses a tunnel, as it crosses the SSH tunnel in production.
//! let tunnel = lab.replication_tunnel().expect("on by default");
//! tunnel.blackhole(); // WAL stops flowing, nothing disconnects
//! tunnel.restore();
//!
//! lab.stop_primary()?; // the replica keeps serving reads
//! lab.start_primary()?;
//! # Ok::<(), pgsplit_lab::LabError>(())
//! ```
//!
//! # Layout
//!
//! - [`binaries`] finds `initdb`, `postgres`, `pg_basebackup`, `pg_isready` and `psql`.
//! - `template` builds, once per PostgreSQL version and identity options, an initialised data
//!   directory with the role and database, under a file lock so parallel test processes share it.
//! - [`cluster`] copies the template into a fresh lab directory (`labdir`), starts the
//!   primary, takes a `pg_basebackup` for the replica, points the replica at the primary
//!   (through a [`Tunnel`] if asked) and waits until it streams.
//! - [`server`] runs one postmaster: writes its settings (`conf`), forks it as the `postgres`
//!   account when we are root (`account`) from a dedicated thread (`spawner`) with a
//!   parent-death signal (`sys`), waits for readiness, stops it.
//! - [`tunnel`] relays TCP on its own runtime thread and injects faults: cut, black hole, delay.
//! - [`proxy`] runs pgsplit in-process on its own runtime thread; [`stack`] puts the cluster, a
//!   tunnel on the path to the primary and the proxy together (the tests' and `pgsplit lab`'s
//!   unit).
//! - [`ports`] hands out free loopback ports; `command` runs PostgreSQL's client programs with
//!   a clean environment and a time limit; `quote` quotes values for conf files, conninfo and SQL.

pub mod binaries;
pub mod certs;
pub mod cluster;
pub mod ports;
pub mod proxy;
pub mod server;
pub mod stack;
pub mod tunnel;

mod account;
mod command;
mod conf;
mod error;
mod labdir;
mod options;
mod quote;
mod spawner;
mod sys;
pub use sys::raise_open_files;
mod template;

pub use binaries::PgBinaries;
pub use cluster::{Cluster, Which};
pub use error::LabError;
pub use labdir::KEEP_ENV;
pub use options::LabOptions;
pub use server::PgServer;
pub use tunnel::{Tunnel, TunnelMode};
