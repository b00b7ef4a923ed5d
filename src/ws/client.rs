//! `lb client`: simulated users that heartbeat, detect a dead server and reconnect.
//!
//! Each user is one task with its own token and connection. Death is detected by
//! timers, never by waiting on the socket: a ping goes out every `heartbeat`, and a
//! ping unanswered after `pong_timeout` kills the connection even if the server is
//! frozen with its sockets open. Writes happen in a separate task so a write that
//! blocks (full send buffer) cannot hold up that timer. Reconnects use exponential
//! backoff with full jitter so that users cut off together do not retry together.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::token::{self, DEFAULT_SECRET};

/// Lifetime of the tokens the simulated users present.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest window over which the initial connects are spread.
const MAX_RAMP: Duration = Duration::from_secs(1);
/// Initial connects are spread over `users * RAMP_PER_USER` (capped by `MAX_RAMP`).
const RAMP_PER_USER: Duration = Duration::from_millis(1);
/// How long a stopping user waits for the server's half of the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long `Fleet::stop` waits for all users to finish closing.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often `lb client` logs a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Exit status of `lb client`, shown at the end of its `--help`.
const EXIT_STATUS_HELP: &str = "\
Exit status: 0 if every user is online when the client stops (after --duration or on
Ctrl-C/SIGTERM); 1 if any user is offline at that moment (lost and not back, or never
connected, e.g. every attempt refused with 401), after printing the summary.";

/// Command-line arguments of `lb client`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_STATUS_HELP)]
pub struct ClientArgs {
    /// WebSocket URL to connect to, e.g. ws://127.0.0.1:8080/ws
    #[arg(long)]
    pub url: String,
    /// Number of simulated users, each with its own token and connection.
    #[arg(long, default_value_t = 1)]
    pub users: usize,
    /// Interval between pings on each connection.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// A ping not answered within this time marks the connection dead.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub pong_timeout: Duration,
    /// Stop after this long and print the summary (default: until Ctrl-C/SIGTERM);
    /// exit 1 if any user is offline then, else 0.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Print the summary as one JSON object on stdout (printed before a failing exit too).
    #[arg(long)]
    pub json: bool,
    /// HS256 secret used to sign the users' tokens.
    #[arg(long, env = "LB_SECRET", default_value = DEFAULT_SECRET, hide_env_values = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub secret: String,
    /// Prefix of user names (`user-0001`, ...).
    #[arg(long, default_value = "user-")]
    pub user_prefix: String,
    /// Limit for TCP connect plus WebSocket handshake (and for the welcome message).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// First reconnect backoff ceiling; doubles with each failed attempt.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,
    /// Largest reconnect backoff ceiling.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub backoff_cap: Duration,
}

/// Settings of a fleet of simulated users.
#[derive(Clone)]
pub struct ClientOpts {
    /// WebSocket URL (`ws://host:port/path`) every user connects to.
    pub url: String,
    /// Number of users.
    pub users: usize,
    /// Interval between pings.
    pub heartbeat: Duration,
    /// A ping unanswered for this long marks the connection dead.
    pub pong_timeout: Duration,
    /// HS256 secret for the users' tokens.
    pub secret: String,
    /// Prefix of user names.
    pub user_prefix: String,
    /// Limit for TCP connect plus handshake, and for the welcome afterwards.
    pub connect_timeout: Duration,
    /// Backoff ceiling of the first retry; doubles per failed attempt.
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_cap: Duration,
}

impl ClientOpts {
    /// Options with the CLI defaults for `users` users of `url`.
    pub fn new(url: impl Into<String>, users: usize) -> ClientOpts {
        ClientOpts {
            url: url.into(),
            users,
            heartbeat: Duration::from_secs(1),
            pong_timeout: Duration::from_secs(3),
            secret: DEFAULT_SECRET.to_string(),
            user_prefix: "user-".to_string(),
            connect_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
        }
    }

