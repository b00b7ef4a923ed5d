//! Child processes that cannot outlive the suite, temp dirs that are always removed,
//! and readings from /proc (CPU time, memory, listening sockets).
//!
//! Every child is started in its own process group with `PR_SET_PDEATHSIG = SIGKILL`,
//! and killed as a group (SIGCONT, then SIGKILL) when its [`Proc`] is dropped, which
//! also happens while a panic unwinds. SIGINT/SIGTERM/SIGHUP to the suite are taken by
//! a thread (`sigwait`) that kills every registered group, removes every temp dir and
//! exits, so even Ctrl-C leaves nothing behind.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn cleanup_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Must run before any other thread starts (they inherit the blocked mask).
pub fn install_cleanup() {
    let set = cleanup_signals();
    // SAFETY: blocking signals in the calling thread; the waiter thread takes them.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait on a set blocked in every thread of this process.
        unsafe {
            libc::sigwait(&set, &mut sig);
        }
        eprintln!("\nsuite: signal {sig}: killing children, removing temp dirs");
        for g in lock(&GROUPS).iter() {
            kill_group(*g);
        }
        for d in lock(&DIRS).iter() {
            let _ = std::fs::remove_dir_all(d);
        }
        std::process::exit(128 + sig);
    });
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) on a process group this suite created (its leader not yet reaped).
    unsafe {
        libc::kill(-pgid, libc::SIGCONT);
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// A child process in its own process group; its output lines are collected.
pub struct Proc {
    child: Child,
    pub name: String,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
    reaped: bool,
}

pub fn verbose() -> bool {
    std::env::var_os("LB_SUITE_VERBOSE").is_some()
}

impl Proc {
    /// Spawns `cmd` (stdin null, stdout and stderr collected). Call from the main thread
    /// only: the death signal is tied to the thread that forks.
    pub fn spawn(name: &str, mut cmd: Command) -> std::io::Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let unblock = cleanup_signals();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        lock(&GROUPS).push(child.id() as i32);
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        type Lines = Arc<Mutex<Vec<String>>>;
        let streams: [(Box<dyn Read + Send>, &Lines); 2] = [
            (Box::new(child.stdout.take().unwrap()), &out),
            (Box::new(child.stderr.take().unwrap()), &err),
        ];
        for (stream, sink) in streams {
            let sink = sink.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if verbose() {
                        eprintln!("[{tag}] {line}");
                    }
                    lock(&sink).push(line);
                }
            });
        }
        Ok(Proc {
            child,
            name: name.to_string(),
            out,
            err,
            reaped: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> Vec<String> {
        lock(&self.out).clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        lock(&self.err).clone()
    }

    /// Last lines of stderr and stdout, for error messages.
    pub fn tail(&self) -> String {
        let mut v = self.stderr();
        v.extend(self.stdout());
        let n = v.len();
        v[n.saturating_sub(6)..].join(" | ")
    }

    /// Waits for a line (stdout or stderr) containing every needle.
    pub fn wait_line(&mut self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for src in [&self.out, &self.err] {
                if let Some(l) = lock(src)
                    .iter()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                {
                    return Some(l.clone());
                }
            }
            if Instant::now() > deadline || !self.alive() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        if self.reaped {
            return false;
        }
        match self.child.try_wait() {
            Ok(None) => true,
            _ => {
                self.reaped = true;
                false
            }
        }
    }

    /// Sends `sig` to the process (not its group); a no-op once it has been reaped.
    pub fn signal(&self, sig: i32) {
        if !self.reaped {
            // SAFETY: kill(2) on a child we own and have not reaped.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.reaped = true;
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.pid();
        if !self.reaped {
            // The unreaped leader keeps the group id reserved: safe to signal the group.
            kill_group(pgid);
        } else {
            // The leader is gone; anything still in its group (e.g. nginx workers) is ours.
            for pid in group_members(pgid) {
                // SAFETY: a process of a group this suite created.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = self.child.wait();
        lock(&GROUPS).retain(|g| *g != pgid);
    }
}

/// Removes the temp dirs of earlier suites that were killed outright (SIGKILL leaves no
/// chance to clean up): `lb-suite-PID-*` whose PID no longer runs.
pub fn remove_stale_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("lb-suite-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A temp dir removed on drop (and by the signal thread).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "lb-suite-{}-{}-{}",
            std::process::id(),
            tag,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        lock(&DIRS).push(p.clone());
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        lock(&DIRS).retain(|d| *d != self.0);
    }
}

// ---------------------------------------------------------------------------------------
// /proc readings

/// Fields after the `(comm)` of /proc/PID/stat, so index 0 is the state (field 3).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Pids whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            stat_fields(*pid)
                .and_then(|f| f.get(2)?.parse::<i32>().ok())
                .is_some_and(|g| g == pgid)
        })
        .collect()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of one process (all its threads), in seconds.
pub fn cpu_secs(pid: i32) -> f64 {
    stat_fields(pid)
        .map(|f| {
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) as f64 / clk_tck()
        })
        .unwrap_or(0.0)
}

/// CPU seconds of every process in the group (master and workers).
pub fn group_cpu_secs(pgid: i32) -> f64 {
    group_members(pgid).into_iter().map(cpu_secs).sum()
}

/// A `Key:   123 kB` value from a /proc status-like file.
fn kib_field(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn rss_kib(pid: i32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS")
}

pub fn hwm_kib(pid: i32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), "VmHWM")
}

/// Memory of a process group: (sum of Pss, sum of Rss) in KiB. PSS splits pages shared
/// between a master and its forked workers, so the sum does not count them twice.
pub fn group_mem_kib(pgid: i32) -> (Option<u64>, u64) {
    let mut pss = Some(0);
    let mut rss = 0;
    for pid in group_members(pgid) {
        rss += rss_kib(pid).unwrap_or(0);
        pss = match (pss, kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss")) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    }
    (pss, rss)
}

/// True once a socket listens on `port` (read from /proc/net/tcp{,6}; listening sockets
/// come first there, so reading stops at the first socket in another state).
pub fn listening(port: u16) -> bool {
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(f) else {
            continue;
        };
        for line in BufReader::new(file).lines().skip(1).map_while(Result::ok) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 || cols[3] != "0A" {
                break;
            }
            let p = cols[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) {
                return true;
            }
        }
    }
    false
}

/// Waits until `port` is listening, or `proc` exits, or `timeout` passes.
pub fn wait_listening(proc: &mut Proc, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if listening(port) {
            return Ok(());
        }
        if !proc.alive() {
            return Err(format!("{} exited: {}", proc.name, proc.tail()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} not listening on port {port} after {timeout:?}: {}",
                proc.name,
                proc.tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Absolute path of `name` on the PATH (also looks in the sbin dirs, where Debian puts
/// haproxy and nginx, in case PATH lacks them).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
