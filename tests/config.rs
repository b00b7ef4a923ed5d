//! Every known-bad config in tests/data is refused by `lb check` and by `lb run`, with a
//! message naming the file, the line and the key; the sample lb.toml is valid.

mod support;

use std::path::Path;
use std::process::Command;

use support::lb_bin;

/// (fixture, line, text the message must contain: the key and what is wrong)
const CASES: &[(&str, Option<u32>, &[&str])] = &[
    ("unknown_key.toml", Some(4), &["balanse", "unknown field"]),
    ("bad_addr.toml", Some(11), &["backend \"s2\" addr", "99999"]),
    ("bad_listen.toml", Some(3), &["listen", "localhost:8080"]),
    (
        "duplicate_service.toml",
        Some(10),
        &["name", "duplicate service"],
    ),
    (
        "duplicate_backend.toml",
        Some(10),
        &["backend \"s1\" name", "duplicate backend"],
    ),
    ("zero_rise.toml", Some(6), &["health.rise", "at least 1"]),
    ("zero_fall.toml", Some(6), &["health.fall", "at least 1"]),
    (
        "zero_interval.toml",
        Some(6),
        &["health.interval", "greater than zero"],
    ),
    ("bad_duration.toml", Some(6), &["health.timeout", "soon"]),
    ("bad_check.toml", Some(6), &["check", "ping"]),
    ("no_backends.toml", Some(1), &["backend", "at least one"]),
    ("syntax.toml", Some(2), &["name"]),
    (
        "huge_max_connections.toml",
        Some(4),
        &["max_connections", "between 1 and"],
    ),
    (
        "backend_is_self.toml",
        Some(7),
        &["backend \"self\" addr", "connect to itself"],
    ),
    (
        "listen_conflict.toml",
        Some(11),
        &["service \"other\" listen", "conflicts with 127.0.0.1:18080"],
    ),
    (
        "bad_health_path.toml",
        Some(6),
        &["health.path", "not a valid request path"],
    ),
    (
        "fast_interval_too_long.toml",
        Some(7),
        &["health.fast_interval", "longer than interval"],
    ),
    (
        "huge_duration.toml",
        Some(4),
        &["idle_timeout", "at most a year"],
    ),
    ("backend_port_zero.toml", Some(7), &["addr", "port 0"]),
    (
        "panic_threshold_over_100.toml",
        Some(4),
        &["panic_threshold", "0 to 100"],
    ),
];

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn check_rejects_each_bad_config_naming_file_line_and_key() {
    for (file, line, needles) in CASES {
        let path = data(file);
        let out = Command::new(lb_bin())
            .args(["check", "-c", &path])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{file}: exit code; stderr: {err}"
        );
        let want = match line {
            Some(l) => format!("{path}:{l}:"),
            None => format!("{path}:"),
        };
        assert!(
            err.contains(&want),
            "{file}: message should start with {want:?}: {err}"
        );
        for n in *needles {
            assert!(
                err.contains(n),
                "{file}: message should mention {n:?}: {err}"
            );
        }
    }
}

#[test]
fn run_refuses_to_start_on_a_bad_config() {
    let listen = support::free_addr();
    let text = std::fs::read_to_string(data("zero_rise.toml"))
        .unwrap()
        .replace("127.0.0.1:18080", &listen.to_string());
    let (_dir, path) = support::write_config(&text);
    let out = Command::new(lb_bin())
        .args(["run", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("health.rise"));
    // It never bound its listener.
    assert!(std::net::TcpStream::connect(listen).is_err());
}

#[test]
fn missing_file_is_an_error() {
    let out = Command::new(lb_bin())
        .args(["check", "-c", "/nonexistent/lb.toml"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lb.toml"));
}

#[test]
fn sample_config_is_valid() {
    let out = Command::new(lb_bin())
        .args([
            "check",
            "-c",
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("lb.toml")
                .to_string_lossy(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 service(s), 3 backend(s)"));
}
