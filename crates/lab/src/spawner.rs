//! A long-lived thread that forks the server processes.
//!
//! Servers are started with `PR_SET_PDEATHSIG` so they die with the lab even if the test process
//! is killed. The kernel delivers that signal when the *thread* that forked the child exits, not
//! the process. Forking from whatever thread calls [`Cluster::start`](crate::Cluster::start)
//! would kill the servers as soon as, say, a test's helper thread finished; forking from a
//! thread owned by the server makes the signal fire only when the server's owner is gone.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::thread;

/// A fork request and where to send the result.
type Request = (Command, mpsc::Sender<io::Result<Child>>);

/// Handle to the forking thread; dropping it ends the thread (and, through the parent-death
/// signal, any child still running).
pub(crate) struct Spawner {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Spawner {
    pub(crate) fn new(name: &str) -> io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Request>();
        let thread = thread::Builder::new()
            .name(format!("pgsplit-lab-{name}"))
            .spawn(move || {
                for (mut cmd, reply) in incoming {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        Ok(Spawner {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Forks `cmd` on the spawner thread.
    pub(crate) fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let gone = || io::Error::other("spawner thread is gone");
        let (reply, result) = mpsc::channel();
        self.requests
            .as_ref()
            .ok_or_else(gone)?
            .send((cmd, reply))
            .map_err(|_| gone())?;
        result.recv().map_err(|_| gone())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
