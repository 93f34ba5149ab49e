//! The console: `psql -d pgsplit` as an admin user (`admin = true` in
//! `[[users]]`; in quick mode the URL's user) talks to the proxy itself,
//! as PgBouncer's `pgbouncer` database does, with the same command names
//! and, where a column means the same, the same column names, so habits
//! and dashboards carry over.
//!
//! It speaks the simple query protocol only (what psql and PgBouncer's
//! console use); extended-protocol messages get `0A000` up to their Sync.
//! Commands are answered from the proxy's own state: nothing here reaches
//! a server.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;
use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::{encode, frame, frontend, tag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::error::{target_name, Error};
use crate::replication::format_lsn;
use crate::Shared;

/// The database name that reaches the console.
pub const DATABASE: &str = "pgsplit";

/// What the console answers to (its `SHOW HELP`).
pub const COMMANDS: [&str; 15] = [
    "SHOW HELP",
    "SHOW VERSION",
    "SHOW POOLS",
    "SHOW CLIENTS",
    "SHOW SERVERS",
    "SHOW STATS",
    "SHOW CONFIG",
    "SHOW REPLICATION",
    "SHOW PRIMARIES",
    "SHOW USERS",
    "SHOW LISTS",
    "KILL_CLIENT <id>",
    "RELOAD",
    "PAUSE",
    "RESUME",
];

/// One command's answer: text columns, rows (`None` is NULL), a tag.
#[derive(Debug, PartialEq, Eq)]
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

impl Table {
    fn new(columns: &[&'static str], rows: Vec<Vec<Option<String>>>) -> Table {
        let tag = format!("SHOW {}", rows.len());
        Table {
            columns: columns.to_vec(),
            rows,
            tag,
        }
    }

    /// Two columns, `key` and `value`.
    fn pairs(rows: Vec<(String, String)>) -> Table {
        Table::two(["key", "value"], rows)
    }

    /// Two columns named `names`.
    fn two(names: [&'static str; 2], rows: Vec<(String, String)>) -> Table {
        Table::new(
            &names,
            rows.into_iter()
                .map(|(k, v)| vec![Some(k), Some(v)])
                .collect(),
        )
    }

    fn done(tag: &str) -> Table {
        Table {
            columns: Vec::new(),
            rows: Vec::new(),
            tag: tag.to_owned(),
        }
    }
}

/// Answers one console command (without its `;`).
///
/// # Errors
/// `ConsoleUnknown` for a command that does not exist, `NotSupported` for
/// one not built yet, `NoSuchClient` for a `KILL_CLIENT` of nobody.
pub fn answer(shared: &Shared, command: &str) -> Result<Table, Error> {
    let words: Vec<String> = command
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW"] | ["SHOW", "HELP"] => Ok(Table::new(
            &["command"],
            COMMANDS
                .iter()
                .map(|c| vec![Some((*c).to_owned())])
                .collect(),
        )),
        ["SHOW", "VERSION"] => Ok(Table::new(
            &["version"],
            vec![vec![Some(format!("pgsplit {}", env!("CARGO_PKG_VERSION")))]],
        )),
        ["SHOW", "POOLS"] => Ok(pools(shared)),
        ["SHOW", "CLIENTS"] => Ok(clients(shared)),
        ["SHOW", "STATS"] => Ok(stats(shared)),
        ["SHOW", "CONFIG"] => Ok(Table::pairs(shared.config().settings())),
        ["SHOW", "REPLICATION"] => Ok(replication(shared)),
        ["SHOW", "PRIMARIES"] => {
            let rows = shared.failover.report().rows();
            Ok(Table::new(
                &crate::failover::COLUMNS,
                rows.into_iter()
                    .map(|r| r.into_iter().map(Some).collect())
                    .collect(),
            ))
        }
        ["SHOW", "USERS"] => Ok(Table::new(
            &["name", "auth", "server_user", "admin"],
            shared
                .config()
                .users
                .iter()
                .map(|u| {
                    vec![
                        Some(u.name.clone()),
                        Some(format!("{:?}", u.auth).to_lowercase()),
                        Some(u.server_user.clone().unwrap_or_else(|| u.name.clone())),
                        Some(if u.admin { "yes" } else { "no" }.to_owned()),
                    ]
                })
                .collect(),
        )),
        ["SHOW", "LISTS"] => Ok(lists(shared)),
        ["KILL_CLIENT", id] | ["KILL", "CLIENT", id] => {
            match id.parse::<u64>().ok().filter(|&id| shared.clients.kill(id)) {
                Some(_) => Ok(Table::done("KILL_CLIENT")),
                None => Err(Error::NoSuchClient((*id).to_owned())),
            }
        }
        ["SHOW", "SERVERS"] => Ok(servers(shared)),
        ["RELOAD"] => reload(shared),
        // Answered by `run_query`, which can wait; not among other commands.
        ["PAUSE"] => Err(Error::NotSupported("PAUSE from here")),
        ["RESUME"] => {
            if shared.pause.resume() {
                tracing::info!("resumed from the console");
                Ok(Table::done("RESUME"))
            } else {
                Err(Error::NotPaused)
            }
        }
        _ => Err(Error::ConsoleUnknown(command.trim().to_owned())),
    }
}