    /// Checks the URL and durations, so a typo fails at once instead of as N retry loops.
    pub fn validate(&self) -> Result<(), ClientError> {
        target(&self.url)?;
        if self.secret.is_empty() {
            return Err(ClientError::Token(token::TokenError::EmptySecret));
        }
        for (name, d) in [
            ("heartbeat", self.heartbeat),
            ("pong-timeout", self.pong_timeout),
            ("connect-timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(ClientError::ZeroDuration(name));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ClientOpts {
    // Hand-written so the secret never ends up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOpts")
            .field("url", &self.url)
            .field("users", &self.users)
            .field("heartbeat", &self.heartbeat)
            .field("pong_timeout", &self.pong_timeout)
            .field("secret", &"<redacted>")
            .field("user_prefix", &self.user_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .finish()
    }
}

impl From<&ClientArgs> for ClientOpts {
    fn from(a: &ClientArgs) -> ClientOpts {
        ClientOpts {
            url: a.url.clone(),
            users: a.users,
            heartbeat: a.heartbeat,
            pong_timeout: a.pong_timeout,
            secret: a.secret.clone(),
            user_prefix: a.user_prefix.clone(),
            connect_timeout: a.connect_timeout,
            backoff_base: a.backoff_base,
            backoff_cap: a.backoff_cap,
        }
    }
}

/// Errors of the client: bad options, or why one connect attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not a `ws://host[:port]/path` URL.
    #[error("bad url {url:?}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// A duration option that must be positive is zero.
    #[error("--{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// TCP connect plus handshake took longer than `connect_timeout`.
    #[error("connect timed out")]
    Timeout,
    /// The TCP connection could not be made.
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    /// No token could be issued (empty secret).
    #[error("cannot issue token: {0}")]
    Token(#[source] token::TokenError),
    /// The server refused or botched the WebSocket handshake (e.g. HTTP 401).
    #[error("handshake failed: {0}")]
    Handshake(#[source] Box<WsError>),
}

/// Host and port a URL points at.
fn target(url: &str) -> Result<(String, u16), ClientError> {
    let bad = |why: &str| ClientError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    let req = url.into_client_request().map_err(|e| bad(&e.to_string()))?;
    let uri = req.uri();
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => return Err(bad("wss:// (TLS) is not supported")),
        _ => return Err(bad("scheme must be ws://")),
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    // `[::1]` in a URL is `::1` to the resolver.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(80)))
}

/// A cheap copy of one user's state.
#[derive(Debug, Clone)]
pub struct UserView {
    /// User name, e.g. `user-0042`.
    pub name: String,
    /// Server id from the welcome message (`?` for a server without one); None while offline.
    pub server: Option<String>,
    /// When the current connection got its welcome; None while offline.
    pub online_since: Option<Instant>,
    /// When the user went offline (or the fleet started, if never online); None while online.
    pub offline_since: Option<Instant>,
    /// How many times the user came back online after losing a connection.
    pub reconnects: u32,
}

/// Mutable state of one user, behind its own mutex (never held across an await).
struct UserState {
    view: UserView,
    ever_online: bool,
}

/// Everything the user tasks and the `Fleet` handle share.
struct Shared {
    opts: ClientOpts,
    started: Instant,
    users: Vec<Mutex<UserState>>,
    /// Time from detecting a death to the welcome on the new connection, per reconnect.
    reconnect_ms: Mutex<Vec<u64>>,
    /// Connections lost after having been online.
    disconnects: AtomicU64,
    /// Connect attempts that did not get a user online.
    failed_attempts: AtomicU64,
    /// Users that have been online at least once.
    first_online: AtomicUsize,
}

/// Locks a mutex, ignoring poisoning: the state is plain data, valid after any panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn name(&self, idx: usize) -> String {
        lock(&self.users[idx]).view.name.clone()
    }

    /// The user got its welcome (or gave up waiting for one) on a new connection.
    fn mark_online(&self, idx: usize, server: &str) {
        let now = Instant::now();
        let mut st = lock(&self.users[idx]);
        let back_after = if st.ever_online {
            st.view
                .offline_since
                .map(|t| now.saturating_duration_since(t))
        } else {
            None
        };
        st.ever_online = true;
        st.view.server = Some(server.to_string());
        st.view.online_since = Some(now);
        st.view.offline_since = None;
        if back_after.is_some() {
            st.view.reconnects += 1;
        }
        let name = st.view.name.clone();
        drop(st);
        match back_after {
            Some(d) => {
                let ms = d.as_millis() as u64;
                lock(&self.reconnect_ms).push(ms);
                info!("{name} back online on {server} after {ms} ms");
            }
            None => {
                debug!("{name} online on {server}");
                // One line a person (or a test) can wait for instead of polling.
                let n = self.first_online.fetch_add(1, Ordering::Relaxed) + 1;
                if n == self.users.len() {
                    let ms = self.started.elapsed().as_millis();
                    info!("all {n} users online after {ms} ms");
                }
            }
        }
    }

    /// The user's live connection died at `at` (detection time).
    fn mark_offline(&self, idx: usize, at: Instant, reason: &str) {
        let mut st = lock(&self.users[idx]);
        let server = st.view.server.take().unwrap_or_else(|| "?".into());
        st.view.online_since = None;
        st.view.offline_since = Some(at);
        let name = st.view.name.clone();
        drop(st);
        self.disconnects.fetch_add(1, Ordering::Relaxed);
        info!("{name} offline (was on {server}): {reason}");
    }

    fn views(&self) -> Vec<UserView> {
        self.users.iter().map(|u| lock(u).view.clone()).collect()
    }

    fn summary(&self) -> Summary {
        let mut per_server = BTreeMap::new();
        let mut online = 0;
        let mut never_connected = 0;
        for u in &self.users {
            let st = lock(u);
            match &st.view.server {
                Some(s) => {
                    online += 1;
                    *per_server.entry(s.clone()).or_insert(0) += 1;
                }
                None if !st.ever_online => never_connected += 1,
                None => {}
            }
        }
        let mut ms = lock(&self.reconnect_ms).clone();
        ms.sort_unstable();
        let users = self.users.len();
        Summary {
            users,
            online,
            per_server,
            reconnects: ms.len() as u64,
            disconnects: self.disconnects.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            reconnect_ms: LatencyStats::from_sorted(&ms),
            users_never_back: users - online,
            never_connected,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// Reconnect-time statistics in milliseconds (nearest-rank percentiles; None without samples).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LatencyStats {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: Option<u64>,
    /// 95th percentile.
    pub p95: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Largest sample.
    pub max: Option<u64>,
}

impl LatencyStats {
    /// Statistics of `sorted` (ascending).
    pub fn from_sorted(sorted: &[u64]) -> LatencyStats {
        let pct = |p: f64| {
            if sorted.is_empty() {
                return None;
            }
            let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            Some(sorted[rank.clamp(1, sorted.len()) - 1])
        };
        LatencyStats {
            count: sorted.len(),
            p50: pct(50.0),
            p95: pct(95.0),
            p99: pct(99.0),
            max: sorted.last().copied(),
        }
    }
}

/// End-of-run report of a fleet: where users are, how often and how fast they reconnected.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    /// Number of simulated users.
    pub users: usize,
    /// Users online at the end.
    pub online: usize,
    /// Users online at the end, per server id.
    pub per_server: BTreeMap<String, usize>,
    /// Successful reconnects (back online after losing a connection).
    pub reconnects: u64,
    /// Connections lost after having been online.
    pub disconnects: u64,
    /// Connect attempts that did not get a user online (refused, 401, timeout, ...).
    pub failed_attempts: u64,
    /// Time from detecting a death to the welcome on the new connection.
    pub reconnect_ms: LatencyStats,
    /// Users offline at the end: lost and not back, plus never connected.
    pub users_never_back: usize,
    /// Users that never got online at all (included in `users_never_back`).
    pub never_connected: usize,
    /// Time since the fleet started.
    pub elapsed_ms: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        writeln!(
            f,
            "users            {} ({} online after {:.1} s)",
            self.users,
            self.online,
            self.elapsed_ms as f64 / 1000.0
        )?;
        writeln!(f, "per server")?;
        if self.per_server.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for (server, n) in &self.per_server {
            writeln!(f, "  {server:<14} {n}")?;
        }
        writeln!(
            f,
            "reconnects       {} (disconnects {}, failed attempts {})",
            self.reconnects, self.disconnects, self.failed_attempts
        )?;
        let r = &self.reconnect_ms;
        writeln!(
            f,
            "reconnect ms     p50 {}  p95 {}  p99 {}  max {}",
            ms(r.p50),
            ms(r.p95),
            ms(r.p99),
            ms(r.max)
        )?;
        writeln!(
            f,
            "never back       {} (never connected {})",
            self.users_never_back, self.never_connected
        )
    }
}

/// A running fleet of simulated users (one task each); stop it with [`Fleet::stop`].
pub struct Fleet {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts one task per user on the current tokio runtime. Invalid options do
    /// not panic: every attempt fails and is counted (check with [`ClientOpts::validate`]).
    pub fn start(mut opts: ClientOpts) -> Fleet {
        // A zero interval would make tokio panic; a millisecond is the smallest sane one.
        let floor = Duration::from_millis(1);
        opts.heartbeat = opts.heartbeat.max(floor);
        opts.pong_timeout = opts.pong_timeout.max(floor);
        opts.connect_timeout = opts.connect_timeout.max(floor);
        let started = Instant::now();
        let width = opts.users.to_string().len().max(4);
        let users = (0..opts.users)
            .map(|i| {
                Mutex::new(UserState {
                    view: UserView {
                        name: format!("{}{:0width$}", opts.user_prefix, i + 1),
                        server: None,
                        online_since: None,
                        offline_since: Some(started),
                        reconnects: 0,
                    },
                    ever_online: false,
                })
            })
            .collect();
        let ramp = (RAMP_PER_USER * opts.users as u32).min(MAX_RAMP);
        let shared = Arc::new(Shared {
            opts,
            started,
            users,
            reconnect_ms: Mutex::new(Vec::new()),
            disconnects: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            first_online: AtomicUsize::new(0),
        });
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for idx in 0..shared.users.len() {
            // Spread the first connects so thousands of users do not SYN-flood at once.
            let delay = random_duration(ramp);
            tasks.spawn(run_user(shared.clone(), idx, delay, cancel.clone()));
        }
        Fleet {
            shared,
            cancel,
            tasks,
        }
    }

    /// A snapshot of every user.
    pub fn users(&self) -> Vec<UserView> {
        self.shared.views()
    }

    /// Number of users online now.
    pub fn online_count(&self) -> usize {
        self.shared
            .users
            .iter()
            .filter(|u| lock(u).view.server.is_some())
            .count()
    }

    /// Users online now, per server id.
    pub fn online_by_server(&self) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for u in &self.shared.users {
            if let Some(s) = &lock(u).view.server {
                *by.entry(s.clone()).or_insert(0) += 1;
            }
        }
        by
    }

    /// The summary so far, without stopping.
    pub fn summary(&self) -> Summary {
        self.shared.summary()
    }

    /// Stops every user (closing connections with a close handshake, bounded in
    /// time) and returns the summary as it stood when `stop` was called.
    pub async fn stop(mut self) -> Summary {
        let summary = self.shared.summary();
        self.cancel.cancel();
        let drained = tokio::time::timeout(STOP_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                remaining = self.tasks.len(),
                "some users did not close in time"
            );
            self.tasks.abort_all();
        }
        summary
    }
}

