//! What a lab cluster looks like from the outside: its login role, database, authentication and
//! the few knobs tests turn.

use std::path::PathBuf;

/// How to build a [`Cluster`](crate::Cluster).
///
/// `user`, `password`, `database` and `auth` are baked into the cached template data directory
/// (see [`Cluster::start`](crate::Cluster::start)); changing them costs one `initdb` the first
/// time a combination is used.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Login role the application connects as: not a superuser, but `CREATEDB`, and owner of
    /// `database`. The bootstrap superuser is always `postgres`, with the same password.
    pub user: String,
    /// Password of `user` and of `postgres`.
    pub password: String,
    /// Database owned by `user`; [`Cluster::psql`](crate::Cluster::psql) runs there too.
    pub database: String,
    /// `pg_hba.conf` method for TCP connections (client and replication): `scram-sha-256`,
    /// `md5`, `password` or `trust`. With `md5`, passwords are stored as MD5 so the server really
    /// sends an MD5 challenge (a SCRAM-stored password would silently upgrade it to SCRAM).
    pub auth: String,
    /// Point the replica's `primary_conninfo` at a [`Tunnel`](crate::Tunnel) in front of the
    /// primary, as in production where WAL crosses the SSH tunnel: cutting that tunnel stops
    /// replication.
    pub replicate_through_tunnel: bool,
    /// Directory the lab directory is created in. When `None`: `/dev/shm` if it has at least
    /// 1 GiB free (much faster than a disk for the ~1,300 files of a data directory), else
    /// `std::env::temp_dir()`. When run as root it must be traversable by the `postgres` account.
    pub base_dir: Option<PathBuf>,
    /// Extra `postgresql.conf` settings for both servers, written after the lab's own, so they
    /// win.
    pub extra_conf: Vec<(String, String)>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            user: "app".to_owned(),
            password: "app".to_owned(),
            database: "app".to_owned(),
            auth: "scram-sha-256".to_owned(),
            replicate_through_tunnel: true,
            base_dir: None,
            extra_conf: Vec::new(),
        }
    }
}
