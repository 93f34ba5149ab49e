//! Cancel keys. Each client gets pgsplit's own BackendKeyData; the registry
//! maps it to whichever backend is running that client's statement right
//! now, so a CancelRequest reaches exactly that statement and nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::stream::Endpoint;

/// The backend statement a cancel should reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub endpoint: Endpoint,
    pub pid: i32,
    pub secret: i32,
}

type Slot = Arc<Mutex<Option<Running>>>;

/// All live sessions' cancel keys.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, Slot)>>,
}

/// A session's key; removing it from the registry on drop.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    slot: Slot,
}

impl CancelRegistry {
    /// Issues a fresh key for a new session.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::thread_rng();
        let secret: i32 = rng.gen();
        let slot: Slot = Arc::default();
        let mut map = self.sessions.lock().expect("cancel registry poisoned");
        let pid = loop {
            let pid = rng.gen_range(1..i32::MAX);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        map.insert(pid, (secret, slot.clone()));
        CancelHandle {
            registry: self.clone(),
            pid,
            secret,
            slot,
        }
    }

    /// What a CancelRequest with this key should cancel, if anything: a
    /// wrong secret or an idle session yields `None`.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<Running> {
        let map = self.sessions.lock().expect("cancel registry poisoned");
        let (s, slot) = map.get(&pid)?;
        if *s != secret {
            return None;
        }
        let running = slot.lock().expect("cancel slot poisoned").clone();
        running
    }

    /// Number of sessions holding a key.
    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .expect("cancel registry poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CancelHandle {
    /// Records (or clears) the backend statement now running.
    pub fn set(&self, running: Option<Running>) {
        *self.slot.lock().expect("cancel slot poisoned") = running;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        if let Ok(mut map) = self.registry.sessions.lock() {
            map.remove(&self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_key_finds_a_running_statement() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register();
        assert_eq!(reg.lookup(h.pid, h.secret), None, "idle session");
        let r = Running {
            endpoint: Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
            pid: 5,
            secret: 6,
        };
        h.set(Some(r.clone()));
        assert_eq!(reg.lookup(h.pid, h.secret), Some(r));
        assert_eq!(reg.lookup(h.pid, h.secret.wrapping_add(1)), None);
        let pid = h.pid;
        drop(h);
        assert_eq!(reg.lookup(pid, 0), None);
        assert!(reg.is_empty());
    }
}
