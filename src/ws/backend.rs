//! `lb backend`: the bundled WebSocket connection server.
//!
//! One hyper HTTP/1 connection per accepted socket serves `/healthz` and `/users`
//! (GET or HEAD) and `/ws`. `/ws` checks the bearer token *before* agreeing to
//! upgrade, then hands the raw upgraded socket to tokio-tungstenite for the session:
//! welcome, echo, automatic pongs, a size limit that answers with close 1009, and an
//! idle timeout for clients that fall silent.

use std::convert::Infallible;
use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::registry::{ConnId, LocalPresence, Presence, PresenceGuard};
use super::token::{self, DEFAULT_SECRET};

/// How long to wait for the peer's half of a close handshake we started.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// After refusing a message, how long to keep reading (and discarding) what the
/// client is still sending, so that closing does not turn into a TCP RST that
/// could destroy our close frame before the client reads it.
const LINGER: Duration = Duration::from_secs(2);
/// Upper bound on bytes discarded while lingering.
const LINGER_MAX_BYTES: usize = 8 << 20;
/// How long `serve` waits for connections to wind down after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client must finish sending its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Command-line arguments of `lb backend`.
#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// Address to listen on, e.g. 127.0.0.1:9001 (port 0 picks a free port).
    #[arg(long)]
    pub listen: String,
    /// Server id, sent in the welcome message and shown by /users.
    #[arg(long)]
    pub id: String,
    /// HS256 secret that client tokens must be signed with.
    #[arg(long, env = "LB_SECRET", default_value = DEFAULT_SECRET, hide_env_values = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub secret: String,
    /// Largest accepted message in bytes, counted across fragments; larger gets close 1009.
    #[arg(long, default_value_t = 65536)]
    pub max_message: usize,
    /// Drop a client that sends nothing at all (no data, no ping) for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub client_timeout: Duration,
}

/// Settings of one backend server: its identity, token secret and limits.
#[derive(Clone)]
pub struct BackendOpts {
    /// Server id, sent in the welcome message and shown by /users.
    pub id: String,
    /// HS256 secret that client tokens must be signed with.
    pub secret: String,
    /// Largest accepted message in bytes (across fragments).
    pub max_message: usize,
    /// Silence after which a client is dropped.
    pub client_timeout: Duration,
}

impl BackendOpts {
    /// Options with the CLI defaults for server `id`.
    pub fn new(id: impl Into<String>) -> BackendOpts {
        BackendOpts {
            id: id.into(),
            secret: DEFAULT_SECRET.to_string(),
            max_message: 65536,
            client_timeout: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for BackendOpts {
    // Hand-written so the secret never ends up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendOpts")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("max_message", &self.max_message)
            .field("client_timeout", &self.client_timeout)
            .finish()
    }
}

impl From<&BackendArgs> for BackendOpts {
    fn from(a: &BackendArgs) -> BackendOpts {
        BackendOpts {
            id: a.id.clone(),
            secret: a.secret.clone(),
            max_message: a.max_message,
            client_timeout: a.client_timeout,
        }
    }
}

/// Errors that stop a backend server.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The listening socket failed in a way that retrying cannot fix.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// State shared by every connection of one server.
struct Shared {
    opts: BackendOpts,
    presence: Arc<dyn Presence>,
    next_conn: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Entry point of `lb backend`.
pub async fn main(args: BackendArgs) -> anyhow::Result<()> {
    // Resolved like `TcpListener::bind` would, but bound through lb's own listener
    // setup: its backlog of 65535 (capped by somaxconn) rather than tokio's 1024 is what
    // lets a survivor absorb a reconnect storm without dropping SYNs.
    let addr = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("cannot resolve {}", args.listen))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.listen))?;
    let listener =
        crate::proxy::bind(addr).with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        // Tests and scripts parse this exact line to learn the bound port.
        let mut out = std::io::stdout().lock();
        writeln!(out, "lb backend {} listening on {addr}", args.id)?;
        out.flush()?;
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown::signal().await;
        info!("shutting down");
        trigger.cancel();
    });
    serve(listener, BackendOpts::from(&args), shutdown).await?;
    Ok(())
}

/// Serves WebSocket sessions on `listener` until `shutdown` is cancelled, then
/// closes sessions with 1001 (Going Away) and waits briefly for them to end.
/// Presence is kept in a registry private to this server.
pub async fn serve(
    listener: TcpListener,
    opts: BackendOpts,
    shutdown: CancellationToken,
) -> Result<(), BackendError> {
    serve_with_presence(listener, opts, LocalPresence::shared(), shutdown).await
}

/// Like [`serve`], recording presence in `presence` (e.g. one shared by several servers).
pub async fn serve_with_presence(
    listener: TcpListener,
    opts: BackendOpts,
    presence: Arc<dyn Presence>,
    shutdown: CancellationToken,
) -> Result<(), BackendError> {
    let shared = Arc::new(Shared {
        opts,
        presence,
        next_conn: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });
    if let Ok(addr) = listener.local_addr() {
        info!(server = %shared.opts.id, %addr, "backend listening");
    }
    let result = loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                // Small WebSocket frames (pings, pongs, chat) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                shared.tasks.spawn(serve_http(stream, shared.clone()));
            }
            Err(e) if is_fatal_accept_error(&e) => break Err(BackendError::Accept(e)),
            Err(e) => {
                // EMFILE, ECONNABORTED and friends pass; spinning on them would burn a core.
                warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    drop(listener);
    shared.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, shared.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = shared.tasks.len(),
            "connections still open after shutdown grace"
        );
    }
    result
}

