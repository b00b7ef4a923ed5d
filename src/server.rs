//! The running balancer: binds listeners, starts checkers and accept loops, applies a
//! new configuration as a diff (hot reload), and drains on shutdown.
//!
//! The reloader and the admin API go through [`Balancer`]; the control-plane state sits
//! behind one mutex that the data plane never touches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::{Backend, BackendSet, BackendState, Transition};
use crate::config::{Config, OnRemoval, ServiceConfig};
use crate::health::{Start, spawn_checker};
use crate::proxy::{self, Service};

/// Why the balancer could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("service {service:?}: cannot listen on {addr}")]
    Bind {
        service: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The admin API could not start (names its address).
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// Outcome of the reloads so far (admin API, metrics).
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub ok: u64,
    pub failed: u64,
    /// When the running configuration was last applied (start-up counts).
    pub last_ok_at: Option<SystemTime>,
    /// The error of the last reload attempt, if it failed.
    pub last_error: Option<String>,
    pub last_attempt_at: Option<SystemTime>,
}

/// One service as the control plane tracks it.
struct ServiceEntry {
    service: Arc<Service>,
    local_addr: SocketAddr,
    /// Shared so a service renamed by a reload can hand its socket to its successor;
    /// taken out at shutdown so the socket closes when the accept loop stops.
    listener: Option<Arc<TcpListener>>,
    stop_accepting: CancellationToken,
    /// Per-backend checker stop tokens, by backend name.
    checkers: HashMap<Arc<str>, CancellationToken>,
}

struct State {
    config: Config,
    services: Vec<ServiceEntry>,
    /// Services removed by a reload whose connections still drain.
    retired: Vec<Arc<Service>>,
}

/// A running balancer.
pub struct Balancer {
    state: Mutex<State>,
    events: broadcast::Sender<Transition>,
    fd_budget: Arc<Semaphore>,
    /// Parent of every checker's stop token.
    checks: CancellationToken,
    background: TaskTracker,
    ready: AtomicBool,
    reload: Mutex<ReloadStatus>,
}

/// Binds one listener per service, in order; fails before anything starts. Sockets
/// passed by systemd (socket activation) are adopted instead, once, at start.
pub fn bind_all(config: &Config) -> Result<Vec<TcpListener>, ServerError> {
    let adopted = crate::systemd::adopt_listeners(
        config.services.iter().map(|s| (s.name.as_str(), s.listen)),
    );
    config
        .services
        .iter()
        .zip(adopted)
        .map(|(s, adopted)| match adopted {
            Some(listener) => {
                // Sockets from systemd come with its options, not ours.
                proxy::tune_listener(&listener);
                Ok(listener)
            }
            None => bind_service(s),
        })
        .collect()
}

fn bind_service(s: &ServiceConfig) -> Result<TcpListener, ServerError> {
    proxy::bind(s.listen).map_err(|source| ServerError::Bind {
        service: s.name.clone(),
        addr: s.listen,
        source,
    })
}

impl Balancer {
    /// Starts checkers and accept loops on already bound `listeners` (one per service,
    /// in order); returns once the first health round is done.
    pub async fn start(config: Config, listeners: Vec<TcpListener>) -> Arc<Balancer> {
        raise_fd_limit();
        let (events, _) = broadcast::channel(1024);
        let balancer = Arc::new(Balancer {
            fd_budget: Arc::new(Semaphore::new(connection_capacity(&config))),
            state: Mutex::new(State {
                config: config.clone(),
                services: Vec::new(),
                retired: Vec::new(),
            }),
            events,
            checks: CancellationToken::new(),
            background: TaskTracker::new(),
            ready: AtomicBool::new(false),
            reload: Mutex::new(ReloadStatus {
                last_ok_at: Some(SystemTime::now()),
                ..Default::default()
            }),
        });
        let mut first_round = Vec::new();
        let mut entries = Vec::new();
        for (cfg, listener) in config.services.into_iter().zip(listeners) {
            let (entry, rounds) = balancer.new_service(cfg, Arc::new(listener), BackendState::Up);
            first_round.extend(rounds);
            entries.push(entry);
        }
        for rx in first_round {
            let _ = rx.await;
        }
        let mut state = balancer.lock();
        for entry in entries {
            balancer.start_accepting(&entry);
            state.services.push(entry);
        }
        drop(state);
        balancer.ready.store(true, Ordering::Release);
        balancer
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds a service with its backends (in health `initial`) and checkers; returns
    /// the first-round receivers. Does not accept yet.
    fn new_service(
        &self,
        cfg: ServiceConfig,
        listener: Arc<TcpListener>,
        initial: BackendState,
    ) -> (ServiceEntry, Vec<tokio::sync::oneshot::Receiver<()>>) {
        let name: Arc<str> = cfg.name.as_str().into();
        // Parent of every backend's close tokens: cancelled when the drain time runs out.
        let hard_stop = CancellationToken::new();
        let members: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .map(|b| Arc::new(Backend::new(name.clone(), b, initial, &hard_stop)))
            .collect();
        let set = Arc::new(BackendSet::new(
            name,
            cfg.balance,
            cfg.panic_threshold,
            members.clone(),
            self.events.clone(),
        ));
        let mut checkers = HashMap::new();
        let mut rounds = Vec::new();
        for b in &members {
            let stop = self.checks.child_token();
            rounds.push(spawn_checker(
                set.clone(),
                b.clone(),
                cfg.health.clone(),
                Start::Decisive,
                &self.background,
                stop.clone(),
            ));
            checkers.insert(b.name.clone(), stop);
        }
        let local_addr = listener.local_addr().unwrap_or(cfg.listen);
        let service = Arc::new(Service::new(cfg, set, self.fd_budget.clone(), hard_stop));
        let entry = ServiceEntry {
            service,
            local_addr,
            listener: Some(listener),
            stop_accepting: CancellationToken::new(),
            checkers,
        };
        (entry, rounds)
    }

    fn start_accepting(&self, entry: &ServiceEntry) {
        tracing::info!(service = %entry.service.name, listen = %entry.local_addr, backends = entry.service.backends.members().len(), "listening");
        if let Some(listener) = entry.listener.clone() {
            self.background.spawn(proxy::accept_loop(
                entry.service.clone(),
                listener,
                entry.stop_accepting.clone(),
            ));
        }
    }

    /// Health transitions from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.events.subscribe()
    }

