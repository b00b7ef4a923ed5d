//! lb: a Layer-4 (TCP) load balancer with active health checking, built to sit in
//! front of long-lived WebSocket connection servers.
//!
//! Data flows one way: config -> backend set -> (accept -> pick -> connect -> splice).
//! The health checker is the only writer of the backend set; the data plane only
//! reads immutable snapshots of it.
//!
//! # Layout
//! - [`config`]: `lb.toml` file types, defaults, `validate()`, errors naming file/line/key.
//! - [`balancer`]: per-service backend set: `ArcSwap` healthy snapshot, selection policies.
//! - [`proxy`]: data plane: listeners (socket2), accept loop, connect + retry, splice.
//! - [`health`]: control plane: tcp/http checks, rise/fall state, one loop per backend.
//! - [`admin`]: the admin HTTP API (live/ready, backends JSON, drain/disable/enable, metrics).
//! - [`httpc`]: one-shot HTTP GET (health checks, the demo).
//! - [`metrics`]: Prometheus metrics (names, registry, hooks).
//! - [`server`]: wires config, balancer, proxy and health together for `lb run`.
//! - [`reload`]: SIGHUP and file watch -> parse, validate, apply as a diff.
//! - [`shutdown`]: SIGINT/SIGTERM as one future.
//! - [`systemd`]: sd_notify (ready, reloading, stopping, status, watchdog), socket activation.
//! - [`ws`]: bundled WebSocket backend, client, tokens and presence registry.
//! - [`demo`]: the orchestrated failover demo (`lb demo`).

pub mod admin;
pub mod balancer;
pub mod config;
pub mod demo;
pub mod health;
pub mod httpc;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod systemd;
pub mod ws;
