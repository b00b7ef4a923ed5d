//! The per-backend loop: a deadline loop that checks, applies rise/fall, reacts at once
//! to passive failures from the data plane, and sleeps until the next jittered deadline.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Checker;
use crate::balancer::{Backend, BackendSet, BackendState};
use crate::config::HealthConfig;

/// Starts one checker task per backend of `set`. The returned future resolves once every
/// backend has had its first check (the "first health round").
pub fn spawn_checkers(
    set: &Arc<BackendSet>,
    cfg: &HealthConfig,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let mut first_round = Vec::with_capacity(set.all.len());
    for backend in &set.all {
        let (tx, rx) = tokio::sync::oneshot::channel();
        first_round.push(rx);
        let task = CheckLoop {
            set: set.clone(),
            backend: backend.clone(),
            checker: Checker::from_config(cfg),
            cfg: cfg.clone(),
        };
        tracker.spawn(task.run(tx, shutdown.clone()));
    }
    async move {
        for rx in first_round {
            let _ = rx.await;
        }
    }
}

struct CheckLoop {
    set: Arc<BackendSet>,
    backend: Arc<Backend>,
    checker: Checker,
    cfg: HealthConfig,
}

impl CheckLoop {
    async fn run(self, first: tokio::sync::oneshot::Sender<()>, shutdown: CancellationToken) {
        // First round: the result is decisive (a backend counts as up until it answers).
        let result = self.checker.run(self.backend.addr, self.cfg.timeout).await;
        if let Err(e) = &result {
            self.set
                .set_up(&self.backend, false, &format!("first check failed: {e}"));
        }
        let _ = first.send(());

        // Consecutive results against the current state (passes while down, failures while up).
        let mut streak: u32 = 0;
        loop {
            let interval = if streak > 0 {
                self.cfg.fast_interval
            } else {
                self.cfg.interval
            };
            let deadline = Instant::now() + jitter(interval);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.backend.passive_down.notified() => {
                    if self.backend.state() == BackendState::Up {
                        let n = self.backend.connect_failures.load(std::sync::atomic::Ordering::Relaxed);
                        self.set.set_up(&self.backend, false, &format!("{n} consecutive connect failures (passive)"));
                        streak = 0;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.checker.run(self.backend.addr, self.cfg.timeout) => r,
            };
            match (self.backend.state(), result) {
                (BackendState::Up, Ok(_)) | (BackendState::Down, Err(_)) => streak = 0,
                (BackendState::Up, Err(e)) => {
                    streak += 1;
                    tracing::debug!(backend = %self.backend.name, streak, "check failed: {e}");
                    if streak >= self.cfg.fall {
                        let reason = format!("{streak} consecutive checks failed, last: {e}");
                        self.set.set_up(&self.backend, false, &reason);
                        streak = 0;
                    }
                }
                (BackendState::Down, Ok(took)) => {
                    streak += 1;
                    if streak >= self.cfg.rise {
                        // A recovered backend starts with a clean passive record.
                        self.backend
                            .connect_failures
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                        let reason = format!(
                            "{streak} consecutive checks passed, last in {} ms",
                            took.as_millis()
                        );
                        self.set.set_up(&self.backend, true, &reason);
                        streak = 0;
                    }
                }
            }
        }
    }
}

/// `d` +-10%, so checks of many backends (and many balancers) do not synchronise.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}
