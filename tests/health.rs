//! Health checking through a real `lb run` in front of real `lb backend` processes:
//! SIGKILL and SIGSTOP are noticed, traffic moves, a recovered backend rejoins.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

fn lb_config(listen: SocketAddr, backends: &[(&str, SocketAddr)], extra: &str) -> String {
    one_service(
        listen,
        backends,
        &format!("balance = \"round-robin\"\n{extra}"),
        "check = \"http\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2",
    )
}

#[test]
fn sigkill_failover_no_new_connection_to_dead_backend() {
    let (mut b1, a1) = spawn_backend("s1");
    let (_b2, a2) = spawn_backend("s2");
    let (_b3, a3) = spawn_backend("s3");
    let listen = free_addr();
    let (_dir, cfg) = write_config(&lb_config(
        listen,
        &[("s1", a1), ("s2", a2), ("s3", a3)],
        "",
    ));
    let lb = start_lb(&cfg);
    // All three take traffic.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..9 {
        seen.insert(which_server(listen).expect("connect through lb"));
    }
    assert_eq!(
        seen.len(),
        3,
        "round-robin should reach every backend: {seen:?}"
    );

    b1.signal(libc::SIGKILL);
    // Reaped: its kernel has closed the listener (a connect racing the kill itself could
    // still be accepted by the dying process and then reset; no L4 proxy can hide that).
    b1.wait_exit(Duration::from_secs(5));
    // Immediately, before any check ran: every new connection still lands, and never on s1
    // (the refused connect is retried on another backend).
    for i in 0..30 {
        let s =
            which_server(listen).unwrap_or_else(|| panic!("connection {i} failed after SIGKILL"));
        assert_ne!(s, "s1", "connection {i} went to the dead backend");
    }
    lb.wait_for_line(&["backend s1 is down"], Duration::from_secs(3));
}

#[test]
fn sigstop_detected_by_http_check_and_rejoins_after_sigcont() {
    let (b1, a1) = spawn_backend("s1");
    let (_b2, a2) = spawn_backend("s2");
    let listen = free_addr();
    let (_dir, cfg) = write_config(&lb_config(listen, &[("s1", a1), ("s2", a2)], ""));
    let lb = start_lb(&cfg);
    // Hold a connection on each backend.
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = TcpStream::connect(listen).unwrap();
        held.push(s);
    }
    b1.signal(libc::SIGSTOP);
    let t = Instant::now();
    lb.wait_for_line(&["backend s1 is down"], Duration::from_secs(5));
    let took = t.elapsed();
    // fall x interval + timeout = 2 x 300ms + 200ms, plus jitter and scheduling slack.
    assert!(
        took < Duration::from_millis(1800),
        "hang detected after {took:?}"
    );
    let line = lb.wait_for_line(&["backend s1 is down"], Duration::from_secs(1));
    assert!(
        line.contains("timed out"),
        "reason should say the check timed out: {line}"
    );
    // New connections avoid the frozen backend.
    for i in 0..10 {
        assert_eq!(
            which_server(listen).as_deref(),
            Some("s2"),
            "connection {i}"
        );
    }
    b1.signal(libc::SIGCONT);
    lb.wait_for_line(&["backend s1 is up"], Duration::from_secs(5));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(which_server(listen).expect("connect"));
    }
    assert!(seen.contains("s1"), "s1 takes traffic again: {seen:?}");
}

#[test]
fn backend_marked_down_closes_its_client_connections() {
    let (b1, a1) = spawn_backend("s1");
    let listen = free_addr();
    let (_dir, cfg) = write_config(&lb_config(listen, &[("s1", a1)], ""));
    let lb = start_lb(&cfg);
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Make sure the splice is established before the fault.
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    b1.signal(libc::SIGSTOP);
    let t = Instant::now();
    // The frozen backend never answers; lb closes the client once it marks s1 down.
    let r = c.read(&mut buf);
    let took = t.elapsed();
    assert!(
        matches!(r, Ok(0)),
        "client should get a clean close, got {r:?}"
    );
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    lb.wait_for_line(&["reason=\"backend_down\""], Duration::from_secs(2));
    b1.signal(libc::SIGCONT);
}