/// `RELOAD`: one row per changed key, saying whether it applied or needs
/// a restart.
fn reload(shared: &Shared) -> Result<Table, Error> {
    let report = shared.reload().map_err(Error::ReloadFailed)?;
    let rows = report
        .changes
        .into_iter()
        .map(|c| {
            vec![
                Some(c.key),
                Some(c.old),
                Some(c.new),
                Some(
                    if c.applied {
                        "applied"
                    } else {
                        "needs a restart"
                    }
                    .to_owned(),
                ),
            ]
        })
        .collect();
    let mut t = Table::new(&["key", "old", "new", "status"], rows);
    t.tag = "RELOAD".into();
    Ok(t)
}

/// How long `PAUSE` waits for transactions in flight.
const PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `PAUSE`: holds new transactions and waits until every session is
/// parked between transactions, then closes idle server connections.
async fn pause(shared: &Shared) -> Result<Table, Error> {
    if shared.pause.pause() {
        tracing::info!("paused from the console: holding new transactions");
    }
    let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
    loop {
        let sessions = shared.clients.list().iter().filter(|c| !c.console).count();
        let parked = shared.pause.parked();
        if parked >= sessions {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::PauseIncomplete(sessions - parked, PAUSE_WAIT));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for t in [
        pgsplit_router::Target::Primary,
        pgsplit_router::Target::Replica,
    ] {
        // Dropped: closed, and their room in the pool given back.
        drop(shared.pools.get(t).take_all_idle());
    }
    Ok(Table::done("PAUSE"))
}

/// PgBouncer's `SHOW POOLS` columns where they mean the same: clients
/// connected as the pool's user and database (`cl_active`), sessions
/// waiting for a connection (`cl_waiting`), connections leased
/// (`sv_active`) and idle (`sv_idle`); one pool per server, user and
/// database, so `target` says which server.
fn pools(shared: &Shared) -> Table {
    let clients = shared.clients.list();
    let mut rows = Vec::new();
    for pools in [&shared.pools.primary, &shared.pools.replica] {
        let mode = match pools.mode {
            crate::config::PoolMode::Transaction => "transaction",
            crate::config::PoolMode::Session => "session",
        };
        for r in pools.rows() {
            let connected = clients
                .iter()
                .filter(|c| !c.console && c.user == r.user && c.database == r.database)
                .count();
            rows.push(vec![
                Some(r.database),
                Some(r.user),
                Some(target_name(r.target).to_owned()),
                Some(connected.to_string()),
                Some(r.waiting.to_string()),
                Some(r.leased.to_string()),
                Some(r.idle.to_string()),
                Some(r.size.to_string()),
                Some(mode.to_owned()),
            ]);
        }
    }
    Table::new(
        &[
            "database",
            "user",
            "target",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "pool_size",
            "pool_mode",
        ],
        rows,
    )
}

/// PgBouncer's `SHOW CLIENTS` columns that pgsplit knows.
fn clients(shared: &Shared) -> Table {
    let rows = shared
        .clients
        .list()
        .into_iter()
        .map(|c| {
            vec![
                Some("C".to_owned()),
                Some(c.user),
                Some(c.database),
                Some(if c.console { "console" } else { "active" }.to_owned()),
                Some(c.peer.ip().to_string()),
                Some(c.peer.port().to_string()),
                Some(utc(c.connected_at)),
                Some(c.application_name),
                Some(c.id.to_string()),
            ]
        })
        .collect();
    Table::new(
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "application_name",
            "id",
        ],
        rows,
    )
}

