//! `GET /metrics` against the real binary: every metric is exposed, counters match the
//! traffic sent through lb (connections, bytes, refused connects), histograms count
//! connections and checks, and series of removed services and backends vanish after a
//! reload while the reload counters move.

mod admin_client;
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use admin_client::*;
use lb::metrics::names;
use support::*;

fn scrape(admin: SocketAddr) -> String {
    let r = get(admin, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.header("content-type")
    );
    r.body
}

/// The value of `name{labels}`; panics (showing the exposition) when it is missing.
fn value(text: &str, name: &str, labels: &str) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("no {name}{{{labels}}} in:\n{text}"))
}

/// Sends `len` bytes through `lb`, reads the echo, closes; returns once the echo is back.
fn echo_through(lb: SocketAddr, len: usize) {
    let mut s = TcpStream::connect(lb).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let data = vec![b'x'; len];
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), len);
}

#[test]
fn metrics_match_the_traffic() {
    let echo = TcpServer::echo();
    let dead = free_addr();
    let (_s1, s1) = spawn_backend("s1");
    let (listen, web, admin) = (free_addr(), free_addr(), free_addr());
    // svc: no active check, so the dead backend is tried (refused) before the passive
    // check marks it down, and stays down for the rest of the test (interval 60s).
    let mut text = one_service(
        listen,
        &[("dead", dead), ("echo", echo.addr)],
        "balance = \"round-robin\"",
        "check = \"none\"\ninterval = \"60s\"\nfall = 1",
    );
    text.push_str(&format!(
        "\n[[service]]\nname = \"web\"\nlisten = \"{web}\"\n[service.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n[[service.backend]]\nname = \"s1\"\naddr = \"{s1}\"\n\n[admin]\nlisten = \"{admin}\"\n"
    ));
    let (_dir, path) = write_config(&text);
    let _lb = start_lb(&path);

    const N: usize = 5;
    const LEN: usize = 1000;
    for _ in 0..N {
        echo_through(listen, LEN);
    }
    assert_eventually!(
        Duration::from_secs(5),
        sample(
            &scrape(admin),
            "lb_connection_duration_seconds_count",
            "service=\"svc\",backend=\"echo\""
        ) == Some(N as f64),
        "{N} connection durations recorded"
    );
    assert_eventually!(
        Duration::from_secs(5),
        sample(
            &scrape(admin),
            "lb_backend_check_duration_seconds_count",
            "service=\"web\",backend=\"s1\""
        )
        .is_some_and(|n| n >= 2.0),
        "check durations recorded"
    );
    let m = scrape(admin);

    // Every name is exposed, with its type.
    for name in names::ALL {
        assert!(
            m.lines().any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} missing:\n{m}"
        );
    }

    let svc = "service=\"svc\"";
    let echo_l = "service=\"svc\",backend=\"echo\"";
    let dead_l = "service=\"svc\",backend=\"dead\"";
    assert_eq!(value(&m, names::CONNECTIONS_ACCEPTED, svc), N as f64);
    assert_eq!(value(&m, names::CONNECTIONS_REJECTED, svc), 0.0);
    assert_eq!(value(&m, names::CONNECTIONS_ACTIVE, svc), 0.0);
    assert_eq!(
        value(&m, names::CONNECTIONS_ACCEPTED, "service=\"web\""),
        0.0
    );
    assert_eq!(value(&m, names::BACKEND_CONNECTIONS, echo_l), N as f64);
    assert_eq!(value(&m, names::BACKEND_CONNECTIONS, dead_l), 0.0);
    assert_eq!(value(&m, names::BACKEND_CONNECTIONS_ACTIVE, echo_l), 0.0);
    assert_eq!(
        value(&m, names::BACKEND_SENT_BYTES, echo_l),
        (N * LEN) as f64
    );
    assert_eq!(
        value(&m, names::BACKEND_RECEIVED_BYTES, echo_l),
        (N * LEN) as f64
    );
    assert_eq!(value(&m, names::BACKEND_SENT_BYTES, dead_l), 0.0);
    let refused = value(
        &m,
        names::BACKEND_CONNECT_FAILURES,
        "service=\"svc\",backend=\"dead\",kind=\"refused\"",
    );
    assert!(refused >= 1.0, "refused connects to dead: {refused}");
    for kind in ["timeout", "other"] {
        let labels = format!("service=\"svc\",backend=\"dead\",kind=\"{kind}\"");
        assert_eq!(value(&m, names::BACKEND_CONNECT_FAILURES, &labels), 0.0);
    }
    let echo_refused = "service=\"svc\",backend=\"echo\",kind=\"refused\"";
    assert_eq!(
        value(&m, names::BACKEND_CONNECT_FAILURES, echo_refused),
        0.0
    );

    // Health: dead was marked down by the passive check, the others are up.
    assert_eq!(value(&m, names::BACKEND_UP, dead_l), 0.0);
    assert_eq!(value(&m, names::BACKEND_UP, echo_l), 1.0);
    let state = |l: &str, s: &str| {
        let labels = format!("{l},state=\"{s}\"");
        value(&m, names::BACKEND_STATE, &labels)
    };
    assert_eq!(state(dead_l, "down"), 1.0);
    assert_eq!(state(dead_l, "up"), 0.0);
    assert_eq!(state(echo_l, "up"), 1.0);
    for s in ["down", "draining", "disabled"] {
        assert_eq!(state(echo_l, s), 0.0);
    }
    assert!(value(&m, names::BACKEND_TRANSITIONS, dead_l) >= 1.0);
    assert_eq!(value(&m, names::BACKEND_WEIGHT, echo_l), 1.0);

    // Histograms: one observation per connection; checks of web's s1 only (svc has none).
    let count = |name: &str, l: &str| value(&m, &format!("{name}_count"), l);
    assert_eq!(count(names::CONNECTION_DURATION, echo_l), N as f64);
    assert!(value(&m, &format!("{}_sum", names::CONNECTION_DURATION), echo_l) > 0.0);
    let inf = format!("{echo_l},le=\"+Inf\"");
    assert_eq!(
        value(&m, &format!("{}_bucket", names::CONNECTION_DURATION), &inf),
        N as f64
    );
    let s1_l = "service=\"web\",backend=\"s1\"";
    assert!(count(names::CHECK_DURATION, s1_l) >= 2.0);
    assert!(sample(&m, &format!("{}_count", names::CHECK_DURATION), echo_l).is_none());

    // Reloads: none yet; the start-up configuration counts as applied now.
    assert_eq!(value(&m, names::RELOADS, "result=\"ok\""), 0.0);
    assert_eq!(value(&m, names::RELOADS, "result=\"failed\""), 0.0);
    assert_eq!(value(&m, names::CONFIG_LAST_RELOAD_SUCCESSFUL, ""), 1.0);
    let applied = value(&m, names::CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP, "");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - applied >= 0.0 && now - applied < 60.0,
        "{applied} vs {now}"
    );
}

