//! The JSON documents of the admin API, built from live state on each request.
//!
//! Times are RFC 3339 strings in UTC with milliseconds (`2025-01-31T12:00:00.123Z`).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use serde::Serialize;

use crate::balancer::Backend;
use crate::config::Balance;
use crate::proxy::Service;
use crate::server::{Balancer, ReloadStatus};

/// `GET /backends`.
#[derive(Debug, Serialize)]
pub struct BackendsDoc {
    /// Listeners bound and first health round done.
    pub ready: bool,
    pub reload: ReloadDoc,
    pub services: Vec<ServiceDoc>,
}

/// Outcome of configuration reloads (start-up is not counted as one).
#[derive(Debug, Serialize)]
pub struct ReloadDoc {
    pub ok: u64,
    pub failed: u64,
    /// When the running configuration was applied (start-up or the last good reload).
    pub last_ok_at: Option<String>,
    /// When a reload was last tried, good or bad.
    pub last_attempt_at: Option<String>,
    /// Why the last reload failed (`file:line: key: message`); null once one succeeds.
    pub last_error: Option<String>,
}

/// One service and its backends.
#[derive(Debug, Serialize)]
pub struct ServiceDoc {
    pub name: String,
    pub listen: String,
    pub balance: &'static str,
    /// Client connections accepted, ever.
    pub accepted: u64,
    /// Client connections closed because no backend could be reached.
    pub rejected: u64,
    /// Client connections open now.
    pub active: u64,
    pub backends: Vec<BackendDoc>,
}

/// One backend as an operator sees it.
#[derive(Debug, Serialize)]
pub struct BackendDoc {
    pub name: String,
    pub addr: String,
    /// `up`, `down`, `draining` or `disabled`: admin state and removal win over health.
    pub state: &'static str,
    /// What the health checks say: `up` or `down`.
    pub health: &'static str,
    /// What the operator asked: `enabled`, `draining` or `disabled`.
    pub admin: &'static str,
    pub weight: u32,
    /// Connections proxied to this backend now.
    pub active: u64,
    /// Connections ever established to this backend.
    pub total: u64,
    /// Bytes client -> backend.
    pub bytes_in: u64,
    /// Bytes backend -> client.
    pub bytes_out: u64,
    pub connect_errors: ConnectErrorsDoc,
    /// Consecutive results of the active check: positive = passes, negative = failures.
    pub check_streak: i32,
    /// Latency of the last passed check, in milliseconds.
    pub last_check_ms: Option<f64>,
    /// State transitions so far (health and admin).
    pub transitions: u64,
    pub last_transition: Option<TransitionDoc>,
}

/// Failed connects to a backend, by kind.
#[derive(Debug, Serialize)]
pub struct ConnectErrorsDoc {
    pub refused: u64,
    pub timeout: u64,
    pub other: u64,
}

/// The last state change of a backend.
#[derive(Debug, Serialize)]
pub struct TransitionDoc {
    pub to: &'static str,
    pub reason: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl BackendsDoc {
    /// The document as of now.
    pub fn now(balancer: &Balancer) -> BackendsDoc {
        BackendsDoc {
            ready: balancer.is_ready(),
            reload: ReloadDoc::from(&balancer.reload_status()),
            services: balancer.services().iter().map(ServiceDoc::of).collect(),
        }
    }
}

impl From<&ReloadStatus> for ReloadDoc {
    fn from(r: &ReloadStatus) -> ReloadDoc {
        ReloadDoc {
            ok: r.ok,
            failed: r.failed,
            last_ok_at: r.last_ok_at.map(rfc3339),
            last_attempt_at: r.last_attempt_at.map(rfc3339),
            last_error: r.last_error.clone(),
        }
    }
}

impl ServiceDoc {
    /// `s` and its configured backends as of now.
    pub fn of(s: &Arc<Service>) -> ServiceDoc {
        let cfg = s.config();
        ServiceDoc {
            name: s.name.to_string(),
            listen: cfg.listen.to_string(),
            balance: match cfg.balance {
                Balance::RoundRobin => "round-robin",
                Balance::LeastConn => "least-conn",
                Balance::Random => "random",
            },
            accepted: s.stats.accepted.load(Relaxed),
            rejected: s.stats.rejected.load(Relaxed),
            active: s.stats.active.load(Relaxed) as u64,
            backends: s
                .backends
                .members()
                .iter()
                .map(|b| BackendDoc::of(b))
                .collect(),
        }
    }
}

impl BackendDoc {
    /// `b` as of now.
    pub fn of(b: &Backend) -> BackendDoc {
        BackendDoc {
            name: b.name.to_string(),
            addr: b.addr.to_string(),
            state: b.state_label(),
            health: b.health().as_str(),
            admin: b.admin().as_str(),
            weight: b.weight(),
            active: b.active.load(Relaxed) as u64,
            total: b.total.load(Relaxed),
            bytes_in: b.bytes_to.load(Relaxed),
            bytes_out: b.bytes_from.load(Relaxed),
            connect_errors: ConnectErrorsDoc {
                refused: b.connect_errors.refused.load(Relaxed),
                timeout: b.connect_errors.timeout.load(Relaxed),
                other: b.connect_errors.other.load(Relaxed),
            },
            check_streak: b.check_streak.load(Relaxed),
            last_check_ms: b.last_check_latency().map(|d| d.as_secs_f64() * 1000.0),
            transitions: b.transitions.load(Relaxed),
            last_transition: b.last_transition().map(|t| TransitionDoc {
                to: t.to,
                reason: t.reason,
                at: rfc3339(t.at),
            }),
        }
    }
}
