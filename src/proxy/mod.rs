//! Data plane: listeners, the accept loop, connect with retry, and the splice between
//! a client and its backend.

mod connect;
mod listener;
mod splice;

pub use connect::{ConnectError, connect_backend};
pub use listener::{bind, tune_stream};
pub use splice::{CloseReason, Totals, splice};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::balancer::BackendSet;
use crate::config::{OnBackendDown, ServiceConfig};

/// What the accept loop and its connection tasks of one service share.
pub struct Service {
    pub config: ServiceConfig,
    pub backends: Arc<BackendSet>,
    /// Client connections in flight (each task holds a permit); at the limit accepting pauses.
    pub limit: Arc<Semaphore>,
    /// Process-wide descriptor budget shared by all services: one permit per proxied
    /// connection (two fds). Accepting pauses when it runs out, so lb never accepts a
    /// client it has no descriptor left to connect onwards for (HAProxy's auto maxconn).
    pub fd_budget: Arc<Semaphore>,
    /// Connection tasks, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the drain timeout runs out: remaining connections are closed.
    pub hard_stop: CancellationToken,
}

impl Service {
    pub fn new(
        config: ServiceConfig,
        backends: Arc<BackendSet>,
        fd_budget: Arc<Semaphore>,
    ) -> Service {
        Service {
            limit: Arc::new(Semaphore::new(config.max_connections)),
            fd_budget,
            config,
            backends,
            connections: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
        }
    }
}

/// Accepts until `stop` is cancelled. Never dies on an accept error and never spins:
/// resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off exponentially up to 1 s
/// while the kernel keeps queueing new connections in the backlog.
pub async fn accept_loop(service: Arc<Service>, listener: TcpListener, stop: CancellationToken) {
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
                let service = service.clone();
                let span =
                    tracing::info_span!("conn", service = %service.config.name, client = %peer);
                service.connections.clone().spawn(
                    async move {
                        handle(&service, client, peer).await;
                        drop(permits);
                    }
                    .instrument(span),
                );
            }
            Err(e) if is_resource_exhaustion(&e) => {
                tracing::warn!(service = %service.config.name, "accept: {e}; backing off {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            // ECONNABORTED and friends concern one connection only: go on.
            Err(e) => tracing::debug!(service = %service.config.name, "accept: {e}"),
        }
    }
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
    tune_stream(&client);
    let cfg = &service.config;
    let (backend, upstream) = match connect_backend(&service.backends, cfg).await {
        Ok(pair) => pair,
        Err(e) => {
            // Close at once so the client retries instead of hanging.
            tracing::warn!(
                client = %peer,
                duration_ms = start.elapsed().as_millis() as u64,
                reason = e.reason(),
                "connection refused: {e}"
            );
            return;
        }
    };
    backend
        .active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    backend
        .total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sever = match cfg.on_backend_down {
        OnBackendDown::Close => backend.sever_token(),
        // A token nobody cancels: the connection ignores its backend's health.
        OnBackendDown::Keep => CancellationToken::new(),
    };
    let totals = splice(
        client,
        upstream,
        cfg.idle_timeout,
        &sever,
        &service.hard_stop,
    )
    .await;
    backend
        .active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    backend
        .bytes_to
        .fetch_add(totals.to_backend, std::sync::atomic::Ordering::Relaxed);
    backend
        .bytes_from
        .fetch_add(totals.to_client, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        client = %peer,
        backend = %backend.name,
        bytes_in = totals.to_backend,
        bytes_out = totals.to_client,
        duration_ms = start.elapsed().as_millis() as u64,
        reason = totals.reason.as_str(),
        "connection closed"
    );
}
