//! `lb demo`: the whole failure/reconnect path on loopback, measured.
//!
//! Backends run as child processes of this same binary (so a fault is a real signal to
//! a real process); the balancer and the client fleet run in this process, so every
//! moment (fault, mark-down, each user's return) is read off one clock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::balancer::BackendState;
use crate::config::{
    BackendConfig, Balance, CheckKind, Config, HealthConfig, OnBackendDown, OnRemoval,
    ServiceConfig,
};
use crate::server::Balancer;
use crate::ws::client::{ClientOpts, Fleet};

/// The fault injected into the busiest backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL: the process dies, its kernel resets every connection.
    Kill,
    /// SIGSTOP: the process hangs, its sockets stay open; only checks and heartbeats tell.
    Hang,
}

/// Command-line arguments of `lb demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of bundled backends to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=64))]
    pub backends: u16,
    /// Number of simulated users.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// What happens to the busiest backend.
    #[arg(long, value_enum, default_value_t = Fault::Kill)]
    pub fault: Fault,
    /// Health check interval of the demo balancer.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Every user must be back on a live backend within this time after the fault.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Client heartbeat (WebSocket ping) period.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// A pong missing this long marks a connection dead.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub pong_timeout: Duration,
}

/// Child backend processes; SIGCONT + SIGKILL on drop so none is left behind.
struct Backends {
    children: Vec<(String, SocketAddr, Child)>,
}

impl Backends {
    async fn spawn(n: u16, secret: &str) -> anyhow::Result<Backends> {
        let exe: PathBuf = std::env::current_exe().context("cannot find this executable")?;
        let mut children = Vec::new();
        for i in 1..=n {
            let id = format!("s{i}");
            let mut cmd = Command::new(&exe);
            cmd.args([
                "backend",
                "--listen",
                "127.0.0.1:0",
                "--id",
                &id,
                "--secret",
                secret,
            ])
            .env("LB_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
            // Even if the demo itself is killed, its backends must not outlive it.
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory
            // of the parent; it is all the child runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
                });
            }
            let mut child = cmd
                .spawn()
                .with_context(|| format!("cannot start backend {id}"))?;
            let stdout = child.stdout.take().context("no stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .with_context(|| format!("backend {id} did not start in 10 s"))??
                .with_context(|| format!("backend {id} exited at start"))?;
            let addr: SocketAddr = line
                .rsplit("listening on ")
                .next()
                .and_then(|s| s.trim().parse().ok())
                .with_context(|| format!("backend {id} said {line:?}"))?;
            children.push((id, addr, child));
        }
        Ok(Backends { children })
    }

    fn pid(&self, id: &str) -> Option<Pid> {
        self.children
            .iter()
            .find(|(i, _, _)| i == id)
            .and_then(|(_, _, c)| c.id())
            .map(|p| Pid::from_raw(p as i32))
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.children {
            if let Some(pid) = child.id() {
                // A stopped process would take SIGKILL too, but SIGCONT first is kinder
                // to anything watching it (and is what an operator would do).
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
            }
            let _ = child.start_kill();
        }
    }
}

