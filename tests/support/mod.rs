//! Shared helpers for the integration tests: spawn the real `lb` binary, find free
//! loopback ports, wait with deadlines. Every child process is killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the `lb` binary built for these tests.
pub fn lb_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb"))
}

/// A loopback port that was free a moment ago (bind to 0, read, release).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Waits until `cond` holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// `assert_eventually!(timeout, cond, "what")`: poll `cond` until it holds, panic on the deadline.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($what:tt)+) => {
        $crate::support::wait_until($timeout, &format!($($what)+), || $cond)
    };
}

/// A child process whose stderr/stdout lines are collected; killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `lb ARGS...` with `LB_LOG=info` unless overridden in `envs`.
    pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(lb_bin());
        cmd.args(args).env("LB_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc::spawn_cmd(name, cmd)
    }

    /// Spawns a prepared command, collecting its output.
    pub fn spawn_cmd(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn lb");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("LB_TEST_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            child,
            name: name.to_string(),
            lines,
        }
    }

    /// True while the process has not exited.
    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// All output lines so far (stdout and stderr interleaved).
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Number of output lines containing every one of `needles`.
    pub fn count_lines(&self, needles: &[&str]) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits for an output line containing every one of `needles`; returns it.
    pub fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: no line with {:?} within {:?}; output:\n{}",
                    self.name,
                    needles,
                    timeout,
                    self.output().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a pid we spawned and still own (not yet reaped).
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit within `timeout`; returns its exit code (None if signalled).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {:?}; output:\n{}",
                    self.name,
                    timeout,
                    self.output().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A SIGSTOPped child ignores nothing but SIGKILL, which works on stopped processes too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `lb backend --listen 127.0.0.1:0 --id ID` and waits until it prints its bound address.
pub fn spawn_backend(id: &str) -> (Proc, SocketAddr) {
    spawn_backend_with(id, &[])
}

/// Like [`spawn_backend`] with extra arguments.
pub fn spawn_backend_with(id: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["backend", "--listen", "127.0.0.1:0", "--id", id];
    args.extend_from_slice(extra);
    let p = Proc::spawn(id, &args, &[]);
    let line = p.wait_for_line(&["listening on"], Duration::from_secs(10));
    let addr = line
        .rsplit("listening on ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse address from {line:?}"));
    (p, addr)
}

/// Writes `toml` to a fresh temp file and returns its path (the directory lives for the test).
pub fn write_config(toml: &str) -> (tempdir::TempDir, PathBuf) {
    let dir = tempdir::TempDir::new();
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

/// Starts `lb run -c PATH` and waits until its listeners are bound.
pub fn start_lb(config_path: &std::path::Path) -> Proc {
    let p = Proc::spawn("lb", &["run", "-c", config_path.to_str().unwrap()], &[]);
    p.wait_for_line(&["ready"], Duration::from_secs(10));
    p
}

/// A tiny self-deleting temporary directory (no extra crate needed).
pub mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "lb-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A TCP server in this test process, for behaviours the bundled backend does not show.
/// `handler` runs on its own thread per connection. Stops accepting on drop.
pub struct TcpServer {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TcpServer {
    pub fn start(handler: impl Fn(std::net::TcpStream) + Send + Sync + 'static) -> TcpServer {
        Self::start_on(free_addr(), handler)
    }

    pub fn start_on(
        addr: SocketAddr,
        handler: impl Fn(std::net::TcpStream) + Send + Sync + 'static,
    ) -> TcpServer {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = Arc::new(handler);
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let h = handler.clone();
                        std::thread::spawn(move || h(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TcpServer { addr, stop }
    }

    /// An echo server: writes back what it reads, passes EOF on as shutdown(write).
    pub fn echo() -> TcpServer {
        Self::start(echo_handler)
    }
}

pub fn echo_handler(mut s: std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // The accept loop polls the flag; wait a moment so the port is really closed.
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// A config with one service `svc` on `listen` in front of `backends` (name, addr);
/// `extra_service` lines go into [[service]], `health` lines into [service.health].
pub fn one_service(
    listen: SocketAddr,
    backends: &[(&str, SocketAddr)],
    extra_service: &str,
    health: &str,
) -> String {
    let mut s = format!(
        "[[service]]\nname = \"svc\"\nlisten = \"{listen}\"\n{extra_service}\n[service.health]\n{health}\n"
    );
    for (name, addr) in backends {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddr = \"{addr}\"\n"
        ));
    }
    s
}

/// Sockets in CLOSE-WAIT (we were sent a FIN and never closed) whose local or remote
/// port is one of `ports`, read from /proc/net/tcp{,6}.
pub fn close_wait_sockets(ports: &[u16]) -> usize {
    let mut n = 0;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 || cols[3] != "08" {
                continue;
            }
            let port =
                |c: &str| u16::from_str_radix(c.rsplit(':').next().unwrap_or(""), 16).unwrap_or(0);
            if ports.contains(&port(cols[1])) || ports.contains(&port(cols[2])) {
                n += 1;
            }
        }
    }
    n
}

/// Opens a WebSocket through `lb` with a valid token and returns the server id from
/// the welcome message, or None if the connection failed.
pub fn which_server(lb: SocketAddr) -> Option<String> {
    let token = lb::ws::token::issue(
        lb::ws::token::DEFAULT_SECRET,
        "probe",
        Duration::from_secs(60),
    );
    let mut s = std::net::TcpStream::connect(lb).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: lb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the welcome frame's JSON is complete.
    while !String::from_utf8_lossy(&got).contains("\"user\"") {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "handshake: {text}");
    let at = text.find("\"server\":\"")? + "\"server\":\"".len();
    Some(text[at..].split('"').next()?.to_string())
}

/// A backend for tests that need a slow first health round: `GET /healthz` is answered
/// 200 after `delay`; any other first bytes are echoed, and the rest of the stream too.
pub fn slow_health_echo(delay: Duration) -> TcpServer {
    TcpServer::start(move |mut s| {
        let mut buf = [0u8; 16384];
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if buf[..n].starts_with(b"GET /healthz") {
            std::thread::sleep(delay);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            return;
        }
        if s.write_all(&buf[..n]).is_ok() {
            echo_handler(s);
        }
    })
}

/// `lb run` in front of one echo backend (service `svc`, tcp check); `extra` goes into
/// `[[service]]`. Everything it started stops when it is dropped.
pub struct EchoBehindLb {
    pub lb: Proc,
    pub listen: SocketAddr,
    pub backend: TcpServer,
    _dir: tempdir::TempDir,
}

pub fn echo_behind_lb(extra: &str) -> EchoBehindLb {
    let backend = TcpServer::echo();
    let (listen, dir, cfg) = tcp_service(backend.addr, extra, "");
    let lb = start_lb(&cfg);
    EchoBehindLb {
        lb,
        listen,
        backend,
        _dir: dir,
    }
}

/// A config file with one service `svc` on a free loopback port in front of `backend`,
/// with a tcp check; `service_extra` goes into `[[service]]`, `health_extra` into
/// `[service.health]`. Returns the listen address, the directory (keep it alive) and the path.
pub fn tcp_service(
    backend: SocketAddr,
    service_extra: &str,
    health_extra: &str,
) -> (SocketAddr, tempdir::TempDir, PathBuf) {
    let listen = free_addr();
    let health = format!("check = \"tcp\"\n{health_extra}");
    let (dir, path) = write_config(&one_service(
        listen,
        &[("b", backend)],
        service_extra,
        &health,
    ));
    (listen, dir, path)
}
