//! Hot reload under traffic: WebSocket users held through lb and a steady stream of new
//! connections while lb.toml is rewritten many times (add a backend, change weights,
//! remove one, invalid files in between). Nothing established drops, nothing new is
//! refused, the added backend takes traffic and the removed one takes none.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// When a new connection started, and the backend it landed on (None: it failed).
type Landing = (Instant, Option<String>);

fn config(listen: SocketAddr, backends: &[(&str, SocketAddr, u32)]) -> String {
    let mut s = format!(
        "[[service]]\nname = \"chat\"\nlisten = \"{listen}\"\nbalance = \"round-robin\"\n\n[service.health]\ncheck = \"http\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n"
    );
    for (name, addr, weight) in backends {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddr = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    s
}

/// Replaces the file the way editors do: write a temp file, rename it over.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn rewrites_under_traffic_drop_nothing_and_route_as_configured() {
    let backends: Vec<_> = ["s1", "s2", "s3", "s4"]
        .iter()
        .map(|id| spawn_backend(id))
        .collect();
    let addr = |i: usize| backends[i].1;
    let listen = free_addr();
    let initial = config(
        listen,
        &[("s1", addr(0), 1), ("s2", addr(1), 1), ("s3", addr(2), 1)],
    );
    let (_dir, path) = write_config(&initial);
    let lb = start_lb(&path);

    // 40 users held through lb for the whole test.
    let users = Proc::spawn(
        "client",
        &[
            "client",
            "--url",
            &format!("ws://{listen}/ws"),
            "--users",
            "40",
            "--heartbeat",
            "300ms",
            "--pong-timeout",
            "2s",
            "--duration",
            "14s",
            "--json",
        ],
        &[],
    );
    users.wait_for_line(&["all 40 users online"], Duration::from_secs(10));

    // A steady stream of new connections, each recording where it landed.
    let stop = Arc::new(AtomicBool::new(false));
    let landed: Arc<Mutex<Vec<Landing>>> = Arc::default();
    let stream = {
        let (stop, landed) = (stop.clone(), landed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let server = which_server(listen);
                landed.lock().unwrap().push((t, server));
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };

    let wait_reloads = |n: usize, failed: usize| {
        assert_eventually!(
            Duration::from_secs(5),
            lb.count_lines(&["reloaded"]) >= n && lb.count_lines(&["reload failed"]) >= failed,
            "{n} reloads and {failed} failures"
        );
    };

    // 1. Add s4.
    write_atomically(
        &path,
        &config(
            listen,
            &[
                ("s1", addr(0), 1),
                ("s2", addr(1), 1),
                ("s3", addr(2), 1),
                ("s4", addr(3), 1),
            ],
        ),
    );
    wait_reloads(1, 0);
    lb.wait_for_line(&["backend s4 is up"], Duration::from_secs(3));
    // 2. An invalid file: nothing changes.
    std::fs::write(&path, "[[service]]\nname = \"chat\nlisten = oops\n").unwrap();
    wait_reloads(1, 1);
    // 3. Change weights (written in place, not renamed).
    std::fs::write(
        &path,
        config(
            listen,
            &[
                ("s1", addr(0), 3),
                ("s2", addr(1), 1),
                ("s3", addr(2), 1),
                ("s4", addr(3), 2),
            ],
        ),
    )
    .unwrap();
    wait_reloads(2, 1);
    // 4. Another invalid file: an unknown key.
    write_atomically(
        &path,
        &format!("{}\nbogus = 1\n", config(listen, &[("s1", addr(0), 1)])),
    );
    wait_reloads(2, 2);
    // 5. Remove s2.
    write_atomically(
        &path,
        &config(
            listen,
            &[("s1", addr(0), 3), ("s3", addr(2), 1), ("s4", addr(3), 2)],
        ),
    );
    wait_reloads(3, 2);
    let s2_removed_at = Instant::now();
    // 6-9. More rewrites: weights back and forth, with SIGHUP as the trigger for one.
    for (i, w) in [1u32, 2, 1].iter().enumerate() {
        write_atomically(
            &path,
            &config(
                listen,
                &[("s1", addr(0), *w), ("s3", addr(2), 1), ("s4", addr(3), 2)],
            ),
        );
        wait_reloads(4 + i, 2);
    }
    lb.signal(libc::SIGHUP); // unchanged file: a no-op that must not disturb anything
    std::thread::sleep(Duration::from_millis(800));

    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    let landed = landed.lock().unwrap().clone();
    let refused = landed.iter().filter(|(_, s)| s.is_none()).count();
    let on_s4 = landed
        .iter()
        .filter(|(_, s)| s.as_deref() == Some("s4"))
        .count();
    let on_s2_after = landed
        .iter()
        .filter(|(t, s)| *t > s2_removed_at && s.as_deref() == Some("s2"))
        .count();
    eprintln!(
        "new connections: {} made, {refused} failed, {on_s4} on s4, {on_s2_after} on s2 after its removal",
        landed.len()
    );
    assert!(
        landed.len() > 100,
        "the stream made only {} connections",
        landed.len()
    );
    assert_eq!(refused, 0, "new connections failed during reloads");
    assert!(on_s4 > 0, "the added backend received no traffic");
    assert_eq!(
        on_s2_after, 0,
        "the removed backend received new connections"
    );
    assert_eq!(lb.count_lines(&["reload failed"]), 2);

    // The held users: none was disconnected, all still online.
    let mut users = users;
    assert_eq!(users.wait_exit(Duration::from_secs(20)), Some(0));
    let json = users
        .output()
        .into_iter()
        .find(|l| l.starts_with('{'))
        .expect("JSON summary");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["disconnects"], 0, "held connections dropped: {json}");
    assert_eq!(v["online"], 40, "{json}");
    assert!(lb.count_lines(&["reason=\"backend_removed\""]) == 0);
}

