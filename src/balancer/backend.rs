//! One backend: its address, health and admin state, and live counters (all atomics).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::BackendConfig;

/// Health of a backend as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Up,
    Down,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
        }
    }
}

/// What the operator asked of a backend (admin API); survives reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Takes traffic when healthy.
    Enabled,
    /// No new connections; open ones stay.
    Draining,
    /// No new connections; open ones were closed.
    Disabled,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }

    fn from_u8(v: u8) -> AdminState {
        match v {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }
}

/// Connect failures by kind, for metrics and the admin API.
#[derive(Debug, Default)]
pub struct ConnectErrors {
    pub refused: AtomicU64,
    pub timeout: AtomicU64,
    pub other: AtomicU64,
}

/// The last health transition of a backend.
#[derive(Debug, Clone)]
pub struct LastTransition {
    pub to: &'static str,
    pub reason: String,
    pub at: SystemTime,
}

/// A configured backend. Health is written by its checker, admin state by the admin API,
/// weight and `removed` by the reloader, counters by the data plane; all read lock-free.
/// Shared as `Arc<Backend>`; identity across reloads is (service, name, addr).
#[derive(Debug)]
pub struct Backend {
    pub service: Arc<str>,
    pub name: Arc<str>,
    pub addr: SocketAddr,
    weight: AtomicU32,
    health: AtomicU8,
    admin: AtomicU8,
    /// Gone from the config; its open connections drain.
    removed: AtomicBool,
    /// Client connections currently proxied to this backend.
    pub active: AtomicUsize,
    /// Connections ever established to this backend.
    pub total: AtomicU64,
    /// Bytes client -> backend and backend -> client, counted as they move.
    pub bytes_to: AtomicU64,
    pub bytes_from: AtomicU64,
    /// Consecutive failed connects by the data plane (passive check); reset on success.
    pub connect_failures: AtomicU32,
    pub connect_errors: ConnectErrors,
    /// Woken when passive failures reach `fall`, so the health task marks it down now.
    pub passive_down: Notify,
    /// Consecutive results of the active check: positive = passes, negative = failures.
    pub check_streak: std::sync::atomic::AtomicI32,
    /// Latency of the last passed check, in microseconds (0 = none yet).
    pub last_check_us: AtomicU64,
    /// Health transitions so far.
    pub transitions: AtomicU64,
    last_transition: Mutex<Option<LastTransition>>,
    /// The service's "drain over" token; parent of `on_kick`.
    parent: CancellationToken,
    /// Cancelled to close every connection regardless of policy (disable, removal);
    /// a child of `parent`, so it also fires when the service's drain time runs out.
    on_kick: ArcSwap<CancellationToken>,
    /// Cancelled when health marks the backend down; a child of `on_kick`. A connection
    /// watches this one token when on_backend_down = close, else `on_kick`: one wait
    /// future per connection instead of three (that is memory every idle connection holds).
    on_down: ArcSwap<CancellationToken>,
}

impl Backend {
    /// A backend in health `initial`: Up at start-up (until its first check answers),
    /// Down when added by a reload (it is checked before it takes traffic).
    /// `parent` is the service's "drain over" token.
    pub fn new(
        service: Arc<str>,
        cfg: &BackendConfig,
        initial: BackendState,
        parent: &CancellationToken,
    ) -> Backend {
        let on_kick = parent.child_token();
        let on_down = on_kick.child_token();
        Backend {
            service,
            name: cfg.name.as_str().into(),
            addr: cfg.addr,
            weight: AtomicU32::new(cfg.weight),
            health: AtomicU8::new(initial as u8),
            admin: AtomicU8::new(0),
            removed: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            bytes_to: AtomicU64::new(0),
            bytes_from: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            connect_errors: ConnectErrors::default(),
            passive_down: Notify::new(),
            check_streak: Default::default(),
            last_check_us: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
            last_transition: Mutex::new(None),
            parent: parent.clone(),
            on_kick: ArcSwap::from_pointee(on_kick),
            on_down: ArcSwap::from_pointee(on_down),
        }
    }

    pub fn health(&self) -> BackendState {
        if self.health.load(Ordering::Acquire) == BackendState::Up as u8 {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Acquire))
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// May new connections go here (given its health)?
    pub fn eligible(&self) -> bool {
        self.health() == BackendState::Up
            && self.admin() == AdminState::Enabled
            && !self.is_removed()
            && self.weight() > 0
    }

    /// What an operator sees: disabled and draining (asked for, or removed by a reload)
    /// win over health.
    pub fn state_label(&self) -> &'static str {
        match (self.admin(), self.is_removed()) {
            (AdminState::Disabled, _) => "disabled",
            (AdminState::Draining, _) | (_, true) => "draining",
            _ => self.health().as_str(),
        }
    }

    pub fn last_transition(&self) -> Option<LastTransition> {
        self.last_transition
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn last_check_latency(&self) -> Option<Duration> {
        match self.last_check_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The token a new connection watches for "backend marked down".
    pub fn down_token(&self) -> CancellationToken {
        (**self.on_down.load()).clone()
    }

    /// The token every connection watches for "close now" (disable, removal).
    pub fn kick_token(&self) -> CancellationToken {
        (**self.on_kick.load()).clone()
    }

    pub(crate) fn swap_health(&self, to: BackendState) -> BackendState {
        if self.health.swap(to as u8, Ordering::AcqRel) == BackendState::Up as u8 {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    pub(crate) fn set_admin_state(&self, to: AdminState) -> AdminState {
        AdminState::from_u8(self.admin.swap(to as u8, Ordering::AcqRel))
    }

    pub(crate) fn set_weight(&self, w: u32) {
        self.weight.store(w, Ordering::Relaxed);
    }

    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    pub(crate) fn record_transition(&self, to: &'static str, reason: &str) {
        self.transitions.fetch_add(1, Ordering::Relaxed);
        *self
            .last_transition
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(LastTransition {
            to,
            reason: reason.to_string(),
            at: SystemTime::now(),
        });
    }

    /// Closes connections watching the down token, and arms a fresh one for later ones.
    pub(crate) fn sever(&self) {
        let fresh = self.on_kick.load().child_token();
        self.on_down.swap(Arc::new(fresh)).cancel();
    }

    /// Closes every open connection, and arms fresh tokens for later ones.
    pub(crate) fn kick(&self) {
        let kick = self.parent.child_token();
        let down = kick.child_token();
        let old = self.on_kick.swap(Arc::new(kick));
        self.on_down.store(Arc::new(down));
        old.cancel();
    }
}
