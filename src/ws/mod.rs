//! The bundled WebSocket side of the product: a minimal connection server
//! (`lb backend`) and a fleet of heartbeating, reconnecting clients (`lb client`),
//! so the whole failure/reconnect path runs with nothing else installed.
//!
//! - [`token`]: HS256 JWTs (`sub`, `exp`) issued by clients, checked by backends.
//! - [`registry`]: presence (user -> server) behind the [`registry::Presence`] trait.
//! - [`backend`]: `lb backend`, a hyper + tungstenite server with auth, echo, limits.
//! - [`client`]: `lb client` and the in-process [`client::Fleet`] used by the demo.

pub mod backend;
pub mod client;
pub mod registry;
pub mod token;

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    // If a handler cannot be installed, that signal keeps its default action
    // (terminate), which is an acceptable fallback for these two commands.
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No SIGINT handler: rely on SIGTERM alone rather than stopping at once.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = term => {}
    }
}
