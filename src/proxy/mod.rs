//! Data plane: listeners, the accept loop, connect with retry, and the splice between
//! a client and its backend.

mod connect;
mod copy;
mod listener;
#[cfg(target_os = "linux")]
pub mod pipes;
mod splice;

pub use connect::{ConnectError, connect_backend};
pub use listener::{bind, tune_listener, tune_stream};
pub use splice::{CloseReason, Totals, splice};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::BackendSet;
use crate::config::{OnBackendDown, ServiceConfig};

/// Per-service counters (read by the admin API and metrics).
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Client connections closed because no backend could be reached.
    pub rejected: AtomicU64,
    /// Client connections open now.
    pub active: AtomicUsize,
    /// Refusals are logged at most once a second per service: with every backend down,
    /// thousands of reconnecting clients would otherwise flood the log.
    refusal_log: LogLimiter,
}

/// Lets one log line through per second and counts the ones it held back.
#[derive(Debug, Default)]
struct LogLimiter {
    /// Second (since the process's first use) of the last line let through, plus one.
    last: AtomicU64,
    held_back: AtomicU64,
}

impl LogLimiter {
    /// `Some(n)`: log now, `n` lines were held back since the last one.
    fn allow(&self) -> Option<u64> {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != now
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// What the accept loop and its connection tasks of one service share.
pub struct Service {
    pub name: Arc<str>,
    /// The service's settings; a reload swaps in new ones, connections read them once.
    config: ArcSwap<ServiceConfig>,
    pub backends: Arc<BackendSet>,
    pub stats: ServiceStats,
    /// Client connections in flight (each task holds a permit); at the limit accepting pauses.
    limit: Arc<Semaphore>,
    /// Process-wide descriptor budget shared by all services: one permit per proxied
    /// connection (two fds). Accepting pauses when it runs out, so lb never accepts a
    /// client it has no descriptor left to connect onwards for (HAProxy's auto maxconn).
    fd_budget: Arc<Semaphore>,
    /// Connection tasks, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the drain timeout runs out: remaining connections are closed.
    pub hard_stop: CancellationToken,
}

impl Service {
    /// `hard_stop` is the token the service's backends were created under.
    pub fn new(
        config: ServiceConfig,
        backends: Arc<BackendSet>,
        fd_budget: Arc<Semaphore>,
        hard_stop: CancellationToken,
    ) -> Service {
        Service {
            name: config.name.as_str().into(),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            config: ArcSwap::from_pointee(config),
            fd_budget,
            backends,
            stats: ServiceStats::default(),
            connections: TaskTracker::new(),
            hard_stop,
        }
    }

    pub fn config(&self) -> Arc<ServiceConfig> {
        self.config.load_full()
    }

    /// Reload: new settings for connections from now on; `max_connections` adjusts the
    /// permits (a lower limit takes effect as open connections finish).
    pub fn set_config(&self, new: ServiceConfig) {
        let old = self.config.load();
        if new.max_connections > old.max_connections {
            self.limit
                .add_permits(new.max_connections - old.max_connections);
        } else if new.max_connections < old.max_connections {
            let excess = old.max_connections - new.max_connections;
            let limit = self.limit.clone();
            // Take the permits back as they come free, without blocking the reload.
            tokio::spawn(async move {
                if let Ok(p) = limit.acquire_many(excess as u32).await {
                    p.forget();
                }
            });
        }
        drop(old);
        self.config.store(Arc::new(new));
    }
}

/// Accepts until `stop` is cancelled. Never dies on an accept error and never spins:
/// resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off exponentially up to 1 s
/// while the kernel keeps queueing new connections in the backlog.
pub async fn accept_loop(
    service: Arc<Service>,
    listener: Arc<TcpListener>,
    stop: CancellationToken,
) {
    const BACKOFF_MIN: Duration = Duration::from_millis(5);
    const BACKOFF_MAX: Duration = Duration::from_secs(1);
    let mut backoff = BACKOFF_MIN;
    loop {
        // Both permits before accept(): at either limit the kernel queues new clients.
        let permits = tokio::select! {
            _ = stop.cancelled() => break,
            p = async {
                let service_permit = service.limit.clone().acquire_owned().await?;
                let fd_permit = service.fd_budget.clone().acquire_owned().await?;
                Ok::<_, tokio::sync::AcquireError>((service_permit, fd_permit))
            } => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = BACKOFF_MIN;
                service.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let service = service.clone();
                // No tracing span per connection: it would cost an allocation and a
                // few hundred bytes per idle connection; the lines carry the fields.
                service.connections.clone().spawn(async move {
                    service.stats.active.fetch_add(1, Ordering::Relaxed);
                    handle(&service, client, peer).await;
                    service.stats.active.fetch_sub(1, Ordering::Relaxed);
                    drop(permits);
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                tracing::warn!(service = %service.name, "accept: {e}; backing off {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            // ECONNABORTED and friends concern one connection only: go on.
            Err(e) => tracing::debug!(service = %service.name, "accept: {e}"),
        }
    }
    tracing::info!(service = %service.name, "stopped accepting");
}

fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One client connection: pick, connect (with retries), splice, log one line at the end.
async fn handle(service: &Service, client: TcpStream, peer: SocketAddr) {
    let start = Instant::now();
    // The client socket inherited TCP_NODELAY and keepalive from the listener.
    let cfg = service.config();
    let (backend, upstream) = match connect_backend(&service.backends, &cfg).await {
        Ok(pair) => pair,
        Err(e) => {
            service.stats.rejected.fetch_add(1, Ordering::Relaxed);
            // Close at once so the client retries instead of hanging.
            if let Some(held_back) = service.stats.refusal_log.allow() {
                tracing::warn!(
                    service = %service.name,
                    client = %peer,
                    duration_ms = start.elapsed().as_millis() as u64,
                    reason = e.reason(),
                    similar_lines_held_back = held_back,
                    "connection refused: {e}"
                );
            }
            return;
        }
    };
    backend.active.fetch_add(1, Ordering::Relaxed);
    backend.total.fetch_add(1, Ordering::Relaxed);
    // One token covers every outside reason to close (see Backend's tokens); which one
    // fired is read back afterwards.
    let watched = match cfg.on_backend_down {
        OnBackendDown::Close => backend.down_token(),
        OnBackendDown::Keep => backend.kick_token(),
    };
    let stop = async {
        watched.cancelled().await;
        if service.hard_stop.is_cancelled() {
            CloseReason::Shutdown
        } else if backend.is_removed() {
            CloseReason::BackendRemoved
        } else if backend.admin() == crate::balancer::AdminState::Disabled {
            CloseReason::BackendDisabled
        } else {
            CloseReason::BackendDown
        }
    };
    let totals = splice(client, upstream, cfg.idle_timeout, &backend, stop).await;
    backend.active.fetch_sub(1, Ordering::Relaxed);
    crate::metrics::connection_closed(service, &backend, start.elapsed());
    tracing::info!(
        service = %service.name,
        client = %peer,
        backend = %backend.name,
        bytes_in = totals.to_backend,
        bytes_out = totals.to_client,
        duration_ms = start.elapsed().as_millis() as u64,
        reason = totals.reason.as_str(),
        "connection closed"
    );
}
