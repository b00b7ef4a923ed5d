//! Helper servers, run as child processes of the suite (the bench binary re-executed with
//! `LB_SUITE_ROLE`), so their CPU and descriptors are not the suite's:
//!
//! - `echo`: writes back what it reads; passes EOF on (connection rate, latency);
//! - `hold`: answers the first 64 bytes once, then holds the connection open, reading
//!   (idle memory); closes when the peer does;
//! - `sink`: reads and discards (bulk throughput without iperf3).
//!
//! Each binds 127.0.0.1:0, prints `listening on ADDR` and serves until killed.
//!
//! - `guard CMD ARGS...`: runs CMD in its own process group (the guard's) and kills the
//!   whole group when the suite dies, even by SIGKILL (parent-death signal), so that the
//!   workers a master forks (nginx) cannot outlive the suite.

use std::io::Write;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const ROLE_ENV: &str = "LB_SUITE_ROLE";

pub fn spawn_cmd(role: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("current_exe"));
    cmd.env(ROLE_ENV, role);
    cmd
}

/// Parses `listening on ADDR` from a role's (or `lb backend`'s) stdout line.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.rsplit("listening on ")
        .next()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn run(role: &str) {
    if role == "guard" {
        guard();
    }
    let rt = match role {
        "hold" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    }
    .expect("runtime");
    let role = role.to_string();
    rt.block_on(async move {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket");
        sock.set_reuse_address(true).unwrap();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        sock.bind(&addr.into()).expect("bind");
        sock.listen(4096).expect("listen");
        sock.set_nonblocking(true).unwrap();
        let std_l: std::net::TcpListener = sock.into();
        let local = std_l.local_addr().unwrap();
        let l = TcpListener::from_std(std_l).unwrap();
        println!("listening on {local}");
        let _ = std::io::stdout().flush();
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    match role.as_str() {
                        "echo" => tokio::spawn(echo(s)),
                        "hold" => tokio::spawn(hold(s)),
                        _ => tokio::spawn(sink(s)),
                    };
                }
                // EMFILE and the like: wait a moment, never spin.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    });
}

async fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = s.shutdown().await;
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn hold(mut s: TcpStream) {
    let mut first = [0u8; 64];
    if s.read_exact(&mut first).await.is_err() || s.write_all(&first).await.is_err() {
        return;
    }
    let mut buf = [0u8; 64];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

async fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

extern "C" fn kill_group(_: libc::c_int) {
    // SAFETY: async-signal-safe calls only: the whole group (this guard included) goes.
    unsafe {
        libc::kill(0, libc::SIGCONT);
        libc::kill(0, libc::SIGKILL);
        libc::_exit(1);
    }
}

fn guard() -> ! {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // SAFETY: installing a plain signal handler, then asking for SIGTERM on parent death.
    unsafe {
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(s, kill_group as *const () as libc::sighandler_t);
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() == 1 {
            kill_group(0);
        }
    }
    let Some((cmd, rest)) = args.split_first() else {
        std::process::exit(2);
    };
    let status = std::process::Command::new(cmd)
        .args(rest)
        .env_remove(ROLE_ENV)
        .status();
    std::process::exit(status.ok().and_then(|s| s.code()).unwrap_or(1));
}