#[test]
fn keep_leaves_connections_open_when_backend_goes_down() {
    let (b1, a1) = spawn_backend("s1");
    let listen = free_addr();
    let (_dir, cfg) = write_config(&lb_config(
        listen,
        &[("s1", a1)],
        "on_backend_down = \"keep\"",
    ));
    let lb = start_lb(&cfg);
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    b1.signal(libc::SIGSTOP);
    lb.wait_for_line(&["backend s1 is down"], Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let r = c.read(&mut [0u8; 16]);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "connection should still be open, got {r:?}"
    );
    b1.signal(libc::SIGCONT);
}

#[test]
fn refused_backend_is_retried_without_client_visible_failure() {
    // Three echo backends; the checks are slow (1 h), so only retries and the passive
    // check can route around the one that stops listening.
    let good1 = TcpServer::echo();
    let good2 = TcpServer::echo();
    let bad = TcpServer::echo();
    let bad_addr = bad.addr;
    let listen = free_addr();
    let cfg_text = one_service(
        listen,
        &[
            ("bad", bad_addr),
            ("good1", good1.addr),
            ("good2", good2.addr),
        ],
        "balance = \"round-robin\"\nretries = 2",
        "check = \"tcp\"\ninterval = \"1h\"\nfall = 3",
    );
    let (_dir, cfg) = write_config(&cfg_text);
    let lb = start_lb(&cfg);
    drop(bad); // now connects to it are refused
    for i in 0..30 {
        let mut c = TcpStream::connect(listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(&got, b"hello");
    }
    // fall = 3 refused connects in a row mark it down without waiting for the 1 h check.
    let line = lb.wait_for_line(&["backend bad is down"], Duration::from_secs(2));
    assert!(line.contains("passive"), "{line}");
}

#[test]
fn all_backends_down_closes_client_at_once() {
    let dead1 = free_addr();
    let dead2 = free_addr();
    let listen = free_addr();
    let (_dir, cfg) = write_config(&one_service(
        listen,
        &[("d1", dead1), ("d2", dead2)],
        "",
        "check = \"tcp\"",
    ));
    let lb = start_lb(&cfg);
    lb.wait_for_line(&["ready", "0/2 backends up"], Duration::from_secs(1));
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let r = c.read(&mut [0u8; 16]);
    assert!(matches!(r, Ok(0)), "expected a close, got {r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "took {:?}",
        t.elapsed()
    );
    lb.wait_for_line(&["no healthy backend"], Duration::from_secs(1));
}

#[test]
fn check_against_syn_dropping_host_fails_within_timeout() {
    // A listener whose backlog is full and never accepted drops further SYNs: the kernel
    // of a host that vanished behaves the same. 127.0.0.1 with backlog 0 is our stand-in.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let black_hole = sock.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue so later SYNs are dropped.
    let _fill: Vec<_> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&black_hole, Duration::from_millis(200)).ok())
        .collect();
    let (_b, good) = spawn_backend("s2");
    let listen = free_addr();
    let (_dir, cfg) = write_config(&one_service(
        listen,
        &[("hole", black_hole), ("s2", good)],
        "",
        "check = \"http\"\ninterval = \"300ms\"\ntimeout = \"250ms\"",
    ));
    let t = Instant::now();
    let lb = start_lb(&cfg);
    // The first round completes within about one timeout even though one host never answers.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "startup took {:?}",
        t.elapsed()
    );
    let line = lb.wait_for_line(&["backend hole is down"], Duration::from_secs(2));
    assert!(line.contains("timed out after 250ms"), "{line}");
    assert_eq!(
        lb.count_lines(&["backend s2 is down"]),
        0,
        "the good backend stayed up"
    );
}
