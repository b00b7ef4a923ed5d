//! Process-level behaviour of `lb run`: SIGTERM drains, a full fd table slows accepting
//! without crashing or spinning, IPv6 listeners.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use support::*;

fn echo_roundtrip(c: &mut TcpStream, msg: &[u8]) {
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

#[test]
fn sigterm_stops_accepting_and_drains_open_connections() {
    let backend = TcpServer::echo();
    let listen = free_addr();
    let (_dir, cfg) = write_config(&one_service(
        listen,
        &[("b", backend.addr)],
        "drain_timeout = \"10s\"",
        "check = \"tcp\"",
    ));
    let mut lb = start_lb(&cfg);
    let mut open = TcpStream::connect(listen).unwrap();
    echo_roundtrip(&mut open, b"before");

    lb.signal(libc::SIGTERM);
    lb.wait_for_line(&["draining"], Duration::from_secs(3));
    // New connections are refused; the open one keeps working.
    assert!(
        TcpStream::connect(listen).is_err(),
        "listener should be closed while draining"
    );
    echo_roundtrip(&mut open, b"during drain");
    // Once it closes, lb exits 0 without waiting for the rest of drain_timeout.
    let t = Instant::now();
    drop(open);
    assert_eq!(lb.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        t.elapsed()
    );
}

#[test]
fn drain_timeout_closes_what_is_left_and_exits_zero() {
    let backend = TcpServer::echo();
    let listen = free_addr();
    let (_dir, cfg) = write_config(&one_service(
        listen,
        &[("b", backend.addr)],
        "drain_timeout = \"1s\"",
        "check = \"tcp\"",
    ));
    let mut lb = start_lb(&cfg);
    let mut open = TcpStream::connect(listen).unwrap();
    echo_roundtrip(&mut open, b"hi");
    let t = Instant::now();
    lb.signal(libc::SIGTERM);
    let mut buf = [0u8; 8];
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        matches!(open.read(&mut buf), Ok(0)),
        "connection closed by the drain timeout"
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert_eq!(lb.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(lb.count_lines(&["reason=\"shutdown\""]) == 1);
}

#[test]
fn full_fd_table_slows_accepting_never_crashes_or_spins() {
    let backend = TcpServer::echo();
    let listen = free_addr();
    let (_dir, cfg) = write_config(&one_service(
        listen,
        &[("b", backend.addr)],
        "",
        "check = \"tcp\"\ninterval = \"1h\"",
    ));
    // A tiny hard limit: lb cannot raise it, and runs out of descriptors at ~20 clients.
    let mut cmd = std::process::Command::new(lb_bin());
    cmd.args(["run", "-c", cfg.to_str().unwrap()]);
    // SAFETY: setrlimit is async-signal-safe; the child runs nothing else before exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut lb = Proc::spawn_cmd("lb", cmd);
    lb.wait_for_line(&["ready"], Duration::from_secs(10));

    // Far more clients than descriptors: the kernel queues them in the backlog.
    let mut clients: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(listen).unwrap())
        .collect();
    lb.wait_for_line(&["accept", "backing off"], Duration::from_secs(5));
    let cpu_before = cpu_ticks(lb.pid());
    std::thread::sleep(Duration::from_secs(1));
    let cpu = cpu_ticks(lb.pid()) - cpu_before;
    // clock ticks are 1/100 s: a spinning accept loop would burn ~100 in that second.
    assert!(
        cpu < 30,
        "lb used {cpu} ticks of CPU in 1 s while out of descriptors"
    );
    assert!(lb.child_alive(), "lb must not crash");

    // Free descriptors: the queued clients are served, and so is a new one.
    clients.truncate(5);
    for c in &mut clients {
        echo_roundtrip(c, b"still here");
    }
    let mut fresh = TcpStream::connect(listen).unwrap();
    echo_roundtrip(&mut fresh, b"new");
}

#[test]
fn ipv6_listener_and_backend() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let backend = TcpServer::start_on("[::1]:0".parse().unwrap(), echo_handler);
    let port = std::net::TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let (_dir, cfg) = write_config(&one_service(
        listen,
        &[("b", backend.addr)],
        "",
        "check = \"tcp\"",
    ));
    let _lb = start_lb(&cfg);
    let mut c = TcpStream::connect(listen).unwrap();
    echo_roundtrip(&mut c, b"over v6");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