/// A uniformly random duration in `[0, max]`.
fn random_duration(max: Duration) -> Duration {
    let nanos = max.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// Backoff before the next attempt, with full jitter: uniform in
/// `[0, min(cap, base * 2^attempt)]`. `attempt` is 0 for the first retry after a
/// connection died (so even that one is spread over `[0, base]`), then counts
/// failed attempts.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let ceiling = base.checked_mul(factor).unwrap_or(cap).min(cap);
    random_duration(ceiling)
}

/// Sleeps `d` unless cancelled first; returns false if cancelled.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Sleeps until `deadline`, or forever if there is none.
async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How a session ended.
enum Outcome {
    /// The fleet is stopping; the connection was closed politely.
    Stopped,
    /// The connection died at `at`; `was_online` tells whether it ever got a welcome.
    Dead {
        was_online: bool,
        at: Instant,
        reason: String,
    },
}

/// One user's life: connect, run a session, detect death, back off, reconnect.
async fn run_user(shared: Arc<Shared>, idx: usize, delay: Duration, cancel: CancellationToken) {
    if !sleep_or_cancel(delay, &cancel).await {
        return;
    }
    let name = shared.name(idx);
    let opts = &shared.opts;
    // Failed attempts since the user was last online; drives the backoff.
    let mut attempt: u32 = 0;
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect(opts, &name) => r,
        };
        match connected {
            Ok(ws) => match session(&shared, idx, ws, &cancel).await {
                Outcome::Stopped => return,
                Outcome::Dead {
                    was_online: true,
                    at,
                    reason,
                } => {
                    shared.mark_offline(idx, at, &reason);
                    attempt = 0;
                }
                Outcome::Dead {
                    was_online: false,
                    reason,
                    ..
                } => {
                    shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    debug!("{name}: connection died before the welcome: {reason}");
                    attempt = attempt.saturating_add(1);
                }
            },
            Err(e) => {
                shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                debug!("{name}: attempt {} failed: {e}", attempt + 1);
                attempt = attempt.saturating_add(1);
            }
        }
        let wait = backoff_delay(attempt, opts.backoff_base, opts.backoff_cap);
        if !sleep_or_cancel(wait, &cancel).await {
            return;
        }
    }
}

