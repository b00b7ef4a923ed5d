//! lb vs HAProxy vs nginx (stream), side by side on loopback, in one run.
//!
//! ```sh
//! cargo bench --bench suite               # full: 10-20 minutes; writes BENCHMARKS.md
//! cargo bench --bench suite -- --quick    # 1-3 minutes (CI); writes target/BENCHMARKS-quick.md
//! ```
//!
//! Options after `--`: `--quick`, `--runs N`, `--only bulk,rate,latency,idle,storm`,
//! `--peers lb,haproxy,nginx`, `--out PATH`. `LB_SUITE_VERBOSE=1` shows children's output.
//!
//! Scenarios: bulk throughput (1 and 8 streams, iperf3), connection rate (64 clients,
//! connect/64 B echo/close) with the proxy's CPU per 100k connections, added ping-pong
//! latency (100 connections), idle memory per proxied connection (1,000 and 9,000), and a
//! reconnect storm of WebSocket users (lb only; SIGKILL and SIGSTOP of a backend).
//! Every figure is the median of several runs with min and max; peers missing from the
//! machine are reported and skipped, never a failure. Timings never fail the suite: it
//! prints, and exits 0 unless it could not run at all.

mod net;
mod peers;
mod procs;
mod report;
mod roles;
mod scenarios;
mod storm;

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use peers::{Env, Peer};
use report::Report;

pub struct Opts {
    pub quick: bool,
    pub runs: Option<usize>,
    pub only: Vec<String>,
    pub out: Option<PathBuf>,
}

const SCENARIOS: [&str; 5] = ["bulk", "rate", "latency", "idle", "storm"];

fn parse_args() -> Result<(Opts, Vec<Peer>), String> {
    let mut opts = Opts {
        quick: false,
        runs: None,
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        out: None,
    };
    let mut peers = Peer::ALL.to_vec();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--bench" => {} // added by `cargo bench`
            "--runs" => {
                opts.runs = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n| *n >= 1)
                        .ok_or("--runs takes a number ≥ 1")?,
                )
            }
            "--only" => {
                let v = args.next().ok_or("--only takes a list")?;
                opts.only = v.split(',').map(str::to_string).collect();
                if let Some(bad) = opts.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    return Err(format!("unknown scenario {bad:?}; known: {SCENARIOS:?}"));
                }
            }
            "--peers" => {
                let v = args.next().ok_or("--peers takes a list")?;
                peers = vec![Peer::Lb];
                for name in v.split(',') {
                    match Peer::ALL.iter().find(|p| p.name() == name) {
                        Some(p) if !peers.contains(p) => peers.push(*p),
                        Some(_) => {}
                        None => return Err(format!("unknown peer {name:?}")),
                    }
                }
            }
            "--out" => opts.out = Some(args.next().ok_or("--out takes a path")?.into()),
            "-h" | "--help" => {
                println!(
                    "cargo bench --bench suite [-- --quick] [--runs N] [--only {}] [--peers lb,haproxy,nginx] [--out PATH]",
                    SCENARIOS.join(",")
                );
                std::process::exit(0);
            }
            // cargo may pass a name filter; ignore anything else.
            _ => {}
        }
    }
    Ok((opts, peers))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // civil_from_days
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|k| format!("{:.1} GiB", k as f64 / 1048576.0))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(s, h)| format!("{s} soft / {h} hard"))
        .unwrap_or_default();
    vec![
        ("cores".into(), format!("{cores} ({model})")),
        ("memory".into(), mem),
        (
            "kernel".into(),
            format!("Linux {}", read("/proc/sys/kernel/osrelease").trim()),
        ),
        ("open files".into(), nofile),
        (
            "tcp_tw_reuse / port range".into(),
            format!(
                "{} / {}",
                read("/proc/sys/net/ipv4/tcp_tw_reuse").trim(),
                read("/proc/sys/net/ipv4/ip_local_port_range")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join("-")
            ),
        ),
    ]
}

