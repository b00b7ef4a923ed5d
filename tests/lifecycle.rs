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
    let mut setup = echo_behind_lb("drain_timeout = \"10s\"");
    let (lb, listen) = (&mut setup.lb, setup.listen);
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
    let mut setup = echo_behind_lb("drain_timeout = \"1s\"");
    let (lb, listen) = (&mut setup.lb, setup.listen);
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
    let (listen, _dir, cfg) = tcp_service(backend.addr, "", "interval = \"1h\"");
    // A tiny hard limit that lb cannot raise: room for only a handful of connections.
    let mut cmd = std::process::Command::new(lb_bin());
    cmd.args(["run", "-c", cfg.to_str().unwrap()]);
    // SAFETY: setrlimit is async-signal-safe; the child runs nothing else before exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 100,
                rlim_max: 100,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut lb = Proc::spawn_cmd("lb", cmd);
    let line = lb.wait_for_line(&["ready"], Duration::from_secs(10));
    let cap_line = lb.wait_for_line(&["room for"], Duration::from_secs(1));
    let capacity: usize = cap_line
        .split("room for ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        capacity > 0 && capacity < 30,
        "capacity {capacity} from 100 fds ({line})"
    );

    // Three times more clients than descriptors: none is refused or closed, the kernel
    // queues those lb cannot take yet.
    let mut clients: Vec<TcpStream> = (0..capacity * 3)
        .map(|_| TcpStream::connect(listen).unwrap())
        .collect();
    for c in clients.iter_mut().take(capacity) {
        echo_roundtrip(c, b"served");
    }
    let cpu_before = cpu_ticks(lb.pid());
    std::thread::sleep(Duration::from_secs(1));
    let cpu = cpu_ticks(lb.pid()) - cpu_before;
    // Clock ticks are 1/100 s: a spinning accept loop would burn ~100 in that second.
    assert!(
        cpu < 30,
        "lb used {cpu} ticks of CPU in 1 s at its descriptor limit"
    );
    assert!(lb.child_alive(), "lb must not crash");

    // As served clients leave, the queued ones are taken, in order, and all work.
    let waiting = clients.split_off(capacity);
    drop(clients);
    for (i, mut c) in waiting.into_iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"queued").unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("queued client {i}: {e}"));
        assert_eq!(&got, b"queued");
        // Leave at once so the next queued client gets the slot.
        drop(c);
    }
    assert!(lb.child_alive(), "lb must not crash");
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
