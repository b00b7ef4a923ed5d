//! `lb run`: binds every service's listener, starts the health checkers and accept
//! loops, reports ready after the first health round, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::{BackendSet, Transition};
use crate::config::Config;
use crate::proxy::{self, Service};

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("service {service:?}: cannot listen on {addr}: {source}")]
    Bind {
        service: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running balancer: its services, and the handles to stop it.
pub struct Balancer {
    pub services: Vec<Arc<Service>>,
    /// Bound addresses, in service order (useful when a config says port 0).
    pub local_addrs: Vec<SocketAddr>,
    events: broadcast::Sender<Transition>,
    stop_accepting: CancellationToken,
    stop_checks: CancellationToken,
    background: TaskTracker,
}

impl Balancer {
    /// Binds every listener first, so a bad address fails before anything starts.
    pub fn bind(config: &Config) -> Result<Vec<TcpListener>, ServerError> {
        config
            .services
            .iter()
            .map(|s| {
                proxy::bind(s.listen).map_err(|source| ServerError::Bind {
                    service: s.name.clone(),
                    addr: s.listen,
                    source,
                })
            })
            .collect()
    }

    /// Starts checkers and accept loops on already bound `listeners` (one per service,
    /// in order); returns once the first health round is done.
    pub async fn start(config: Config, listeners: Vec<TcpListener>) -> Balancer {
        raise_fd_limit();
        let fd_budget = Arc::new(Semaphore::new(connection_capacity(&config)));
        let (events, _) = broadcast::channel(1024);
        let stop_accepting = CancellationToken::new();
        let stop_checks = CancellationToken::new();
        let background = TaskTracker::new();
        let mut services = Vec::new();
        let mut first_rounds = Vec::new();
        for s in config.services {
            let set = Arc::new(BackendSet::new(&s, events.clone()));
            first_rounds.push(crate::health::spawn_checkers(
                &set,
                &s.health,
                &background,
                &stop_checks,
            ));
            services.push(Arc::new(Service::new(s, set, fd_budget.clone())));
        }
        for f in first_rounds {
            f.await;
        }
        let mut local_addrs = Vec::new();
        for (service, listener) in services.iter().zip(listeners) {
            local_addrs.push(listener.local_addr().unwrap_or(service.config.listen));
            background.spawn(proxy::accept_loop(
                service.clone(),
                listener,
                stop_accepting.clone(),
            ));
        }
        Balancer {
            services,
            local_addrs,
            events,
            stop_accepting,
            stop_checks,
            background,
        }
    }

    /// Health transitions from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.events.subscribe()
    }

    /// Healthy and total backends over all services.
    pub fn healthy_count(&self) -> (usize, usize) {
        self.services.iter().fold((0, 0), |(h, t), s| {
            (
                h + s.backends.healthy().backends.len(),
                t + s.backends.all.len(),
            )
        })
    }

    /// Stops accepting (listeners close, new connects are refused), lets open connections
    /// finish for up to each service's `drain_timeout`, then closes what is left.
    pub async fn shutdown(self) {
        self.stop_accepting.cancel();
        let drains = self.services.iter().map(|s| {
            let s = s.clone();
            async move {
                s.connections.close();
                let open = s.connections.len();
                if open > 0 {
                    tracing::info!(service = %s.config.name, open, "draining for up to {:?}", s.config.drain_timeout);
                }
                if tokio::time::timeout(s.config.drain_timeout, s.connections.wait())
                    .await
                    .is_err()
                {
                    tracing::info!(service = %s.config.name, open = s.connections.len(), "drain timeout: closing the rest");
                    s.hard_stop.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.connections.wait()).await;
                }
            }
        });
        futures_util::future::join_all(drains).await;
        self.stop_checks.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.background.wait()).await;
    }
}

/// The whole of `lb run` after the config is loaded: bind, start, serve until
/// `shutdown` resolves, drain, return.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let listeners = Balancer::bind(&config)?;
    let balancer = Balancer::start(config, listeners).await;
    let (healthy, total) = balancer.healthy_count();
    for (s, addr) in balancer.services.iter().zip(&balancer.local_addrs) {
        tracing::info!(service = %s.config.name, listen = %addr, backends = s.backends.all.len(), "listening");
    }
    tracing::info!(
        healthy,
        total,
        "ready: first health round done, {healthy}/{total} backends up"
    );
    shutdown.await;
    tracing::info!("shutting down: no longer accepting");
    balancer.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft open-file limit to the hard one: each proxied connection costs two
/// descriptors, so the default soft limit (often 1024) would cap lb at ~500 clients.
fn raise_fd_limit() {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
}

/// How many proxied connections the open-file limit leaves room for: two descriptors
/// each, after a reserve for listeners, health checks, the runtime and stdio.
fn connection_capacity(config: &Config) -> usize {
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
    let reserve = 32 + config.services.len() + backends;
    let capacity = (nofile as usize).saturating_sub(reserve) / 2;
    tracing::info!(
        nofile,
        capacity,
        "open-file limit {nofile}: room for {capacity} proxied connections"
    );
    capacity.clamp(1, Semaphore::MAX_PERMITS)
}
