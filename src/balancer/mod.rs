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

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
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
    /// Percent of healthy backends below which health is ignored (0: never).
    panic_threshold: AtomicU8,
    panic: AtomicBool,
    events: broadcast::Sender<Transition>,
}

impl BackendSet {
    pub fn new(
        service: Arc<str>,
        policy: Balance,
        panic_threshold: u8,
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
            panic_threshold: AtomicU8::new(panic_threshold),
            panic: AtomicBool::new(false),
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
        // In panic mode the backend still takes traffic, so its clients stay too.
        if !up && !self.in_panic() {
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
    pub fn replace(&self, policy: Balance, panic_threshold: u8, members: Vec<Arc<Backend>>) {
        self.policy.store(policy as u8, Ordering::Relaxed);
        self.panic_threshold
            .store(panic_threshold, Ordering::Relaxed);
        self.members.store(Arc::new(members));
        self.republish();
    }

    /// Rebuilds the eligible snapshot from the members' current states.
    ///
    /// Panic mode (Envoy's panic threshold): when fewer than `panic_threshold` percent of
    /// the backends that could take traffic are healthy (but at least one is), health is
    /// ignored and all of them take traffic. Losing most of a service at once is more often the checks
    /// failing under a reconnect storm than most servers dying together; sending every
    /// client to the last healthy one would overload it too and cascade. Connects to a
    /// backend that is really dead are refused and retried elsewhere.
    pub fn republish(&self) {
        let _guard = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let members = self.members.load();
        let candidates: Vec<&Arc<Backend>> = members
            .iter()
            .filter(|b| b.admin() == AdminState::Enabled && !b.is_removed() && b.weight() > 0)
            .collect();
        let healthy = candidates
            .iter()
            .filter(|b| b.health() == BackendState::Up)
            .count();
        let threshold = self.panic_threshold.load(Ordering::Relaxed) as usize;
        // With none healthy there is no panic: clients are closed at once, as promised.
        let panic = healthy > 0 && healthy * 100 < threshold * candidates.len();
        if panic != self.panic.swap(panic, Ordering::Relaxed) {
            if panic {
                tracing::warn!(service = %self.service, healthy, candidates = candidates.len(), "panic mode: fewer than {threshold}% of backends healthy; all of them take traffic");
            } else {
                tracing::info!(service = %self.service, healthy, "panic mode over");
            }
        }
        let entries = candidates
            .into_iter()
            .filter(|b| panic || b.health() == BackendState::Up)
            .map(|b| Entry {
                backend: b.clone(),
                weight: b.weight(),
            })
            .collect();
        self.eligible.store(Arc::new(Snapshot::build(entries)));
    }

    /// True while health is ignored because too few backends are healthy.
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use tokio_util::sync::CancellationToken;

    fn set_of(n: usize, panic_threshold: u8) -> BackendSet {
        let parent = CancellationToken::new();
        let members = (0..n)
            .map(|i| {
                Arc::new(Backend::new(
                    "svc".into(),
                    &BackendConfig {
                        name: format!("b{i}"),
                        addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                        weight: 1,
                    },
                    BackendState::Up,
                    &parent,
                ))
            })
            .collect();
        let (events, _) = broadcast::channel(16);
        BackendSet::new(
            "svc".into(),
            Balance::RoundRobin,
            panic_threshold,
            members,
            events,
        )
    }

    #[test]
    fn panic_mode_ignores_health_below_threshold_but_not_at_zero() {
        let set = set_of(3, 50);
        let m = set.members();
        let b1_down = m[1].down_token();
        set.set_health(&m[1], false, "test");
        assert_eq!(set.eligible().len(), 2);
        assert!(!set.in_panic());
        assert!(
            b1_down.is_cancelled(),
            "outside panic mode its connections are closed"
        );
        let b2_down = m[2].down_token();
        set.set_health(&m[2], false, "test");
        assert!(set.in_panic(), "1 of 3 healthy is under 50%");
        assert_eq!(
            set.eligible().len(),
            3,
            "in panic every backend takes traffic"
        );
        assert!(!b2_down.is_cancelled(), "in panic its clients stay");
        set.set_health(&m[0], false, "test");
        assert!(
            !set.in_panic(),
            "none healthy: no panic, clients are refused"
        );
        assert_eq!(set.eligible().len(), 0);
        set.set_health(&m[1], true, "test");
        set.set_health(&m[2], true, "test");
        assert!(!set.in_panic());
        assert_eq!(set.eligible().len(), 2);
    }

    #[test]
    fn panic_threshold_zero_never_panics() {
        let set = set_of(3, 0);
        let m = set.members();
        set.set_health(&m[1], false, "test");
        set.set_health(&m[2], false, "test");
        assert!(!set.in_panic());
        assert_eq!(set.eligible().len(), 1);
    }
}
