//! The open-file limit, checked at startup: every client and every server
//! connection is a descriptor, and a proxy that runs out refuses clients
//! with an error that says nothing of why. PgBouncer's operators learn to
//! raise `ulimit -n`; pgsplit says so when it starts.

use tracing::warn;

use crate::config::Config;

/// Descriptors beyond clients and pools: listeners, the admin endpoint,
/// the monitor's connections, cancel requests in flight, log files.
const SPARE: usize = 32;

/// What the configuration may need open at once.
pub fn needed(config: &Config) -> usize {
    config.max_client_connections
        + config.pool.for_target(true).max_server_connections
        + config.pool.for_target(false).max_server_connections
        + SPARE
}

/// The soft limit from a `/proc/<pid>/limits` text (`None`: unlimited or
/// unreadable).
fn soft_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Warns when this process's open-file limit is below what `config` may
/// need; returns the limit, when known.
pub fn check(config: &Config) -> Option<u64> {
    let limit = soft_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)?;
    let need = needed(config);
    if limit < need as u64 {
        warn!(
            limit,
            need,
            "the open-file limit (ulimit -n) is below max_client_connections plus the pools' \
             max_server_connections: connections past it will fail; raise it \
             (ulimit -n, or LimitNOFILE= in a systemd unit)"
        );
    }
    Some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_soft_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(soft_limit(text), Some(1024));
        assert_eq!(
            soft_limit("Max open files            unlimited            unlimited            files"),
            None
        );
        assert_eq!(soft_limit(""), None);
    }

    #[test]
    fn counts_clients_and_both_pools() {
        let c = Config::default();
        assert_eq!(needed(&c), 1000 + 50 + 50 + SPARE);
    }
}
