//! Cancel keys. Each client gets pgsplit's own BackendKeyData; the registry
//! maps it to whichever backend is running that client's statement right
//! now, so a CancelRequest reaches exactly that statement and nothing else.
//!
//! With pooling, a connection may go back to its pool, and to another
//! client, while a cancel meant for its last statement is still on its way
//! to the server. A cancel being forwarded is counted on the session's slot
//! (see [`Cancelling`]) before the slot's running backend is read, and a
//! session returning a connection reads that count after it marked itself
//! idle: whichever comes second sees the other. A connection returned while
//! a cancel is on its way is closed instead of pooled (`cancel_in_flight`),
//! so the cancel can only land on a statement of the client that sent it,
//! or on nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
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
    /// Cancels of this session being forwarded right now.
    cancelling: AtomicU32,
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
    /// wrong secret or an idle session yields `None`. Hold the returned
    /// guard until the cancel has been delivered.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<(Running, Cancelling)> {
        let map = self.sessions.lock().expect("cancel registry poisoned");
        let (s, slot) = map.get(&pid)?;
        if *s != secret {
            return None;
        }
        // Counted before `active` is read (see the module doc).
        slot.cancelling.fetch_add(1, Ordering::SeqCst);
        let guard = Cancelling(slot.clone());
        let active = usize::from(slot.active.load(Ordering::SeqCst));
        let i = active.checked_sub(1)?;
        let backends = slot.backends.lock().expect("cancel slot poisoned");
        let running = backends.get(i).cloned().flatten()?;
        Some((running, guard))
    }

    /// The server connections sessions hold now: (the session's key pid,
    /// backend number — 0 primary, 1 replica —, where it is).
    pub fn held(&self) -> Vec<(i32, usize, Running)> {
        let map = self.sessions.lock().expect("cancel registry poisoned");
        let mut out = Vec::new();
        for (pid, (_, slot)) in map.iter() {
            let backends = slot.backends.lock().expect("cancel slot poisoned");
            for (i, b) in backends.iter().enumerate() {
                if let Some(r) = b {
                    out.push((*pid, i, r.clone()));
                }
            }
        }
        out
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
        self.slot.active.store(v, Ordering::SeqCst);
    }

    /// A cancel of this session is being forwarded: a connection it may
    /// be meant for must not go to another client now.
    pub fn cancel_in_flight(&self) -> bool {
        self.slot.cancelling.load(Ordering::SeqCst) > 0
    }
}

/// A cancel being forwarded, counted on its session's slot until dropped.
pub struct Cancelling(Slot);

impl Drop for Cancelling {
    fn drop(&mut self) {
        self.0.cancelling.fetch_sub(1, Ordering::SeqCst);
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
        assert!(reg.lookup(h.pid, h.secret).is_none(), "idle session");
        let r = Running {
            endpoint: Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
            pid: 5,
            secret: 6,
        };
        h.set_backend(1, r.clone());
        assert!(reg.lookup(h.pid, h.secret).is_none(), "connected, idle");
        h.set_active(Some(1));
        assert_eq!(reg.lookup(h.pid, h.secret).map(|x| x.0), Some(r.clone()));
        h.set_active(None);
        assert!(reg.lookup(h.pid, h.secret).is_none());
        h.set_active(Some(1));
        assert_eq!(reg.lookup(h.pid, h.secret).map(|x| x.0), Some(r));
        assert!(reg.lookup(h.pid, h.secret.wrapping_add(1)).is_none());
        let pid = h.pid;
        drop(h);
        assert!(reg.lookup(pid, 0).is_none());
        assert!(reg.is_empty());
    }

    #[test]
    fn a_cancel_on_its_way_is_seen_by_the_session_until_delivered() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register();
        h.set_backend(
            0,
            Running {
                endpoint: Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
                pid: 5,
                secret: 6,
            },
        );
        assert!(!h.cancel_in_flight());
        // An idle session: nothing to cancel, nothing counted afterwards.
        assert!(reg.lookup(h.pid, h.secret).is_none());
        assert!(!h.cancel_in_flight());
        h.set_active(Some(0));
        let (_, guard) = reg.lookup(h.pid, h.secret).expect("running");
        h.set_active(None);
        assert!(
            h.cancel_in_flight(),
            "the statement ended, the cancel is on its way"
        );
        drop(guard);
        assert!(!h.cancel_in_flight());
    }
}
