//! The admin API against the real binary: liveness and readiness, the /backends JSON for
//! a backend that was SIGKILLed, drain/disable/enable with held WebSocket connections,
//! the bearer token, 404/405, a bind failure, and admin state kept across a reload.

mod admin_client;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use admin_client::*;
use support::*;

const HEALTH: &str = "check = \"http\"\ninterval = \"200ms\"\ntimeout = \"150ms\"";

/// One service `svc` on `listen` (round-robin, so spreading is predictable) in front of
/// `backends`, with `[admin]` on `admin` and `admin_extra` lines in it.
fn config(
    listen: SocketAddr,
    backends: &[(&str, SocketAddr)],
    admin: SocketAddr,
    admin_extra: &str,
) -> String {
    let mut s = one_service(listen, backends, "balance = \"round-robin\"", HEALTH);
    s.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n{admin_extra}\n"));
    s
}

/// lb in front of the bundled backends `ids`; returns lb, its listen and admin addresses.
struct Setup {
    backends: Vec<(Proc, SocketAddr)>,
    lb: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    _dir: tempdir::TempDir,
    path: std::path::PathBuf,
}

fn setup(ids: &[&str], admin_extra: &str) -> Setup {
    let backends: Vec<(Proc, SocketAddr)> = ids.iter().map(|id| spawn_backend(id)).collect();
    let named: Vec<(&str, SocketAddr)> = ids
        .iter()
        .copied()
        .zip(backends.iter().map(|b| b.1))
        .collect();
    let (listen, admin) = (free_addr(), free_addr());
    let (dir, path) = write_config(&config(listen, &named, admin, admin_extra));
    let lb = start_lb(&path);
    lb.wait_for_line(&["admin API listening"], Duration::from_secs(5));
    Setup {
        backends,
        lb,
        listen,
        admin,
        _dir: dir,
        path,
    }
}

fn rfc3339_age(s: &serde_json::Value) -> Duration {
    let t = humantime::parse_rfc3339(s.as_str().expect("a time string"))
        .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"));
    SystemTime::now().duration_since(t).unwrap_or_default()
}

#[test]
fn live_ready_and_backends_json_with_a_killed_backend() {
    let mut t = setup(&["s1", "s2"], "");
    let live = get(t.admin, "/live");
    assert_eq!((live.status, live.body.as_str()), (200, "live\n"));
    assert_eq!(get(t.admin, "/ready").status, 200);

    let doc = get(t.admin, "/backends").json();
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["reload"]["ok"], 0);
    assert_eq!(doc["reload"]["failed"], 0);
    assert!(doc["reload"]["last_error"].is_null());
    assert!(rfc3339_age(&doc["reload"]["last_ok_at"]) < Duration::from_secs(60));
    let svc = &doc["services"][0];
    assert_eq!(svc["name"], "svc");
    assert_eq!(svc["listen"], t.listen.to_string());
    assert_eq!(svc["balance"], "round-robin");
    let s1 = &svc["backends"][0];
    for key in [
        "name",
        "addr",
        "state",
        "health",
        "admin",
        "weight",
        "active",
        "total",
        "bytes_in",
        "bytes_out",
        "connect_errors",
        "check_streak",
        "last_check_ms",
        "transitions",
        "last_transition",
    ] {
        assert!(s1.get(key).is_some(), "backend has no {key:?}: {s1:#}");
    }
    assert_eq!(s1["name"], "s1");
    assert_eq!(s1["addr"], t.backends[0].1.to_string());
    assert_eq!(s1["state"], "up");
    assert_eq!(s1["weight"], 1);

    // SIGKILL s2: it is marked down, with the reason and the time.
    t.backends[1].0.child.kill().unwrap();
    t.backends[1].0.child.wait().unwrap();
    assert_eventually!(
        Duration::from_secs(5),
        backend(t.admin, "svc", "s2")["state"] == "down",
        "s2 down in /backends"
    );
    let s2 = backend(t.admin, "svc", "s2");
    assert_eq!(s2["health"], "down");
    assert_eq!(s2["admin"], "enabled");
    assert_eq!(s2["last_transition"]["to"], "down");
    let reason = s2["last_transition"]["reason"].as_str().unwrap();
    assert!(reason.contains("fail"), "reason: {reason}");
    assert!(rfc3339_age(&s2["last_transition"]["at"]) < Duration::from_secs(30));
    assert!(s2["check_streak"].as_i64().unwrap() < 0, "{s2:#}");
    assert!(s2["transitions"].as_u64().unwrap() >= 1);

    // Traffic: all on s1 now; one connection held, two done.
    let mut held = Ws::open(t.listen);
    assert_eq!(held.server, "s1");
    assert_eq!(held.echo("hello").unwrap(), "hello");
    for _ in 0..2 {
        assert_eq!(which_server(t.listen).as_deref(), Some("s1"));
    }
    // The two finished ones close as soon as lb sees the FINs.
    assert_eventually!(
        Duration::from_secs(3),
        backend(t.admin, "svc", "s1")["active"] == 1,
        "one connection open on s1"
    );
    let s1 = backend(t.admin, "svc", "s1");
    assert_eq!(s1["total"], 3, "{s1:#}");
    assert!(s1["bytes_in"].as_u64().unwrap() > 0, "{s1:#}");
    assert!(s1["bytes_out"].as_u64().unwrap() > 0, "{s1:#}");
    assert!(s1["check_streak"].as_i64().unwrap() > 0, "{s1:#}");
    assert!(s1["last_check_ms"].as_f64().unwrap() > 0.0, "{s1:#}");
    assert_eq!(s2["total"], 0);
    drop(held);
    assert_eventually!(
        Duration::from_secs(3),
        backend(t.admin, "svc", "s1")["active"] == 0,
        "s1 has no active connection"
    );
    let svc = &get(t.admin, "/backends").json()["services"][0];
    assert_eq!(svc["accepted"], 3);
    assert_eq!(svc["active"], 0);
}

