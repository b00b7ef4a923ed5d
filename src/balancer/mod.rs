//! The backend set of one service: every configured backend with its live counters,
//! and the healthy subset as an immutable snapshot behind an `ArcSwap`.
//!
//! The data plane only ever `load()`s the snapshot and picks from it with atomics;
//! the health checker is the only writer (`set_up`), building the next snapshot off the
//! hot path and `store()`ing it.

mod backend;
mod select;

pub use backend::{Backend, BackendState};

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::broadcast;

use crate::config::{Balance, ServiceConfig};

/// A health transition, as published to observers (logs, the demo, later the admin API).
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

/// The healthy backends at one moment, with what selection needs precomputed.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Healthy backends with weight > 0, in configuration order.
    pub backends: Vec<Arc<Backend>>,
    /// Smooth weighted round-robin order (indices into `backends`), one slot per weight unit.
    schedule: Vec<u32>,
}

impl Snapshot {
    fn build(backends: Vec<Arc<Backend>>) -> Snapshot {
        let schedule = select::smooth_schedule(&backends);
        Snapshot { backends, schedule }
    }
}

/// All backends of one service and the healthy snapshot the data plane picks from.
pub struct BackendSet {
    pub service: Arc<str>,
    /// Every configured backend, up or down, in configuration order.
    pub all: Vec<Arc<Backend>>,
    policy: Balance,
    healthy: ArcSwap<Snapshot>,
    /// Round-robin cursor; Relaxed is enough, only spreading matters.
    cursor: std::sync::atomic::AtomicUsize,
    /// Serialises snapshot rebuilds between health tasks (control plane only).
    publish: Mutex<()>,
    events: broadcast::Sender<Transition>,
}

impl BackendSet {
    /// Builds the set from config; every backend starts up (until its first check answers).
    pub fn new(cfg: &ServiceConfig, events: broadcast::Sender<Transition>) -> BackendSet {
        let service: Arc<str> = cfg.name.as_str().into();
        let all: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .map(|b| Arc::new(Backend::new(service.clone(), b)))
            .collect();
        let set = BackendSet {
            service,
            all,
            policy: cfg.balance,
            healthy: ArcSwap::from_pointee(Snapshot::default()),
            cursor: Default::default(),
            publish: Mutex::new(()),
            events,
        };
        set.republish();
        set
    }

    /// The current healthy snapshot (one atomic load, no lock).
    pub fn healthy(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.healthy.load()
    }

    /// Picks a healthy backend for a new connection, skipping those in `tried`.
    /// Hot path: one snapshot load, atomics, no lock, no allocation.
    pub fn pick(&self, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let snap = self.healthy.load();
        let skip = |b: &Arc<Backend>| tried.iter().any(|t| Arc::ptr_eq(t, b));
        match self.policy {
            Balance::RoundRobin => {
                let start = self
                    .cursor
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                select::round_robin(&snap.backends, &snap.schedule, start, skip)
            }
            Balance::Random => select::weighted_random(&snap.backends, skip),
            Balance::LeastConn => select::least_conn(&snap.backends, skip),
        }
        .cloned()
    }

    /// Marks `backend` up or down, publishes the new healthy snapshot and a transition.
    /// Returns false if it already was in that state. Control plane only.
    pub fn set_up(&self, backend: &Arc<Backend>, up: bool, reason: &str) -> bool {
        let to = if up {
            BackendState::Up
        } else {
            BackendState::Down
        };
        let from = backend.swap_state(to);
        if from == to {
            return false;
        }
        self.republish();
        if !up {
            // Connections still open to it are told to close (if the service says so).
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

    fn republish(&self) {
        let _guard = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let up = self
            .all
            .iter()
            .filter(|b| b.state() == BackendState::Up && b.weight > 0)
            .cloned()
            .collect();
        self.healthy.store(Arc::new(Snapshot::build(up)));
    }
}
