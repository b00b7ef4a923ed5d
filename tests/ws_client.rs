//! `lb client` against real `lb backend` processes: a clean run, a backend killed
//! and replaced on the same port, a backend frozen with SIGSTOP (sockets open,
//! nothing answered) that only the heartbeat can detect, and refused tokens.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::Proc;

const WAIT: Duration = Duration::from_secs(10);

/// Number of users the backend at `addr` lists in `/users`.
fn users_on(addr: SocketAddr) -> usize {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET /users HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    if s.read_to_string(&mut out).is_err() {
        return 0;
    }
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(body).map_or(0, |m| m.len())
}

/// Starts `lb backend` on an explicit address.
fn backend_at(id: &str, addr: SocketAddr) -> Proc {
    let listen = addr.to_string();
    let p = Proc::spawn(id, &["backend", "--listen", &listen, "--id", id], &[]);
    p.wait_for_line(&["listening on"], WAIT);
    p
}

/// Starts `lb client --json` against `addr` with `extra` arguments.
fn client(addr: SocketAddr, users: usize, extra: &[&str]) -> Proc {
    let url = format!("ws://{addr}/ws");
    let users = users.to_string();
    let mut args = vec!["client", "--url", &url, "--users", &users, "--json"];
    args.extend_from_slice(extra);
    Proc::spawn("client", &args, &[])
}

/// Waits for the client to exit 0 and returns its JSON summary.
fn summary(p: Proc) -> serde_json::Value {
    summary_with_exit(p, 0)
}

/// Waits for the client to exit with `expected` and returns its JSON summary.
fn summary_with_exit(mut p: Proc, expected: i32) -> serde_json::Value {
    let code = p.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(expected), "output:\n{}", p.output().join("\n"));
    let line = p
        .output()
        .into_iter()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in:\n{}", p.output().join("\n")));
    serde_json::from_str(&line).unwrap()
}

#[test]
fn five_users_on_one_backend() {
    let (_b, addr) = support::spawn_backend("s1");
    let c = client(addr, 5, &["--duration", "3s"]);
    c.wait_for_line(&["all 5 users online"], WAIT);
    assert_eq!(users_on(addr), 5);
    let s = summary(c);
    assert_eq!(s["users"], 5);
    assert_eq!(s["online"], 5);
    assert_eq!(s["per_server"], serde_json::json!({"s1": 5}));
    assert_eq!(s["users_never_back"], 0);
    assert_eq!(s["reconnects"], 0);
    // Stopping closes politely: the backend sees close frames, not resets.
    support::wait_until(WAIT, "backend logged 5 client closes", || {
        _b.count_lines(&["ws session ended", "client closed"]) == 5
    });
}

#[test]
fn users_reconnect_when_backend_is_killed_and_replaced_on_same_port() {
    let addr = support::free_addr();
    let first = backend_at("s1", addr);
    let c = client(
        addr,
        5,
        &[
            "--duration",
            "5s",
            "--backoff-base",
            "50ms",
            "--backoff-cap",
            "400ms",
        ],
    );
    c.wait_for_line(&["all 5 users online"], WAIT);
    first.signal(libc::SIGKILL);
    drop(first);
    let _second = backend_at("s2", addr);
    support::wait_until(WAIT, "5 users back on s2", || {
        c.count_lines(&["back online on s2 after"]) == 5
    });
    assert_eq!(users_on(addr), 5);
    let s = summary(c);
    assert!(s["reconnects"].as_u64().unwrap() >= 5, "{s}");
    assert_eq!(s["users_never_back"], 0, "{s}");
    assert_eq!(s["per_server"], serde_json::json!({"s2": 5}));
    assert_eq!(s["reconnect_ms"]["count"], s["reconnects"]);
}

