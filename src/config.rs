//! `lb.toml`: serde file types with defaults, then `validate()` into a typed [`Config`].
//!
//! Every error names the file, the line where TOML gives one, and the key, e.g.
//! `lb.toml:14: service "chat" health.rise: must be at least 1`.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration that cannot be used; names file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a value of the wrong type, or a value out of range.
    #[error("{}", located(path, line, key, message))]
    Invalid {
        path: PathBuf,
        /// 1-based line, when TOML can give one.
        line: Option<usize>,
        /// Dotted key path, e.g. `service[0].health.rise` or `service "chat".backend "s1".addr`.
        key: String,
        message: String,
    },
}

fn located(path: &Path, line: &Option<usize>, key: &str, message: &str) -> String {
    let mut s = path.display().to_string();
    if let Some(line) = line {
        s.push_str(&format!(":{line}"));
    }
    if !key.is_empty() {
        s.push_str(&format!(": {key}"));
    }
    s.push_str(&format!(": {message}"));
    s
}

/// How a service picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Weighted round-robin over the healthy set.
    RoundRobin,
    /// Two random (weighted) choices; the one with fewer active connections per weight wins.
    LeastConn,
    /// Weighted random.
    Random,
}

/// What happens to open client connections when their backend is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBackendDown {
    /// Close them at once, so clients reconnect to a live backend now.
    Close,
    /// Leave them open (HAProxy's default).
    Keep,
}

/// What happens to the open connections of a backend (or service) removed by a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRemoval {
    /// Keep them until they close by themselves.
    Drain,
    /// Keep them for up to `drain_timeout`, then close what is left.
    Close,
}

/// Which active check a service runs against its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    /// A TCP connect succeeds. Cannot see a hung process whose kernel still accepts.
    Tcp,
    /// `GET path` answers 2xx within the timeout.
    Http,
    /// No active check: backends are always up (only the passive check applies).
    None,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub services: Vec<ServiceConfig>,
    /// `[admin]`: absent = no admin API.
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: the admin API and metrics endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// When set, every request needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// One `[[service]]`: a listener and the backends behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    pub drain_timeout: Duration,
    pub on_backend_down: OnBackendDown,
    pub on_removal: OnRemoval,
    /// Percent of healthy backends below which health is ignored (0: never).
    pub panic_threshold: u8,
    /// Most client connections held at once; at the limit, accepting pauses (the kernel queues).
    pub max_connections: usize,
    pub health: HealthConfig,
    pub backends: Vec<BackendConfig>,
}

/// `[service.health]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub check: CheckKind,
    pub path: String,
    pub interval: Duration,
    /// Interval while a backend is between states (some passes or failures counted).
    pub fast_interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// One `[[service.backend]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub addr: SocketAddr,
    /// Relative share of new connections; 0 takes no new connections.
    pub weight: u32,
}

/// Defaults, in one place so the README and the code agree.
pub mod defaults {
    use std::time::Duration;
    pub const BALANCE: super::Balance = super::Balance::LeastConn;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const RETRIES: u32 = 2;
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const ON_BACKEND_DOWN: super::OnBackendDown = super::OnBackendDown::Close;
    pub const ON_REMOVAL: super::OnRemoval = super::OnRemoval::Drain;
    pub const PANIC_THRESHOLD: u8 = 50;
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9900";
    pub const MAX_CONNECTIONS: usize = 100_000;
    pub const CHECK: super::CheckKind = super::CheckKind::Http;
    pub const PATH: &str = "/healthz";
    pub const INTERVAL: Duration = Duration::from_secs(1);
    pub const TIMEOUT: Duration = Duration::from_millis(500);
    pub const RISE: u32 = 2;
    pub const FALL: u32 = 2;
    pub const WEIGHT: u32 = 1;
    /// Upper bound on a weight (keeps the round-robin schedule small).
    pub const MAX_WEIGHT: u32 = 256;
    /// Upper bound on `max_connections` (far above what one process can hold).
    pub const MAX_CONNECTIONS_LIMIT: usize = 100_000_000;
    /// Upper bound on any duration (a typo like "500000000y" would overflow timers).
    pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
}

