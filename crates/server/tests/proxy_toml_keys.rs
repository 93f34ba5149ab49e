//! Every key the configuration accepts is documented in the shipped
//! `proxy.toml`, set or commented out (`# key = value`) under its `[table]`
//! header (a commented header, `# [pool.primary]`, counts for the commented
//! keys after it), and every key documented there is one the configuration
//! accepts.
//!
//! The accepted keys come from the configuration itself: the default
//! serialized (`Config::settings()`, what `SHOW CONFIG` prints), plus a
//! configuration that sets every optional key, which the default leaves
//! out (`None` is not serialized), plus the secrets that are never
//! serialized. That these lists are complete is checked against serde's
//! own list of each table's fields.

use std::collections::BTreeSet;

use pgsplit_server::config::{Config, Overrides, User};

/// The shipped example configuration, at the workspace root.
const SHIPPED: &str = include_str!("../../../proxy.toml");

/// A configuration that sets every key the default leaves unset: the
/// per-target overrides, the optional logins and files, and a user with
/// every field.
const EVERYTHING_SET: &str = r#"
[primary]
hosts = ["10.0.0.1:5433", "10.0.0.2:5433"]
sslmode = "verify-full"
sslrootcert = "/etc/ca.pem"

[replica]
sslmode = "require"
sslrootcert = "/etc/ca.pem"

[timeouts.primary]
connect_timeout = "10s"
statement_timeout = "30s"
server_idle_timeout = "5m"
server_lifetime = "1h"

[timeouts.replica]
connect_timeout = "1s"
statement_timeout = "5s"
server_idle_timeout = "1m"
server_lifetime = "30m"

[pool]
min_idle = 1

[pool.primary]
mode = "session"
size = 10
max_server_connections = 30
min_idle = 2
checkout_timeout = "10s"

[pool.replica]
mode = "transaction"
size = 40
max_server_connections = 80
min_idle = 0
checkout_timeout = "1s"

[monitor]
user = "monitor"
password = "secret"

[tls]
cert = "/etc/pgsplit/server.crt"
key = "/etc/pgsplit/server.key"
mode = "require"

[auth]
mode = "auth_query"
auth_user = "pgsplit_auth"
auth_password = "secret"
auth_database = "postgres"

[[users]]
name = "app"
password = "secret"
auth = "md5"
server_user = "app_owner"
server_password = "other"
admin = true
"#;

/// `User` fields serde accepts but never serializes (`skip_serializing`:
/// no secret is ever shown). `EVERYTHING_SET` sets them, so loading it
/// proves they are accepted.
const NEVER_SERIALIZED: &[&str] = &[
    "users.password",
    "users.server_password",
    "auth.auth_password",
];

/// Accepted by the type but not a setting: `[replica]` shares the
/// `[primary]` address type, whose `hosts` (the primary's candidates)
/// validation refuses for the replica unless empty. Checked below.
const NOT_SETTINGS: &[&str] = &["replica.hosts"];

/// Where the `[[users]]` entries' keys go: `users.name`, as the
/// configuration's own error messages name them.
const USERS: &str = "users";

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The dotted keys of a TOML value; an array of tables (`[[users]]`)
/// contributes its entries' keys under its own name.
fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                flatten(&join(prefix, k), v, out);
            }
        }
        toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_table) => {
            for entry in a {
                flatten(prefix, entry, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// The keys of one `[[users]]` entry, serialized.
fn user_keys(user: &User) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let v = toml::Value::try_from(user).expect("a user serializes");
    flatten(USERS, &v, &mut out);
    out
}

/// The keys of a configuration as `SHOW CONFIG` lists them, with the
/// single `users` line replaced by the keys of each user.
fn keys_of(config: &Config) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = config
        .settings()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != USERS)
        .collect();
    for u in &config.users {
        out.extend(user_keys(u));
    }
    out
}

/// Every key the configuration accepts, `NOT_SETTINGS` included.
fn accepted_keys() -> BTreeSet<String> {
    let default = Config::from_toml("", &Overrides::default()).expect("the default loads");
    let everything = Config::from_toml(EVERYTHING_SET, &Overrides::default())
        .unwrap_or_else(|e| panic!("EVERYTHING_SET must load: {e}"));
    let mut keys = keys_of(&default);
    keys.extend(keys_of(&everything));
    keys.extend(NOT_SETTINGS.iter().map(|k| (*k).to_owned()));
    // `settings()` lists nothing if the configuration fails to serialize:
    // make sure it listed keys of both.
    for k in [
        "listen",
        "timeouts.primary.connect_timeout",
        "pool.replica.size",
    ] {
        assert!(keys.contains(k), "serialization lost {k}: {keys:?}");
    }
    keys.extend(NEVER_SERIALIZED.iter().map(|k| (*k).to_owned()));
    keys
}

