//! Moving bytes between a client and its backend, both directions, with TCP's
//! half-close kept intact.
//!
//! Hand-written rather than `tokio::io::copy_bidirectional` because the product needs
//! what that does not give: the reason a connection ended (for the close log and the
//! failover), an idle timeout over both directions, RST propagation, prompt teardown when
//! the backend is marked down, zero-copy `splice(2)`, and no buffer or pipe held by an
//! idle connection (see [`super::copy`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::copy::pump;
use crate::balancer::Backend;

/// Why a proxied connection ended (the `reason` of the close log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed in order; the client's FIN came first.
    ClientClosed,
    /// Both sides closed in order; the backend's FIN came first.
    BackendClosed,
    /// The client reset (or its socket failed); the backend was reset in turn.
    ClientReset,
    /// The backend reset (crash, refused write); the client was reset in turn.
    BackendReset,
    /// Neither side sent anything for `idle_timeout`.
    IdleTimeout,
    /// The backend was marked down and the service closes its connections.
    BackendDown,
    /// An operator disabled the backend (admin API).
    BackendDisabled,
    /// A reload removed the backend and its drain time ran out.
    BackendRemoved,
    /// The drain timeout ran out during shutdown.
    Shutdown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::BackendClosed => "backend_closed",
            CloseReason::ClientReset => "client_reset",
            CloseReason::BackendReset => "backend_reset",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BackendDown => "backend_down",
            CloseReason::BackendDisabled => "backend_disabled",
            CloseReason::BackendRemoved => "backend_removed",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Bytes moved each way and why it ended.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub to_backend: u64,
    pub to_client: u64,
    pub reason: CloseReason,
}

/// How one direction ended.
pub(super) enum End {
    /// The source sent FIN; it was passed on as shutdown(write) to the sink.
    Eof,
    /// Reading the source failed: the source is gone (reset); end everything now.
    ReadFailed,
    /// Writing the sink failed: the sink is gone; the other direction will see it too.
    WriteFailed,
}

/// Splices `client` and `backend` until both directions end, one side resets, the idle
/// timeout passes, or `stop` resolves (backend down or disabled, drain over) with the
/// reason. Bytes are also added to `counters`' live totals as they move.
pub async fn splice(
    client: TcpStream,
    backend: TcpStream,
    idle_timeout: Duration,
    counters: &Backend,
    stop: impl Future<Output = CloseReason>,
) -> Totals {
    let base = Instant::now();
    let activity = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let reason = {
        let c2b = pump(
            &client,
            &backend,
            [&up, &counters.bytes_to],
            &activity,
            base,
        );
        let b2c = pump(
            &backend,
            &client,
            [&down, &counters.bytes_from],
            &activity,
            base,
        );
        tokio::pin!(c2b, b2c, stop);
        let (mut c2b_end, mut b2c_end) = (None, None);
        loop {
            tokio::select! {
                end = &mut c2b, if c2b_end.is_none() => {
                    if matches!(end, End::ReadFailed) { break CloseReason::ClientReset; }
                    c2b_end = Some((end, b2c_end.is_none()));
                }
                end = &mut b2c, if b2c_end.is_none() => {
                    if matches!(end, End::ReadFailed) { break CloseReason::BackendReset; }
                    b2c_end = Some((end, c2b_end.is_none()));
                }
                _ = idle(&activity, base, idle_timeout) => break CloseReason::IdleTimeout,
                reason = &mut stop => break reason,
            }
            if let (Some((c, c_first)), Some((b, _))) = (&c2b_end, &b2c_end) {
                break match (c, b) {
                    (End::WriteFailed, _) => CloseReason::BackendReset,
                    (_, End::WriteFailed) => CloseReason::ClientReset,
                    _ if *c_first => CloseReason::ClientClosed,
                    _ => CloseReason::BackendClosed,
                };
            }
        }
    };
    // Pass an abort on as an abort (RST, via SO_LINGER 0), so the other peer learns at
    // once rather than at its next write. A backend we give up on is reset too: a hung
    // one would otherwise hold an orphaned socket retransmitting our FIN for minutes.
    match reason {
        CloseReason::ClientReset => abort(&backend),
        CloseReason::BackendReset => abort(&client),
        CloseReason::BackendDown | CloseReason::BackendDisabled | CloseReason::BackendRemoved => {
            abort(&backend)
        }
        _ => {}
    }
    Totals {
        to_backend: up.load(Ordering::Relaxed),
        to_client: down.load(Ordering::Relaxed),
        reason,
    }
}

fn abort(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Resolves once nothing moved in either direction for `timeout`.
async fn idle(activity: &AtomicU64, base: Instant, timeout: Duration) {
    loop {
        let last = base + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
