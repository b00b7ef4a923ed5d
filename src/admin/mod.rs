//! The admin API: liveness, readiness, backend state as JSON, drain/disable/enable, and
//! Prometheus metrics, over HTTP/1.1 (hyper) on `[admin] listen`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /live` | 200 while the process runs |
//! | `GET /ready` | 200 once listeners are bound and the first health round is done, else 503 |
//! | `GET /backends` | JSON: reload status, every service and backend ([`view::BackendsDoc`]) |
//! | `POST /backends/{service}/{backend}/drain` | no new connections, open ones stay |
//! | `POST /backends/{service}/{backend}/disable` | no new connections, open ones closed |
//! | `POST /backends/{service}/{backend}/enable` | back to taking traffic when healthy |
//! | `GET /metrics` | Prometheus text exposition ([`crate::metrics`]) |
//!
//! With `token` set, every request needs `Authorization: Bearer <token>` (else 401).
//! Without one, POSTs are only taken from loopback peers (else 403): a listen address
//! opened to the network must not let anyone who can reach it take backends out.
//!
//! The admin server shares nothing with the data plane but the atomics and snapshots it
//! reads; it runs on the same runtime, with its own small connection limit.

pub mod view;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::balancer::AdminState;
use crate::config::AdminConfig;
use crate::metrics::Metrics;
use crate::server::Balancer;

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The cause is left to `source()`, so `{:#}` chains print it once.
    #[error("admin API: cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Admin connections served at once; more wait in the kernel's backlog. Scrapers and
/// operators need a handful; the cap keeps a misbehaving client from using up descriptors
/// the data plane counts on.
const MAX_CONNECTIONS: usize = 64;

/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The running admin server; dropping it stops the server (open requests get a moment
/// to finish).
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: CancellationToken,
}

impl AdminServer {
    /// The bound address (useful when the config says port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `cfg.listen` (done before the services start, so a bad admin address fails
/// start-up before any client is accepted).
pub fn bind(cfg: &AdminConfig) -> Result<TcpListener, AdminError> {
    crate::proxy::bind(cfg.listen).map_err(|source| AdminError::Bind {
        addr: cfg.listen,
        source,
    })
}

/// Serves the admin API for `balancer` on `listener` (from [`bind`]) on the current tokio
/// runtime until the returned [`AdminServer`] is dropped.
pub fn spawn(listener: TcpListener, balancer: Arc<Balancer>, cfg: &AdminConfig) -> AdminServer {
    let local_addr = listener.local_addr().unwrap_or(cfg.listen);
    let stop = CancellationToken::new();
    let api = Arc::new(Api {
        metrics: Metrics::new(balancer.clone()),
        balancer,
        token: cfg.token.clone(),
    });
    tracing::info!(listen = %local_addr, token = api.token.is_some(), "admin API listening");
    tokio::spawn(serve(listener, api, stop.clone()));
    AdminServer { local_addr, stop }
}

async fn serve(listener: TcpListener, api: Arc<Api>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning; the data plane
                    // matters more than the admin API.
                    tracing::warn!("admin API: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = api.handle(peer, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(1), conn.as_mut())
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(client = %peer, "admin API connection: {e}");
            }
            drop(permit);
        });
    }
    tracing::debug!("admin API stopped");
}

/// What a request handler needs.
struct Api {
    balancer: Arc<Balancer>,
    metrics: Metrics,
    token: Option<String>,
}

type Reply = Response<Full<Bytes>>;

impl Api {
    fn handle(&self, peer: SocketAddr, req: &Request<Incoming>) -> Reply {
        let reply = self.route(peer, req);
        tracing::debug!(client = %peer, method = %req.method(), path = req.uri().path(), status = reply.status().as_u16(), "admin request");
        reply
    }

