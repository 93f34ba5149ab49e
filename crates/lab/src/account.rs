//! The OS account PostgreSQL runs as: `postgres` when we are root (the server refuses to run as
//! root), otherwise ourselves.
//!
//! Everything the servers write — data directories, the lab directory, generated config files —
//! must belong to that account, so the helpers here both switch a command's credentials and
//! hand files over.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::sys;
use crate::LabError;

/// The account PostgreSQL runs as when we are root.
const SERVER_ACCOUNT: &str = "postgres";

/// Who server processes and data-directory writers run as.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServerAccount {
    /// `(uid, gid)` to switch to; `None` when we already are the right user.
    switch_to: Option<(u32, u32)>,
    /// The uid the servers end up with; part of the template key, since the template's files
    /// belong to it.
    uid: u32,
}

impl ServerAccount {
    /// The account for this process: `postgres` when root, else the current user.
    ///
    /// # Errors
    ///
    /// [`LabError::NoServerAccount`] when root and there is no `postgres` account.
    pub(crate) fn for_this_process() -> Result<Self, LabError> {
        let euid = sys::effective_uid();
        if euid != 0 {
            return Ok(ServerAccount {
                switch_to: None,
                uid: euid,
            });
        }
        let found = sys::lookup_user(SERVER_ACCOUNT).map_err(LabError::io(format!(
            "look up the {SERVER_ACCOUNT} account"
        )))?;
        let (uid, gid) = found.ok_or_else(|| LabError::NoServerAccount {
            name: SERVER_ACCOUNT.to_owned(),
        })?;
        Ok(ServerAccount {
            switch_to: Some((uid, gid)),
            uid,
        })
    }

    pub(crate) fn uid(&self) -> u32 {
        self.uid
    }

    /// Makes `cmd` run as this account.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        if let Some((uid, gid)) = self.switch_to {
            cmd.uid(uid).gid(gid);
        }
    }

    /// Hands `path` (not recursively) to this account.
    pub(crate) fn give(&self, path: &Path) -> io::Result<()> {
        match self.switch_to {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// Creates a directory only this account can enter (PostgreSQL insists on 0700 data dirs).
    pub(crate) fn create_private_dir(&self, path: &Path) -> Result<(), LabError> {
        let context = || format!("create directory {}", path.display());
        fs::create_dir(path).map_err(LabError::io(context()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(LabError::io(context()))?;
        self.give(path).map_err(LabError::io(context()))
    }

    /// Writes a file readable only by this account.
    pub(crate) fn write_private_file(&self, path: &Path, contents: &str) -> Result<(), LabError> {
        let context = || format!("write {}", path.display());
        fs::write(path, contents).map_err(LabError::io(context()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(LabError::io(context()))?;
        self.give(path).map_err(LabError::io(context()))
    }
}
