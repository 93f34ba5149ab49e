//! These start real PostgreSQL servers, so there are few of them and each checks a lot.

use std::path::Path;

use super::*;

const CATCH_UP: Duration = Duration::from_secs(30);

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn cluster_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cluster>();
}

#[test]
fn replica_follows_the_primary_and_drop_cleans_up() {
    let started = Instant::now();
    let lab = Cluster::start(LabOptions::default()).unwrap();
    eprintln!("Cluster::start took {:?}", started.elapsed());

    assert_eq!(
        lab.psql(Which::Replica, "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
    assert_eq!(
        lab.psql(Which::Primary, "SELECT pg_is_in_recovery()")
            .unwrap(),
        "f"
    );
    assert_eq!(
        lab.psql(Which::Primary, "SELECT current_database(), current_user")
            .unwrap(),
        "app|postgres"
    );
    // The application role owns the database and is not a superuser.
    assert_eq!(
        lab.psql(
            Which::Primary,
            "SELECT rolsuper, rolcreatedb, pg_get_userbyid(datdba) FROM pg_roles, pg_database \
             WHERE rolname = 'app' AND datname = 'app'"
        )
        .unwrap(),
        "f|t|app"
    );

    lab.psql(
        Which::Primary,
        "CREATE TABLE lab_probe (id int PRIMARY KEY); INSERT INTO lab_probe VALUES (1), (2);",
    )
    .unwrap();
    lab.wait_replica_caught_up(CATCH_UP).unwrap();
    assert_eq!(
        lab.psql(Which::Replica, "SELECT sum(id) FROM lab_probe")
            .unwrap(),
        "3"
    );
    let err = lab
        .psql(Which::Replica, "INSERT INTO lab_probe VALUES (3)")
        .unwrap_err();
    assert!(err.to_string().contains("read-only transaction"), "{err}");

    let dir = lab.dir().to_path_buf();
    let pids = [
        lab.server(Which::Primary).pid().unwrap(),
        lab.server(Which::Replica).pid().unwrap(),
    ];
    let addrs = [lab.primary_addr(), lab.replica_addr()];
    assert!(dir.join("primary/PG_VERSION").is_file());
    drop(lab);

    assert!(!dir.exists(), "lab directory {} left behind", dir.display());
    for pid in pids {
        assert!(!process_exists(pid), "postmaster {pid} still running");
    }
    for addr in addrs {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} still accepts"
        );
    }
}

#[test]
fn replica_survives_primary_restart_and_replication_tunnel_faults() {
    // md5 here (the other test covers the SCRAM default): passwords must be stored as MD5, or
    // the server would quietly answer md5 lines with a SCRAM exchange.
    let opts = LabOptions {
        auth: "md5".to_owned(),
        ..LabOptions::default()
    };
    let mut lab = Cluster::start(opts).unwrap();
    assert_eq!(
        lab.psql(
            Which::Primary,
            "SELECT string_agg(left(rolpassword, 3), ',' ORDER BY rolname) FROM pg_authid \
             WHERE rolname IN ('app', 'postgres')"
        )
        .unwrap(),
        "md5,md5"
    );
    lab.psql(Which::Primary, "CREATE TABLE events (n int)")
        .unwrap();

    // Primary restart on the same port: the replica reconnects on its own.
    let primary_addr = lab.primary_addr();
    lab.stop_primary().unwrap();
    assert!(lab.server(Which::Primary).pid().is_none());
    assert_eq!(
        lab.psql(Which::Replica, "SELECT count(*) FROM events")
            .unwrap(),
        "0"
    );
    lab.start_primary().unwrap();
    assert_eq!(lab.primary_addr(), primary_addr);
    lab.psql(Which::Primary, "INSERT INTO events VALUES (1)")
        .unwrap();
    lab.wait_replica_caught_up(CATCH_UP).unwrap();
    assert_eq!(
        lab.psql(Which::Replica, "SELECT count(*) FROM events")
            .unwrap(),
        "1"
    );

    // Cutting the replication tunnel stops replication; restoring resumes it.
    let tunnel = lab.replication_tunnel().unwrap();
    assert_eq!(tunnel.upstream(), lab.primary_addr());
    tunnel.cut();
    lab.psql(Which::Primary, "INSERT INTO events VALUES (2)")
        .unwrap();
    let stalled = lab.wait_replica_caught_up(Duration::from_secs(1));
    assert!(
        matches!(stalled, Err(LabError::Timeout { .. })),
        "{stalled:?}"
    );
    tunnel.restore();
    lab.wait_replica_caught_up(CATCH_UP).unwrap();
    assert_eq!(
        lab.psql(Which::Replica, "SELECT count(*) FROM events")
            .unwrap(),
        "2"
    );

    // Replica restart.
    lab.stop_replica().unwrap();
    lab.psql(Which::Primary, "INSERT INTO events VALUES (3)")
        .unwrap();
    lab.start_replica().unwrap();
    lab.wait_replica_caught_up(CATCH_UP).unwrap();
    assert_eq!(
        lab.psql(Which::Replica, "SELECT count(*) FROM events")
            .unwrap(),
        "3"
    );
}
