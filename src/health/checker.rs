//! The per-backend loop: a deadline loop that checks, applies rise/fall, reacts at once
//! to passive failures from the data plane, and sleeps until the next jittered deadline.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Checker;
use crate::balancer::{Backend, BackendSet, BackendState};
use crate::config::{CheckKind, HealthConfig};

/// How a checker starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first result is decisive either way (start-up: a backend counts as up until
    /// it answers; a backend added by a reload counts as down until it answers).
    Decisive,
    /// Carry on from the backend's current state (a restart after a health-setting change).
    Continue,
}

/// Starts the checker of one backend; it runs until `stop` is cancelled. The returned
/// receiver fires once its first check is done (the "first health round").
pub fn spawn_checker(
    set: Arc<BackendSet>,
    backend: Arc<Backend>,
    cfg: HealthConfig,
    start: Start,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let task = CheckLoop {
        checker: Checker::from_config(&cfg),
        set,
        backend,
        cfg,
    };
    tracker.spawn(task.run(start, tx, stop));
    rx
}

struct CheckLoop {
    set: Arc<BackendSet>,
    backend: Arc<Backend>,
    checker: Checker,
    cfg: HealthConfig,
}

impl CheckLoop {
    async fn check(&self) -> Result<Duration, super::CheckError> {
        let started = Instant::now();
        let r = self.checker.run(self.backend.addr, self.cfg.timeout).await;
        let b = &self.backend;
        crate::metrics::check_finished(b, started.elapsed());
        match &r {
            Ok(took) => {
                b.last_check_us
                    .store(took.as_micros().max(1) as u64, Ordering::Relaxed);
                let s = b.check_streak.load(Ordering::Relaxed);
                b.check_streak.store(
                    if s > 0 { s.saturating_add(1) } else { 1 },
                    Ordering::Relaxed,
                );
            }
            Err(_) => {
                let s = b.check_streak.load(Ordering::Relaxed);
                b.check_streak.store(
                    if s < 0 { s.saturating_sub(1) } else { -1 },
                    Ordering::Relaxed,
                );
            }
        }
        r
    }

    async fn run(self, start: Start, first: oneshot::Sender<()>, stop: CancellationToken) {
        if self.cfg.check == CheckKind::None {
            // Nothing to check: up at once, and only the passive check can take it down.
            self.set.set_health(&self.backend, true, "no active check");
            let _ = first.send(());
            self.passive_only(stop).await;
            return;
        }
        if start == Start::Decisive {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.check() => r,
            };
            match result {
                Err(e) => {
                    self.set
                        .set_health(&self.backend, false, &format!("first check failed: {e}"))
                }
                Ok(took) => self.set.set_health(
                    &self.backend,
                    true,
                    &format!("first check passed in {} ms", took.as_millis()),
                ),
            };
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
                _ = stop.cancelled() => return,
                _ = self.backend.passive_down.notified() => {
                    self.passive_mark_down();
                    streak = 0;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.check() => r,
            };
            match (self.backend.health(), result) {
                (BackendState::Up, Ok(_)) | (BackendState::Down, Err(_)) => streak = 0,
                (BackendState::Up, Err(e)) => {
                    streak += 1;
                    tracing::debug!(backend = %self.backend.name, streak, "check failed: {e}");
                    if streak >= self.cfg.fall {
                        let reason = format!("{streak} consecutive checks failed, last: {e}");
                        self.set.set_health(&self.backend, false, &reason);
                        streak = 0;
                    }
                }
                (BackendState::Down, Ok(took)) => {
                    streak += 1;
                    if streak >= self.cfg.rise {
                        // A recovered backend starts with a clean passive record.
                        self.backend.connect_failures.store(0, Ordering::Relaxed);
                        let reason = format!(
                            "{streak} consecutive checks passed, last in {} ms",
                            took.as_millis()
                        );
                        self.set.set_health(&self.backend, true, &reason);
                        streak = 0;
                    }
                }
            }
        }
    }

    fn passive_mark_down(&self) {
        // A connect that succeeded since the wake-up reset the count: then the refusals
        // were not consecutive after all, and the backend stays up.
        let n = self.backend.connect_failures.load(Ordering::Relaxed);
        if self.backend.health() == BackendState::Up && n >= self.cfg.fall {
            let reason = format!("{n} consecutive refused connects (passive)");
            self.set.set_health(&self.backend, false, &reason);
        }
    }

    /// With `check = "none"`: down on passive failures, back up after `interval`
    /// (there is nothing else to tell us it recovered).
    async fn passive_only(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.backend.passive_down.notified() => self.passive_mark_down(),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.interval) => {}
            }
            self.backend.connect_failures.store(0, Ordering::Relaxed);
            self.set.set_health(
                &self.backend,
                true,
                "no active check: retrying after interval",
            );
        }
    }
}

/// `d` +-10%, so checks of many backends (and many balancers) do not synchronise.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}
