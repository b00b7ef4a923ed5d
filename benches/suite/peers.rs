//! The proxies compared: lb, HAProxy (with splice) and nginx (stream module), each
//! started with a config written to a temp dir, in front of one backend, with the same
//! number of workers (2, the cores of the reference machine) and no per-connection
//! logging.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{self, Proc, TempDir};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Lb,
    Haproxy,
    Nginx,
}

impl Peer {
    pub const ALL: [Peer; 3] = [Peer::Lb, Peer::Haproxy, Peer::Nginx];
    pub fn name(self) -> &'static str {
        match self {
            Peer::Lb => "lb",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
        }
    }
}

/// What is installed, found once at start.
pub struct Env {
    /// A copy of the `lb` that cargo built, taken at start: a rebuild of target/release/lb
    /// during the run (others work in the same tree) cannot mix two versions in one table.
    pub lb: PathBuf,
    /// git revision of the tree the copy was taken from.
    pub lb_rev: Option<String>,
    _bin_dir: TempDir,
    pub haproxy: Result<PathBuf, String>,
    /// The nginx binary and the stream module to load (None: assume it is built in).
    pub nginx: Result<(PathBuf, Option<PathBuf>), String>,
    pub iperf3: Option<PathBuf>,
    /// Peers the user asked for (`--peers`).
    pub wanted: Vec<Peer>,
    pub workers: usize,
}

pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

impl Env {
    pub fn detect(wanted: Vec<Peer>) -> Env {
        let haproxy = procs::which("haproxy")
            .ok_or_else(|| "not installed (`command -v haproxy` finds nothing)".to_string());
        let nginx = match procs::which("nginx") {
            None => Err("not installed (`command -v nginx` finds nothing)".to_string()),
            Some(bin) => {
                let module = Path::new(NGINX_STREAM_MODULE);
                if module.is_file() {
                    Ok((bin, Some(module.to_path_buf())))
                } else if version_of(&bin, &["-V"]).contains("--with-stream ")
                    || version_of(&bin, &["-V"]).contains("--with-stream\n")
                {
                    Ok((bin, None))
                } else {
                    Err(format!(
                        "stream module missing ({NGINX_STREAM_MODULE}; apt-get install libnginx-mod-stream)"
                    ))
                }
            }
        };
        let bin_dir = TempDir::new("bin");
        let built = PathBuf::from(env!("CARGO_BIN_EXE_lb"));
        let lb_rev = git_rev();
        let copy = bin_dir.path().join("lb");
        let lb = match std::fs::copy(&built, &copy) {
            Ok(_) => copy,
            Err(e) => {
                eprintln!(
                    "suite: cannot copy {}: {e}; using it in place",
                    built.display()
                );
                built
            }
        };
        Env {
            lb,
            lb_rev,
            _bin_dir: bin_dir,
            haproxy,
            nginx,
            // LB_SUITE_NO_IPERF3=1: use the suite's own generator even where iperf3 is installed.
            iperf3: procs::which("iperf3")
                .filter(|_| std::env::var_os("LB_SUITE_NO_IPERF3").is_none()),
            wanted,
            workers: 2,
        }
    }

    /// Why `peer` is skipped, or None if it runs.
    pub fn missing(&self, peer: Peer) -> Option<String> {
        if !self.wanted.contains(&peer) {
            return Some("not selected (--peers)".into());
        }
        match peer {
            Peer::Lb => None,
            Peer::Haproxy => self.haproxy.as_ref().err().cloned(),
            Peer::Nginx => self.nginx.as_ref().err().cloned(),
        }
    }

    pub fn present(&self) -> Vec<Peer> {
        Peer::ALL
            .into_iter()
            .filter(|p| self.missing(*p).is_none())
            .collect()
    }

