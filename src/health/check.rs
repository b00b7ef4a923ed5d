//! The checks themselves: a TCP connect, or an HTTP `GET` answered 2xx. Each is bounded
//! by the timeout as a whole, so a host that drops SYNs fails in `timeout`, not in the
//! kernel's minutes of SYN retries.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::config::{CheckKind, HealthConfig};

/// Why one check failed (becomes the `reason` of a down transition).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] crate::httpc::GetError),
    #[error("http status {0}")]
    Status(u16),
}

/// A configured check, ready to run against one address.
#[derive(Debug, Clone)]
pub enum Checker {
    Tcp,
    Http {
        path: String,
    },
    /// `check = "none"`: always passes.
    None,
}

impl Checker {
    pub fn from_config(cfg: &HealthConfig) -> Checker {
        match cfg.check {
            CheckKind::Tcp => Checker::Tcp,
            CheckKind::Http => Checker::Http {
                path: cfg.path.clone(),
            },
            CheckKind::None => Checker::None,
        }
    }

    /// Runs one check; on success returns how long it took.
    pub async fn run(&self, addr: SocketAddr, timeout: Duration) -> Result<Duration, CheckError> {
        let start = Instant::now();
        match tokio::time::timeout(timeout, self.run_unbounded(addr)).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CheckError::Timeout(timeout)),
        }
    }

    async fn run_unbounded(&self, addr: SocketAddr) -> Result<(), CheckError> {
        let path = match self {
            Checker::Tcp => {
                TcpStream::connect(addr)
                    .await
                    .map_err(CheckError::Connect)?;
                return Ok(());
            }
            Checker::Http { path } => path,
            Checker::None => return Ok(()),
        };
        let (status, _) = crate::httpc::get(addr, path, 64 * 1024).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(CheckError::Status(status))
        }
    }
}
