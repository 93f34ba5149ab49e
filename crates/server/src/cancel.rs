//! Cancel keys. Each client gets pgsplit's own BackendKeyData; the registry
//! maps it to whichever backend is running that client's statement right
//! now, so a CancelRequest reaches exactly that statement and nothing else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
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

/// One session's cancel target. The session's backends are recorded when
/// they connect; which one is running a statement is one atomic, set and
/// cleared twice per statement without a lock.
#[derive(Default)]
struct SlotInner {
    /// 0: idle; 1 + index of the backend running the client's statement.
    active: AtomicU8,
    backends: Mutex<[Option<Running>; 2]>,
}

type Slot = Arc<SlotInner>;

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
        let active = usize::from(slot.active.load(Ordering::Acquire));
        let i = active.checked_sub(1)?;
        let backends = slot.backends.lock().expect("cancel slot poisoned");
        backends.get(i).cloned().flatten()
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
    /// Records the session's backend number `i` (0 or 1) as it connects.
    pub fn set_backend(&self, i: usize, running: Running) {
        if let Some(b) = self
            .slot
            .backends
            .lock()
            .expect("cancel slot poisoned")
            .get_mut(i)
        {
            *b = Some(running);
        }
    }

    /// Backend `i` went back to its pool: no cancel reaches it any more.
    pub fn clear_backend(&self, i: usize) {
        if let Some(b) = self
            .slot
            .backends
            .lock()
            .expect("cancel slot poisoned")
            .get_mut(i)
        {
            *b = None;
        }
    }

    /// Backend `i` now runs the client's statement; `None`: none does.
    pub fn set_active(&self, i: Option<usize>) {
        let v = i.map_or(0, |i| u8::try_from(i + 1).unwrap_or(0));
        self.slot.active.store(v, Ordering::Release);
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
        h.set_backend(1, r.clone());
        assert_eq!(reg.lookup(h.pid, h.secret), None, "connected, idle");
        h.set_active(Some(1));
        assert_eq!(reg.lookup(h.pid, h.secret), Some(r.clone()));
        h.set_active(None);
        assert_eq!(reg.lookup(h.pid, h.secret), None);
        h.set_active(Some(1));
        assert_eq!(reg.lookup(h.pid, h.secret), Some(r));
        assert_eq!(reg.lookup(h.pid, h.secret.wrapping_add(1)), None);
        let pid = h.pid;
        drop(h);
        assert_eq!(reg.lookup(pid, 0), None);
        assert!(reg.is_empty());
    }
}