/// TCP connect plus WebSocket handshake with a fresh token, bounded by `connect_timeout`.
async fn connect(opts: &ClientOpts, name: &str) -> Result<WebSocketStream<TcpStream>, ClientError> {
    let (host, port) = target(&opts.url)?;
    let mut request = opts
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Handshake(Box::new(e)))?;
    // Re-issued at every attempt, so a long outage never leaves a user with a stale token.
    let tok = token::try_issue(&opts.secret, name, TOKEN_TTL).map_err(ClientError::Token)?;
    let auth =
        HeaderValue::from_str(&format!("Bearer {tok}")).map_err(|e| ClientError::BadUrl {
            url: opts.url.clone(),
            why: e.to_string(),
        })?;
    request.headers_mut().insert(header::AUTHORIZATION, auth);
    tokio::time::timeout(opts.connect_timeout, async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(ClientError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (ws, _response) = tokio_tungstenite::client_async_with_config(request, tcp, None)
            .await
            .map_err(|e| ClientError::Handshake(Box::new(e)))?;
        Ok(ws)
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}

/// The welcome message the bundled backend sends first.
#[derive(Deserialize)]
struct Welcome {
    #[serde(rename = "type")]
    kind: String,
    server: String,
}

/// Server id from a welcome message; None if `text` is not one.
fn parse_welcome(text: &str) -> Option<String> {
    serde_json::from_str::<Welcome>(text)
        .ok()
        .filter(|w| w.kind == "welcome")
        .map(|w| w.server)
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Source = SplitStream<WebSocketStream<TcpStream>>;

/// Writes queued messages; ends at the first write error or when the queue closes.
async fn writer(mut sink: Sink, mut rx: mpsc::Receiver<Message>) {
    while let Some(msg) = rx.recv().await {
        if sink.send(msg).await.is_err() {
            return;
        }
    }
}

/// Aborts the writer task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one connection until it dies or the fleet stops.
async fn session(
    shared: &Shared,
    idx: usize,
    ws: WebSocketStream<TcpStream>,
    cancel: &CancellationToken,
) -> Outcome {
    let opts = &shared.opts;
    let (sink, mut source) = ws.split();
    // Small queue: only pings and the final close go through it. If it is full the
    // writer is stuck, and the pong deadline below will declare the connection dead.
    let (tx, rx) = mpsc::channel::<Message>(4);
    let _writer = AbortOnDrop(tokio::spawn(writer(sink, rx)));

    let start = tokio::time::Instant::now();
    let welcome_deadline = start + opts.connect_timeout;
    let mut online = false;
    let mut heartbeat = tokio::time::interval_at(start + opts.heartbeat, opts.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    // Pings not yet answered: (sequence number, sent at). The oldest one sets the deadline.
    let mut unanswered: VecDeque<(u64, tokio::time::Instant)> = VecDeque::new();

    let reason = loop {
        let pong_deadline = unanswered.front().map(|&(_, t)| t + opts.pong_timeout);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                close(&tx, &mut source).await;
                return Outcome::Stopped;
            }
            _ = sleep_until_opt(pong_deadline) => {
                break format!("no pong within {}", humantime::format_duration(opts.pong_timeout));
            }
            _ = sleep_until_opt((!online).then_some(welcome_deadline)) => {
                // A server that sends no welcome is still a working server.
                online = true;
                shared.mark_online(idx, "?");
            }
            _ = heartbeat.tick() => {
                seq += 1;
                // Counted as sent even if the queue is full: an unwritable socket is dead too.
                unanswered.push_back((seq, tokio::time::Instant::now()));
                let ping = Message::Ping(seq.to_be_bytes().to_vec().into());
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(ping) {
                    break "write failed".to_string();
                }
            }
            msg = source.next() => match msg {
                Some(Ok(Message::Pong(payload))) => {
                    // A pong answers its ping and every earlier one (pongs may be coalesced).
                    if let Ok(bytes) = <[u8; 8]>::try_from(payload.as_ref()) {
                        let answered = u64::from_be_bytes(bytes);
                        unanswered.retain(|&(s, _)| s > answered);
                    }
                }
                Some(Ok(Message::Text(text))) if !online => {
                    online = true;
                    let server = parse_welcome(&text).unwrap_or_else(|| "?".to_string());
                    shared.mark_online(idx, &server);
                }
                Some(Ok(Message::Close(frame))) => {
                    let at = Instant::now();
                    // Let tungstenite flush its close reply (it does so on the next read).
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        source.next(),
                    )
                    .await;
                    let reason = match frame {
                        Some(f) => format!("server closed ({} {})", f.code, f.reason),
                        None => "server closed".to_string(),
                    };
                    return Outcome::Dead { was_online: online, at, reason };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break read_error(&e),
                None => break "connection closed".to_string(),
            },
        }
    };
    Outcome::Dead {
        was_online: online,
        at: Instant::now(),
        reason,
    }
}

/// Short reason for a read error, for the "offline" log line.
fn read_error(e: &WsError) -> String {
    match e {
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "connection closed without a close frame".to_string()
        }
        WsError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
            "connection reset".to_string()
        }
        other => format!("read error: {other}"),
    }
}

