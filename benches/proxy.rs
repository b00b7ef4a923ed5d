//! Side-by-side figures: direct vs through lb (vs HAProxy when installed), all on
//! loopback, same run. Prints medians of several runs and ratios; asserts nothing
//! about timings (these machines are shared and noisy).
//!
//! `cargo bench --bench proxy` (add `-- --quick` for a short smoke run).
//! Scenarios: bulk throughput (one stream), connection rate (connect, 64 B echo, close),
//! ping-pong latency of 64 B on one persistent connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Echo server for the connection-rate and latency runs; a sink for bulk runs
/// (the client says which with its first byte: b'E' echo, b'S' sink).
fn start_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).is_err() {
        return;
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {
                if mode[0] == b'S' {
                    let _ = s.write_all(b"done");
                }
                return;
            }
            Ok(n) if mode[0] == b'E' => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_lb(dir: &std::path::Path, backend: SocketAddr) -> (Killed, SocketAddr) {
    let listen = free_addr();
    let cfg = dir.join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[service]]\nname = \"bench\"\nlisten = \"{listen}\"\n[service.health]\ncheck = \"tcp\"\ninterval = \"1h\"\n[[service.backend]]\naddr = \"{backend}\"\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["run", "-c", cfg.to_str().unwrap()])
        .env("LB_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(listen);
    (Killed(child), listen)
}

fn start_haproxy(dir: &std::path::Path, backend: SocketAddr) -> Option<(Killed, SocketAddr)> {
    let bin = which("haproxy")?;
    let listen = free_addr();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 20000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 1h\n  timeout server 1h\n  option splice-auto\nlisten bench\n  bind {listen}\n  server b {backend}\n"
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["-f", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_port(listen);
    Some((Killed(child), listen))
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// MB/s pushing `total` bytes one way and waiting for the sink's acknowledgement.
fn bulk(addr: SocketAddr, total: usize) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"S").unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    sent as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// Connections per second: connect, 64 B echo, close; `threads` clients in parallel.
fn conn_rate(addr: SocketAddr, per_thread: usize, threads: usize) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let msg = [b'E'; 65];
                let mut back = [0u8; 64];
                for _ in 0..per_thread {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_nodelay(true).unwrap();
                    s.write_all(&msg).unwrap();
                    s.read_exact(&mut back).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    (per_thread * threads) as f64 / start.elapsed().as_secs_f64()
}

/// Round-trip times of 64 B ping-pong on one connection, in microseconds (sorted).
fn pingpong(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"E").unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    rtts
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 5 };
    let bulk_bytes = if quick { 64 << 20 } else { 1 << 30 };
    let (conns, threads) = if quick { (100, 4) } else { (1000, 8) };
    let pings = if quick { 1000 } else { 20000 };

    let dir = std::env::temp_dir().join(format!("lb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = start_server();
    let (_lb, lb_addr) = start_lb(&dir, server);
    let haproxy = start_haproxy(&dir, server);
    let mut targets = vec![("direct", server), ("lb", lb_addr)];
    match &haproxy {
        Some((_, a)) => targets.push(("haproxy", *a)),
        None => println!("(haproxy not installed: its column is skipped)"),
    }

    println!("{runs} run(s) each; median [min..max]; ratio = lb / other\n");
    println!(
        "{:<10} {:>28} {:>28} {:>22} {:>10}",
        "target", "bulk MB/s", "conn/s (64B echo)", "rtt p50/p99 us", ""
    );
    let mut rows = Vec::new();
    for (name, addr) in &targets {
        let b = median((0..runs).map(|_| bulk(*addr, bulk_bytes)).collect());
        let c = median(
            (0..runs)
                .map(|_| conn_rate(*addr, conns, threads))
                .collect(),
        );
        let r = pingpong(*addr, pings);
        let (p50, p99) = (pct(&r, 50.0), pct(&r, 99.0));
        println!(
            "{name:<10} {:>10.0} [{:>6.0}..{:>6.0}] {:>10.0} [{:>6.0}..{:>6.0}] {:>10.1} / {:>8.1}",
            b.0, b.1, b.2, c.0, c.1, c.2, p50, p99
        );
        rows.push((name.to_string(), b.0, c.0, p50, p99));
    }
    let lb = rows.iter().find(|r| r.0 == "lb").cloned().unwrap();
    println!();
    for other in rows.iter().filter(|r| r.0 != "lb") {
        println!(
            "lb vs {:<8} bulk {:.2}x   conn/s {:.2}x   added p50 {:+.1} us   added p99 {:+.1} us",
            other.0,
            lb.1 / other.1,
            lb.2 / other.2,
            lb.3 - other.3,
            lb.4 - other.4
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