#[test]
fn removed_series_vanish_and_reloads_are_counted() {
    let (_b1, s1) = spawn_backend("s1");
    let (_b2, s2) = spawn_backend("s2");
    let (listen, other, admin) = (free_addr(), free_addr(), free_addr());
    let health = "interval = \"200ms\"\ntimeout = \"150ms\"";
    let with = |backends: &[(&str, SocketAddr)], other_service: bool| {
        let mut t = one_service(listen, backends, "balance = \"round-robin\"", health);
        if other_service {
            t.push_str(&format!(
                "\n[[service]]\nname = \"other\"\nlisten = \"{other}\"\n[[service.backend]]\nname = \"o1\"\naddr = \"{s1}\"\n"
            ));
        }
        t.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n"));
        t
    };
    let (_dir, path) = write_config(&with(&[("s1", s1), ("s2", s2)], true));
    // No file watch: only SIGHUP reloads, so every reload is counted exactly once.
    let lb = Proc::spawn(
        "lb",
        &["run", "--no-watch", "-c", path.to_str().unwrap()],
        &[],
    );
    lb.wait_for_line(&["ready"], Duration::from_secs(10));

    // A connection to each backend, so the connection histograms have both.
    let landed: Vec<_> = (0..2).filter_map(|_| which_server(listen)).collect();
    assert_eq!(landed.len(), 2);
    let s2_l = "service=\"svc\",backend=\"s2\"";
    assert_eventually!(
        Duration::from_secs(5),
        sample(
            &scrape(admin),
            &format!("{}_count", names::CONNECTION_DURATION),
            s2_l
        ) == Some(1.0),
        "the connection to s2 recorded"
    );
    let before = scrape(admin);
    assert!(before.contains("backend=\"s2\""));
    assert!(before.contains("service=\"other\""));
    let applied_at_start = value(&before, names::CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP, "");

    // Remove s2 and the service "other".
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&path, with(&[("s1", s1)], false)).unwrap();
    lb.signal(libc::SIGHUP);
    assert_eventually!(
        Duration::from_secs(5),
        sample(&scrape(admin), names::RELOADS, "result=\"ok\"") == Some(1.0),
        "one reload"
    );
    let after = scrape(admin);
    for gone in ["backend=\"s2\"", "service=\"other\""] {
        let left: Vec<&str> = after.lines().filter(|l| l.contains(gone)).collect();
        assert!(left.is_empty(), "{gone} still exposed: {left:#?}");
    }
    assert_eq!(
        value(
            &after,
            names::BACKEND_CONNECTIONS,
            "service=\"svc\",backend=\"s1\""
        ),
        1.0
    );
    assert!(value(&after, names::CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP, "") > applied_at_start);
    assert_eq!(value(&after, names::CONFIG_LAST_RELOAD_SUCCESSFUL, ""), 1.0);

    // A bad file: counted as failed, the running configuration stays.
    std::fs::write(&path, "[[service]]\nname = \"svc\"\nlisten = oops\n").unwrap();
    lb.signal(libc::SIGHUP);
    assert_eventually!(
        Duration::from_secs(5),
        sample(&scrape(admin), names::RELOADS, "result=\"failed\"") == Some(1.0),
        "one failed reload"
    );
    let m = scrape(admin);
    assert_eq!(value(&m, names::RELOADS, "result=\"ok\""), 1.0);
    assert_eq!(value(&m, names::CONFIG_LAST_RELOAD_SUCCESSFUL, ""), 0.0);
    assert_eq!(
        value(&m, names::BACKEND_UP, "service=\"svc\",backend=\"s1\""),
        1.0
    );
}
