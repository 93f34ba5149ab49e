//! Running PostgreSQL's own programs (initdb, psql, pg_basebackup, pg_isready) to completion,
//! with a clean environment, a time limit, and their output captured for errors.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::sys;
use crate::LabError;

/// libpq and server variables that would silently redirect or reconfigure our commands.
const INHERITED_PG_VARS: [&str; 14] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGAPPNAME",
    "PGDATA",
    "PGTARGETSESSIONATTRS",
];

/// A command for one of PostgreSQL's programs: no inherited `PG*` variables, C locale, no
/// stdin, and killed if this process dies.
pub(crate) fn pg_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in INHERITED_PG_VARS {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C").env("PGCONNECT_TIMEOUT", "10");
    cmd.stdin(Stdio::null());
    sys::die_with_parent(&mut cmd);
    cmd
}

/// What a finished command printed.
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd` to completion, feeding it `input` on stdin, killing it after `limit`.
///
/// # Errors
///
/// [`LabError::Io`] if it cannot be started, [`LabError::Timeout`] if it runs past `limit`.
/// A non-zero exit is not an error here; see [`run_ok`].
pub(crate) fn run(
    cmd: &mut Command,
    input: Option<&str>,
    limit: Duration,
) -> Result<Finished, LabError> {
    let shown = describe(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .map_err(LabError::io(format!("start `{shown}`")))?;

    // Feed and drain on helper threads so a chatty child never blocks on a full pipe.
    let feeder = child.stdin.take().zip(input).map(|(mut stdin, input)| {
        let input = input.to_owned();
        thread::spawn(move || {
            // The child may exit without reading everything (e.g. on an SQL error); that
            // surfaces through its exit status, not here.
            let _ = stdin.write_all(input.as_bytes());
        })
    });
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);

    let status =
        wait_bounded(&mut child, limit).map_err(LabError::io(format!("wait for `{shown}`")))?;
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    let collect = |reader: Option<thread::JoinHandle<String>>| {
        reader
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default()
    };
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    match status {
        Some(status) => Ok(Finished {
            status,
            stdout,
            stderr,
        }),
        None => Err(LabError::Timeout {
            what: format!("`{shown}` to finish within {limit:?} (stderr so far: {stderr})"),
        }),
    }
}

/// Like [`run`], but a non-zero exit is a [`LabError::Command`]; returns stdout.
pub(crate) fn run_ok(
    cmd: &mut Command,
    input: Option<&str>,
    limit: Duration,
) -> Result<String, LabError> {
    let finished = run(cmd, input, limit)?;
    if finished.status.success() {
        Ok(finished.stdout)
    } else {
        Err(LabError::Command {
            cmd: describe(cmd),
            status: finished.status,
            stderr: finished.stderr.trim_end().to_owned(),
        })
    }
}

/// The command line for messages. Passwords travel in the environment, never in arguments, so
/// showing the arguments leaks nothing.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut shown = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child` up to `limit`; past it, kills and reaps it and returns `None`.
fn wait_bounded(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_feeds_input_and_reports_failures() {
        let out = run_ok(
            &mut pg_command("cat"),
            Some("hello"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(out, "hello");

        let mut failing = pg_command("sh");
        failing.args(["-c", "echo oops >&2; exit 3"]);
        let err = run_ok(&mut failing, None, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&err, LabError::Command { stderr, status, .. } if stderr == "oops" && status.code() == Some(3)),
            "{err:?}"
        );
    }

    #[test]
    fn kills_commands_that_overrun() {
        let started = Instant::now();
        let err = run(
            pg_command("sleep").arg("30"),
            None,
            Duration::from_millis(100),
        )
        .err()
        .unwrap();
        assert!(matches!(err, LabError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