/// Closes the connection politely: close frame 1000, then wait (bounded) for the reply.
async fn close(tx: &mpsc::Sender<Message>, source: &mut Source) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "client stopping".into(),
    };
    if tx.try_send(Message::Close(Some(frame))).is_ok() {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(_)) = source.next().await {}
        })
        .await;
    }
}

/// Entry point of `lb client`. Prints the summary when stopped, then fails (exit
/// status 1) if any user is offline at that moment (`users_never_back > 0`).
pub async fn main(args: ClientArgs) -> anyhow::Result<()> {
    let opts = ClientOpts::from(&args);
    opts.validate()?;
    info!(
        users = opts.users,
        url = %opts.url,
        heartbeat = %humantime::format_duration(opts.heartbeat),
        pong_timeout = %humantime::format_duration(opts.pong_timeout),
        "starting clients"
    );
    let fleet = Fleet::start(opts);
    let run = async {
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.tick().await;
        loop {
            progress.tick().await;
            let by = fleet.online_by_server();
            info!(
                "online {}/{} {:?}",
                by.values().sum::<usize>(),
                fleet.shared.users.len(),
                by
            );
        }
    };
    let stop_after = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = stop_after => {}
        _ = crate::shutdown::signal() => info!("stopping"),
        _ = run => {}
    }
    let summary = fleet.stop().await;
    {
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&summary)?)?;
        } else {
            write!(out, "{summary}")?;
        }
        // The summary must be out before the error line and the exit.
        out.flush()?;
    }
    if summary.users_never_back > 0 {
        anyhow::bail!(
            "{} of {} users offline at exit ({} never connected)",
            summary.users_never_back,
            summary.users,
            summary.never_connected
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for _ in 0..200 {
            assert!(backoff_delay(0, base, cap) <= base);
            assert!(backoff_delay(3, base, cap) <= Duration::from_millis(800));
            assert!(backoff_delay(40, base, cap) <= cap);
        }
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        let s = LatencyStats::from_sorted(&v);
        assert_eq!(
            (s.p50, s.p95, s.p99, s.max),
            (Some(50), Some(95), Some(99), Some(100))
        );
        assert_eq!(LatencyStats::from_sorted(&[]).p50, None);
        assert_eq!(LatencyStats::from_sorted(&[7]).p99, Some(7));
    }

    #[test]
    fn url_checks() {
        assert_eq!(
            target("ws://127.0.0.1:9000/ws").unwrap(),
            ("127.0.0.1".into(), 9000)
        );
        assert_eq!(target("ws://[::1]/ws").unwrap(), ("::1".into(), 80));
        assert!(target("wss://example.com/ws").is_err());
        assert!(target("http://example.com/ws").is_err());
    }

    #[test]
    fn welcome_parsing() {
        assert_eq!(
            parse_welcome(r#"{"type":"welcome","server":"s1","user":"u"}"#),
            Some("s1".into())
        );
        assert_eq!(parse_welcome("hello"), None);
    }
}
