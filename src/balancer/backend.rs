//! One backend: its address, health state and live counters (all atomics).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::BackendConfig;

/// Health state of a backend as the balancer sees it.
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

/// A configured backend. Written by the health checker (state) and by the data plane
/// (counters); read by both. Shared as `Arc<Backend>`.
#[derive(Debug)]
pub struct Backend {
    pub service: Arc<str>,
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub weight: u32,
    state: AtomicU8,
    /// Client connections currently proxied to this backend.
    pub active: AtomicUsize,
    /// Connections ever established to this backend.
    pub total: AtomicU64,
    /// Bytes client -> backend, and backend -> client, counted when connections close.
    pub bytes_to: AtomicU64,
    pub bytes_from: AtomicU64,
    /// Consecutive failed connects by the data plane (passive check); reset on success.
    pub connect_failures: AtomicU32,
    /// Woken when passive failures reach `fall`, so the health task marks it down now.
    pub passive_down: Notify,
    /// Cancelled when the backend is marked down; open connections watch it.
    sever: ArcSwap<CancellationToken>,
}

impl Backend {
    pub fn new(service: Arc<str>, cfg: &BackendConfig) -> Backend {
        Backend {
            service,
            name: cfg.name.as_str().into(),
            addr: cfg.addr,
            weight: cfg.weight,
            state: AtomicU8::new(BackendState::Up as u8),
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            bytes_to: AtomicU64::new(0),
            bytes_from: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            passive_down: Notify::new(),
            sever: ArcSwap::from_pointee(CancellationToken::new()),
        }
    }

    pub fn state(&self) -> BackendState {
        if self.state.load(Ordering::Acquire) == BackendState::Up as u8 {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    pub(crate) fn swap_state(&self, to: BackendState) -> BackendState {
        if self.state.swap(to as u8, Ordering::AcqRel) == BackendState::Up as u8 {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    /// The token a new connection to this backend watches; cancelled when it goes down.
    pub fn sever_token(&self) -> CancellationToken {
        (**self.sever.load()).clone()
    }

    /// Cancels the current token (closing the connections that chose to watch it) and
    /// installs a fresh one for connections made after a recovery.
    pub(crate) fn sever(&self) {
        let old = self.sever.swap(Arc::new(CancellationToken::new()));
        old.cancel();
    }
}
