//! The admin endpoint: `/metrics` for Prometheus, `/health` for load checks.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// One HTTP request; returns (status, body).
pub(crate) async fn get(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("the endpoint answers")
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap();
    (status, body)
}

pub(crate) fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served() {
    let s = stack();
    let admin = s.proxy().admin_addr().expect("admin endpoint on");
    let c = client(&s).await;
    c.batch_execute("CREATE TABLE m (x int)").await.unwrap();
    caught_up(&s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    port_of(&c, "SELECT inet_server_port()").await;

    let (status, body) = get(admin, &request("/metrics")).await;
    assert_eq!(status, 200);
    for needle in [
        "pgsplit_routed_total{target=\"replica\",reason=\"read\"} ",
        "pgsplit_routed_total{target=\"primary\",reason=\"write\"} ",
        "# TYPE pgsplit_replica_lag_seconds gauge",
        "pgsplit_replica_lag_bytes ",
        "pgsplit_primary_up 1",
        "pgsplit_replica_up 1",
        "pgsplit_clients 1\n",
        "pgsplit_read_only_retries_total 0",
        "# TYPE pgsplit_missing_object_retries_total counter",
        "pgsplit_missing_object_retries_total{sqlstate=\"42P01\"} 0",
        "# TYPE pgsplit_statement_duration_seconds histogram",
        "pgsplit_statement_duration_seconds_bucket{target=\"replica\",reason=\"read\",le=\"+Inf\"} ",
        "pgsplit_statement_duration_seconds_count{target=\"primary\",reason=\"write\"} ",
    ] {
        assert!(body.contains(needle), "{needle:?} missing from:\n{body}");
    }
    // The histogram adds up: its +Inf bucket is its count, and a 300 ms
    // sleep on the primary lands in the 0.5 s bucket, not below.
    c.batch_execute("SELECT /* pgsplit:primary */ pg_sleep(0.3)")
        .await
        .unwrap();
    let (_, body) = get(admin, &request("/metrics")).await;
    let value = |series: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series))
            .unwrap_or_else(|| panic!("{series} missing:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    };
    let labels = "target=\"primary\",reason=\"hint\"";
    let inf = value(&format!(
        "pgsplit_statement_duration_seconds_bucket{{{labels},le=\"+Inf\"}}"
    ));
    assert_eq!(
        inf,
        value(&format!(
            "pgsplit_statement_duration_seconds_count{{{labels}}}"
        ))
    );
    assert_eq!(
        value(&format!(
            "pgsplit_statement_duration_seconds_bucket{{{labels},le=\"0.25\"}}"
        )),
        0
    );
    assert_eq!(
        value(&format!(
            "pgsplit_statement_duration_seconds_bucket{{{labels},le=\"0.5\"}}"
        )),
        1
    );

    let (status, body) = get(admin, &request("/health")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");

    // The primary's tunnel cut: unhealthy, with the reason.
    s.tunnel().cut();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(admin, &request("/health")).await;
        if status == 503 {
            assert!(body.contains("primary unreachable"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still healthy: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.tunnel().restore();

    assert_eq!(get(admin, &request("/nope")).await.0, 404);
    assert_eq!(get(admin, "POST /metrics HTTP/1.1\r\n\r\n").await.0, 405);
    let huge = format!("GET /metrics HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(get(admin, &huge).await.0, 431);
}
