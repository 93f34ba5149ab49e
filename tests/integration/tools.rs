//! The command-line clients people use: psql and pgbench.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_pgsplit() {
    let s = stack();
    let mut c = pg_tool("psql");
    c.arg(s.url())
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At"])
        .args(["-c", "CREATE TABLE ps (id int PRIMARY KEY, t text)"])
        .args(["-c", "INSERT INTO ps VALUES (1, 'a'), (2, 'b')"]);
    run_tool(c);
    caught_up(&s);
    let mut c = pg_tool("psql");
    c.arg(s.url())
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At"])
        .args(["-c", "\\d ps"])
        .args(["-c", "SELECT inet_server_port()"]);
    let out = run_tool(c);
    assert!(out.contains("id|integer||not null|"), "\\d output:\n{out}");
    assert!(out.contains(&replica_port(&s).to_string()), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_with_no_failed_transactions() {
    let s = stack();
    pgbench(&s, &["-i", "-s", "1", "-q"]);
    caught_up(&s);
    for mode in ["simple", "extended", "prepared"] {
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-M", mode, "-c", "4", "-j", "2", "-T", "3", "-n"];
            args.extend_from_slice(script);
            let out = pgbench(&s, &args);
            assert!(
                out.contains("number of failed transactions: 0"),
                "{args:?}:\n{out}"
            );
            let processed = out
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|v| v.split('/').next())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            assert!(processed > 50, "{args:?} processed {processed}:\n{out}");
        }
    }
    let stats = &s.proxy().shared().stats;
    assert!(
        stats
            .routed_replica
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100
    );
}