#[test]
fn drain_keeps_open_connections_disable_closes_them_enable_restores() {
    let t = setup(&["s1", "s2"], "");
    // Hold a connection on s1 (round-robin: one of two consecutive ones lands there).
    let mut held = Ws::open(t.listen);
    if held.server != "s1" {
        held = Ws::open(t.listen);
    }
    assert_eq!(held.server, "s1");

    let r = post(t.admin, "/backends/svc/s1/drain");
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["service"], "svc");
    assert_eq!(j["backend"]["state"], "draining");
    assert_eq!(j["backend"]["last_transition"]["to"], "draining");
    // The open connection stays and works; new ones avoid s1.
    assert_eq!(held.echo("still here").unwrap(), "still here");
    for _ in 0..6 {
        assert_eq!(which_server(t.listen).as_deref(), Some("s2"));
    }
    let s1 = backend(t.admin, "svc", "s1");
    assert_eq!(
        (s1["state"].as_str(), s1["active"].as_u64()),
        (Some("draining"), Some(1))
    );
    assert_eq!(s1["health"], "up");
    // Draining twice is fine.
    assert_eq!(post(t.admin, "/backends/svc/s1/drain").status, 200);

    // Disable: the open connection is closed.
    let r = post(t.admin, "/backends/svc/s1/disable");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["backend"]["state"], "disabled");
    assert!(
        held.closed_within(Duration::from_secs(3)),
        "disable left the connection open"
    );
    t.lb.wait_for_line(
        &["connection closed", "backend=s1", "backend_disabled"],
        Duration::from_secs(3),
    );
    assert_eventually!(
        Duration::from_secs(3),
        backend(t.admin, "svc", "s1")["active"] == 0,
        "s1 has no active connection"
    );
    for _ in 0..4 {
        assert_eq!(which_server(t.listen).as_deref(), Some("s2"));
    }

    // Enable: s1 takes new connections again.
    let r = post(t.admin, "/backends/svc/s1/enable");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["backend"]["state"], "up");
    let landed: Vec<_> = (0..4).filter_map(|_| which_server(t.listen)).collect();
    assert!(
        landed.iter().any(|s| s == "s1"),
        "s1 not used after enable: {landed:?}"
    );
}