/// Accept errors that mean the listening socket itself is broken.
fn is_fatal_accept_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

/// Runs hyper's HTTP/1 server on one accepted socket.
async fn serve_http(stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream.peer_addr().ok();
    let svc_shared = shared.clone();
    let svc = service_fn(move |req| {
        let shared = svc_shared.clone();
        async move { Ok::<_, Infallible>(handle(req, shared).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.shutdown.cancelled() => {
            // Finish the request in flight (if any), then close; keep-alive idlers close at once.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(?peer, error = %e, "http connection ended with error");
    }
}

/// Routes one HTTP request. `/healthz` and `/users` answer HEAD like GET (monitors
/// and load balancers probe with HEAD); hyper leaves the body out of a HEAD response.
async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let get_or_head = matches!(*req.method(), Method::GET | Method::HEAD);
    match (req.method(), req.uri().path()) {
        (_, "/healthz") if get_or_head => text(StatusCode::OK, "ok"),
        (_, "/users") if get_or_head => {
            let users = shared.presence.snapshot().await;
            let body = serde_json::to_vec(&users).unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        (&Method::GET, "/ws") => upgrade(req, shared),
        (_, "/healthz" | "/users") => method_not_allowed("GET, HEAD"),
        // An upgrade is GET only (RFC 6455 §4.1).
        (_, "/ws") => method_not_allowed("GET"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A plain-text response.
fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A 405 listing the methods `allow`ed on the path.
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// A 401 saying why the token was refused.
fn unauthorized(why: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("unauthorized: {why}\n"))));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// `/ws`: authenticate, validate the upgrade request, answer 101 and start the session.
fn upgrade(mut req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    // The token is checked first so that an unauthenticated client learns nothing else.
    let Some(tok) = bearer_token(req.headers()).or_else(|| query_token(req.uri().query())) else {
        return unauthorized("missing token".into());
    };
    let claims = match token::verify(&shared.opts.secret, &tok) {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "refused websocket token");
            return unauthorized(e.to_string());
        }
    };
    let key = match check_upgrade_request(&req) {
        Ok(key) => key,
        Err((status, why)) => {
            let mut resp = text(status, why);
            if status == StatusCode::UPGRADE_REQUIRED {
                // RFC 6455 §4.4: tell the client which version we speak.
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return resp;
        }
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session_shared = shared.clone();
    shared.tasks.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => session(upgraded, claims.sub, session_shared).await,
            Err(e) => debug!(user = %claims.sub, error = %e, "upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// The token of an `Authorization: Bearer TOKEN` header, if any.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, tok) = value.trim().split_once(' ')?;
    let tok = tok.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !tok.is_empty()).then(|| tok.to_string())
}

/// The `token` query parameter, if any. JWTs are base64url and dots, so they
/// never need percent-decoding.
fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, v)| *k == "token" && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

/// Whether any comma-separated element of header `name` equals `token` (case-insensitively).
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks RFC 6455 §4.2.1 requirements; returns the Sec-WebSocket-Key, or the
/// status and text to refuse the request with.
fn check_upgrade_request(req: &Request<Incoming>) -> Result<String, (StatusCode, &'static str)> {
    let bad = |why| Err((StatusCode::BAD_REQUEST, why));
    let h = req.headers();
    if req.version() != Version::HTTP_11 {
        return bad("websocket upgrade requires HTTP/1.1\n");
    }
    if !header_has_token(h, header::UPGRADE, "websocket") {
        return bad("expected Upgrade: websocket\n");
    }
    if !header_has_token(h, header::CONNECTION, "upgrade") {
        return bad("expected Connection: Upgrade\n");
    }
    match h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) {
        None => return bad("missing Sec-WebSocket-Version\n"),
        Some(b"13") => {}
        Some(_) => {
            return Err((
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version (need 13)\n",
            ));
        }
    }
    match h
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(key) if !key.trim().is_empty() => Ok(key.trim().to_string()),
        _ => bad("missing Sec-WebSocket-Key\n"),
    }
}

/// Why a WebSocket session ended, for the one log line per session.
enum EndReason {
    /// The client sent a close frame.
    ClientClosed(Option<CloseFrame>),
    /// The TCP connection ended without a close handshake.
    Disconnected,
    /// Nothing arrived for `client_timeout`.
    Idle,
    /// The client exceeded `max_message`.
    TooBig,
    /// The client broke the protocol (bad UTF-8, bad framing).
    Protocol(String),
    /// The server is shutting down.
    Shutdown,
    /// An I/O or other error.
    Error(String),
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::ClientClosed(Some(c)) => {
                write!(f, "client closed ({} {})", c.code, c.reason)
            }
            EndReason::ClientClosed(None) => write!(f, "client closed"),
            EndReason::Disconnected => write!(f, "disconnected without close"),
            EndReason::Idle => write!(f, "idle timeout"),
            EndReason::TooBig => write!(f, "message too big"),
            EndReason::Protocol(e) => write!(f, "protocol error: {e}"),
            EndReason::Shutdown => write!(f, "server shutdown"),
            EndReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// The first message of every session: which server and which user this is.
#[derive(serde::Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    server: &'a str,
    user: &'a str,
}

/// Socket type of an upgraded session.
type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// One WebSocket session, from the upgraded socket to the log line at its end.
async fn session(upgraded: Upgraded, user: String, shared: Arc<Shared>) {
    let conn: ConnId = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let max = shared.opts.max_message;
    // Limiting frames too (not only messages) makes tungstenite refuse an oversized
    // frame from its header, before buffering its payload.
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    // Registered before the welcome, so a client that saw its welcome is already listed.
    let presence = PresenceGuard::register(shared.presence.clone(), &user, &shared.opts.id, conn);
    let reason = run_session(&mut ws, &user, &shared).await;
    drop(presence);
    info!(
        user = %user,
        server = %shared.opts.id,
        conn,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = %reason,
        "ws session ended"
    );
}

/// The session loop: welcome, then echo until the client leaves, misbehaves or goes quiet.
async fn run_session(ws: &mut Ws, user: &str, shared: &Shared) -> EndReason {
    let idle = shared.opts.client_timeout;
    let welcome = serde_json::to_string(&Welcome {
        kind: "welcome",
        server: &shared.opts.id,
        user,
    })
    .unwrap_or_default();
    match tokio::time::timeout(idle, ws.send(Message::text(welcome))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return EndReason::Error(e.to_string()),
        Err(_) => return EndReason::Error("welcome not accepted in time".into()),
    }
    let mut peer_close = None;
    loop {
        let next = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => {
                close_handshake(ws, CloseCode::Away, "server shutting down").await;
                return EndReason::Shutdown;
            }
            // Any frame resets the timer, pings included; that is what keeps quiet clients alive.
            r = tokio::time::timeout(idle, ws.next()) => r,
        };
        let msg = match next {
            Err(_elapsed) => {
                close_handshake(ws, CloseCode::Away, "idle timeout").await;
                return EndReason::Idle;
            }
            Ok(None) => {
                return match peer_close {
                    Some(frame) => EndReason::ClientClosed(frame),
                    None => EndReason::Disconnected,
                };
            }
            Ok(Some(Ok(msg))) => msg,
            Ok(Some(Err(WsError::Capacity(e)))) => {
                debug!(user, error = %e, "refusing oversized message");
                refuse(ws, CloseCode::Size, "message too big").await;
                return EndReason::TooBig;
            }
            Ok(Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)))) => {
                return EndReason::Disconnected;
            }
            Ok(Some(Err(e @ WsError::Utf8(_)))) => {
                refuse(ws, CloseCode::Invalid, "invalid utf-8").await;
                return EndReason::Protocol(e.to_string());
            }
            Ok(Some(Err(WsError::Protocol(e)))) => {
                refuse(ws, CloseCode::Protocol, "protocol error").await;
                return EndReason::Protocol(e.to_string());
            }
            Ok(Some(Err(e))) => return EndReason::Error(e.to_string()),
        };
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                // Bounded, so a client that sends but never reads cannot pin this task forever.
                match tokio::time::timeout(idle, ws.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return EndReason::Error(e.to_string()),
                    Err(_) => return EndReason::Error("client not reading".into()),
                }
            }
            // tungstenite queued the pong when it read the ping; the next `ws.next()`
            // (immediately, at the top of the loop) writes and flushes it.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            // tungstenite queued the close reply; the next `ws.next()` flushes it and ends.
            Message::Close(frame) => peer_close = Some(frame),
        }
    }
}

/// Starts a close handshake and waits (bounded) for the client's reply.
async fn close_handshake(ws: &mut Ws, code: CloseCode, reason: &'static str) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if ws.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Sends a close frame after a read error (the stream is unusable for reading by
/// then), then lingers: tungstenite does not put a close frame on the wire by itself
/// when it refuses a message.
async fn refuse(ws: &mut Ws, code: CloseCode, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, ws.send(Message::Close(Some(frame)))).await;
    linger(ws.get_mut()).await;
}

/// Half-closes the socket and discards incoming bytes until the peer closes
/// (bounded in time and bytes). Closing a socket with unread data makes the
/// kernel send RST, which can make the peer drop our close frame unread.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    while total < LINGER_MAX_BYTES {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_token_found_among_params() {
        assert_eq!(
            query_token(Some("a=1&token=abc.def")),
            Some("abc.def".into())
        );
        assert_eq!(query_token(Some("token=")), None);
        assert_eq!(query_token(None), None);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  x.y.z"),
        );
        assert_eq!(bearer_token(&h), Some("x.y.z".into()));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn connection_header_token_list() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(header_has_token(&h, header::CONNECTION, "upgrade"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!header_has_token(&h, header::CONNECTION, "upgrade"));
    }
}