/// PgBouncer's `SHOW SERVERS` columns that pgsplit knows: every server
/// connection, leased by a session (`active`, with that client's user and
/// database) or idle in its pool; `target` says which server.
fn servers(shared: &Shared) -> Table {
    let clients = shared.clients.list();
    let place = |e: &crate::stream::Endpoint| match e {
        crate::stream::Endpoint::Tcp(a) => (a.ip().to_string(), a.port().to_string()),
        crate::stream::Endpoint::Unix(p) => (p.display().to_string(), String::new()),
    };
    let mut rows = Vec::new();
    for (key_pid, i, running) in shared.cancels.held() {
        let owner = clients.iter().find(|c| c.key_pid == key_pid);
        let (addr, port) = place(&running.endpoint);
        let target = if i == 0 { "primary" } else { "replica" };
        rows.push(vec![
            Some("S".to_owned()),
            owner.map(|c| c.user.clone()),
            owner.map(|c| c.database.clone()),
            Some("active".to_owned()),
            Some(addr),
            Some(port),
            Some(target.to_owned()),
            Some(running.pid.to_string()),
            owner.map(|c| c.id.to_string()),
        ]);
    }
    for pools in [&shared.pools.primary, &shared.pools.replica] {
        for (user, database, endpoint, pid) in pools.idle_servers() {
            let (addr, port) = place(&endpoint);
            rows.push(vec![
                Some("S".to_owned()),
                Some(user),
                Some(database),
                Some("idle".to_owned()),
                Some(addr),
                Some(port),
                Some(target_name(pools.target).to_owned()),
                Some(pid.to_string()),
                None,
            ]);
        }
    }
    Table::new(
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "target",
            "remote_pid",
            "client_id",
        ],
        rows,
    )
}

/// The proxy's counters, one per row (`SHOW STATS` in PgBouncer is per
/// database; pgsplit counts per process).
fn stats(shared: &Shared) -> Table {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &shared.stats;
    let mut rows = vec![
        ("clients_accepted", s.clients_accepted.load(Relaxed)),
        ("clients_rejected", s.clients_rejected.load(Relaxed)),
        ("clients_connected", s.clients_connected.load(Relaxed)),
        ("routed_primary", s.routed_primary.load(Relaxed)),
        ("routed_replica", s.routed_replica.load(Relaxed)),
        ("routed_any", s.routed_any.load(Relaxed)),
        ("unclassified", s.unclassified.load(Relaxed)),
        ("parser_decided", s.parser_decided.load(Relaxed)),
        ("retried_on_primary", s.retried_on_primary.load(Relaxed)),
        (
            "retried_missing",
            s.retried_missing.iter().map(|n| n.load(Relaxed)).sum(),
        ),
        ("config_reloads", shared.live.reloads.load(Relaxed)),
        (
            "config_reload_failures",
            shared.live.reload_failures.load(Relaxed),
        ),
        ("paused", u64::from(shared.pause.is_paused())),
        ("paused_sessions", shared.pause.parked() as u64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_string()))
    .collect::<Vec<_>>();
    for (name, n) in crate::stats::RESOLUTIONS.iter().zip(&s.resolutions) {
        rows.push((
            format!("commits_resolved_{name}"),
            n.load(Relaxed).to_string(),
        ));
    }
    Table::two(["stat", "value"], rows)
}