    /// The services now, in configuration order.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.lock()
            .services
            .iter()
            .map(|e| e.service.clone())
            .collect()
    }

    /// Bound listen addresses, in service order (useful when a config says port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.lock().services.iter().map(|e| e.local_addr).collect()
    }

    /// The configuration now running.
    pub fn config(&self) -> Config {
        self.lock().config.clone()
    }

    /// True once the listeners are bound and the first health round is done.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a reload that failed before reaching [`Balancer::apply`] (bad file).
    pub fn record_reload_failure(&self, error: String) {
        let mut r = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        r.failed += 1;
        r.last_error = Some(error);
        r.last_attempt_at = Some(SystemTime::now());
    }

    /// Backends taking traffic and healthy, and configured backends, over all services.
    pub fn healthy_count(&self) -> (usize, usize) {
        self.services().iter().fold((0, 0), |(h, t), s| {
            // Taking traffic and up: in panic mode the snapshot also holds down backends.
            let up = s
                .backends
                .eligible()
                .entries
                .iter()
                .filter(|e| e.backend.health() == BackendState::Up)
                .count();
            (h + up, t + s.backends.members().len())
        })
    }

    /// Applies `new` as a diff against the running configuration. Listeners of new
    /// services are bound first: if one cannot be, nothing changes. Unchanged services
    /// keep their listener, backends, health state, counters and connections.
    pub fn apply(&self, new: Config) -> Result<String, ServerError> {
        let mut state = self.lock();
        let result = self.apply_locked(&mut state, new);
        let mut r = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        r.last_attempt_at = Some(SystemTime::now());
        match &result {
            Ok(_) => {
                r.ok += 1;
                r.last_ok_at = r.last_attempt_at;
                r.last_error = None;
            }
            Err(e) => {
                r.failed += 1;
                r.last_error = Some(e.to_string());
            }
        }
        result
    }

    fn apply_locked(&self, state: &mut State, new: Config) -> Result<String, ServerError> {
        let mut changes: Vec<String> = Vec::new();
        // 1. Bind what is new before changing anything. A new service on the address of
        // one going away (a rename) takes over its listening socket: binding again would
        // fail, and closing first would refuse connections in between.
        let mut fresh_listeners = HashMap::new();
        for s in &new.services {
            let kept = state
                .services
                .iter()
                .any(|e| *e.service.name == *s.name && e.service.config().listen == s.listen);
            if !kept {
                let inherited = state
                    .services
                    .iter()
                    .find(|e| e.service.config().listen == s.listen)
                    .and_then(|e| e.listener.clone());
                let listener = match inherited {
                    Some(l) => l,
                    None => Arc::new(bind_service(s)?),
                };
                fresh_listeners.insert(s.name.clone(), listener);
            }
        }
        // 2. Services gone (or moved to another address): stop accepting, drain.
        let mut kept_entries = Vec::new();
        for entry in std::mem::take(&mut state.services) {
            let cfg = entry.service.config();
            match new.services.iter().find(|s| s.name == cfg.name) {
                Some(s) if s.listen == cfg.listen => kept_entries.push(entry),
                _ => {
                    changes.push(format!("service {} removed", cfg.name));
                    let retired = self.retire_service(entry);
                    state.retired.push(retired);
                }
            }
        }
        // Retired services whose connections are all gone need no more tracking.
        state.retired.retain(|s| !s.connections.is_empty());
        // 3. Kept services: settings, backends, checkers.
        let mut services = Vec::new();
        for s in &new.services {
            if let Some(pos) = kept_entries.iter().position(|e| *e.service.name == *s.name) {
                let mut entry = kept_entries.swap_remove(pos);
                self.update_service(&mut entry, s.clone(), &mut changes);
                services.push(entry);
            } else {
                let listener = fresh_listeners.remove(&s.name).expect("bound in step 1");
                // Backends of a new service are checked before it accepts anyone.
                let (entry, rounds) = self.new_service(s.clone(), listener, BackendState::Down);
                changes.push(format!("service {} added on {}", s.name, entry.local_addr));
                let service = entry.service.clone();
                let stop = entry.stop_accepting.clone();
                let local_addr = entry.local_addr;
                let listener = entry
                    .listener
                    .clone()
                    .expect("a new service has its listener");
                self.background.spawn(async move {
                    for rx in rounds {
                        let _ = rx.await;
                    }
                    if !stop.is_cancelled() {
                        tracing::info!(service = %service.name, listen = %local_addr, "listening");
                        proxy::accept_loop(service, listener, stop).await;
                    }
                });
                services.push(entry);
            }
        }
        state.services = services;
        state.config = new;
        Ok(if changes.is_empty() {
            "no change".to_string()
        } else {
            changes.join("; ")
        })
    }

    fn update_service(
        &self,
        entry: &mut ServiceEntry,
        new: ServiceConfig,
        changes: &mut Vec<String>,
    ) {
        let old = entry.service.config();
        let set = entry.service.backends.clone();
        let health_changed = old.health != new.health;
        let mut members = Vec::with_capacity(new.backends.len());
        let current = set.members();
        for b in &new.backends {
            match current
                .iter()
                .find(|m| *m.name == *b.name && m.addr == b.addr)
            {
                Some(m) => {
                    if m.weight() != b.weight {
                        changes.push(format!(
                            "{}/{} weight {} -> {}",
                            new.name,
                            b.name,
                            m.weight(),
                            b.weight
                        ));
                        m.set_weight(b.weight);
                    }
                    if health_changed {
                        self.restart_checker(entry, &set, m, &new, Start::Continue);
                    }
                    members.push(m.clone());
                }
                None => {
                    changes.push(format!("{}/{} added ({})", new.name, b.name, b.addr));
                    // Checked before it takes traffic.
                    let m = Arc::new(Backend::new(
                        set.service.clone(),
                        b,
                        BackendState::Down,
                        &entry.service.hard_stop,
                    ));
                    self.restart_checker(entry, &set, &m, &new, Start::Decisive);
                    members.push(m);
                }
            }
        }
        for m in current.iter() {
            if !members.iter().any(|n| Arc::ptr_eq(n, m)) {
                changes.push(format!("{}/{} removed", new.name, m.name));
                if let Some(stop) = entry.checkers.remove(&m.name) {
                    stop.cancel();
                }
                m.mark_removed();
                if new.on_removal == OnRemoval::Close && m.active.load(Ordering::Relaxed) > 0 {
                    let m = m.clone();
                    let after = new.drain_timeout;
                    self.background.spawn(async move {
                        tokio::time::sleep(after).await;
                        m.kick();
                    });
                }
            }
        }
        if *old != new {
            if health_changed {
                changes.push(format!(
                    "{} health settings changed: checkers restarted",
                    new.name
                ));
            }
            set.replace(new.balance, new.panic_threshold, members);
            entry.service.set_config(new);
        }
    }

    fn restart_checker(
        &self,
        entry: &mut ServiceEntry,
        set: &Arc<BackendSet>,
        b: &Arc<Backend>,
        cfg: &ServiceConfig,
        start: Start,
    ) {
        if let Some(old) = entry.checkers.remove(&b.name) {
            old.cancel();
        }
        let stop = self.checks.child_token();
        let _first = spawn_checker(
            set.clone(),
            b.clone(),
            cfg.health.clone(),
            start,
            &self.background,
            stop.clone(),
        );
        entry.checkers.insert(b.name.clone(), stop);
    }

    /// Stops accepting and checking for a removed service; its connections drain as its
    /// `on_removal` says.
    fn retire_service(&self, entry: ServiceEntry) -> Arc<Service> {
        entry.stop_accepting.cancel();
        for stop in entry.checkers.values() {
            stop.cancel();
        }
        let service = entry.service;
        let cfg = service.config();
        for b in service.backends.members().iter() {
            b.mark_removed();
        }
        service.backends.republish();
        service.connections.close();
        if cfg.on_removal == OnRemoval::Close {
            let s = service.clone();
            self.background.spawn(async move {
                if tokio::time::timeout(cfg.drain_timeout, s.connections.wait())
                    .await
                    .is_err()
                {
                    s.hard_stop.cancel();
                }
            });
        }
        service
    }

    /// Ends the drain at once: closes every connection of every service.
    pub fn abort_drain(&self) {
        let state = self.lock();
        for s in state
            .services
            .iter()
            .map(|e| &e.service)
            .chain(state.retired.iter())
        {
            s.hard_stop.cancel();
        }
    }

    /// Stops accepting (listeners close, new connects are refused), lets open connections
    /// finish for up to each service's `drain_timeout`, then closes what is left.
    pub async fn shutdown(&self) {
        // /ready answers 503 from now on, so a load balancer in front stops sending.
        self.ready.store(false, Ordering::Release);
        let services: Vec<Arc<Service>> = {
            let mut state = self.lock();
            for e in &mut state.services {
                e.stop_accepting.cancel();
                // The accept loop drops its handle as it stops; this is the other one.
                e.listener = None;
            }
            state
                .services
                .iter()
                .map(|e| e.service.clone())
                .chain(state.retired.iter().cloned())
                .collect()
        };
        let drains = services.into_iter().map(|s| async move {
            s.connections.close();
            let cfg = s.config();
            let open = s.connections.len();
            if open > 0 {
                tracing::info!(service = %s.name, open, "draining for up to {:?}", cfg.drain_timeout);
            }
            if tokio::time::timeout(cfg.drain_timeout, s.connections.wait())
                .await
                .is_err()
            {
                tracing::info!(service = %s.name, open = s.connections.len(), "drain timeout: closing the rest");
                s.hard_stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.connections.wait()).await;
            }
        });
        futures_util::future::join_all(drains).await;
        self.checks.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.background.wait()).await;
    }
}