    /// One line per peer: its version, or why it is missing.
    pub fn versions(&self) -> Vec<(String, String)> {
        let mut v = vec![];
        let git = self.lb_rev.clone();
        v.push((
            "lb".to_string(),
            format!(
                "{}{}",
                version_of(&self.lb, &["--version"]).trim(),
                git.map(|g| format!(" (git {g})")).unwrap_or_default()
            ),
        ));
        v.push((
            "haproxy".into(),
            match &self.haproxy {
                Ok(b) => first_line(&version_of(b, &["-v"])),
                Err(e) => format!("skipped: {e}"),
            },
        ));
        v.push((
            "nginx".into(),
            match &self.nginx {
                Ok((b, m)) => format!(
                    "{}{}",
                    first_line(&version_of(b, &["-v"])),
                    m.as_ref()
                        .map(|m| format!(" + {}", m.display()))
                        .unwrap_or_default()
                ),
                Err(e) => format!("skipped: {e}"),
            },
        ));
        v.push((
            "iperf3".into(),
            match &self.iperf3 {
                Some(b) => first_line(&version_of(b, &["--version"])),
                None => {
                    "not installed (or LB_SUITE_NO_IPERF3 set): bulk uses the suite's own generator"
                        .into()
                }
            },
        ));
        v.push((
            "rustc".into(),
            first_line(&version_of(Path::new("rustc"), &["--version"])),
        ));
        v
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// stdout + stderr of `bin args` (bounded: these commands print and exit).
pub fn version_of(bin: &Path, args: &[&str]) -> String {
    match Command::new(bin).args(args).output() {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("? ({e})"),
    }
}

fn git_rev() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let rev = Command::new("git")
        .args(["-C", dir, "rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    if !rev.status.success() {
        return None;
    }
    let mut r = String::from_utf8_lossy(&rev.stdout).trim().to_string();
    let dirty = Command::new("git")
        .args([
            "-C",
            dir,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "src",
            "Cargo.toml",
        ])
        .output()
        .ok()?;
    if !dirty.stdout.is_empty() {
        r.push_str(" + uncommitted changes in src/");
    }
    Some(r)
}

/// A running proxy in front of one backend.
pub struct Proxy {
    pub peer: Peer,
    pub addr: SocketAddr,
    pub proc: Proc,
    _dir: TempDir,
}

impl Proxy {
    /// CPU seconds of all its processes.
    pub fn cpu_secs(&self) -> f64 {
        procs::group_cpu_secs(self.proc.pid())
    }
    /// (PSS, RSS) in KiB summed over its processes.
    pub fn mem_kib(&self) -> (Option<u64>, u64) {
        procs::group_mem_kib(self.proc.pid())
    }
}

pub fn lb_config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "# No active check (as for the peers); connect failures still count (passive).\n\
         [[service]]\nname = \"bench\"\nlisten = \"{listen}\"\n\n\
         [service.health]\ncheck = \"none\"\n\n\
         [[service.backend]]\nname = \"b\"\naddr = \"{backend}\"\n"
    )
}

pub fn haproxy_config(listen: SocketAddr, backend: SocketAddr, threads: usize) -> String {
    format!(
        "global\n  nbthread {threads}\n  # 2 fds per connection + 2 per splice pipe must fit the 20,000-fd limit\n  maxconn 9400\n  maxpipes 500\n\n\
         defaults\n  mode tcp\n  maxconn 9400\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  option splice-auto\n\n\
         listen bench\n  bind {listen}\n  server b {backend}\n"
    )
}

pub fn nginx_config(
    dir: &Path,
    module: Option<&Path>,
    listen: SocketAddr,
    backend: SocketAddr,
    workers: usize,
) -> String {
    let load = module
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    format!(
        "{load}daemon off;\nmaster_process on;\nworker_processes {workers};\nworker_rlimit_nofile 20000;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\n\
         events {{\n  worker_connections 19500;\n}}\n\n\
         stream {{\n  server {{\n    listen {listen} reuseport backlog=4096;\n    proxy_pass {backend};\n    proxy_connect_timeout 5s;\n    proxy_timeout 1h;\n  }}\n}}\n",
        d = dir.display()
    )
}

/// Starts `peer` on a fresh port in front of `backend`; waits until it listens.
pub fn start(env: &Env, peer: Peer, backend: SocketAddr) -> Result<Proxy, String> {
    let dir = TempDir::new(peer.name());
    let listen = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    let mut cmd;
    match peer {
        Peer::Lb => {
            let cfg = dir.path().join("lb.toml");
            std::fs::write(&cfg, lb_config(listen, backend)).map_err(|e| e.to_string())?;
            cmd = Command::new(&env.lb);
            cmd.args(["run", "--no-watch", "-c"])
                .arg(&cfg)
                .env("LB_LOG", "warn");
        }
        Peer::Haproxy => {
            let bin = env.haproxy.as_ref().map_err(Clone::clone)?;
            let cfg = dir.path().join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(listen, backend, env.workers))
                .map_err(|e| e.to_string())?;
            cmd = Command::new(bin);
            cmd.arg("-db").arg("-f").arg(&cfg);
        }
        Peer::Nginx => {
            let (bin, module) = env.nginx.as_ref().map_err(Clone::clone)?;
            let cfg = dir.path().join("nginx.conf");
            std::fs::write(
                &cfg,
                nginx_config(dir.path(), module.as_deref(), listen, backend, env.workers),
            )
            .map_err(|e| e.to_string())?;
            // Under a guard: nginx's workers get no parent-death signal of their own.
            cmd = crate::roles::spawn_cmd("guard");
            cmd.arg(bin)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&cfg);
        }
    }
    let mut proc =
        Proc::spawn(peer.name(), cmd).map_err(|e| format!("spawn {}: {e}", peer.name()))?;
    procs::wait_listening(&mut proc, listen.port(), Duration::from_secs(10))?;
    if peer == Peer::Nginx {
        // The master binds before forking its workers; wait until they are there.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while procs::group_members(proc.pid()).len() < 2 + env.workers
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    if !proc.alive() {
        return Err(format!("{} exited: {}", peer.name(), proc.tail()));
    }
    Ok(Proxy {
        peer,
        addr: listen,
        proc,
        _dir: dir,
    })
}