/// The fields serde accepts in the table at `path` (`""`: the top level,
/// `users`: a `[[users]]` entry), read from serde's error for an unknown
/// one, which lists every field, including the ones never serialized:
/// "unknown field `x`, expected one of `a`, `b`".
fn fields_of(path: &str) -> BTreeSet<String> {
    const PROBE: &str = "pgsplit_no_such_key";
    let text = match path {
        "" => format!("{PROBE} = 1\n"),
        USERS => format!("[[users]]\nname = \"probe\"\nauth = \"trust\"\n{PROBE} = 1\n"),
        p => format!("[{p}]\n{PROBE} = 1\n"),
    };
    let err = match Config::from_toml(&text, &Overrides::default()) {
        Ok(_) => panic!("[{path}] accepted an unknown key"),
        Err(e) => e.to_string(),
    };
    let expected = err
        .split_once(&format!("unknown field `{PROBE}`, expected"))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no field list for [{path}] in: {err}"));
    // toml names the table after the list: `… in `pool.primary``.
    let in_table = format!(" in `{path}`");
    let expected = expected.strip_suffix(&in_table).unwrap_or(expected);
    // The names are the backquoted words: `a`, `b` or `c`.
    let fields: BTreeSet<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|f| join(path, f))
        .collect();
    assert!(!fields.is_empty(), "no field list for [{path}] in: {err}");
    fields
}

/// The collection above misses nothing serde accepts: each table's full
/// field list (the tables being those the keys run through) is covered by
/// a key or by a table of keys.
fn assert_complete(accepted: &BTreeSet<String>) {
    let mut tables: BTreeSet<String> = BTreeSet::from([String::new()]);
    for k in accepted {
        let mut prefix = k.as_str();
        while let Some((t, _)) = prefix.rsplit_once('.') {
            tables.insert(t.to_owned());
            prefix = t;
        }
    }
    let mut missed = Vec::new();
    for table in &tables {
        for field in fields_of(table) {
            let under = format!("{field}.");
            if !accepted.contains(&field) && !accepted.iter().any(|k| k.starts_with(&under)) {
                missed.push(field);
            }
        }
    }
    assert!(
        missed.is_empty(),
        "config.rs accepts keys this test does not collect; set them in EVERYTHING_SET \
         (or list them in NEVER_SERIALIZED if they are never serialized): {missed:?}"
    );
}

/// The name in a table header line (`[pool]`, `[[users]]`), if it is one.
fn header(line: &str) -> Option<String> {
    let inner = line
        .strip_prefix("[[")
        .and_then(|l| l.strip_suffix("]]"))
        .or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')))?;
    let parts: Vec<&str> = inner.split('.').map(str::trim).collect();
    parts
        .iter()
        .all(|p| is_bare_key(p))
        .then(|| parts.join("."))
}

fn is_bare_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The keys `proxy.toml` documents: set (as TOML reads them), or commented
/// out as `# key = value` (a valid TOML value) under the last header,
/// commented or not.
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let file: toml::Table = toml::from_str(text).expect("proxy.toml is TOML");
    flatten("", &toml::Value::Table(file), &mut out);
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim();
        match line.strip_prefix('#') {
            None => {
                // A header sets where commented keys go too; anything
                // else set was read above.
                let code = line.split('#').next().unwrap_or("").trim();
                if let Some(h) = header(code) {
                    table = h;
                }
            }
            Some(comment) => {
                let comment = comment.trim();
                if let Some(h) = header(comment) {
                    table = h;
                } else if let Some((key, value)) = comment.split_once('=') {
                    let key = key.trim();
                    let is_value = toml::from_str::<toml::Table>(&format!("v = {value}")).is_ok();
                    if is_bare_key(key) && is_value {
                        out.insert(join(&table, key));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_key_collection_is_complete() {
    assert_complete(&accepted_keys());
}

#[test]
fn replica_hosts_is_not_a_setting() {
    // Why NOT_SETTINGS may leave `replica.hosts` undocumented: only an
    // empty list is accepted. Should the replica get candidates, this
    // fails and the key needs documenting.
    let e = Config::from_toml(
        "[replica]\nhosts = [\"10.0.0.9:5432\"]\n",
        &Overrides::default(),
    )
    .expect_err("replica.hosts is refused");
    assert!(e.to_string().contains("replica.hosts"), "{e}");
}

#[test]
fn every_key_is_documented_in_proxy_toml() {
    let documented = documented_keys(SHIPPED);
    let missing: Vec<String> = accepted_keys()
        .into_iter()
        .filter(|k| !NOT_SETTINGS.contains(&k.as_str()) && !documented.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "proxy.toml does not document these keys; add each under its [table] \
         (commented out, `# key = value`, when it has no default to show), \
         with a line on what it does and its default:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn proxy_toml_documents_only_keys_that_exist() {
    let accepted = accepted_keys();
    let unknown: Vec<String> = documented_keys(SHIPPED)
        .into_iter()
        .filter(|k| !accepted.contains(k))
        .collect();
    assert!(
        unknown.is_empty(),
        "proxy.toml documents keys the configuration does not accept:\n  {}",
        unknown.join("\n  ")
    );
}

#[test]
fn commented_keys_go_under_their_header() {
    let text = "a = 1\n# b = \"2s\"\n# prose, not a key: x = y z\n[t]\n# c = []\n\
                # [t.u]\n# d = 4   # example\n[[users]]   # example\nname = \"n\"\n# e = \"…\"\n";
    let got: Vec<String> = documented_keys(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "t.c", "t.u.d", "users.e", "users.name"]);
}
