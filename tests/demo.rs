//! `lb demo` end to end: both faults exit 0 with every user back, and no backend
//! process is left behind.

mod support;

use std::process::Command;

use support::lb_bin;

fn run_demo(fault: &str) -> String {
    let out = Command::new(lb_bin())
        .args([
            "demo",
            "--fault",
            fault,
            "--clients",
            "40",
            "--deadline",
            "15s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo --fault {fault} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("users lost:                 0"), "{stdout}");
    assert!(
        stdout.contains("OK: every user is back on a live backend"),
        "{stdout}"
    );
    // Every backend the demo started is gone (killed, and reaped by the demo).
    for pid in stdout.lines().filter_map(|l| {
        l.split("(pid ")
            .nth(1)?
            .split(')')
            .next()?
            .parse::<i32>()
            .ok()
    }) {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| !s.contains("State:\tZ"))
            .unwrap_or(false);
        assert!(!alive, "backend pid {pid} outlived the demo");
    }
    stdout
}

#[test]
fn demo_kill_fault_every_user_back() {
    let out = run_demo("kill");
    assert!(out.contains("SIGKILL to backend"), "{out}");
    assert!(out.contains("balancer marked"), "{out}");
}

#[test]
fn demo_hang_fault_every_user_back() {
    let out = run_demo("hang");
    assert!(out.contains("SIGSTOP to backend"), "{out}");
    // A hang is found by the http check timing out, not by a refused connect.
    assert!(out.contains("timed out"), "{out}");
}