    fn route(&self, peer: SocketAddr, req: &Request<Incoming>) -> Reply {
        if let Some(token) = &self.token {
            if !bearer_matches(req.headers().get(header::AUTHORIZATION), token) {
                let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"lb\""),
                );
                return r;
            }
        }
        let path = req.uri().path();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = req.method();
        match segments.as_slice() {
            ["live"] => get(method, || text(StatusCode::OK, "live\n")),
            ["ready"] => get(method, || {
                if self.balancer.is_ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
            ["backends"] => get(method, || {
                json(StatusCode::OK, &view::BackendsDoc::now(&self.balancer))
            }),
            ["metrics"] => get(method, || {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                r
            }),
            ["backends", service, backend, action] => {
                let to = match *action {
                    "drain" => AdminState::Draining,
                    "disable" => AdminState::Disabled,
                    "enable" => AdminState::Enabled,
                    _ => return not_found(path),
                };
                if method != Method::POST {
                    return method_not_allowed("POST");
                }
                if !may_change(self.token.is_some(), peer) {
                    return error(
                        StatusCode::FORBIDDEN,
                        "changes are only taken from loopback unless [admin] token is set",
                    );
                }
                self.set_admin(service, backend, to)
            }
            _ => not_found(path),
        }
    }

    fn set_admin(&self, service: &str, backend: &str, to: AdminState) -> Reply {
        let (Some(service), Some(backend)) = (percent_decode(service), percent_decode(backend))
        else {
            return error(StatusCode::BAD_REQUEST, "bad percent-encoding in the path");
        };
        let Some(s) = self
            .balancer
            .services()
            .into_iter()
            .find(|s| *s.name == *service)
        else {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no service named {service:?}"),
            );
        };
        let Some(b) = s.backends.find(&backend) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!("service {service:?} has no backend named {backend:?}"),
            );
        };
        s.backends.set_admin(&b, to);
        #[derive(Serialize)]
        struct Changed {
            service: String,
            backend: view::BackendDoc,
        }
        json(
            StatusCode::OK,
            &Changed {
                service,
                backend: view::BackendDoc::of(&b),
            },
        )
    }
}

/// `f()` for GET (and HEAD, whose body hyper leaves out), 405 otherwise.
fn get(method: &Method, f: impl FnOnce() -> Reply) -> Reply {
    if method == Method::GET || method == Method::HEAD {
        f()
    } else {
        method_not_allowed("GET, HEAD")
    }
}

/// May `peer` change backend states? Loopback peers may; others only when a token is
/// configured (the caller has checked it by then: with a token, every request needs it).
fn may_change(token_configured: bool, peer: SocketAddr) -> bool {
    // `::ffff:127.0.0.1` is loopback too (a dual-stack listener sees IPv4 peers so).
    token_configured || peer.ip().to_canonical().is_loopback()
}

/// True if `header` is `Bearer <token>`. Compared in constant time, so response timing
/// does not tell how much of a guess was right.
fn bearer_matches(header: Option<&HeaderValue>, token: &str) -> bool {
    let Some(value) = header.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes `%XX` escapes in a path segment (service and backend names may hold any
/// character); None if an escape is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|e| {
        // Our documents are plain structs of strings and numbers; this cannot happen.
        format!("{{\"error\":\"cannot encode: {e}\"}}").into_bytes()
    });
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

fn not_found(path: &str) -> Reply {
    error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}"))
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed; use {allow}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(bearer_matches(Some(&h("Bearer s3cret")), "s3cret"));
        assert!(bearer_matches(Some(&h("bearer  s3cret ")), "s3cret"));
        assert!(!bearer_matches(Some(&h("Bearer s3cre")), "s3cret"));
        assert!(!bearer_matches(Some(&h("Bearer s3cretX")), "s3cret"));
        assert!(!bearer_matches(Some(&h("Basic s3cret")), "s3cret"));
        assert!(!bearer_matches(Some(&h("s3cret")), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }

    #[test]
    fn changes_from_loopback_or_with_token() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(may_change(false, at("127.0.0.1:5000")));
        assert!(may_change(false, at("127.1.2.3:5000")));
        assert!(may_change(false, at("[::1]:5000")));
        assert!(may_change(false, at("[::ffff:127.0.0.1]:5000")));
        assert!(!may_change(false, at("10.0.0.7:5000")));
        assert!(!may_change(false, at("[2001:db8::1]:5000")));
        assert!(!may_change(false, at("[::ffff:10.0.0.7]:5000")));
        assert!(may_change(true, at("10.0.0.7:5000")));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("s1").as_deref(), Some("s1"));
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }
}