/// Lag, positions and the link, as the monitor last saw them.
fn replication(shared: &Shared) -> Table {
    let r = &shared.replication;
    let opt = |v: Option<u64>| v.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let stale = r.stale(shared.config().routing.max_replica_lag);
    Table::pairs(vec![
        ("monitor".into(), yes(r.enabled())),
        ("primary_up".into(), yes(r.primary_up())),
        ("primary_link_down".into(), yes(r.primary_link_down())),
        ("replica_up".into(), yes(r.replica_up())),
        ("replica_lag_ms".into(), opt(r.lag_ms())),
        ("replica_lag_bytes".into(), opt(r.lag_bytes())),
        (
            "primary_lsn".into(),
            r.primary_lsn().map_or_else(|| "unknown".into(), format_lsn),
        ),
        (
            "replay_lsn".into(),
            r.replay_lsn().map_or_else(|| "unknown".into(), format_lsn),
        ),
        ("written_lsn".into(), format_lsn(r.written_lsn())),
        (
            "replica_serves_reads".into(),
            match stale {
                None => "yes".to_owned(),
                Some(why) => format!("no: {why}"),
            },
        ),
        ("replica_polls".into(), r.replica_polls().to_string()),
        ("primary_polls".into(), r.polls_started().to_string()),
    ])
}

/// PgBouncer's `SHOW LISTS`: counts of what the proxy holds.
fn lists(shared: &Shared) -> Table {
    let clients = shared.clients.list();
    let console = clients.iter().filter(|c| c.console).count();
    let mut pools = 0;
    let (mut used, mut free) = (0, 0);
    for p in [&shared.pools.primary, &shared.pools.replica] {
        for r in p.rows() {
            pools += 1;
            used += r.leased;
            free += r.idle;
        }
    }
    Table::new(
        &["list", "items"],
        [
            ("users", shared.config().users.len()),
            ("pools", pools),
            ("used_clients", clients.len() - console),
            ("console_clients", console),
            ("used_servers", used),
            ("free_servers", free),
        ]
        .into_iter()
        .map(|(k, v)| vec![Some(k.to_owned()), Some(v.to_string())])
        .collect(),
    )
}

/// `2026-12-05 16:49:53 UTC`, as PgBouncer prints times.
fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Runs a console connection after its login until the client leaves,
/// the console kills it, or the proxy shuts down.
pub(crate) async fn run(
    mut stream: crate::tls::ClientStream,
    mut buf: BytesMut,
    shared: Arc<Shared>,
    user: &str,
    (pid, secret): (i32, i32),
    kill: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut out = BytesMut::new();
    encode::auth_ok(&mut out);
    for (k, v) in [
        (
            "server_version",
            format!("{}/pgsplit", env!("CARGO_PKG_VERSION")),
        ),
        ("server_encoding", "UTF8".into()),
        ("client_encoding", "UTF8".into()),
        ("DateStyle", "ISO".into()),
        ("integer_datetimes", "on".into()),
        ("standard_conforming_strings", "on".into()),
        ("is_superuser", "off".into()),
        ("session_authorization", user.to_owned()),
        ("application_name", String::new()),
    ] {
        encode::parameter_status(&mut out, k, &v);
    }
    encode::backend_key_data(&mut out, pid, secret);
    encode::ready_for_query(&mut out, TxStatus::Idle);
    let max = shared.config().max_message_bytes;
    let mut skipping = false;
    loop {
        if !out.is_empty() {
            if send(&mut stream, &out).await.is_err() {
                return;
            }
            out.clear();
        }
        let f = match frame::decode(&mut buf, max) {
            Ok(Some(f)) => f,
            Ok(None) => {
                let read = tokio::select! {
                    r = stream.read_buf(&mut buf) => r,
                    () = kill.cancelled() => {
                        Error::Killed.write_to(&mut out, true);
                        let _ = send(&mut stream, &out).await;
                        return;
                    }
                    () = shutdown.cancelled() => {
                        Error::ShuttingDown.write_to(&mut out, true);
                        let _ = send(&mut stream, &out).await;
                        return;
                    }
                };
                match read {
                    Ok(n) if n > 0 => continue,
                    _ => return,
                }
            }
            Err(e) => {
                Error::Protocol(e).write_to(&mut out, true);
                let _ = send(&mut stream, &out).await;
                return;
            }
        };
        match f.tag() {
            tag::frontend::TERMINATE => return,
            tag::frontend::QUERY => {
                skipping = false;
                match frontend::query(f.body()) {
                    Ok(sql) => run_query(&shared, sql, &mut out).await,
                    Err(e) => Error::Protocol(e).write_to(&mut out, false),
                }
                encode::ready_for_query(&mut out, TxStatus::Idle);
            }
            tag::frontend::SYNC => {
                skipping = false;
                encode::ready_for_query(&mut out, TxStatus::Idle);
            }
            tag::frontend::FLUSH => {}
            _ if skipping => {}
            _ => {
                skipping = true;
                Error::NotSupported("the extended query protocol on the console")
                    .write_to(&mut out, false);
            }
        }
    }
}

