//! The configuration the lab gives PostgreSQL: `postgresql.conf` settings, `pg_hba.conf`, and
//! the replica's connection back to the primary.
//!
//! Per-server settings live in their own file, [`LAB_CONF`], included from `postgresql.conf`
//! and rewritten on every start, so the port can change between starts and a copied data
//! directory never keeps its source's identity.

use std::fmt::Write as _;

use crate::quote;
use crate::LabOptions;

/// File in each data directory holding the lab's settings; `postgresql.conf` includes it last.
pub(crate) const LAB_CONF: &str = "pgsplit-lab.conf";

/// Line appended to the template's `postgresql.conf`.
pub(crate) const INCLUDE_LAB_CONF: &str = "\ninclude_if_exists = 'pgsplit-lab.conf'\n";

/// `application_name` the replica streams under, to find it in `pg_stat_replication`.
pub(crate) const REPLICA_NAME: &str = "pgsplit_replica";

/// Physical replication slot the replica streams from, so the primary keeps WAL the replica
/// has not received while it is stopped or its tunnel is cut.
pub(crate) const REPLICA_SLOT: &str = "pgsplit_replica";

/// The bootstrap superuser; the lab uses it for set-up, inspection and replication.
pub(crate) const SUPERUSER: &str = "postgres";

/// Settings both servers run with, before `extra_conf`.
pub(crate) fn base_settings(opts: &LabOptions) -> Vec<(String, String)> {
    let password_encryption = if opts.auth == "md5" {
        "md5"
    } else {
        "scram-sha-256"
    };
    [
        ("listen_addresses", "127.0.0.1"),
        ("max_connections", "100"),
        ("shared_buffers", "32MB"),
        ("password_encryption", password_encryption),
        // Test speed; durability across OS crashes is not something the lab tests.
        ("fsync", "off"),
        ("full_page_writes", "off"),
        ("wal_level", "replica"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_keep_size", "256MB"),
        ("hot_standby", "on"),
        ("hot_standby_feedback", "on"),
        // Report replay progress often so lag views are fresh.
        ("wal_receiver_status_interval", "1s"),
        // Reconnect quickly after the primary restarts or a tunnel is restored (default 5s).
        ("wal_retrieve_retry_interval", "500ms"),
        // Dynamic shared memory as files in the data directory rather than in /dev/shm, so a
        // server killed with its test (parent-death signal) leaves nothing behind once the lab
        // directory is removed.
        ("dynamic_shared_memory_type", "mmap"),
        ("logging_collector", "off"),
        ("log_line_prefix", "%m [%p] %q%a "),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect()
}

/// Settings that make a base backup stream from the primary at `host:port`.
pub(crate) fn replica_settings(opts: &LabOptions, port: u16) -> Vec<(String, String)> {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={user} password={password} \
         application_name={REPLICA_NAME} connect_timeout=5",
        user = quote::conninfo_value(SUPERUSER),
        password = quote::conninfo_value(&opts.password),
    );
    vec![
        ("primary_conninfo".to_owned(), conninfo),
        ("primary_slot_name".to_owned(), REPLICA_SLOT.to_owned()),
    ]
}

/// Renders `key = 'value'` lines, ending with the port this start uses and
/// the directory of its unix socket (the lab's own directory, so labs never
/// collide and the path stays short).
pub(crate) fn render(
    settings: &[(String, String)],
    port: u16,
    socket_dir: &std::path::Path,
) -> String {
    let mut out = String::from("# Written by pgsplit-lab on every start; edits are lost.\n");
    for (key, value) in settings {
        let _ = writeln!(out, "{key} = {}", quote::conf_value(value));
    }
    let _ = writeln!(
        out,
        "unix_socket_directories = {}",
        quote::conf_value(&socket_dir.display().to_string())
    );
    let _ = writeln!(out, "port = {port}");
    out
}

/// `pg_hba.conf`: loopback TCP only, for clients and replication alike, with `auth`.
pub(crate) fn hba(auth: &str) -> String {
    format!(
        "# Written by pgsplit-lab.\n\
         local all all trust\n\
         local replication all trust\n\
         host all all 127.0.0.1/32 {auth}\n\
         host replication all 127.0.0.1/32 {auth}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_settings_with_quoting_and_port() {
        let opts = LabOptions {
            password: "p'w".to_owned(),
            ..LabOptions::default()
        };
        let text = render(
            &replica_settings(&opts, 5999),
            6000,
            std::path::Path::new("/tmp/lab"),
        );
        assert!(
            text.contains(
                "primary_conninfo = 'host=127.0.0.1 port=5999 user=''postgres'' \
                 password=''p\\\\''w'' application_name=pgsplit_replica connect_timeout=5'"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("unix_socket_directories = '/tmp/lab'\nport = 6000\n"),
            "{text}"
        );
    }

    #[test]
    fn md5_auth_stores_md5_passwords() {
        let md5 = LabOptions {
            auth: "md5".to_owned(),
            ..LabOptions::default()
        };
        let setting = |opts: &LabOptions| {
            base_settings(opts)
                .into_iter()
                .find(|(key, _)| key == "password_encryption")
                .map(|(_, value)| value)
        };
        assert_eq!(setting(&md5).as_deref(), Some("md5"));
        assert_eq!(
            setting(&LabOptions::default()).as_deref(),
            Some("scram-sha-256")
        );
    }
}
