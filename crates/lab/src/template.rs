//! The cached data directory every lab primary is copied from.
//!
//! `initdb` plus creating the role and database is the slow part of a lab, and identical for
//! every lab with the same PostgreSQL version and [`LabOptions`] identity fields. It is done
//! once, shut down cleanly, and kept where labs go by default (see `labdir::default_root`)
//! keyed by a hash of those
//! inputs. Test runners that start one process per test (cargo-nextest) may build it
//! concurrently, so building happens under an exclusive `flock` in a scratch directory that is
//! renamed into place: a template that exists is always complete.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::account::ServerAccount;
use crate::binaries::PgBinaries;
use crate::command::{self, pg_command};
use crate::conf::{self, SUPERUSER};
use crate::labdir;
use crate::quote::{sql_ident, sql_literal};
use crate::server::PgServer;
use crate::LabError;
use crate::LabOptions;

/// Bumped whenever what goes into a template changes, so stale templates are not reused.
const FORMAT: &str = "pgsplit-lab-template-v2";

/// Limit for `initdb`.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);

/// The template's data directory, building it first if needed.
pub(crate) fn ensure(
    bins: &PgBinaries,
    account: ServerAccount,
    opts: &LabOptions,
) -> Result<PathBuf, LabError> {
    let root = labdir::default_root();
    let name = format!("pgsplit-lab-template-{:016x}", key(bins, account, opts));
    let ready = root.join(&name);
    if ready.is_dir() {
        return Ok(ready.join("data"));
    }

    let lock_path = root.join(format!("{name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        // Created by another user (root and `postgres` share templates): flock needs no write
        // access, so a read-only descriptor does.
        .or_else(|_| File::open(&lock_path))
        .map_err(LabError::io(format!("open {}", lock_path.display())))?;
    crate::sys::lock_exclusive(&lock)
        .map_err(LabError::io(format!("lock {}", lock_path.display())))?;
    if ready.is_dir() {
        // Another process built it while we waited for the lock.
        return Ok(ready.join("data"));
    }

    // Holding the lock, any scratch directory for this key is left over from a builder that died.
    let scratch = root.join(format!("{name}.building"));
    match fs::remove_dir_all(&scratch) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(LabError::io(format!("remove {}", scratch.display()))(err))
        }
        _ => {}
    }
    let started = std::time::Instant::now();
    build(bins, account, opts, &scratch)?;
    fs::rename(&scratch, &ready).map_err(LabError::io(format!(
        "move {} to {}",
        scratch.display(),
        ready.display()
    )))?;
    tracing::info!(template = %ready.display(), elapsed = ?started.elapsed(), "built lab template");
    Ok(ready.join("data"))
}

/// initdb, configure, create the role and database, shut down cleanly.
fn build(
    bins: &PgBinaries,
    account: ServerAccount,
    opts: &LabOptions,
    scratch: &Path,
) -> Result<(), LabError> {
    account.create_private_dir(scratch)?;
    let data = scratch.join("data");
    let pwfile = scratch.join("pwfile");
    account.write_private_file(&pwfile, &format!("{}\n", opts.password))?;

    let mut initdb = pg_command(bins.tool("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", SUPERUSER, "--auth-local=trust"])
        .arg(format!("--auth-host={}", opts.auth))
        .arg(format!("--pwfile={}", pwfile.display()))
        .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        // 1 MB WAL segments instead of 16: every copy, base backup and new segment writes
        // 15 MB less, which is most of a warm start's I/O. Clients cannot tell.
        .arg("--wal-segsize=1")
        .current_dir(scratch);
    account.apply(&mut initdb);
    command::run_ok(&mut initdb, None, INITDB_TIMEOUT)?;
    fs::remove_file(&pwfile).map_err(LabError::io(format!("remove {}", pwfile.display())))?;

    let postgresql_conf = data.join("postgresql.conf");
    let mut main_conf = fs::read_to_string(&postgresql_conf)
        .map_err(LabError::io(format!("read {}", postgresql_conf.display())))?;
    main_conf.push_str(conf::INCLUDE_LAB_CONF);
    account.write_private_file(&postgresql_conf, &main_conf)?;
    account.write_private_file(&data.join("pg_hba.conf"), &conf::hba(&opts.auth))?;

    let mut server = PgServer::new(
        "template",
        bins.clone(),
        account,
        data,
        scratch.join("template.log"),
        conf::base_settings(opts),
        &opts.password,
    )?;
    server.start_on_free_port()?;
    server.psql("postgres", &setup_sql(opts))?;
    if !server.stop()? {
        return Err(LabError::ServerStart {
            name: "template".to_owned(),
            reason: "did not shut down cleanly".to_owned(),
            log_tail: server.log_tail(30),
        });
    }
    Ok(())
}

/// Passwords are set again after `password_encryption` so they are stored in the format the
/// chosen `auth` needs (initdb always stores SCRAM).
fn setup_sql(opts: &LabOptions) -> String {
    let encryption = if opts.auth == "md5" {
        "md5"
    } else {
        "scram-sha-256"
    };
    let password = sql_literal(&opts.password);
    let user = sql_ident(&opts.user);
    let mut sql = format!(
        "SET password_encryption = {};\nALTER ROLE {} PASSWORD {password};\n",
        sql_literal(encryption),
        sql_ident(SUPERUSER),
    );
    if opts.user != SUPERUSER {
        sql.push_str(&format!(
            "CREATE ROLE {user} LOGIN CREATEDB PASSWORD {password};\n"
        ));
    }
    if !["postgres", "template0", "template1"].contains(&opts.database.as_str()) {
        sql.push_str(&format!(
            "CREATE DATABASE {} OWNER {user};\n",
            sql_ident(&opts.database)
        ));
    }
    sql
}

/// Everything that makes one template differ from another. FNV-1a, because it is stable across
/// Rust releases (std's hasher is not promised to be), so the cache survives toolchain updates.
fn key(bins: &PgBinaries, account: ServerAccount, opts: &LabOptions) -> u64 {
    let uid = account.uid().to_string();
    let bindir = bins.bindir().display().to_string();
    let parts = [
        FORMAT,
        bins.version(),
        &bindir,
        &uid,
        &opts.user,
        &opts.password,
        &opts.database,
        &opts.auth,
    ];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_sql_creates_role_and_database_only_when_needed() {
        let sql = setup_sql(&LabOptions::default());
        assert!(
            sql.contains(r#"CREATE ROLE "app" LOGIN CREATEDB PASSWORD 'app';"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"CREATE DATABASE "app" OWNER "app";"#),
            "{sql}"
        );

        let superuser_only = LabOptions {
            user: "postgres".to_owned(),
            database: "postgres".to_owned(),
            ..LabOptions::default()
        };
        let sql = setup_sql(&superuser_only);
        assert!(!sql.contains("CREATE"), "{sql}");
        assert!(
            sql.contains(r#"ALTER ROLE "postgres" PASSWORD 'app';"#),
            "{sql}"
        );
    }
}
