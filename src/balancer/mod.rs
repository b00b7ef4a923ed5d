//! The backend set of one service: every configured backend with its live counters,
//! and the eligible subset as an immutable snapshot behind an `ArcSwap`.
//!
//! The data plane only ever `load()`s the snapshot and picks from it with atomics.
//! The control plane (health checkers, the reloader, the admin API) changes a backend's
//! state and calls `republish()`, which builds the next snapshot off the hot path and
//! `store()`s it.

mod backend;
mod select;

pub use backend::{AdminState, Backend, BackendState, ConnectErrors, LastTransition};

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::broadcast;

use crate::config::Balance;

/// A health transition, as published to observers (logs, the demo, systemd status).
#[derive(Debug, Clone)]
pub struct Transition {
    pub service: Arc<str>,
    pub backend: Arc<str>,
    pub from: BackendState,
    pub to: BackendState,
    pub reason: String,
    pub at: Instant,
    pub wall: SystemTime,
}

/// One eligible backend in a snapshot, with the weight it had when the snapshot was built.
#[derive(Debug, Clone)]
pub struct Entry {
    pub backend: Arc<Backend>,
    pub weight: u32,
}

/// The eligible backends at one moment, with what selection needs precomputed.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Healthy, enabled backends with weight > 0, in configuration order.
    pub entries: Vec<Entry>,
    /// Smooth weighted round-robin order (indices into `entries`), one slot per weight unit.
    schedule: Vec<u32>,
}

impl Snapshot {
    fn build(entries: Vec<Entry>) -> Snapshot {
        let schedule = select::smooth_schedule(&entries);
        Snapshot { entries, schedule }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// All backends of one service and the snapshot the data plane picks from.
pub struct BackendSet {
    pub service: Arc<str>,
    /// Configured backends (removed ones leave), in configuration order.
    members: ArcSwap<Vec<Arc<Backend>>>,
    policy: AtomicU8,
    eligible: ArcSwap<Snapshot>,
    /// Round-robin cursor; Relaxed is enough, only spreading matters.
    cursor: AtomicUsize,
    /// Serialises snapshot rebuilds between control-plane writers.
    publish: Mutex<()>,
    events: broadcast::Sender<Transition>,
}

impl BackendSet {
    pub fn new(
        service: Arc<str>,
        policy: Balance,
        members: Vec<Arc<Backend>>,
        events: broadcast::Sender<Transition>,
    ) -> BackendSet {
        let set = BackendSet {
            service,
            members: ArcSwap::from_pointee(members),
            policy: AtomicU8::new(policy as u8),
            eligible: ArcSwap::from_pointee(Snapshot::default()),
            cursor: Default::default(),
            publish: Mutex::new(()),
            events,
        };
        set.republish();
        set
    }

    /// The configured backends now.
    pub fn members(&self) -> Arc<Vec<Arc<Backend>>> {
        self.members.load_full()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Backend>> {
        self.members
            .load()
            .iter()
            .find(|b| &*b.name == name)
            .cloned()
    }

    /// The current eligible snapshot (one atomic load, no lock).
    pub fn eligible(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.eligible.load()
    }

    fn policy(&self) -> Balance {
        match self.policy.load(Ordering::Relaxed) {
            x if x == Balance::RoundRobin as u8 => Balance::RoundRobin,
            x if x == Balance::Random as u8 => Balance::Random,
            _ => Balance::LeastConn,
        }
    }

    /// Picks an eligible backend for a new connection, skipping those in `tried`.
    /// Hot path: one snapshot load, atomics, no lock, no allocation.
    pub fn pick(&self, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let snap = self.eligible.load();
        let skip = |b: &Arc<Backend>| tried.iter().any(|t| Arc::ptr_eq(t, b));
        match self.policy() {
            Balance::RoundRobin => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                select::round_robin(&snap.entries, &snap.schedule, start, skip)
            }
            Balance::Random => select::weighted_random(&snap.entries, skip),
            Balance::LeastConn => select::least_conn(&snap.entries, skip),
        }
        .cloned()
    }

    /// Marks `backend` up or down, publishes the new snapshot and a transition, and (when
    /// down) closes the connections that watch its down token. Returns false if it
    /// already was in that state.
    pub fn set_health(&self, backend: &Arc<Backend>, up: bool, reason: &str) -> bool {
        let to = if up {
            BackendState::Up
        } else {
            BackendState::Down
        };
        let from = backend.swap_health(to);
        if from == to {
            return false;
        }
        backend.record_transition(to.as_str(), reason);
        self.republish();
        if !up {
            backend.sever();
        }
        tracing::info!(
            service = %self.service,
            backend = %backend.name,
            addr = %backend.addr,
            from = from.as_str(),
            to = to.as_str(),
            reason,
            "backend {} is {}",
            backend.name,
            to.as_str()
        );
        let _ = self.events.send(Transition {
            service: self.service.clone(),
            backend: backend.name.clone(),
            from,
            to,
            reason: reason.to_string(),
            at: Instant::now(),
            wall: SystemTime::now(),
        });
        true
    }

    /// Admin: drain (no new connections), disable (and close open ones) or enable.
    pub fn set_admin(&self, backend: &Arc<Backend>, to: AdminState) {
        let from = backend.set_admin_state(to);
        if from != to {
            backend.record_transition(to.as_str(), "admin request");
            tracing::info!(service = %self.service, backend = %backend.name, from = from.as_str(), to = to.as_str(), "backend {} is {} (admin)", backend.name, to.as_str());
        }
        self.republish();
        if to == AdminState::Disabled {
            backend.kick();
        }
    }

    /// Reload: the new member list (kept backends are the same `Arc`s) and policy.
    pub fn replace(&self, policy: Balance, members: Vec<Arc<Backend>>) {
        self.policy.store(policy as u8, Ordering::Relaxed);
        self.members.store(Arc::new(members));
        self.republish();
    }

    /// Rebuilds the eligible snapshot from the members' current states.
    pub fn republish(&self) {
        let _guard = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let entries = self
            .members
            .load()
            .iter()
            .filter(|b| b.eligible())
            .map(|b| Entry {
                backend: b.clone(),
                weight: b.weight(),
            })
            .collect();
        self.eligible.store(Arc::new(Snapshot::build(entries)));
    }
}