fn echo_ok(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = [0u8; 4];
    c.write_all(b"ping").is_ok() && c.read_exact(&mut got).is_ok() && &got == b"ping"
}

#[test]
fn services_come_and_go_and_removed_backends_close_after_drain_timeout() {
    use std::io::{Read, Write};
    let a = TcpServer::echo();
    let b = TcpServer::echo();
    let (l1, l2) = (free_addr(), free_addr());
    let svc = |name: &str, listen: SocketAddr, extra: &str, backends: &[(&str, SocketAddr)]| {
        let mut s = format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\non_removal = \"close\"\ndrain_timeout = \"600ms\"\n{extra}\n[service.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\n"
        );
        for (n, addr) in backends {
            s.push_str(&format!(
                "[[service.backend]]\nname = \"{n}\"\naddr = \"{addr}\"\n"
            ));
        }
        s
    };
    let (_dir, path) = write_config(&svc("one", l1, "", &[("a", a.addr), ("b", b.addr)]));
    let lb = start_lb(&path);
    assert!(echo_ok(l1));
    assert!(std::net::TcpStream::connect(l2).is_err());

    // Hold a connection through service one (on a or b).
    let mut held = std::net::TcpStream::connect(l1).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    held.write_all(b"x").unwrap();
    held.read_exact(&mut [0u8; 1]).unwrap();

    // Add service two; it opens its listener once its backend passed a check.
    write_atomically(
        &path,
        &format!(
            "{}{}",
            svc("one", l1, "", &[("a", a.addr), ("b", b.addr)]),
            svc("two", l2, "", &[("a", a.addr)])
        ),
    );
    assert_eventually!(Duration::from_secs(5), echo_ok(l2), "service two answers");
    // The held connection did not notice.
    held.write_all(b"y").unwrap();
    held.read_exact(&mut [0u8; 1]).unwrap();

    // Remove both backends of service one but a new one: the held connection is on a
    // removed backend and is closed once drain_timeout (600 ms) has passed.
    let c = TcpServer::echo();
    write_atomically(
        &path,
        &format!(
            "{}{}",
            svc("one", l1, "", &[("c", c.addr)]),
            svc("two", l2, "", &[("a", a.addr)])
        ),
    );
    let t = Instant::now();
    let r = held.read(&mut [0u8; 1]);
    assert!(
        matches!(r, Ok(0)),
        "held connection should be closed, got {r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t.elapsed()
    );
    lb.wait_for_line(&["reason=\"backend_removed\""], Duration::from_secs(1));
    assert_eventually!(
        Duration::from_secs(3),
        echo_ok(l1),
        "service one answers through c"
    );

    // Remove service one: its listener closes; service two is untouched.
    write_atomically(&path, &svc("two", l2, "", &[("a", a.addr)]));
    assert_eventually!(
        Duration::from_secs(3),
        std::net::TcpStream::connect(l1).is_err(),
        "service one's listener closed"
    );
    assert!(echo_ok(l2));
    lb.wait_for_line(&["service one removed"], Duration::from_secs(1));
}

#[test]
fn renaming_a_service_keeps_its_listener_open() {
    let a = TcpServer::echo();
    let listen = free_addr();
    let svc = |name: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\n[service.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\n[[service.backend]]\nname = \"a\"\naddr = \"{}\"\n",
            a.addr
        )
    };
    let (_dir, path) = write_config(&svc("one"));
    let lb = start_lb(&path);
    assert!(echo_ok(listen));
    // Connections keep coming while the service is renamed; none may be refused.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(0usize));
    let prober = {
        let (stop, failures) = (stop.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if !echo_ok(listen) {
                    *failures.lock().unwrap() += 1;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    write_atomically(&path, &svc("uno"));
    lb.wait_for_line(&["service uno added"], Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().unwrap();
    assert!(probes > 20, "only {probes} probes");
    assert_eq!(
        *failures.lock().unwrap(),
        0,
        "connections failed during the rename"
    );
    assert_eq!(lb.count_lines(&["reload failed"]), 0);
}