fn demo_config(args: &DemoArgs, backends: &Backends) -> Config {
    let health = HealthConfig {
        check: CheckKind::Http,
        path: "/healthz".into(),
        interval: args.interval,
        fast_interval: (args.interval / 4).max(Duration::from_millis(50)),
        timeout: (args.interval / 2).max(Duration::from_millis(100)),
        rise: 2,
        fall: 2,
    };
    Config {
        path: PathBuf::from("(demo)"),
        admin: None,
        services: vec![ServiceConfig {
            name: "chat".into(),
            listen: "127.0.0.1:0".parse().expect("literal address"),
            balance: Balance::LeastConn,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3600),
            retries: 2,
            drain_timeout: Duration::from_secs(1),
            on_backend_down: OnBackendDown::Close,
            on_removal: OnRemoval::Drain,
            panic_threshold: crate::config::defaults::PANIC_THRESHOLD,
            max_connections: 100_000,
            health,
            backends: backends
                .children
                .iter()
                .map(|(id, addr, _)| BackendConfig {
                    name: id.clone(),
                    addr: *addr,
                    weight: 1,
                })
                .collect(),
        }],
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// The p-th percentile (0..=100) of sorted `v`, nearest rank.
fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Entry point of `lb demo`.
pub async fn main(args: DemoArgs) -> anyhow::Result<()> {
    let secret = crate::ws::token::DEFAULT_SECRET.to_string();
    println!(
        "lb demo: {} backends, {} users, fault = {:?}, health check http every {:?} (fall 2, rise 2)",
        args.backends, args.clients, args.fault, args.interval
    );
    let backends = Backends::spawn(args.backends, &secret).await?;
    for (id, addr, _) in &backends.children {
        println!(
            "  backend {id} on {addr} (pid {})",
            backends.pid(id).map(|p| p.as_raw()).unwrap_or(0)
        );
    }

    let config = demo_config(&args, &backends);
    let listeners = crate::server::bind_all(&config)?;
    let balancer = Balancer::start(config, listeners).await;
    let lb_addr = balancer.local_addrs()[0];
    let mut transitions = balancer.subscribe();
    println!("  balancer on {lb_addr} (least-conn, on_backend_down = close)");

    let fleet = Fleet::start(ClientOpts {
        url: format!("ws://{lb_addr}/ws"),
        users: args.clients,
        heartbeat: args.heartbeat,
        pong_timeout: args.pong_timeout,
        secret: secret.clone(),
        user_prefix: "user-".into(),
        connect_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(5),
    });

    // Ctrl-C or SIGTERM ends the demo early, still cleaning up every child.
    let outcome = tokio::select! {
        r = run_scenario(&args, &backends, &balancer, &fleet, &mut transitions) => r,
        () = crate::shutdown::signal() => Err(anyhow::anyhow!("interrupted")),
    };

    let _ = fleet.stop().await;
    balancer.shutdown().await;
    drop(backends);
    outcome
}

async fn run_scenario(
    args: &DemoArgs,
    backends: &Backends,
    balancer: &Balancer,
    fleet: &Fleet,
    transitions: &mut tokio::sync::broadcast::Receiver<crate::balancer::Transition>,
) -> anyhow::Result<()> {
    // 1. Everyone online.
    let start = Instant::now();
    while fleet.online_count() < args.clients {
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "only {}/{} users came online in 30 s",
                fleet.online_count(),
                args.clients
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = fleet.online_by_server();
    println!(
        "\nall {} users online after {} ms: {}",
        args.clients,
        ms(start.elapsed()),
        fmt_counts(&before)
    );

    // 2. The busiest backend gets the fault.
    let (victim, victim_users) = before
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, n)| (s.clone(), *n))
        .context("no users online")?;
    let pid = backends.pid(&victim).context("victim backend has no pid")?;
    let affected: Vec<String> = fleet
        .users()
        .into_iter()
        .filter(|u| u.server.as_deref() == Some(victim.as_str()))
        .map(|u| u.name)
        .collect();
    while transitions.try_recv().is_ok() {}
    let signal = match args.fault {
        Fault::Kill => Signal::SIGKILL,
        Fault::Hang => Signal::SIGSTOP,
    };
    let t0 = Instant::now();
    kill(pid, signal).with_context(|| format!("cannot signal backend {victim}"))?;
    println!(
        "\nT0        {signal:?} to backend {victim} (pid {pid}), which holds {victim_users} users"
    );

    // 3. Watch: the balancer's verdict and every affected user's return.
    let deadline = t0 + args.deadline;
    let mut marked_down: Option<(Duration, String)> = None;
    let mut back: BTreeMap<String, Duration> = BTreeMap::new();
    loop {
        while let Ok(t) = transitions.try_recv() {
            if *t.backend == *victim && t.to == BackendState::Down && marked_down.is_none() {
                let at = Instant::from_std(t.at).saturating_duration_since(t0);
                marked_down = Some((at, t.reason.clone()));
            }
        }
        for u in fleet.users() {
            if back.contains_key(&u.name) || !affected.contains(&u.name) {
                continue;
            }
            if let (Some(server), Some(since)) = (&u.server, u.online_since) {
                let since = Instant::from_std(since);
                if *server != victim && since > t0 {
                    back.insert(u.name.clone(), since - t0);
                }
            }
        }
        let all_back = back.len() == affected.len() && fleet.online_count() == args.clients;
        if (all_back && marked_down.is_some()) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 4. The timeline, in time order.
    let mut times: Vec<Duration> = back.values().copied().collect();
    times.sort();
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    if let Some((at, reason)) = &marked_down {
        timeline.push((*at, format!("balancer marked {victim} down ({reason})")));
    }
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        timeline.push((*first, "first user back online".into()));
        timeline.push((
            percentile(&times, 50.0),
            "half of the users back online".into(),
        ));
        timeline.push((*last, format!("all {} users back online", times.len())));
    }
    timeline.sort_by_key(|(at, _)| *at);
    for (at, what) in &timeline {
        println!("+{:>6} ms {what}", ms(*at));
    }
    let lost = affected.len() - back.len();
    let after = fleet.online_by_server();
    println!("\nfailover of {} users from {victim}:", affected.len());
    println!(
        "  balancer marked it down at: {}",
        marked_down
            .as_ref()
            .map_or("never (within the deadline)".to_string(), |(d, _)| format!(
                "+{} ms",
                ms(*d)
            ))
    );
    println!(
        "  back online after fault:    p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 95.0)),
        ms(percentile(&times, 99.0)),
        ms(percentile(&times, 100.0)),
    );
    println!("  users per server after:     {}", fmt_counts(&after));
    let presence = registered_users(backends, &victim).await;
    println!("  presence registries say:    {}", fmt_counts(&presence));
    println!("  users lost:                 {lost}");

    let on_victim = after.get(&victim).copied().unwrap_or(0);
    if lost > 0 || on_victim > 0 || fleet.online_count() < args.clients {
        bail!(
            "{lost} user(s) not back within {:?}; {on_victim} still on {victim}; {}/{} online",
            args.deadline,
            fleet.online_count(),
            args.clients
        );
    }
    if marked_down.is_none() {
        bail!("the balancer never marked {victim} down");
    }
    let (healthy, total) = balancer.healthy_count();
    println!("\nOK: every user is back on a live backend ({healthy}/{total} backends up).");
    Ok(())
}

/// Users per server as the backends' own presence registries report them (GET /users),
/// skipping the faulted one.
async fn registered_users(backends: &Backends, skip: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (id, addr, _) in &backends.children {
        if id == skip {
            continue;
        }
        let got = tokio::time::timeout(
            Duration::from_secs(2),
            crate::httpc::get(*addr, "/users", 16 * 1024 * 1024),
        )
        .await;
        let n = match got {
            Ok(Ok((200, body))) => serde_json::from_slice::<BTreeMap<String, String>>(&body)
                .map(|m| m.len())
                .unwrap_or(0),
            _ => 0,
        };
        out.insert(id.clone(), n);
    }
    out
}

fn fmt_counts(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}
