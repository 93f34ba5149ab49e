//! Finding the installed PostgreSQL programs the lab drives.
//!
//! Looked for, in order: `PGSPLIT_PG_BINDIR`; `pg_config --bindir` when that directory holds
//! `initdb` (on Debian `pg_config` may come from the client-only package); the highest
//! `/usr/lib/postgresql/<major>/bin`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::LabError;

/// Environment variable that names the directory holding the PostgreSQL programs.
pub const BINDIR_ENV: &str = "PGSPLIT_PG_BINDIR";

/// Where Debian and Ubuntu install each major version side by side.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// Programs the lab runs; a directory without all of them is not used.
const REQUIRED: [&str; 5] = ["initdb", "postgres", "pg_basebackup", "pg_isready", "psql"];

/// A directory of PostgreSQL programs and the server version they are.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    bindir: PathBuf,
    /// As `postgres --version` reports it, e.g. `15.18`.
    version: String,
}

impl PgBinaries {
    /// Finds the PostgreSQL installation to use (see the module docs for the search order).
    ///
    /// # Errors
    ///
    /// [`LabError::BinariesMissing`] when no candidate holds every program the lab needs;
    /// the message says what to install.
    pub fn locate() -> Result<Self, LabError> {
        let mut searched = Vec::new();
        if let Some(dir) = env::var_os(BINDIR_ENV) {
            // An explicit choice is never second-guessed: if it is wrong, say so.
            return Self::at(PathBuf::from(dir));
        }
        searched.push(format!("${BINDIR_ENV} (unset)"));

        if let Some(dir) = pg_config_bindir() {
            if dir.join("initdb").is_file() {
                if let Ok(found) = Self::at(dir.clone()) {
                    return Ok(found);
                }
            }
            searched.push(dir.display().to_string());
        } else {
            searched.push("pg_config --bindir (not found)".to_owned());
        }

        for dir in debian_bindirs() {
            if let Ok(found) = Self::at(dir.clone()) {
                return Ok(found);
            }
            searched.push(dir.display().to_string());
        }
        searched.push(format!("{DEBIAN_ROOT}/*/bin"));
        Err(LabError::BinariesMissing {
            searched: searched.join(", "),
        })
    }

    /// Uses the programs in `bindir`.
    ///
    /// # Errors
    ///
    /// [`LabError::BinariesMissing`] when a required program is missing or `postgres --version`
    /// cannot be run.
    pub fn at(bindir: impl Into<PathBuf>) -> Result<Self, LabError> {
        let bindir = bindir.into();
        let missing: Vec<&str> = REQUIRED
            .into_iter()
            .filter(|tool| !bindir.join(tool).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(LabError::BinariesMissing {
                searched: format!("{} (missing {})", bindir.display(), missing.join(", ")),
            });
        }
        let version = server_version(&bindir).ok_or_else(|| LabError::BinariesMissing {
            searched: format!("{} (`postgres --version` failed)", bindir.display()),
        })?;
        Ok(PgBinaries { bindir, version })
    }

    /// The directory holding the programs.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Server version, e.g. `15.18`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Major version, e.g. `15`.
    pub fn major(&self) -> u32 {
        self.version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0)
    }

    /// Path of one program, e.g. `tool("psql")`.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

/// What `program arg` prints on stdout, when it runs and succeeds.
fn stdout_of(program: &Path, arg: &str) -> Option<String> {
    let out = Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pg_config_bindir() -> Option<PathBuf> {
    let dir = stdout_of(Path::new("pg_config"), "--bindir")?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `/usr/lib/postgresql/<major>/bin`, highest major first.
fn debian_bindirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(DEBIAN_ROOT) else {
        return Vec::new();
    };
    let mut majors: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    majors.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    majors.into_iter().map(|(_, dir)| dir).collect()
}

/// Parses `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` into `15.18`.
fn server_version(bindir: &Path) -> Option<String> {
    parse_version(&stdout_of(&bindir.join("postgres"), "--version")?)
}

fn parse_version(banner: &str) -> Option<String> {
    let version = banner.split_whitespace().nth(2)?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_banners() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n").as_deref(),
            Some("15.18")
        );
        assert_eq!(
            parse_version("postgres (PostgreSQL) 17devel").as_deref(),
            Some("17devel")
        );
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn a_directory_without_the_programs_is_refused_with_advice() {
        let err = PgBinaries::at("/nonexistent-pgsplit-bindir").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, LabError::BinariesMissing { .. }));
        assert!(
            message.contains("apt-get install -y postgresql"),
            "{message}"
        );
        assert!(message.contains(BINDIR_ENV), "{message}");
    }
}