// ---- file types: exactly what the TOML may say ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    service: Vec<Spanned<FileService>>,
    admin: Option<FileAdmin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: Spanned<String>,
    listen: Spanned<String>,
    balance: Option<Balance>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    retries: Option<u32>,
    drain_timeout: Option<Spanned<String>>,
    on_backend_down: Option<OnBackendDown>,
    on_removal: Option<OnRemoval>,
    panic_threshold: Option<Spanned<u8>>,
    max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    health: Option<FileHealth>,
    #[serde(default)]
    backend: Vec<Spanned<FileBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    check: Option<CheckKind>,
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    fast_interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    name: Option<Spanned<String>>,
    addr: Spanned<String>,
    weight: Option<Spanned<u32>>,
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let v = Validator { path, text };
        let file: FileConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
        v.validate(file)
    }
}

/// Would binding `a` and `b` collide? Same port and family, and the same address or
/// either one the wildcard (0.0.0.0 / ::), which covers every local address.
fn same_socket(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Turns file types into typed config; knows the text so it can turn spans into lines.
struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn line_of(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn err(
        &self,
        span: Option<Range<usize>>,
        key: String,
        message: impl fmt::Display,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: span.map(|s| self.line_of(s)),
            key,
            message: message.to_string(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        // toml's message names the unknown or mistyped key; the span gives the line.
        let span = e.span();
        let key = span.clone().map(|s| self.key_at(s)).unwrap_or_default();
        self.err(span, key, e.message().trim())
    }

    /// Best effort: the key written on the line of `span` (`rise = 0` -> `rise`), with the
    /// enclosing `[table]` header, so the message names the key even for syntax errors.
    fn key_at(&self, span: Range<usize>) -> String {
        let line_no = self.line_of(span);
        let lines: Vec<&str> = self.text.lines().collect();
        let Some(line) = lines.get(line_no - 1) else {
            return String::new();
        };
        let mut table = String::new();
        for l in lines[..line_no - 1].iter().rev() {
            let t = l.trim();
            if t.starts_with('[') {
                table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
                break;
            }
        }
        let t = line.trim();
        if t.starts_with('[') {
            return t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
        let key = t.split('=').next().unwrap_or("").trim();
        match (table.is_empty(), key.is_empty()) {
            (_, true) => table,
            (true, false) => key.to_string(),
            (false, false) => format!("{table}.{key}"),
        }
    }

    fn duration(
        &self,
        v: Option<Spanned<String>>,
        default: Duration,
        key: String,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let d = humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            self.err(
                Some(v.span()),
                key.clone(),
                format!(
                    "{:?} is not a duration like \"500ms\", \"2s\", \"1h\": {e}",
                    v.get_ref()
                ),
            )
        })?;
        if !allow_zero && d.is_zero() {
            return Err(self.err(Some(v.span()), key, "must be greater than zero"));
        }
        if d > defaults::MAX_DURATION {
            return Err(self.err(Some(v.span()), key, "must be at most a year"));
        }
        Ok(d)
    }

    fn addr(&self, v: &Spanned<String>, key: String) -> Result<SocketAddr, ConfigError> {
        v.get_ref().trim().parse().map_err(|_| {
            self.err(
                Some(v.span()),
                key,
                format!(
                    "{:?} is not an ip:port address (IPv6 as \"[::1]:8080\")",
                    v.get_ref()
                ),
            )
        })
    }

    fn at_least_one(
        &self,
        v: Option<Spanned<u32>>,
        default: u32,
        key: String,
    ) -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => {
                Err(self.err(Some(v.span()), key, "must be at least 1"))
            }
            Some(v) => Ok(v.into_inner()),
        }
    }

    fn validate(&self, file: FileConfig) -> Result<Config, ConfigError> {
        if file.service.is_empty() {
            return Err(self.err(None, "service".into(), "no [[service]] is defined"));
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        // Checked once every listen address is known: a backend must not be lb itself.
        let mut backend_addrs = Vec::new();
        let mut services = Vec::with_capacity(file.service.len());
        for s in file.service {
            let span = s.span();
            let s = s.into_inner();
            let name = s.name.get_ref().trim().to_string();
            if name.is_empty() {
                return Err(self.err(
                    Some(s.name.span()),
                    "service.name".into(),
                    "must not be empty",
                ));
            }
            let k = |key: &str| format!("service {name:?} {key}");
            if !names.insert(name.clone()) {
                return Err(self.err(Some(s.name.span()), k("name"), "duplicate service name"));
            }
            let listen = self.addr(&s.listen, k("listen"))?;
            if let Some(other) = listens.iter().find(|l| same_socket(l, &listen)) {
                return Err(self.err(
                    Some(s.listen.span()),
                    k("listen"),
                    format!(
                        "{listen} conflicts with {other}, the listen address of another service"
                    ),
                ));
            }
            listens.insert(listen);
            let health = self.health(s.health, &name)?;
            let panic_threshold = match s.panic_threshold {
                None => defaults::PANIC_THRESHOLD,
                Some(p) if *p.get_ref() > 100 => {
                    return Err(self.err(
                        Some(p.span()),
                        k("panic_threshold"),
                        "is a percentage: 0 to 100",
                    ));
                }
                Some(p) => p.into_inner(),
            };
            let max_connections = match s.max_connections {
                None => defaults::MAX_CONNECTIONS,
                Some(v) if *v.get_ref() == 0 || *v.get_ref() > defaults::MAX_CONNECTIONS_LIMIT => {
                    return Err(self.err(
                        Some(v.span()),
                        k("max_connections"),
                        format!("must be between 1 and {}", defaults::MAX_CONNECTIONS_LIMIT),
                    ));
                }
                Some(v) => v.into_inner(),
            };
            if s.backend.is_empty() {
                return Err(self.err(
                    Some(span),
                    k("backend"),
                    "a service needs at least one [[service.backend]]",
                ));
            }
            let mut backend_names = HashSet::new();
            let mut backends = Vec::with_capacity(s.backend.len());
            for (i, b) in s.backend.into_iter().enumerate() {
                let b = b.into_inner();
                let bname = match &b.name {
                    Some(n) if n.get_ref().trim().is_empty() => {
                        return Err(self.err(
                            Some(n.span()),
                            k("backend.name"),
                            "must not be empty",
                        ));
                    }
                    Some(n) => n.get_ref().trim().to_string(),
                    None => format!("{}-{}", name, i + 1),
                };
                let bk = |key: &str| format!("service {name:?} backend {bname:?} {key}");
                if !backend_names.insert(bname.clone()) {
                    let span = b.name.as_ref().map(|n| n.span());
                    return Err(self.err(
                        span,
                        bk("name"),
                        "duplicate backend name in this service",
                    ));
                }
                let addr = self.addr(&b.addr, bk("addr"))?;
                if addr.port() == 0 {
                    return Err(self.err(
                        Some(b.addr.span()),
                        bk("addr"),
                        "port 0 is not a backend port",
                    ));
                }
                backend_addrs.push((addr, b.addr.span(), bk("addr")));
                let weight = match b.weight {
                    None => defaults::WEIGHT,
                    Some(w) if *w.get_ref() > defaults::MAX_WEIGHT => {
                        return Err(self.err(
                            Some(w.span()),
                            bk("weight"),
                            format!("must be at most {}", defaults::MAX_WEIGHT),
                        ));
                    }
                    Some(w) => w.into_inner(),
                };
                backends.push(BackendConfig {
                    name: bname,
                    addr,
                    weight,
                });
            }
            services.push(ServiceConfig {
                balance: s.balance.unwrap_or(defaults::BALANCE),
                connect_timeout: self.duration(
                    s.connect_timeout,
                    defaults::CONNECT_TIMEOUT,
                    k("connect_timeout"),
                    false,
                )?,
                idle_timeout: self.duration(
                    s.idle_timeout,
                    defaults::IDLE_TIMEOUT,
                    k("idle_timeout"),
                    false,
                )?,
                retries: s.retries.unwrap_or(defaults::RETRIES),
                drain_timeout: self.duration(
                    s.drain_timeout,
                    defaults::DRAIN_TIMEOUT,
                    k("drain_timeout"),
                    true,
                )?,
                on_backend_down: s.on_backend_down.unwrap_or(defaults::ON_BACKEND_DOWN),
                on_removal: s.on_removal.unwrap_or(defaults::ON_REMOVAL),
                panic_threshold,
                max_connections,
                name,
                listen,
                health,
                backends,
            });
        }
        for (addr, span, key) in &backend_addrs {
            // A wildcard listener is only known to be us for loopback backends: another
            // host on the same port (0.0.0.0:8080 -> 10.0.0.5:8080) is the usual setup.
            let is_us = |l: &&SocketAddr| {
                l.port() == addr.port()
                    && l.is_ipv4() == addr.is_ipv4()
                    && (l.ip() == addr.ip()
                        || (l.ip().is_unspecified()
                            && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
            };
            if let Some(l) = listens.iter().find(is_us) {
                return Err(self.err(
                    Some(span.clone()),
                    key.clone(),
                    format!("{addr} is lb's own listen address {l}: lb would connect to itself"),
                ));
            }
        }
        let admin = match file.admin {
            None => None,
            Some(a) => Some(AdminConfig {
                listen: match &a.listen {
                    Some(l) => self.addr(l, "admin.listen".into())?,
                    None => defaults::ADMIN_LISTEN.parse().expect("valid default"),
                },
                token: match a.token {
                    Some(t) if t.get_ref().trim().is_empty() => {
                        return Err(self.err(
                            Some(t.span()),
                            "admin.token".into(),
                            "must not be empty (leave it out for no token)",
                        ));
                    }
                    t => t.map(|t| t.into_inner()),
                },
            }),
        };
        if let Some(a) = &admin {
            if listens.contains(&a.listen) {
                return Err(self.err(
                    None,
                    "admin.listen".into(),
                    format!("{} is already the listen address of a service", a.listen),
                ));
            }
        }
        Ok(Config {
            path: self.path.to_path_buf(),
            services,
            admin,
        })
    }

    fn health(&self, h: Option<FileHealth>, service: &str) -> Result<HealthConfig, ConfigError> {
        let k = |key: &str| format!("service {service:?} health.{key}");
        let h = h.unwrap_or(FileHealth {
            check: None,
            path: None,
            interval: None,
            fast_interval: None,
            timeout: None,
            rise: None,
            fall: None,
        });
        let path = match h.path {
            None => defaults::PATH.to_string(),
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(self.err(Some(p.span()), k("path"), "must start with '/'"));
            }
            Some(p)
                if p.get_ref()
                    .parse::<hyper::http::uri::PathAndQuery>()
                    .is_err() =>
            {
                return Err(self.err(
                    Some(p.span()),
                    k("path"),
                    format!("{:?} is not a valid request path (spaces and control characters must be %-encoded)", p.get_ref()),
                ));
            }
            Some(p) => p.into_inner(),
        };
        let interval = self.duration(h.interval, defaults::INTERVAL, k("interval"), false)?;
        // HAProxy's fastinter: between states, look again sooner so a flap is confirmed fast.
        let fast_default = (interval / 4).max(Duration::from_millis(50)).min(interval);
        let fast_span = h.fast_interval.as_ref().map(|f| f.span());
        let fast_interval =
            self.duration(h.fast_interval, fast_default, k("fast_interval"), false)?;
        if fast_interval > interval {
            return Err(self.err(
                fast_span,
                k("fast_interval"),
                format!("must not be longer than interval ({interval:?})"),
            ));
        }
        Ok(HealthConfig {
            check: h.check.unwrap_or(defaults::CHECK),
            path,
            interval,
            fast_interval,
            timeout: self.duration(h.timeout, defaults::TIMEOUT, k("timeout"), false)?,
            rise: self.at_least_one(h.rise, defaults::RISE, k("rise"))?,
            fall: self.at_least_one(h.fall, defaults::FALL, k("fall"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("lb.toml"), s)
    }

    const MIN: &str = "[[service]]\nname = \"chat\"\nlisten = \"127.0.0.1:8080\"\n[[service.backend]]\naddr = \"127.0.0.1:9001\"\n";

    #[test]
    fn minimal_gets_defaults() {
        let c = parse(MIN).unwrap();
        let s = &c.services[0];
        assert_eq!(s.balance, Balance::LeastConn);
        assert_eq!(s.health.check, CheckKind::Http);
        assert_eq!(s.health.interval, Duration::from_secs(1));
        assert_eq!(s.health.fast_interval, Duration::from_millis(250));
        assert_eq!(s.backends[0].name, "chat-1");
        assert_eq!(s.backends[0].weight, 1);
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = parse(&format!("{MIN}bogus = 1\n")).unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:6:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = parse(&MIN.replace(
            "[[service.backend]]",
            "[service.health]\nrise = 0\n[[service.backend]]",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("lb.toml:5:") && e.contains("health.rise"),
            "{e}"
        );
    }

    #[test]
    fn wildcard_listen_allows_remote_backend_on_same_port() {
        let text = MIN
            .replace("127.0.0.1:8080", "0.0.0.0:9001")
            .replace("127.0.0.1:9001", "192.0.2.10:9001");
        assert!(parse(&text).is_ok());
        let own = MIN.replace("127.0.0.1:8080", "0.0.0.0:9001");
        assert!(
            parse(&own)
                .unwrap_err()
                .to_string()
                .contains("connect to itself")
        );
    }
}
