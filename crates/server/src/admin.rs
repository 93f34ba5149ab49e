//! The admin HTTP endpoint (`[admin] listen`): `GET /metrics` in the
//! Prometheus text format and `GET /health` for load checks.
//!
//! The counters are the proxy's own atomics (`stats`, `replication`),
//! rendered here on request: the relay path pays one relaxed increment per
//! decision and nothing else, and no exporter owns a port or a thread. The
//! HTTP side is the least that Prometheus, curl and load-balancer checks
//! need: one request per connection, bounded in size and time.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::stats::REASONS;
use crate::Shared;

/// A request head larger than this is refused.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A client must send its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoint until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &shared).await {
                        debug!(cause = %e, "admin request failed");
                    }
                });
            }
            Err(e) => {
                debug!(cause = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_REQUEST_BYTES {
                return Ok::<_, std::io::Error>(());
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let (status, ctype, body) = match head {
        Err(_) => (408, "text/plain", "request timeout\n".to_owned()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) if buf.len() > MAX_REQUEST_BYTES => {
            (431, "text/plain", "request too large\n".to_owned())
        }
        Ok(Ok(())) => route(&buf, shared),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    // Unread input (a refused oversized request) would make the close a
    // reset that can destroy the answer in flight: read a bounded rest.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < 256 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    Ok(())
}

fn route(head: &[u8], shared: &Shared) -> (u16, &'static str, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(shared),
        ),
        ("GET" | "HEAD", "/health") => {
            let (ok, body) = health(shared);
            (if ok { 200 } else { 503 }, "application/json", body)
        }
        (_, "/metrics" | "/health") => (405, "text/plain", "method not allowed\n".into()),
        _ => (
            404,
            "text/plain",
            "not found: try /metrics or /health\n".into(),
        ),
    }
}

/// `/health`: healthy when the primary is reachable and the replica is up,
/// replaying and within `max_replica_lag`.
pub(crate) fn health(shared: &Shared) -> (bool, String) {
    let rep = &shared.replication;
    let bound = shared.config().routing.max_replica_lag;
    let mut problems = Vec::new();
    if !rep.primary_up() {
        problems.push("primary unreachable".to_owned());
    }
    if let Some(st) = rep.stale(bound) {
        problems.push(st.to_string());
    }
    let primaries = shared.failover.report();
    if shared.failover.following() {
        if primaries.current.is_none() {
            problems.push(primaries.why.clone());
        }
        if let Some(a) = &primaries.alarm {
            problems.push(a.clone());
        }
    }
    let candidates = primaries
        .rows()
        .iter()
        .map(|r| {
            format!(
                "{{\"candidate\":\"{}\",\"role\":\"{}\",\"timeline\":{},\"current\":{}}}",
                r[0].replace('"', "'"),
                r[1],
                if r[2].is_empty() { "null" } else { &r[2] },
                r[3] == "yes"
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let lag = rep
        .lag_ms()
        .map_or_else(|| "null".to_owned(), |ms| ms.to_string());
    let ok = problems.is_empty();
    let reasons = problems
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "'")))
        .collect::<Vec<_>>()
        .join(",");
    let body = format!(
        "{{\"status\":\"{}\",\"primary\":\"{}\",\"replica\":\"{}\",\"replica_lag_ms\":{lag},\"problems\":[{reasons}],\"primary_candidates\":[{candidates}],\"primary_changed_at\":{},\"primary_change_reason\":\"{}\"}}\n",
        if ok { "ok" } else { "degraded" },
        if rep.primary_up() { "up" } else { "down" },
        if rep.replica_up() { "up" } else { "down" },
        primaries
            .changed_at_secs()
            .map_or_else(|| "null".to_owned(), |s| s.to_string()),
        primaries.why.replace('"', "'"),
    );
    (ok, body)
}

/// `/metrics` in the Prometheus text exposition format.
pub(crate) fn metrics(shared: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    let s = &shared.stats;
    let rep = &shared.replication;
    let mut gauge = |name: &str, help: &str, value: Option<f64>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        match value {
            Some(v) => {
                let _ = writeln!(out, "{name} {v}");
            }
            None => {
                let _ = writeln!(out, "{name} NaN");
            }
        }
    };
    gauge(
        "pgsplit_replica_lag_seconds",
        "Replica lag in time (0 when it has replayed all the primary wrote).",
        rep.lag_ms().map(|ms| ms as f64 / 1000.0),
    );
    gauge(
        "pgsplit_replica_lag_bytes",
        "WAL the replica has not replayed yet.",
        rep.lag_bytes().map(|b| b as f64),
    );
    gauge(
        "pgsplit_primary_up",
        "1 when the monitor reaches the primary.",
        Some(f64::from(u8::from(rep.primary_up()))),
    );
    gauge(
        "pgsplit_replica_up",
        "1 when the monitor reaches the replica.",
        Some(f64::from(u8::from(rep.replica_up()))),
    );
    let primaries = shared.failover.report();
    gauge(
        "pgsplit_primary_changes",
        "Times writes moved to another primary candidate (or were refused) since the first was chosen.",
        Some(primaries.changes as f64),
    );
    gauge(
        "pgsplit_config_reloads",
        "Configuration reloads that loaded (SIGHUP or RELOAD).",
        Some(
            shared
                .live
                .reloads
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
    );
    gauge(
        "pgsplit_config_reload_failures",
        "Configuration reloads refused because the file did not load; the old configuration stayed in force.",
        Some(shared.live.reload_failures.load(std::sync::atomic::Ordering::Relaxed) as f64),
    );
    gauge(
        "pgsplit_paused",
        "1 while the console's PAUSE holds new transactions.",
        Some(f64::from(u8::from(shared.pause.is_paused()))),
    );
    gauge(
        "pgsplit_paused_sessions",
        "Sessions held between transactions by PAUSE.",
        Some(shared.pause.parked() as f64),
    );
    gauge(
        "pgsplit_primary_alarm",
        "1 while several primary candidates are writable at once.",
        Some(f64::from(u8::from(primaries.alarm.is_some()))),
    );
    gauge(
        "pgsplit_clients",
        "Client connections open now (logging in or logged in).",
        Some(shared.stats.clients_connected.load(Relaxed) as f64),
    );
    let _ = writeln!(
        out,
        "# HELP pgsplit_routed_total Statements and batches routed, by target and reason.\n\
         # TYPE pgsplit_routed_total counter"
    );
    for (i, target) in ["primary", "replica", "any"].iter().enumerate() {
        for (j, reason) in REASONS.iter().enumerate() {
            let n = s.routed[i][j].load(Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "pgsplit_routed_total{{target=\"{target}\",reason=\"{}\"}} {n}",
                    reason.as_str()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP pgsplit_commit_resolutions_total Commits whose answer was lost, by the outcome the proxy learned.\n\
         # TYPE pgsplit_commit_resolutions_total counter"
    );
    for (i, outcome) in crate::stats::RESOLUTIONS.iter().enumerate() {
        let n = s.resolutions[i].load(Relaxed);
        let _ = writeln!(
            out,
            "pgsplit_commit_resolutions_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP pgsplit_missing_object_retries_total Reads the replica failed for want of an object it had not replayed yet, run again on the primary, by SQLSTATE.\n\
         # TYPE pgsplit_missing_object_retries_total counter"
    );
    for (i, code) in crate::stats::MISSING.iter().enumerate() {
        let _ = writeln!(
            out,
            "pgsplit_missing_object_retries_total{{sqlstate=\"{code}\"}} {}",
            s.retried_missing[i].load(Relaxed)
        );
    }
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    let ryw = s.routed[0][REASONS
        .iter()
        .position(|r| *r == pgsplit_router::route::Reason::ReadYourWrites)
        .unwrap_or(0)]
    .load(Relaxed);
    counter(
        "pgsplit_read_your_writes_redirects_total",
        "Reads sent to the primary because the replica had not replayed the session's writes.",
        ryw,
    );
    counter(
        "pgsplit_read_only_retries_total",
        "Reads the replica refused as writes (25006), run again on the primary.",
        s.retried_on_primary.load(Relaxed),
    );
    counter(
        "pgsplit_parser_fallbacks_total",
        "Statements the lexical classifier left to the SQL parser.",
        s.parser_decided.load(Relaxed),
    );
    counter(
        "pgsplit_unclassified_total",
        "Statements neither classifier stage could decide (sent to the primary).",
        s.unclassified.load(Relaxed),
    );
    counter(
        "pgsplit_clients_accepted_total",
        "Client connections accepted.",
        s.clients_accepted.load(Relaxed),
    );
    counter(
        "pgsplit_clients_rejected_total",
        "Client connections refused (limit, bad startup, failed login).",
        s.clients_rejected.load(Relaxed),
    );
    candidate_metrics(shared, &mut out);
    pool_metrics(shared, &mut out);
    latency_metrics(shared, &mut out);
    out
}

/// The pools: connections by state per pool, waiters, and process-wide
/// counters with the checkout wait histogram.
/// Each primary candidate: reachable, writable, current, and its timeline.
fn candidate_metrics(shared: &Shared, out: &mut String) {
    let r = shared.failover.report();
    let _ = writeln!(
        out,
        "# HELP pgsplit_primary_candidate_up 1 when the monitor reaches the candidate.\n\
         # TYPE pgsplit_primary_candidate_up gauge\n\
         # HELP pgsplit_primary_candidate_writable 1 when the candidate takes writes (not in recovery, not read-only).\n\
         # TYPE pgsplit_primary_candidate_writable gauge\n\
         # HELP pgsplit_primary_candidate_current 1 for the candidate writes go to.\n\
         # TYPE pgsplit_primary_candidate_current gauge\n\
         # HELP pgsplit_primary_candidate_timeline The candidate's timeline, when known.\n\
         # TYPE pgsplit_primary_candidate_timeline gauge"
    );
    for (i, a) in r.addrs.iter().enumerate() {
        let label = format!("candidate=\"{}\"", escape_label(&a.to_string()));
        let seen = r.seen.get(i).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "pgsplit_primary_candidate_up{{{label}}} {}\n\
             pgsplit_primary_candidate_writable{{{label}}} {}\n\
             pgsplit_primary_candidate_current{{{label}}} {}",
            u8::from(seen.reachable),
            u8::from(seen.writable),
            u8::from(r.current == Some(i)),
        );
        if let Some(t) = seen.timeline {
            let _ = writeln!(out, "pgsplit_primary_candidate_timeline{{{label}}} {t}");
        }
    }
}

fn pool_metrics(shared: &Shared, out: &mut String) {
    use crate::pool::{STATS, WAIT_BUCKETS};
    let _ = writeln!(
        out,
        "# HELP pgsplit_pool_connections Server connections of a pool, by state.\n\
         # TYPE pgsplit_pool_connections gauge\n\
         # HELP pgsplit_pool_size The most server connections a pool may open.\n\
         # TYPE pgsplit_pool_size gauge\n\
         # HELP pgsplit_pool_waiting Sessions waiting for a connection of a pool.\n\
         # TYPE pgsplit_pool_waiting gauge"
    );
    for pools in [&shared.pools.primary, &shared.pools.replica] {
        for r in pools.rows() {
            let labels = format!(
                "target=\"{}\",user=\"{}\",database=\"{}\"",
                crate::error::target_name(r.target),
                escape_label(&r.user),
                escape_label(&r.database)
            );
            let _ = writeln!(
                out,
                "pgsplit_pool_connections{{{labels},state=\"idle\"}} {}\n\
                 pgsplit_pool_connections{{{labels},state=\"leased\"}} {}\n\
                 pgsplit_pool_size{{{labels}}} {}\n\
                 pgsplit_pool_waiting{{{labels}}} {}",
                r.idle, r.leased, r.size, r.waiting
            );
        }
    }
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        "pgsplit_pool_connections_opened_total",
        "Server connections the pools opened.",
        STATS.opened.load(Relaxed),
    );
    counter(
        "pgsplit_pool_connections_closed_total",
        "Pooled server connections closed (lost, expired, idle, evicted or unclean at return).",
        STATS.closed.load(Relaxed),
    );
    counter(
        "pgsplit_pool_leases_total",
        "Server connections leased to sessions.",
        STATS.leases.load(Relaxed),
    );
    counter(
        "pgsplit_pool_checkout_timeouts_total",
        "Statements refused with 53300: no connection free within checkout_timeout.",
        STATS.timeouts.load(Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP pgsplit_pool_pinned_sessions Sessions holding a server connection because of a pin or a named prepared statement.\n\
         # TYPE pgsplit_pool_pinned_sessions gauge\n\
         pgsplit_pool_pinned_sessions {}",
        STATS.pinned.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP pgsplit_pool_wait_seconds How long checkouts that found no connection free waited.\n\
         # TYPE pgsplit_pool_wait_seconds histogram"
    );
    let counts: Vec<u64> = STATS.wait_buckets.iter().map(|n| n.load(Relaxed)).collect();
    histogram(
        out,
        "pgsplit_pool_wait_seconds",
        "",
        &WAIT_BUCKETS,
        &counts,
        STATS.wait_micros.load(Relaxed),
    );
}

/// One histogram series: cumulative buckets (`labels` first, then `le`),
/// sum (from microseconds) and count (the buckets' total).
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    counts: &[u64],
    sum_micros: u64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (le, n) in bounds.iter().zip(counts) {
        cumulative += n;
        let le = if le.is_infinite() {
            "+Inf".to_owned()
        } else {
            le.to_string()
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braces} {}\n{name}_count{braces} {cumulative}",
        sum_micros as f64 / 1e6
    );
}

/// Cycle durations by target and routing reason (the reasons seen so far).
fn latency_metrics(shared: &Shared, out: &mut String) {
    use crate::stats::LATENCY_BUCKETS;
    let _ = writeln!(
        out,
        "# HELP pgsplit_statement_duration_seconds A client's cycle (a simple Query, or an extended batch up to Sync) from sending it to the server to the server's ReadyForQuery, by target and routing reason.\n\
         # TYPE pgsplit_statement_duration_seconds histogram"
    );
    for (i, target) in ["primary", "replica"].iter().enumerate() {
        for (j, reason) in REASONS.iter().enumerate() {
            let h = &shared.stats.latency[i][j];
            let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Relaxed)).collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let labels = format!("target=\"{target}\",reason=\"{}\"", reason.as_str());
            histogram(
                out,
                "pgsplit_statement_duration_seconds",
                &labels,
                &LATENCY_BUCKETS,
                &counts,
                h.sum_micros.load(Relaxed),
            );
        }
    }
}

/// A Prometheus label value with `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
