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