async fn send(stream: &mut crate::tls::ClientStream, out: &[u8]) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await
}

/// Answers every `;`-separated command of one Query message; the first
/// error ends it, as a server does.
async fn run_query(shared: &Shared, sql: &str, out: &mut BytesMut) {
    let commands: Vec<&str> = sql
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if commands.is_empty() {
        encode::empty_query_response(out);
        return;
    }
    for c in commands {
        let res = if c.eq_ignore_ascii_case("PAUSE") {
            pause(shared).await
        } else {
            answer(shared, c)
        };
        match res {
            Ok(t) => {
                if !t.columns.is_empty() {
                    encode::row_description_text(out, &t.columns);
                    for row in &t.rows {
                        let values: Vec<Option<&str>> = row.iter().map(Option::as_deref).collect();
                        encode::data_row_text(out, &values);
                    }
                }
                encode::command_complete(out, &t.tag);
            }
            Err(e) => {
                e.write_to(out, false);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        let cfg = crate::config::Config::from_toml(
            "[[users]]\nname = \"app\"\npassword = \"secret\"\nadmin = true\n",
            &crate::config::Overrides::default(),
        )
        .unwrap();
        Shared::new(Arc::new(cfg))
    }

    #[test]
    fn commands_are_case_insensitive_and_unknown_ones_are_42601() {
        let s = shared();
        let v = answer(&s, "show version").unwrap();
        assert!(v.rows[0][0].as_deref().unwrap().starts_with("pgsplit "));
        assert_eq!(v.tag, "SHOW 1");
        let e = answer(&s, "SHOW NONSENSE").unwrap_err();
        assert_eq!(e.client_code().1, "42601");
        // Built from text, not a file: nothing to read again.
        assert_eq!(answer(&s, "RELOAD").unwrap_err().client_code().1, "F0000");
        assert_eq!(answer(&s, "RESUME").unwrap_err().client_code().1, "55000");
        assert_eq!(
            answer(&s, "KILL_CLIENT 99").unwrap_err().client_code().1,
            "42704"
        );
        assert_eq!(
            answer(&s, "KILL_CLIENT x").unwrap_err().client_code().1,
            "42704"
        );
    }

    #[test]
    fn show_config_has_every_section_and_no_secret() {
        let s = shared();
        let t = answer(&s, "SHOW CONFIG").unwrap();
        let keys: Vec<&str> = t.rows.iter().map(|r| r[0].as_deref().unwrap()).collect();
        for k in [
            "listen",
            "primary.port",
            "timeouts.connect_timeout",
            "pool.mode",
            "routing.read_your_writes",
            "monitor.failover_grace",
            "admin.listen",
            "users",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        let text = format!("{:?}", t.rows);
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("app (admin)"), "{text}");
        let timeout = t
            .rows
            .iter()
            .find(|r| r[0].as_deref() == Some("timeouts.connect_timeout"))
            .unwrap();
        assert_eq!(timeout[1].as_deref(), Some("5s"));
    }

    #[test]
    fn times_print_as_pgbouncer_does() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_488_193);
        assert_eq!(utc(t), "2026-12-05 16:29:53 UTC");
        assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(utc(leap), "2000-02-29 00:00:00 UTC");
    }
}
