//! Reads of the server's own state, which only the primary answers as the
//! session's server.
//!
//! A session through pgsplit is writable, so it must look like a primary:
//! a read of recovery status, WAL positions, replication views,
//! statistics or `transaction_read_only` answered by the replica would
//! tell a client (pgJDBC's `targetServerType=primary`, libpq before 14,
//! a health check, PostgreSQL's own `sysviews` and `stats` tests) that it
//! reached a standby, or show another server's counters. Such reads carry
//! a primary hint. Inside a block the block's server still answers (a
//! `READ ONLY` block on the replica is read-only, and says so).
//!
//! The check is a case-insensitive search for the names below anywhere in
//! the text, comments and literals included: a false match only sends a
//! read to the primary. It runs when a statement is classified, which each
//! session remembers, so not once per execution.

/// Names whose mention makes a read one of the server's state.
const MARKERS: &[&[u8]] = &[
    b"pg_is_in_recovery",
    b"pg_last_wal_",
    b"pg_last_xact_replay",
    b"pg_is_wal_replay_paused",
    b"pg_get_wal_replay_pause_state",
    b"pg_walfile_name",
    b"pg_control_",
    b"pg_stat",
    b"pg_replication_slots",
    b"pg_current_snapshot",
    b"txid_current_snapshot",
    b"transaction_read_only",
    b"in_hot_standby",
];

/// Whether `sql` reads state only the primary answers for the session.
pub fn mentions_server_state(sql: &str) -> bool {
    let b = sql.as_bytes();
    // Every marker contains "_"; most statements have few.
    memchr::memchr_iter(b'_', b).any(|at| {
        MARKERS.iter().any(|m| {
            // Markers are matched where their first '_' falls.
            let Some(u) = m.iter().position(|&c| c == b'_') else {
                return false;
            };
            at >= u
                && b.get(at - u..at - u + m.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(m))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_state_reads_are_recognised_in_any_case() {
        for sql in [
            "select pg_is_in_recovery()",
            "SELECT count(*) = 0 FROM pg_stat_wal_receiver",
            "SHOW transaction_read_only",
            "select current_setting('TRANSACTION_READ_ONLY')",
            "SELECT * FROM pg_catalog.PG_STAT_ACTIVITY",
            "select checkpoints_req from pg_stat_bgwriter",
            "select pg_last_wal_replay_lsn()",
            "SELECT slot_name FROM pg_replication_slots",
            "SHOW in_hot_standby",
        ] {
            assert!(mentions_server_state(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "select * from accounts where user_id = $1",
            "select pg_size_pretty(pg_database_size(current_database()))",
            "select st_x(geom) from places",
            "_",
            "pg_",
        ] {
            assert!(!mentions_server_state(sql), "{sql}");
        }
    }
}
