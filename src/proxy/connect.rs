//! Connect to a backend with a timeout, retrying on other healthy backends. Refused
//! connects feed the passive health check: `fall` in a row mark a backend down at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;

use super::tune_stream;
use crate::balancer::{Backend, BackendSet};
use crate::config::ServiceConfig;

/// Why no backend connection could be made for a client.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no healthy backend")]
    NoBackend,
    #[error("{attempts} connect attempt(s) failed, last to {backend}: {last}")]
    Exhausted {
        attempts: u32,
        backend: Arc<str>,
        last: std::io::Error,
    },
}

impl ConnectError {
    /// Short machine-friendly reason for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::NoBackend => "no_backend",
            ConnectError::Exhausted { .. } => "connect_failed",
        }
    }
}

/// Picks and connects, trying up to `1 + retries` distinct backends.
pub async fn connect_backend(
    set: &BackendSet,
    cfg: &ServiceConfig,
) -> Result<(Arc<Backend>, TcpStream), ConnectError> {
    // Tried backends live on the stack for the common case (first try succeeds).
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut last_err = None;
    for _ in 0..=cfg.retries {
        let Some(backend) = set.pick(&tried) else {
            break;
        };
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                backend.connect_failures.store(0, Ordering::Relaxed);
                tune_stream(&stream);
                return Ok((backend, stream));
            }
            Ok(Err(e)) => {
                note_failure(&backend, cfg, &e);
                last_err = Some((backend.name.clone(), e));
            }
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", cfg.connect_timeout),
                );
                note_failure(&backend, cfg, &e);
                last_err = Some((backend.name.clone(), e));
            }
        }
        tried.push(backend);
    }
    match last_err {
        None => Err(ConnectError::NoBackend),
        Some((backend, last)) => Err(ConnectError::Exhausted {
            attempts: tried.len() as u32,
            backend,
            last,
        }),
    }
}

fn note_failure(backend: &Backend, cfg: &ServiceConfig, e: &std::io::Error) {
    // Our own fd exhaustion says nothing about the backend's health.
    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
        return;
    }
    let by_kind = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => &backend.connect_errors.refused,
        std::io::ErrorKind::TimedOut => &backend.connect_errors.timeout,
        _ => &backend.connect_errors.other,
    };
    by_kind.fetch_add(1, Ordering::Relaxed);
    // Only a refusal is proof that nothing listens. A timeout may just be a backend whose
    // accept queue overflowed in a reconnect storm: counting those would mark the
    // survivors of a crash down one after another, just when they are needed most.
    if e.kind() != std::io::ErrorKind::ConnectionRefused {
        return;
    }
    let n = backend.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::debug!(backend = %backend.name, consecutive = n, "connect failed: {e}");
    if n >= cfg.health.fall {
        backend.passive_down.notify_one();
    }
}