#[test]
fn frozen_backend_is_detected_by_heartbeat_within_a_second() {
    let (b, addr) = support::spawn_backend("s1");
    let c = client(
        addr,
        3,
        &[
            "--duration",
            "6s",
            "--heartbeat",
            "200ms",
            "--pong-timeout",
            "600ms",
            "--connect-timeout",
            "500ms",
            "--backoff-cap",
            "300ms",
        ],
    );
    c.wait_for_line(&["all 3 users online"], WAIT);
    // Frozen, not dead: the kernel keeps the sockets open and ACKs data, so only a
    // missing pong can tell.
    b.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    support::wait_until(Duration::from_secs(3), "3 users offline", || {
        c.count_lines(&["offline (was on s1)", "no pong within 600ms"]) == 3
    });
    let detected = frozen.elapsed();
    assert!(
        detected < Duration::from_millis(1500),
        "heartbeat took {detected:?} to notice a frozen server"
    );
    // Attempts against the frozen server time out and count as failures...
    std::thread::sleep(Duration::from_millis(800));
    b.signal(libc::SIGCONT);
    // ...and once it thaws everybody comes back.
    support::wait_until(WAIT, "3 users back on s1", || {
        c.count_lines(&["back online on s1 after"]) == 3
    });
    let s = summary(c);
    assert_eq!(s["users_never_back"], 0, "{s}");
    assert!(s["reconnects"].as_u64().unwrap() >= 3, "{s}");
    assert!(s["failed_attempts"].as_u64().unwrap() >= 3, "{s}");
}

#[test]
fn refused_tokens_leave_users_never_connected() {
    let (_b, addr) = support::spawn_backend("s1");
    let c = client(
        addr,
        2,
        &[
            "--duration",
            "1s",
            "--secret",
            "wrong",
            "--backoff-cap",
            "200ms",
        ],
    );
    // Users offline at the end make the run a failure, after the summary is printed.
    let s = summary_with_exit(c, 1);
    assert_eq!(s["online"], 0, "{s}");
    assert_eq!(s["never_connected"], 2, "{s}");
    assert_eq!(s["users_never_back"], 2, "{s}");
    assert!(s["failed_attempts"].as_u64().unwrap() >= 2, "{s}");
}

#[test]
fn users_lost_and_not_back_make_the_exit_status_1() {
    let (b, addr) = support::spawn_backend("s1");
    let c = client(
        addr,
        3,
        &[
            "--duration",
            "3s",
            "--heartbeat",
            "200ms",
            "--pong-timeout",
            "600ms",
            "--backoff-cap",
            "200ms",
        ],
    );
    c.wait_for_line(&["all 3 users online"], WAIT);
    b.signal(libc::SIGKILL);
    support::wait_until(WAIT, "3 users offline", || {
        c.count_lines(&["offline (was on s1)"]) == 3
    });
    let s = summary_with_exit(c, 1);
    assert_eq!(s["online"], 0, "{s}");
    assert_eq!(s["users_never_back"], 3, "{s}");
    assert_eq!(s["never_connected"], 0, "{s}");
    assert_eq!(s["disconnects"], 3, "{s}");
}

#[test]
fn readable_summary_then_exit_1_when_users_never_connected() {
    let (_b, addr) = support::spawn_backend("s1");
    let url = format!("ws://{addr}/ws");
    let mut p = Proc::spawn(
        "client",
        &[
            "client",
            "--url",
            &url,
            "--users",
            "2",
            "--duration",
            "1s",
            "--secret",
            "wrong",
        ],
        &[],
    );
    assert_eq!(
        p.wait_exit(WAIT),
        Some(1),
        "output:\n{}",
        p.output().join("\n")
    );
    p.wait_for_line(&["never back", "2 (never connected 2)"], WAIT);
    p.wait_for_line(&["lb:", "2 of 2 users offline"], WAIT);
}

#[test]
fn help_documents_the_exit_status() {
    let mut p = Proc::spawn("client-help", &["client", "--help"], &[]);
    assert_eq!(p.wait_exit(WAIT), Some(0));
    p.wait_for_line(&["Exit status"], WAIT);
    p.wait_for_line(&["1 if any user is offline"], WAIT);
}

#[test]
fn readable_summary_without_json() {
    let (_b, addr) = support::spawn_backend("s1");
    let url = format!("ws://{addr}/ws");
    let mut p = Proc::spawn(
        "client",
        &["client", "--url", &url, "--users", "2", "--duration", "1s"],
        &[],
    );
    assert_eq!(p.wait_exit(WAIT), Some(0));
    p.wait_for_line(&["per server"], WAIT);
    p.wait_for_line(&["s1", "2"], WAIT);
    p.wait_for_line(&["never back", "0"], WAIT);
}

#[test]
fn sigterm_stops_the_client_with_a_summary() {
    let (_b, addr) = support::spawn_backend("s1");
    let c = client(addr, 2, &[]);
    c.wait_for_line(&["all 2 users online"], WAIT);
    c.signal(libc::SIGTERM);
    let s = summary(c);
    assert_eq!(s["per_server"], serde_json::json!({"s1": 2}));
}