fn main() {
    if let Ok(role) = std::env::var(roles::ROLE_ENV) {
        roles::run(&role);
        return;
    }
    let (opts, wanted) = match parse_args() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("suite: {e}");
            std::process::exit(2);
        }
    };
    procs::install_cleanup();
    procs::remove_stale_dirs();
    let started = Instant::now();
    let date = utc_now();
    let env = Env::detect(wanted);
    let mode = if opts.quick { "quick" } else { "full" };
    let command = format!(
        "cargo bench --bench suite{}",
        if opts.quick { " -- --quick" } else { "" }
    );
    println!("lb benchmark suite ({mode}): lb vs HAProxy vs nginx on loopback, same run");
    let versions = env.versions();
    for (k, v) in &versions {
        println!("  {k:<8} {v}");
    }
    for p in Peer::ALL {
        if let Some(why) = env.missing(p) {
            println!("  skipping {}: {why}", p.name());
        }
    }
    println!();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rep = Report::default();
    let want = |s: &str| opts.only.iter().any(|o| o == s);

    // Each scenario is caught on its own: a panic or an error costs its figures only.
    let run =
        |name: &str, rep: &mut Report, f: &mut dyn FnMut(&mut Report) -> Result<(), String>| {
            let t = Instant::now();
            eprintln!("== {name}");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rep)));
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => rep.errors.push(format!("{name}: {e}")),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    rep.errors.push(format!("{name}: panicked: {msg}"));
                }
            }
            eprintln!("   ({name}: {:.0} s)", t.elapsed().as_secs_f64());
        };
    if want("bulk") {
        run("bulk throughput", &mut rep, &mut |r| {
            scenarios::bulk(&env, &opts, r)
        });
    }
    if want("rate") || want("latency") {
        run("connection rate and latency", &mut rep, &mut |r| {
            scenarios::rate_and_latency(&env, &opts, &rt, r, want("rate"), want("latency"))
        });
    }
    if want("idle") {
        run("idle memory", &mut rep, &mut |r| {
            scenarios::idle(&env, &opts, &rt, r)
        });
    }
    if want("storm") {
        run("reconnect storm", &mut rep, &mut |r| {
            storm::storm(&env, &opts, r)
        });
    }
    drop(rt);

    let elapsed = started.elapsed().as_secs_f64();
    let runs_text = match opts.runs {
        Some(n) => format!("{n} run(s) per figure"),
        None if opts.quick => "2 runs per figure (idle memory and storm: 1)".into(),
        None => "3 runs per figure".into(),
    };
    let body = rep.render(&Peer::ALL);
    println!(
        "\n{runs_text}; cells: median [min–max]; lb ÷ peer = ratio of the medians (for CPU, latency and memory, lower is better)\n"
    );
    println!("{body}");
    println!("finished in {:.0} s", elapsed);

    let md = markdown(
        &date, &opts, &env, &versions, &command, &runs_text, &body, elapsed,
    );
    let out = opts.out.clone().unwrap_or_else(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if opts.quick && opts.only.len() == SCENARIOS.len() {
            root.join("target").join("BENCHMARKS-quick.md")
        } else if opts.quick || opts.only.len() != SCENARIOS.len() || opts.runs.is_some() {
            root.join("target").join("BENCHMARKS-partial.md")
        } else {
            root.join("BENCHMARKS.md")
        }
    });
    match std::fs::write(&out, md) {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => println!("could not write {}: {e}", out.display()),
    }
}

#[allow(clippy::too_many_arguments)]
fn markdown(
    date: &str,
    opts: &Opts,
    env: &Env,
    versions: &[(String, String)],
    command: &str,
    runs_text: &str,
    body: &str,
    elapsed: f64,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks: lb vs HAProxy vs nginx\n");
    let _ = writeln!(
        s,
        "Written by `{command}` ({} mode, {:.0} s){}. All on loopback, all peers in the same run, \
         interleaved run by run. The machine is shared and noisy: read ratios, not absolute figures, \
         and expect a few percent of run-to-run spread (the [min–max] shows it).\n",
        if opts.quick { "quick" } else { "full" },
        elapsed,
        if opts.only.len() != SCENARIOS.len() {
            format!(", scenarios: {}", opts.only.join(","))
        } else {
            String::new()
        }
    );
    let _ = writeln!(s, "- date: {date} (start)");
    for (k, v) in machine() {
        let _ = writeln!(s, "- {k}: {v}");
    }
    for (k, v) in versions {
        let _ = writeln!(s, "- {k}: {v}");
    }
    let _ = writeln!(
        s,
        "- reproduce: `{command}` (needs `apt-get install haproxy nginx libnginx-mod-stream iperf3`; a missing peer is skipped)\n"
    );
    let _ = writeln!(s, "## Results\n");
    let _ = writeln!(
        s,
        "{runs_text}; cells: median [min–max]; \"lb ÷ peer\" = ratio of the medians (throughput and rate: higher is \
         better; CPU, latency and memory: lower is better).\n"
    );
    s.push_str(body);
    let _ = writeln!(s, "\n## Setup\n");
    let _ = writeln!(
        s,
        "Every proxy runs with {} workers (lb: tokio's default of one worker thread per core; HAProxy: `nbthread {}`; \
         nginx: `worker_processes {}`) and logs nothing per connection (lb with `LB_LOG=warn`). \
         One backend, no active health check. The configurations, with ports as placeholders:\n",
        env.workers, env.workers, env.workers
    );
    let a: std::net::SocketAddr = "127.0.0.1:8000".parse().unwrap();
    let b: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let _ = writeln!(
        s,
        "lb (`lb run -c lb.toml`):\n\n```toml\n{}```\n",
        peers::lb_config(a, b)
    );
    let _ = writeln!(
        s,
        "HAProxy (`haproxy -db -f haproxy.cfg`):\n\n```\n{}```\n",
        peers::haproxy_config(a, b, env.workers)
    );
    let _ = writeln!(
        s,
        "nginx (`nginx -p DIR -e DIR/error.log -c DIR/nginx.conf`):\n\n```nginx\n{}```\n",
        peers::nginx_config(
            std::path::Path::new("DIR"),
            Some(std::path::Path::new(peers::NGINX_STREAM_MODULE)),
            a,
            b,
            env.workers
        )
    );
    let _ = writeln!(
        s,
        "The storm's lb (`lb run -c lb.toml`, `LB_LOG=info`; backends: `lb backend --listen 127.0.0.1:0 --id sN`; \
         users: `lb client --url ws://LB/ws --users N --json --duration 300s --user-prefix cK-`, started one process \
         at a time, each once the users so far are steady on the backends for 2 s):\n\n```toml\n{}```",
        storm::lb_config(
            a,
            "127.0.0.1:8001".parse().unwrap(),
            &[
                ("s1".into(), "127.0.0.1:9001".parse().unwrap()),
                ("s2".into(), "127.0.0.1:9002".parse().unwrap()),
                ("s3".into(), "127.0.0.1:9003".parse().unwrap()),
            ]
        )
    );
    s
}
