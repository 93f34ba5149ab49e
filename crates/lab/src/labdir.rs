//! Where labs live, and a cluster's directory: both data directories and their logs, private to
//! the server account, removed when the cluster is dropped.
//!
//! Labs default to `/dev/shm` when it has room: a data directory is about 1,300 small files, and
//! creating them on a disk file system costs far more than the bytes (measured: ~0.9 s to copy
//! one on ext4, ~0.08 s on tmpfs), twice per cluster (template copy and base backup).
//!
//! A test process killed outright never runs that removal (its servers still die, through the
//! parent-death signal). Directory names carry the creating pid, so the next lab sweeps
//! directories whose creator no longer exists. Set [`KEEP_ENV`] to keep directories (and their
//! server logs) for a post-mortem; kept ones are never swept.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::account::ServerAccount;
use crate::LabError;

/// Name prefix of lab directories: `pgsplit-lab-<pid>-<seq>`.
const PREFIX: &str = "pgsplit-lab-";

/// Set (to anything) to keep lab directories, logs included, after the cluster is dropped.
pub const KEEP_ENV: &str = "PGSPLIT_LAB_KEEP";

/// Marks a kept directory so the sweep leaves it alone.
const KEPT_MARKER: &str = "KEPT";

/// The tmpfs labs prefer.
const SHM: &str = "/dev/shm";

/// Free space `/dev/shm` needs before labs go there; container defaults (64 MB) are too small.
const SHM_MIN_FREE_BYTES: u64 = 1 << 30;

/// Distinguishes the labs of one process.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

/// Where labs and their template go unless told otherwise: `/dev/shm` if it is a directory we
/// can write with at least 1 GiB free, else `std::env::temp_dir()`.
pub(crate) fn default_root() -> PathBuf {
    let shm = Path::new(SHM);
    let roomy = crate::sys::available_bytes(shm).is_ok_and(|free| free >= SHM_MIN_FREE_BYTES);
    let writable =
        fs::metadata(shm).is_ok_and(|meta| meta.is_dir() && !meta.permissions().readonly());
    if roomy && writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// An owned lab directory; dropping it deletes it.
pub(crate) struct LabDir {
    path: PathBuf,
}

impl LabDir {
    /// Creates `<base>/pgsplit-lab-<pid>-<seq>`, first sweeping directories left by dead
    /// processes.
    pub(crate) fn create(base: &Path, account: ServerAccount) -> Result<Self, LabError> {
        sweep_stale(base);
        loop {
            let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{PREFIX}{}-{seq}", std::process::id()));
            match account.create_private_dir(&path) {
                Ok(()) => return Ok(LabDir { path }),
                Err(LabError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    // Left by an earlier process with our pid; it is not ours to touch.
                    continue;
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LabDir {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_ENV).is_some() {
            let _ = fs::write(self.path.join(KEPT_MARKER), "");
            // stderr rather than tracing: a test runner shows it next to the failing test,
            // and tests install no subscriber.
            eprintln!(
                "{KEEP_ENV} is set: keeping lab directory {}",
                self.path.display()
            );
            return;
        }
        if let Err(err) = fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %err, "could not remove lab directory");
        }
    }
}

/// Removes lab directories whose creating process is gone.
fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(creator_pid) else {
            continue;
        };
        let kept = entry.path().join(KEPT_MARKER).exists();
        if pid != std::process::id() && !kept && !is_alive(pid) {
            tracing::debug!(dir = %entry.path().display(), "removing stale lab directory");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether process `pid` exists and is not a zombie (a killed test runner may linger as one).
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ") ".
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// The pid in `pgsplit-lab-<pid>-<seq>`; `None` for anything else (templates included).
fn creator_pid(name: &str) -> Option<u32> {
    let (pid, seq) = name.strip_prefix(PREFIX)?.split_once('-')?;
    seq.parse::<u32>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lab_directories_name_a_creator() {
        assert_eq!(creator_pid("pgsplit-lab-123-4"), Some(123));
        assert_eq!(creator_pid("pgsplit-lab-template-00ff00ff00ff00ff"), None);
        assert_eq!(creator_pid("pgsplit-lab-template-00ff.lock"), None);
        assert_eq!(creator_pid("pgsplit-lab-12x-4"), None);
        assert_eq!(creator_pid("other-123-4"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_free_pid_is_not() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX));
    }
}