#[test]
fn token_is_required_when_configured() {
    let t = setup(&["s1"], "token = \"s3cret\"");
    for path in ["/live", "/ready", "/backends", "/metrics"] {
        let r = get(t.admin, path);
        assert_eq!(r.status, 401, "{path} without a token: {}", r.body);
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        let r = request(t.admin, "GET", path, &["Authorization: Bearer wrong"]);
        assert_eq!(r.status, 401, "{path} with a wrong token");
        let r = request(t.admin, "GET", path, &["Authorization: Bearer s3cret"]);
        assert_eq!(r.status, 200, "{path} with the token: {}", r.body);
    }
    assert_eq!(post(t.admin, "/backends/svc/s1/drain").status, 401);
    assert_eq!(backend_with_token(t.admin)["state"], "up");
    let r = request(
        t.admin,
        "POST",
        "/backends/svc/s1/drain",
        &["Authorization: Bearer s3cret"],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(backend_with_token(t.admin)["state"], "draining");
}

fn backend_with_token(admin: SocketAddr) -> serde_json::Value {
    let r = request(admin, "GET", "/backends", &["Authorization: Bearer s3cret"]);
    r.json()["services"][0]["backends"][0].clone()
}

#[test]
fn unknown_paths_404_wrong_methods_405() {
    let t = setup(&["s1"], "");
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/backends/"),
        ("GET", "/backends/svc"),
        ("POST", "/backends/svc/s1/explode"),
        ("POST", "/backends/svc/nope/drain"),
        ("POST", "/backends/nope/s1/drain"),
    ] {
        let r = request(t.admin, method, path, &[]);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
        assert!(r.json()["error"].is_string());
    }
    for (method, path, allow) in [
        ("POST", "/live", "GET, HEAD"),
        ("POST", "/ready", "GET, HEAD"),
        ("DELETE", "/backends", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/backends/svc/s1/drain", "POST"),
        ("DELETE", "/backends/svc/s1/enable", "POST"),
    ] {
        let r = request(t.admin, method, path, &[]);
        assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
    // Nothing above changed anything.
    assert_eq!(backend(t.admin, "svc", "s1")["state"], "up");
    // Names are percent-decoded.
    assert_eq!(post(t.admin, "/backends/%73vc/s%31/drain").status, 200);
    assert_eq!(backend(t.admin, "svc", "s1")["state"], "draining");
}

#[test]
fn admin_bind_failure_is_a_startup_error_naming_the_address() {
    let (_b, baddr) = spawn_backend("s1");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap();
    let (_dir, path) = write_config(&config(free_addr(), &[("s1", baddr)], admin, ""));
    let mut lb = Proc::spawn("lb", &["run", "-c", path.to_str().unwrap()], &[]);
    let code = lb.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{}", lb.output().join("\n"));
    let out = lb.output().join("\n");
    assert!(
        out.contains(&format!("admin API: cannot listen on {admin}")),
        "{out}"
    );
}

#[test]
fn admin_state_survives_a_reload_and_failed_reloads_are_shown() {
    let t = setup(&["s1", "s2"], "");
    assert_eq!(post(t.admin, "/backends/svc/s1/drain").status, 200);
    assert_eq!(post(t.admin, "/backends/svc/s2/enable").status, 200);

    // Change s2's weight; s1 (same name and address) is kept, draining.
    let named = [("s1", t.backends[0].1), ("s2", t.backends[1].1)];
    let text = config(t.listen, &named, t.admin, "").replace(
        &format!("addr = \"{}\"\n", t.backends[1].1),
        &format!("addr = \"{}\"\nweight = 3\n", t.backends[1].1),
    );
    std::fs::write(&t.path, text).unwrap();
    t.lb.signal(libc::SIGHUP);
    assert_eventually!(
        Duration::from_secs(5),
        backend(t.admin, "svc", "s2")["weight"] == 3,
        "s2 weight 3 after the reload"
    );
    let doc = get(t.admin, "/backends").json();
    assert_eq!(doc["reload"]["ok"], 1, "{doc:#}");
    assert!(doc["reload"]["last_error"].is_null());
    let s1 = backend(t.admin, "svc", "s1");
    assert_eq!(s1["state"], "draining", "{s1:#}");
    assert_eq!(s1["admin"], "draining");
    for _ in 0..4 {
        assert_eq!(which_server(t.listen).as_deref(), Some("s2"));
    }

    // A bad file: nothing changes, and the error (file, line, key) is shown.
    std::fs::write(
        &t.path,
        config(t.listen, &named, t.admin, "")
            .replace("interval = \"200ms\"", "interval = \"soon\""),
    )
    .unwrap();
    t.lb.signal(libc::SIGHUP);
    assert_eventually!(
        Duration::from_secs(5),
        get(t.admin, "/backends").json()["reload"]["failed"]
            .as_u64()
            .unwrap()
            >= 1,
        "a failed reload in /backends"
    );
    let doc = get(t.admin, "/backends").json();
    let err = doc["reload"]["last_error"].as_str().expect("last_error");
    assert!(
        err.contains(&format!("{}:", t.path.display())) && err.contains("health.interval"),
        "{err}"
    );
    assert!(doc["reload"]["last_attempt_at"].is_string());
    assert_eq!(backend(t.admin, "svc", "s1")["state"], "draining");
    assert_eq!(backend(t.admin, "svc", "s2")["weight"], 3);
}
