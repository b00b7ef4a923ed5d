//! Presence registry: which user is online on which server.
//!
//! Backends talk to presence only through the [`Presence`] trait so that a
//! registry shared across backends can replace [`LocalPresence`] later without
//! touching the WebSocket code.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

/// Identifies one WebSocket connection, so that a late close of an old
/// connection can be told apart from the user's newer one.
pub type ConnId = u64;

/// A presence registry: records user -> server and answers who is online.
///
/// `online`/`offline` never block (they are called from connection tasks and
/// from drop guards); `snapshot` is async because a shared registry would need I/O.
pub trait Presence: Send + Sync {
    /// `user` is now online on `server` through connection `conn`.
    fn online(&self, user: &str, server: &str, conn: ConnId);
    /// Connection `conn` of `user` ended; removes the entry only if it is still that connection's.
    fn offline(&self, user: &str, conn: ConnId);
    /// The current user -> server map.
    fn snapshot(&self) -> BoxFuture<'_, BTreeMap<String, String>>;
}

/// One queued update or query for the registry task.
enum Command {
    Online {
        user: String,
        server: String,
        conn: ConnId,
    },
    Offline {
        user: String,
        conn: ConnId,
    },
    Snapshot(oneshot::Sender<BTreeMap<String, String>>),
}

/// In-process presence: a handle to a task that owns the map; updates are queued to it.
///
/// Queueing (rather than a shared lock) keeps connection tasks from contending
/// on one mutex during a reconnect storm, and keeps updates in arrival order.
#[derive(Clone)]
pub struct LocalPresence {
    tx: mpsc::UnboundedSender<Command>,
}

impl LocalPresence {
    /// Spawns the registry task on the current tokio runtime. The task ends
    /// when the last handle is dropped.
    pub fn spawn() -> LocalPresence {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx));
        LocalPresence { tx }
    }

    /// Wraps the registry in an `Arc<dyn Presence>` for sharing.
    pub fn shared() -> Arc<dyn Presence> {
        Arc::new(LocalPresence::spawn())
    }
}

impl Presence for LocalPresence {
    fn online(&self, user: &str, server: &str, conn: ConnId) {
        // A send error means the registry task is gone (runtime shutting down): nothing to record.
        let _ = self.tx.send(Command::Online {
            user: user.to_string(),
            server: server.to_string(),
            conn,
        });
    }

    fn offline(&self, user: &str, conn: ConnId) {
        let _ = self.tx.send(Command::Offline {
            user: user.to_string(),
            conn,
        });
    }

    fn snapshot(&self) -> BoxFuture<'_, BTreeMap<String, String>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(Command::Snapshot(reply)).is_err() {
                return BTreeMap::new();
            }
            rx.await.unwrap_or_default()
        })
    }
}

/// The registry task: applies commands in order to the map it owns.
async fn run(mut rx: mpsc::UnboundedReceiver<Command>) {
    // user -> (server, connection that registered it)
    let mut map: HashMap<String, (String, ConnId)> = HashMap::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Online { user, server, conn } => {
                // The newest connection wins: a reconnect replaces a stale entry.
                map.insert(user, (server, conn));
            }
            Command::Offline { user, conn } => {
                // Only the connection that registered the entry may remove it, so the
                // late close of an old connection does not erase the user's reconnect.
                if map.get(&user).is_some_and(|(_, c)| *c == conn) {
                    map.remove(&user);
                }
            }
            Command::Snapshot(reply) => {
                let snap = map
                    .iter()
                    .map(|(u, (s, _))| (u.clone(), s.clone()))
                    .collect();
                let _ = reply.send(snap);
            }
        }
    }
}

/// Removes a connection's presence entry when dropped, however the connection ends.
pub struct PresenceGuard {
    presence: Arc<dyn Presence>,
    user: String,
    conn: ConnId,
}

impl PresenceGuard {
    /// Marks `user` online on `server` via `conn`; offline again when the guard drops.
    pub fn register(
        presence: Arc<dyn Presence>,
        user: &str,
        server: &str,
        conn: ConnId,
    ) -> PresenceGuard {
        presence.online(user, server, conn);
        PresenceGuard {
            presence,
            user: user.to_string(),
            conn,
        }
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence.offline(&self.user, self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_close_of_old_connection_keeps_reconnect() {
        let p = LocalPresence::spawn();
        p.online("alice", "s1", 1);
        p.online("alice", "s2", 2);
        p.offline("alice", 1);
        let snap = p.snapshot().await;
        assert_eq!(snap.get("alice").map(String::as_str), Some("s2"));
        p.offline("alice", 2);
        assert!(p.snapshot().await.is_empty());
    }

    #[tokio::test]
    async fn guard_removes_on_drop() {
        let p = LocalPresence::shared();
        let g = PresenceGuard::register(p.clone(), "bob", "s1", 7);
        assert_eq!(p.snapshot().await.len(), 1);
        drop(g);
        assert!(p.snapshot().await.is_empty());
    }
}
