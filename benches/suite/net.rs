//! Client-side load: connection churn, ping-pong, idle connections, bulk streams.
//!
//! Churned and held connections are spread over source addresses 127.0.0.N (bound with
//! `IP_BIND_ADDRESS_NO_PORT`, so the port is chosen at connect time per destination and
//! TIME_WAIT ports of loopback connections are reused), since one source address runs
//! out of ephemeral ports under churn.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Source address number `i` of a pool starting at 127.0.0.`first` with `n` addresses.
pub fn src(first: u8, n: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, first + (i % n as usize) as u8)
}

pub async fn connect_from(
    src: Ipv4Addr,
    dst: SocketAddr,
    limit: Duration,
) -> io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a valid int option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    s.bind(SocketAddr::new(src.into(), 0))?;
    let st = timeout(limit, s.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    st.set_nodelay(true)?;
    Ok(st)
}

/// `clients` loops of connect, 64 B request, 64 B echo, close, for `dur`.
/// Returns (completed, failed, elapsed seconds).
pub async fn conn_rate(dst: SocketAddr, clients: usize, dur: Duration) -> (u64, u64, f64) {
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let from = src(10, 64, c);
        set.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let msg = [b'r'; 64];
            let mut back = [0u8; 64];
            while Instant::now() < deadline {
                let one = async {
                    let mut s = connect_from(from, dst, Duration::from_secs(3)).await?;
                    s.write_all(&msg).await?;
                    s.read_exact(&mut back).await?;
                    Ok::<_, io::Error>(())
                };
                match timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(())) => ok += 1,
                    _ => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = set.join_next().await {
        if let Ok((o, f)) = r {
            ok += o;
            failed += f;
        }
    }
    (ok, failed, start.elapsed().as_secs_f64())
}

/// `conns` persistent connections, each sending 64 B every `every` (phases spread over
/// the interval) and timing the echo, for `dur`. Returns sorted round-trip times in µs
/// and the number of connections that failed.
pub async fn pingpong(
    dst: SocketAddr,
    conns: usize,
    every: Duration,
    dur: Duration,
) -> (Vec<f64>, usize) {
    let mut streams = vec![];
    let mut failed = 0;
    for c in 0..conns {
        match connect_from(src(80, 20, c), dst, Duration::from_secs(3)).await {
            Ok(s) => streams.push(s),
            Err(_) => failed += 1,
        }
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let deadline = start + dur;
    let n = streams.len().max(1);
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let phase = every.mul_f64(i as f64 / n as f64);
        set.spawn(async move {
            let mut rtts =
                Vec::with_capacity((dur.as_millis() / every.as_millis().max(1)) as usize + 1);
            let msg = [b'p'; 64];
            let mut back = [0u8; 64];
            let mut tick = tokio::time::interval_at(start + phase, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                let r = timeout(Duration::from_secs(2), async {
                    s.write_all(&msg).await?;
                    s.read_exact(&mut back).await?;
                    Ok::<_, io::Error>(())
                })
                .await;
                match r {
                    Ok(Ok(())) => rtts.push(t.elapsed().as_secs_f64() * 1e6),
                    _ => return (rtts, true),
                }
            }
            (rtts, false)
        });
    }
    let mut all = vec![];
    while let Some(r) = set.join_next().await {
        match r {
            Ok((v, broke)) => {
                all.extend(v);
                failed += broke as usize;
            }
            Err(_) => failed += 1,
        }
    }
    all.sort_by(f64::total_cmp);
    (all, failed)
}

/// Opens `count` connections (numbered from `first`, for the source address), each
/// sending 64 B and reading the 64 B answer, and returns them open, plus the failures.
pub async fn open_idle(dst: SocketAddr, first: usize, count: usize) -> (Vec<TcpStream>, usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for i in first..first + count {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let one = async {
                let mut s = connect_from(src(100, 100, i), dst, Duration::from_secs(5)).await?;
                s.write_all(&[b'h'; 64]).await?;
                let mut back = [0u8; 64];
                s.read_exact(&mut back).await?;
                Ok::<_, io::Error>(s)
            };
            timeout(Duration::from_secs(10), one).await.ok()?.ok()
        });
    }
    let (mut open, mut failed) = (vec![], 0);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Some(s)) => open.push(s),
            _ => failed += 1,
        }
    }
    (open, failed)
}

/// Closes with a reset (SO_LINGER 0): no TIME_WAIT left behind by thousands of sockets.
pub fn abort_all(v: Vec<TcpStream>) {
    for s in v {
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    }
}

/// Bulk without iperf3: `streams` connections writing 128 KiB chunks to a sink for `dur`.
/// Returns (bytes, seconds).
pub fn bulk_own(dst: SocketAddr, streams: usize, dur: Duration) -> Result<(u64, f64), String> {
    use std::io::Write;
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> Result<u64, String> {
                let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3))
                    .map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(Duration::from_secs(5))).ok();
                let chunk = vec![0x5au8; 128 * 1024];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&chunk).map_err(|e| e.to_string())?;
                    sent += chunk.len() as u64;
                }
                Ok(sent)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| "bulk thread panicked".to_string())??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

/// `GET path` over HTTP/1.1 with `Connection: close`; returns the body (bounded by `limit`).
pub fn http_get(addr: SocketAddr, path: &str, limit: Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).ok();
    s.set_write_timeout(Some(limit)).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}
