//! The few raw libc calls the lab needs, each wrapped in a safe function.
//!
//! The workspace denies `unsafe_code`; every exception in this crate lives here, on the
//! narrowest item, with the reason it is sound next to it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The effective user id of this process.
#[allow(unsafe_code)]
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Looks up an account's `(uid, gid)` in the user database; `None` when there is no such account.
#[allow(unsafe_code)]
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is a plain C struct of integers and pointers, for which all-zero is valid;
    // getpwnam_r fills it in.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, writable memory of the stated size for the whole
    // call; getpwnam_r (unlike getpwnam) uses only the buffers it is given, so it is thread-safe.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Ok(None);
    }
    Ok(Some((entry.pw_uid, entry.pw_gid)))
}

/// Sends `signal` to process `pid`.
///
/// Callers only pass the pid of a child they hold and have not reaped, so the pid cannot have
/// been recycled for an unrelated process.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Blocks until this open file holds an exclusive `flock`; it is released when the file closes.
///
/// `flock` locks belong to the open file description, so two threads of one process that each
/// open the file exclude each other just like two processes do.
#[allow(unsafe_code)]
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: the descriptor is owned by `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Makes the child get SIGKILL when the thread that forks it exits (`PR_SET_PDEATHSIG`).
///
/// std runs `pre_exec` hooks after it has switched uid/gid, which matters: the kernel clears
/// the parent-death signal when credentials change. If the parent is already gone by the time
/// the hook runs, nobody would deliver the signal, so the child refuses to start instead.
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the hook runs in the forked child before exec and only makes two async-signal-safe
    // system calls (prctl, getppid); it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            let signal = libc::SIGKILL as libc::c_ulong;
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Bytes available to unprivileged users on the file system holding `path`.
#[allow(unsafe_code)]
// `u64::from` is the identity on 64-bit targets but widens on 32-bit ones.
#[allow(clippy::useless_conversion)]
pub(crate) fn available_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero is valid.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stats` is live and writable for the whole call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(stats.f_bavail).saturating_mul(u64::from(stats.f_frsize)))
}

/// Raises this process's open-file soft limit to at least `want` (at most
/// the hard limit); returns the soft limit now in force.
#[allow(unsafe_code)]
pub fn raise_open_files(want: u64) -> io::Result<u64> {
    // SAFETY: rlimit is a plain C struct of integers, for which all-zero is valid.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is live and writable for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= want as libc::rlim_t {
        return Ok(lim.rlim_cur as u64);
    }
    lim.rlim_cur = (want as libc::rlim_t).min(lim.rlim_max);
    // SAFETY: `lim` is a valid rlimit whose soft limit does not exceed its hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur as u64)
}
