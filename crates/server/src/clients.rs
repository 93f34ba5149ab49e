//! The connected clients, for the console: who is connected from where
//! since when (`SHOW CLIENTS`), and a way to end one (`KILL_CLIENT`).
//!
//! A session registers once, after its login, and is removed when its
//! [`ClientEntry`] drops, however it ends. Nothing here is touched per
//! statement, so the relay path pays nothing for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

/// One connected client, as the console shows it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub peer: SocketAddr,
    pub connected_at: SystemTime,
    pub application_name: String,
    /// A console session rather than a proxied one.
    pub console: bool,
    /// The pid of its cancel key (what ties it to the server connections
    /// it holds).
    pub key_pid: i32,
}

/// All connected clients by id.
#[derive(Default)]
pub struct Clients {
    map: Mutex<BTreeMap<u64, (ClientInfo, CancellationToken)>>,
}

/// A client's place in [`Clients`], removed on drop; `kill` fires when the
/// console ends the client.
pub struct ClientEntry {
    clients: Arc<Clients>,
    id: u64,
    pub kill: CancellationToken,
}

impl Clients {
    /// Registers a client; it is listed until the entry drops.
    pub fn register(self: &Arc<Self>, info: ClientInfo) -> ClientEntry {
        let kill = CancellationToken::new();
        let id = info.id;
        self.lock().insert(id, (info, kill.clone()));
        ClientEntry {
            clients: self.clone(),
            id,
            kill,
        }
    }

    /// Every connected client, by id.
    pub fn list(&self) -> Vec<ClientInfo> {
        self.lock().values().map(|(i, _)| i.clone()).collect()
    }

    /// Ends client `id` (its session gets `57P01`); false when there is no
    /// such client.
    pub fn kill(&self, id: u64) -> bool {
        match self.lock().get(&id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (ClientInfo, CancellationToken)>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for ClientEntry {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64) -> ClientInfo {
        ClientInfo {
            id,
            user: "app".into(),
            database: "app".into(),
            peer: "127.0.0.1:5000".parse().unwrap(),
            connected_at: SystemTime::now(),
            application_name: String::new(),
            console: false,
            key_pid: 0,
        }
    }

    #[test]
    fn clients_are_listed_while_connected_and_can_be_killed() {
        let clients = Arc::new(Clients::default());
        let a = clients.register(info(1));
        {
            let _b = clients.register(info(2));
            assert_eq!(clients.list().len(), 2);
        }
        assert_eq!(clients.list().iter().map(|c| c.id).collect::<Vec<_>>(), [1]);
        assert!(!a.kill.is_cancelled());
        assert!(clients.kill(1));
        assert!(a.kill.is_cancelled());
        assert!(!clients.kill(2), "gone");
    }
}
