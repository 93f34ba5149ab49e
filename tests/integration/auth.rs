//! Client authentication: SCRAM (default), md5, trust; failures are FATAL
//! 28P01 with one message for wrong passwords and unknown users alike.

use pgsplit_lab::stack::StackOptions;

use crate::common::*;

const USERS: &str = r#"
[[users]]
name = "md5user"
password = "md5pass"
auth = "md5"
server_user = "app"
server_password = "app"

[[users]]
name = "trusted"
auth = "trust"
server_user = "app"
server_password = "app"
"#;

fn with_users() -> StackOptions {
    StackOptions {
        toml: USERS.into(),
        ..Default::default()
    }
}

fn conn(s: &pgsplit_lab::stack::Stack, user: &str, password: &str, db: &str) -> String {
    let a = s.proxy_addr();
    format!(
        "host={} port={} user={user} password={password} dbname={db}",
        a.ip(),
        a.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_and_trust_users_log_in() {
    let s = stack_with(with_users());
    let c = connect(&conn(&s, "app", "app", "app")).await.unwrap();
    assert_eq!(
        port_of(&c, "SELECT inet_server_port()").await,
        replica_port(&s)
    );
    let c = connect(&conn(&s, "md5user", "md5pass", "app"))
        .await
        .unwrap();
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app", "md5user maps to the backend user app");
    let c = connect(&conn(&s, "trusted", "whatever", "app"))
        .await
        .unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_look_the_same() {
    let s = stack_with(with_users());
    let wrong = connect(&conn(&s, "app", "nope", "app")).await.unwrap_err();
    assert_eq!(code(&wrong), "28P01");
    let unknown = connect(&conn(&s, "ghost", "nope", "app"))
        .await
        .unwrap_err();
    assert_eq!(code(&unknown), "28P01");
    let msg = |e: &tokio_postgres::Error, user: &str| {
        e.as_db_error().unwrap().message().replace(user, "USER")
    };
    assert_eq!(msg(&wrong, "app"), msg(&unknown, "ghost"));
    let md5_wrong = connect(&conn(&s, "md5user", "nope", "app"))
        .await
        .unwrap_err();
    assert_eq!(code(&md5_wrong), "28P01");
    // No secret in any message.
    for e in [&wrong, &unknown, &md5_wrong] {
        let text = e.as_db_error().unwrap().to_string();
        assert!(
            !text.contains("md5pass") && !text.contains("'app'"),
            "{text}"
        );
    }
    // The proxy keeps serving.
    client(&s).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_3d000() {
    let s = stack();
    let e = connect(&conn(&s, "app", "app", "nosuchdb"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "3D000");
    assert!(e.as_db_error().unwrap().message().contains("nosuchdb"));
}

/// pgsplit logs in to the servers with whatever they ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_asking_for_md5_cleartext_or_trust_are_served() {
    for method in ["md5", "password", "trust"] {
        let s = stack_with(StackOptions {
            lab: pgsplit_lab::LabOptions {
                auth: method.into(),
                ..Default::default()
            },
            ..Default::default()
        });
        let c = client(&s).await;
        assert_eq!(
            port_of(&c, "SELECT inet_server_port()").await,
            replica_port(&s),
            "{method}"
        );
        c.batch_execute("CREATE TABLE a (x int)").await.unwrap();
        assert_eq!(
            port_of(&c, "INSERT INTO a VALUES (1) RETURNING inet_server_port()").await,
            primary_port(&s),
            "{method}"
        );
    }
}

/// Wrong backend credentials surface as the server's own 28P01, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_backend_credentials_are_reported() {
    let s = stack_with(StackOptions {
        toml: r#"
[[users]]
name = "misconfigured"
password = "client-secret"
server_user = "app"
server_password = "not-the-password"
"#
        .into(),
        ..Default::default()
    });
    let e = connect(&conn(&s, "misconfigured", "client-secret", "app"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01");
    let text = e.to_string();
    assert!(!text.contains("not-the-password"), "{text}");
}