/// The whole of `lb run` after the config is loaded: bind, start, serve (reloading on
/// SIGHUP and file changes) until `shutdown` resolves, drain, return.
pub async fn run(
    config: Config,
    watch: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let path = config.path.clone();
    // systemd: from the start, so a slow first health round still feeds the watchdog.
    let _watchdog = crate::systemd::spawn_watchdog();
    // SIGHUP's default action kills: catch it from here on, so a `systemctl reload` sent
    // right after READY=1, before the reloader below listens, cannot stop lb.
    let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let admin = config
        .admin
        .clone()
        .map(|cfg| crate::admin::bind(&cfg).map(|l| (l, cfg)))
        .transpose()?;
    let listeners = bind_all(&config)?;
    let balancer = Balancer::start(config, listeners).await;
    // Dropped when run() returns, so /metrics and /live keep answering while lb drains.
    let _admin = admin.map(|(listener, cfg)| crate::admin::spawn(listener, balancer.clone(), &cfg));
    let (healthy, total) = balancer.healthy_count();
    tracing::info!(
        healthy,
        total,
        "ready: first health round done, {healthy}/{total} backends up"
    );
    let stop_reloader = CancellationToken::new();
    let reloader = tokio::spawn(crate::reload::run(
        balancer.clone(),
        path,
        watch,
        stop_reloader.clone(),
    ));
    crate::systemd::ready(&crate::systemd::backends_status(healthy, total));
    tokio::select! {
        () = shutdown => {}
        // Never resolves: keeps systemd's STATUS= current on every health transition.
        () = crate::systemd::follow_backends(balancer.subscribe(), || balancer.healthy_count()) => {}
    }
    crate::systemd::stopping();
    stop_reloader.cancel();
    let _ = reloader.await;
    tracing::info!("shutting down: no longer accepting (a second signal closes everything now)");
    let drain = balancer.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        () = &mut drain => {}
        () = crate::shutdown::signal() => {
            tracing::warn!("second signal: closing every connection now");
            balancer.abort_drain();
            drain.await;
        }
    }
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
    // Reloads may add services and backends: leave them room too.
    let reserve = 64 + 2 * (config.services.len() + backends);
    // splice(2) pipes (two fds each) come out of the same budget: a 64th of it, at most 256.
    let pipes = (nofile as usize / 64).min(256);
    #[cfg(target_os = "linux")]
    proxy::pipes::set_limit(pipes);
    let capacity = (nofile as usize).saturating_sub(reserve + 2 * pipes) / 2;
    tracing::info!(
        nofile,
        capacity,
        pipes,
        "open-file limit {nofile}: room for {capacity} proxied connections"
    );
    capacity.clamp(1, Semaphore::MAX_PERMITS)
}
