//! Data-plane behaviour through a real `lb run`: half-close, large payloads, slow
//! readers, idle timeout, no CLOSE-WAIT left behind.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use support::*;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn half_close_with_megabytes_then_reply_after_client_fin() {
    const LEN: usize = 3 * 1024 * 1024;
    // Backend: read everything until the client's FIN, then answer with the length and
    // the payload reversed, then close.
    let backend = TcpServer::start(|mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        if got.is_empty() {
            return; // a health check
        }
        let mut reply = format!("{}\n", got.len()).into_bytes();
        reply.extend(got.iter().rev());
        s.write_all(&reply).unwrap();
    });
    let (listen, _dir, cfg) = tcp_service(backend.addr, "", "");
    let lb = start_lb(&cfg);

    let mut c = connect(listen);
    let payload = pattern(LEN);
    c.write_all(&payload).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    let header = format!("{LEN}\n");
    assert!(
        reply.starts_with(header.as_bytes()),
        "reply header {:?}",
        &reply[..20.min(reply.len())]
    );
    let body = &reply[header.len()..];
    assert_eq!(body.len(), LEN);
    assert!(body.iter().eq(payload.iter().rev()), "reply body differs");
    drop(c);
    lb.wait_for_line(
        &[
            "connection closed",
            "reason=\"client_closed\"",
            &format!("bytes_in={LEN}"),
        ],
        Duration::from_secs(5),
    );
    assert_eventually!(
        Duration::from_secs(5),
        close_wait_sockets(&[listen.port(), backend.addr.port()]) == 0,
        "no CLOSE-WAIT sockets"
    );
}

#[test]
fn large_reply_then_immediate_close_to_slow_reader_loses_nothing() {
    const LEN: usize = 8 * 1024 * 1024;
    let backend = TcpServer::start(|mut s| {
        let mut req = [0u8; 4];
        if s.read_exact(&mut req).is_err() {
            return; // a health check
        }
        s.write_all(&pattern(LEN)).unwrap();
        // close() at once: everything not yet taken by lb sits in the kernel buffers.
    });
    let (listen, _dir, cfg) = tcp_service(backend.addr, "", "");
    let _lb = start_lb(&cfg);

    let mut c = connect(listen);
    c.write_all(b"GET!").unwrap();
    let mut got = Vec::with_capacity(LEN);
    let mut buf = [0u8; 64 * 1024];
    let start = Instant::now();
    loop {
        let n = c.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        // Slow reader for the first half second: lb must hold the rest, not drop it.
        if start.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(got.len(), LEN, "bytes received");
    assert!(got == pattern(LEN), "content differs");
}

#[test]
fn idle_timeout_frees_both_sides() {
    let setup = echo_behind_lb("idle_timeout = \"700ms\"");
    let (lb, listen, backend) = (&setup.lb, setup.listen, &setup.backend);

    let mut c = connect(listen);
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    let waited = t.elapsed();
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(3),
        "closed after {waited:?}, expected about 700ms"
    );
    lb.wait_for_line(&["reason=\"idle_timeout\""], Duration::from_secs(2));
    drop(c);
    assert_eventually!(
        Duration::from_secs(5),
        close_wait_sockets(&[listen.port(), backend.addr.port()]) == 0,
        "no CLOSE-WAIT sockets"
    );
}

#[test]
fn backend_reset_resets_client_promptly() {
    // Backend answers one message then aborts with RST (SO_LINGER 0), like a crash.
    let backend = TcpServer::start(|mut s| {
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).is_err() {
            return; // a health check
        }
        s.write_all(b"bye").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let (listen, _dir, cfg) = tcp_service(backend.addr, "", "");
    let lb = start_lb(&cfg);
    let mut c = connect(listen);
    c.write_all(b"hello").unwrap();
    let mut got = [0u8; 3];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"bye");
    let t = Instant::now();
    let r = c.read(&mut [0u8; 16]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "client not closed promptly"
    );
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client should see the reset, got {r:?}"
    );
    lb.wait_for_line(&["reason=\"backend_reset\""], Duration::from_secs(2));
}

/// The kernel's timer column in /proc/net/tcp for established sockets whose local port
/// is `local` or whose remote port is `remote`: 2 means a keepalive timer is armed.
fn keepalive_armed(local: u16, remote: u16) -> (bool, bool) {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |c: &str| u16::from_str_radix(c.rsplit(':').next().unwrap(), 16).unwrap();
    let (mut client_leg, mut backend_leg) = (false, false);
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols[3] != "01" {
            continue;
        }
        let timer_on = cols[5].starts_with("02:");
        if port(cols[1]) == local && timer_on {
            client_leg = true;
        }
        if port(cols[2]) == remote && timer_on {
            backend_leg = true;
        }
    }
    (client_leg, backend_leg)
}

#[test]
fn both_legs_have_keepalive_so_a_vanished_peer_is_found() {
    let setup = echo_behind_lb("");
    let (listen, backend) = (setup.listen, &setup.backend);
    let mut c = connect(listen);
    c.write_all(b"ping").unwrap();
    c.read_exact(&mut [0u8; 4]).unwrap();
    // lb's accepted socket (local port = listen) and its backend socket (remote port =
    // backend) both run a keepalive timer; the test's own sockets do not.
    assert_eq!(
        keepalive_armed(listen.port(), backend.addr.port()),
        (true, true)
    );
}
