//! Moving bytes between a client and its backend, both directions, with TCP's
//! half-close kept intact.
//!
//! Hand-written rather than `tokio::io::copy_bidirectional` because the product needs
//! what that does not give: the reason a connection ended (for the close log and the
//! failover), an idle timeout over both directions, RST propagation, prompt teardown when
//! the backend is marked down, zero-copy `splice(2)`, and no buffer or pipe held by an
//! idle connection (see [`super::copy`]).

use std::task::Poll;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::copy::{Direction, End};
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
    let mut c2b = Direction::new();
    let mut b2c = Direction::new();
    let mut first_eof: Option<bool> = None; // Some(true): the client's FIN came first
    let mut last_activity = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle, stop);
    let reason = std::future::poll_fn(|cx| {
        if let Poll::Ready(reason) = stop.as_mut().poll(cx) {
            return Poll::Ready(reason);
        }
        let mut progressed = false;
        let c = c2b.poll(cx, &client, &backend, &counters.bytes_to, &mut progressed);
        if c == Poll::Ready(End::ReadFailed) {
            return Poll::Ready(CloseReason::ClientReset);
        }
        let b = b2c.poll(cx, &backend, &client, &counters.bytes_from, &mut progressed);
        if b == Poll::Ready(End::ReadFailed) {
            return Poll::Ready(CloseReason::BackendReset);
        }
        if first_eof.is_none() && (c.is_ready() || b.is_ready()) {
            first_eof = Some(c.is_ready());
        }
        if let (Poll::Ready(c), Poll::Ready(b)) = (c, b) {
            return Poll::Ready(match (c, b) {
                (End::WriteFailed, _) => CloseReason::BackendReset,
                (_, End::WriteFailed) => CloseReason::ClientReset,
                _ if first_eof == Some(true) => CloseReason::ClientClosed,
                _ => CloseReason::BackendClosed,
            });
        }
        // The idle timer is only re-armed when it fires (not on every byte, which would
        // touch the timer wheel per read): then it checks the last activity.
        if progressed {
            last_activity = Instant::now();
        }
        while idle.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + idle_timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(CloseReason::IdleTimeout);
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    // Pass an abort on as an abort (RST, via SO_LINGER 0), so the other peer learns at
    // once rather than at its next write. A backend we give up on is reset too: a hung
    // one would otherwise hold an orphaned socket retransmitting our FIN for minutes.
    // A close we force while bytes we read still wait in our pipe or buffer would look
    // like a clean end to the peer that never gets them: reset it instead, so the
    // truncation shows.
    if c2b.pending() > 0 {
        abort(&backend);
    }
    if b2c.pending() > 0 {
        abort(&client);
    }
    match reason {
        CloseReason::ClientReset => abort(&backend),
        CloseReason::BackendReset => abort(&client),
        CloseReason::BackendDown | CloseReason::BackendDisabled | CloseReason::BackendRemoved => {
            abort(&backend)
        }
        _ => {}
    }
    Totals {
        to_backend: c2b.moved,
        to_client: b2c.moved,
        reason,
    }
}

fn abort(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}
