//! Scenario 5, the reconnect storm (lb only): WebSocket users (`lb client`, several processes) on three
//! `lb backend`s through lb; the busiest backend is SIGKILLed (or SIGSTOPped) and the
//! suite measures how long until every displaced user is back, how many never come back,
//! lb's peak CPU and memory, and the highest rate of new sessions a survivor saw.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Opts;
use crate::net::http_get;
use crate::peers::Env;
use crate::procs::{self, Proc, TempDir};
use crate::report::{Report, Status, Table, fmt_stat, pct, stat};
use crate::roles::parse_listening;

// The storm's health settings (the brief's): http checks, interval 1 s, fall 2, timeout 500 ms.
const INTERVAL_S: f64 = 1.0;
const FALL: f64 = 2.0;
const TIMEOUT_S: f64 = 0.5;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long after the fault users may take to come back (then the rest count as lost).
const WATCH_S: f64 = 20.0;
const CPU_WINDOW_S: f64 = 0.5;
const RATE_WINDOW_S: f64 = 0.1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    Kill,
    Stop,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::Stop => "SIGSTOP",
        }
    }
    fn signal(self) -> i32 {
        match self {
            Fault::Kill => libc::SIGKILL,
            Fault::Stop => libc::SIGSTOP,
        }
    }
    /// p99 limit on "back online after the fault", ms.
    fn limit_ms(self) -> f64 {
        match self {
            Fault::Kill => 3000.0,
            Fault::Stop => (FALL * INTERVAL_S + TIMEOUT_S + 1.0) * 1000.0,
        }
    }
}

#[derive(Debug, Default)]
struct Run {
    displaced: usize,
    /// Per displaced user that came back: ms from the fault to its welcome on a survivor.
    back_ms: Vec<f64>,
    /// Displaced users with no "back online" line (from the clients' logs).
    not_back: usize,
    /// Sum of the clients' users_never_back (JSON summaries).
    lost: usize,
    json_p50: Option<f64>,
    json_p99: Option<f64>,
    json_max: Option<f64>,
    detect_ms: Option<f64>,
    peak_cpu_pct: f64,
    peak_rss_mib: f64,
    peak_new_per_s: f64,
    /// lb health transitions to down during the ramp-up, before the fault.
    flaps_before: usize,
    /// lb health transitions of surviving backends to down after the fault.
    survivor_downs: usize,
    /// Failed connects by lb to the survivors after the fault (admin API).
    survivor_connect_errors: Option<f64>,
    rate_source: &'static str,
}

/// Waits until the backends hold `expected` users for 2 s in a row (at most 30 s);
/// returns the users per backend.
fn wait_steady(
    backends: &[(String, SocketAddr, Proc)],
    expected: usize,
) -> Result<Vec<usize>, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since: Option<Instant> = None;
    loop {
        let c: Vec<usize> = backends
            .iter()
            .map(|b| users_on(b.1).unwrap_or(0))
            .collect();
        let sum: usize = c.iter().sum();
        if sum == expected {
            let s = *since.get_or_insert_with(Instant::now);
            if s.elapsed() >= Duration::from_secs(2) {
                return Ok(c);
            }
        } else {
            since = None;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "users on the backends {c:?} = {sum}, not a steady {expected} within 30 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn lb_config(
    listen: SocketAddr,
    admin: SocketAddr,
    backends: &[(String, SocketAddr)],
) -> String {
    let mut s = format!(
        "[admin]\nlisten = \"{admin}\"\n\n\
         [[service]]\nname = \"storm\"\nlisten = \"{listen}\"\non_backend_down = \"close\"\n\n\
         [service.health]\ncheck = \"http\"\ninterval = \"1s\"\nfall = 2\ntimeout = \"500ms\"\n"
    );
    for (name, addr) in backends {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddr = \"{addr}\"\n"
        ));
    }
    s
}

type AdminView = HashMap<String, (u64, u64)>;

/// Per backend (by name): connections proxied ever (`total`) and failed connects by real
/// traffic, from lb's admin API (`GET /backends`); None if it does not answer.
fn admin_backends(admin: SocketAddr) -> Option<AdminView> {
    let body = http_get(admin, "/backends", Duration::from_millis(800)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut m = HashMap::new();
    for svc in v["services"].as_array()? {
        for b in svc["backends"].as_array()? {
            let e = &b["connect_errors"];
            let errs = ["refused", "timeout", "other"]
                .iter()
                .map(|k| e[*k].as_u64().unwrap_or(0))
                .sum();
            m.insert(
                b["name"].as_str()?.to_string(),
                (b["total"].as_u64()?, errs),
            );
        }
    }
    Some(m)
}

/// Users online on a backend (its presence map), or None if it did not answer.
fn users_on(addr: SocketAddr) -> Option<usize> {
    let body = http_get(addr, "/users", Duration::from_millis(800)).ok()?;
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&body)
        .ok()
        .map(|m| m.len())
}

/// Seconds since the epoch of a tracing timestamp such as `2026-12-03T16:52:38.436616Z`.
pub fn parse_ts(s: &str) -> Option<f64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.strip_suffix('Z')?.split(':');
    let (h, mi) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    Some(crate::days_from_civil(y, m, dd) as f64 * 86400.0 + h * 3600.0 + mi * 60.0 + sec)
}

fn line_ts(line: &str) -> Option<f64> {
    parse_ts(line.split_whitespace().next()?)
}

fn run_once(
    env: &Env,
    fault: Fault,
    clients: usize,
    per_client: usize,
    verbose_tag: &str,
) -> Result<Run, String> {
    let dir = TempDir::new("storm");
    // Three backends.
    let mut backends = vec![];
    for i in 1..=3 {
        let id = format!("s{i}");
        let mut cmd = Command::new(&env.lb);
        cmd.args(["backend", "--listen", "127.0.0.1:0", "--id", &id])
            .env("LB_LOG", "warn");
        let mut p = Proc::spawn(&id, cmd).map_err(|e| e.to_string())?;
        let line = p
            .wait_line(&["listening on"], Duration::from_secs(10))
            .ok_or_else(|| format!("backend {id} did not start: {}", p.tail()))?;
        let addr = parse_listening(&line).ok_or("cannot parse backend address")?;
        backends.push((id, addr, p));
    }
    let listen = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    let cfg = dir.path().join("lb.toml");
    let named: Vec<(String, SocketAddr)> =
        backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
    let admin = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    std::fs::write(&cfg, lb_config(listen, admin, &named)).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&env.lb);
    cmd.args(["run", "--no-watch", "-c"])
        .arg(&cfg)
        .env("LB_LOG", "info");
    let mut lb = Proc::spawn("lb", cmd).map_err(|e| e.to_string())?;
    lb.wait_line(&["ready"], Duration::from_secs(15))
        .ok_or_else(|| format!("lb not ready: {}", lb.tail()))?;

    // The users, in several processes.
    let total = clients * per_client;
    let mut fleet = vec![];
    for c in 0..clients {
        let mut cmd = Command::new(&env.lb);
        cmd.args([
            "client",
            "--url",
            &format!("ws://{listen}/ws"),
            "--users",
            &per_client.to_string(),
            "--json",
            "--duration",
            "300s",
            "--user-prefix",
            &format!("c{}-", c + 1),
        ])
        .env("LB_LOG", "info");
        let mut f = Proc::spawn(&format!("client{}", c + 1), cmd).map_err(|e| e.to_string())?;
        // One client process at a time, each once the users so far are steady: a client
        // ramps its users over 1 s, and thousands of connects in the same second overflow
        // the backends' accept queues on 2 cores (see the notes).
        f.wait_line(&["users online after"], Duration::from_secs(60))
            .ok_or_else(|| format!("{}: not all users online within 60 s: {}", f.name, f.tail()))?;
        fleet.push(f);
        wait_steady(&backends, (c + 1) * per_client)
            .map_err(|e| format!("ramp-up, after client {}: {e}", c + 1))?;
    }
    let before = wait_steady(&backends, total).map_err(|e| format!("before the fault: {e}"))?;
    let flaps_before = lb
        .stderr()
        .iter()
        .filter(|l| l.contains(" is down "))
        .count();
    let victim = (0..3).max_by_key(|i| before[*i]).unwrap();
    let victim_id = backends[victim].0.clone();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    eprintln!(
        "  storm {verbose_tag}: {total} users online {before:?}; {} to {victim_id}",
        fault.name()
    );

    // The fault.
    let lb_pid = lb.pid();
    let t0_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let admin_before = admin_backends(admin);
    let t0 = Instant::now();
    backends[victim].2.signal(fault.signal());

    // Sample lb and the survivors every 100 ms until every user is back (+1 s), or 20 s.
    // lb: (t, CPU s, RSS KiB); each survivor: (t when its answer came, users).
    let mut lb_samples: Vec<(f64, f64, Option<u64>)> = vec![];
    let mut surv_samples: Vec<Vec<(f64, usize)>> = vec![vec![]; survivors.len()];
    let mut admin_samples: Vec<(f64, AdminView)> = vec![];
    let mut all_back_at = None;
    let mut next = t0;
    loop {
        let t = t0.elapsed().as_secs_f64();
        lb_samples.push((t, procs::cpu_secs(lb_pid), procs::rss_kib(lb_pid)));
        let mut sum = 0;
        for (k, i) in survivors.iter().enumerate() {
            if let Some(n) = users_on(backends[*i].1) {
                surv_samples[k].push((t0.elapsed().as_secs_f64(), n));
                sum += n;
            }
        }
        if let Some(m) = admin_backends(admin) {
            admin_samples.push((t0.elapsed().as_secs_f64(), m));
        }
        if sum >= total && all_back_at.is_none() {
            all_back_at = Some(t);
        }
        if all_back_at.is_some_and(|a| t > a + 1.0) || t > WATCH_S {
            break;
        }
        next += SAMPLE_EVERY;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let hwm = procs::hwm_kib(lb_pid);

    // Stop the users; read their summaries.
    for f in &fleet {
        f.signal(libc::SIGTERM);
    }
    let mut run = Run {
        displaced: before[victim],
        flaps_before,
        ..Run::default()
    };
    let (mut p50s, mut p99s, mut maxs) = (vec![], vec![], vec![]);
    for f in fleet.iter_mut() {
        if f.wait_exit(Duration::from_secs(20)).is_none() {
            return Err(format!("{} did not stop within 20 s", f.name));
        }
        let json = f
            .stdout()
            .into_iter()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or_else(|| format!("{}: no JSON summary: {}", f.name, f.tail()))?;
        let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
        run.lost += v["users_never_back"].as_u64().unwrap_or(0) as usize;
        let r = &v["reconnect_ms"];
        p50s.extend(r["p50"].as_f64());
        p99s.extend(r["p99"].as_f64());
        maxs.extend(r["max"].as_f64());
    }
    // Per process percentiles cannot be merged exactly: the worst process is shown.
    let worst = |v: &[f64]| v.iter().copied().reduce(f64::max);
    run.json_p50 = worst(&p50s);
    run.json_p99 = worst(&p99s);
    run.json_max = worst(&maxs);

    // Fault -> back, per displaced user, from the clients' timestamped log lines.
    let victim_tag = format!("(was on {victim_id})");
    let mut displaced: HashMap<String, Option<f64>> = HashMap::new();
    for f in &fleet {
        let lines = f.stderr();
        for l in &lines {
            if let Some(i) = l.find(" offline ")
                && l.contains(&victim_tag)
                && line_ts(l).is_some_and(|t| t >= t0_wall)
            {
                let name = l[..i].split_whitespace().last().unwrap_or("").to_string();
                displaced.entry(name).or_insert(None);
            }
        }
        for l in &lines {
            if let Some(i) = l.find(" back online on ")
                && let Some(t) = line_ts(l).filter(|t| *t >= t0_wall)
            {
                let name = l[..i].split_whitespace().last().unwrap_or("");
                if let Some(slot) = displaced.get_mut(name)
                    && slot.is_none()
                {
                    *slot = Some((t - t0_wall) * 1000.0);
                }
            }
        }
    }
    let mut back: Vec<f64> = displaced.values().flatten().copied().collect();
    back.sort_by(f64::total_cmp);
    run.not_back = displaced.values().filter(|v| v.is_none()).count();
    run.back_ms = back;
    if displaced.len() != run.displaced {
        eprintln!(
            "  storm {verbose_tag}: {} users were on {victim_id}, {} logged going offline from it",
            run.displaced,
            displaced.len()
        );
    }
    run.detect_ms = lb
        .stderr()
        .iter()
        .filter(|l| l.contains(&format!("backend {victim_id} is down")))
        .filter_map(|l| line_ts(l))
        .find(|t| *t >= t0_wall)
        .map(|t| (t - t0_wall) * 1000.0);
    // Health transitions after the fault: a survivor marked down means a cascade.
    let mut shown = 0;
    for l in lb.stderr() {
        let Some(t) = line_ts(&l).filter(|t| *t >= t0_wall) else {
            continue;
        };
        if l.contains(" is down ") || l.contains(" is up ") {
            if l.contains(" is down ") && !l.contains(&format!("backend {victim_id} is down")) {
                run.survivor_downs += 1;
            }
            if shown < 12 {
                let msg = l.split_once(" INFO ").map_or(l.as_str(), |x| x.1);
                eprintln!("    +{:>6.0} ms  lb: {msg}", (t - t0_wall) * 1000.0);
                shown += 1;
            }
        }
    }

    // lb's peak CPU and the survivors' peak session rate, over the shortest windows of at
    // least CPU_WINDOW_S / RATE_WINDOW_S between samples.
    let peak = |series: &[(f64, f64)], min_dt: f64| -> f64 {
        let mut best: f64 = 0.0;
        for (i, a) in series.iter().enumerate() {
            if let Some(b) = series[i + 1..].iter().find(|b| b.0 - a.0 >= min_dt) {
                best = best.max((b.1 - a.1) / (b.0 - a.0));
            }
        }
        best
    };
    let cpu: Vec<(f64, f64)> = lb_samples.iter().map(|s| (s.0, s.1)).collect();
    run.peak_cpu_pct = peak(&cpu, CPU_WINDOW_S) * 100.0;
    // New connections per survivor: lb's own per-backend totals when the admin API
    // answers; else the growth of the survivors' presence maps.
    run.rate_source = if admin_samples.len() >= 2 {
        "lb admin API: per-backend total"
    } else {
        "survivors' GET /users growth"
    };
    for (k, i) in survivors.iter().enumerate() {
        let v: Vec<(f64, f64)> = if admin_samples.len() >= 2 {
            let name = &backends[*i].0;
            admin_samples
                .iter()
                .filter_map(|(t, m)| Some((*t, m.get(name)?.0 as f64)))
                .collect()
        } else {
            surv_samples[k].iter().map(|s| (s.0, s.1 as f64)).collect()
        };
        run.peak_new_per_s = run.peak_new_per_s.max(peak(&v, RATE_WINDOW_S));
    }
    if let (Some(b), Some((_, a))) = (&admin_before, admin_samples.last()) {
        let errs = survivors
            .iter()
            .map(|i| {
                let n = &backends[*i].0;
                a.get(n)
                    .map_or(0, |x| x.1)
                    .saturating_sub(b.get(n).map_or(0, |x| x.1))
            })
            .sum::<u64>();
        run.survivor_connect_errors = Some(errs as f64);
    }
    let sampled_peak = lb_samples.iter().filter_map(|s| s.2).max().unwrap_or(0);
    run.peak_rss_mib = hwm.unwrap_or(sampled_peak).max(sampled_peak) as f64 / 1024.0;
    eprintln!(
        "  storm {verbose_tag}: {} displaced, back p50 {:?} p99 {:?} max {:?} ms after the fault, {} lost; lb down after {:?} ms",
        run.displaced,
        pct(&run.back_ms, 50.0).map(|x| x.round()),
        pct(&run.back_ms, 99.0).map(|x| x.round()),
        run.back_ms.last().map(|x| x.round()),
        run.lost,
        run.detect_ms.map(|x| x.round())
    );
    // Children are killed on drop (the stopped one gets SIGCONT first), then the dir goes.
    drop(fleet);
    drop(lb);
    drop(backends);
    Ok(run)
}

pub fn storm(env: &Env, opts: &Opts, rep: &mut Report) -> Result<(), String> {
    let (clients, per_client) = if opts.quick { (1, 1000) } else { (3, 3000) };
    let runs = opts.runs.unwrap_or(if opts.quick { 1 } else { 3 });
    let faults = [Fault::Kill, Fault::Stop];
    let mut results: BTreeMap<usize, Vec<Run>> = BTreeMap::new();
    for run in 0..runs {
        for (fi, f) in faults.iter().enumerate() {
            let tag = format!("{} run {}/{runs}", f.name(), run + 1);
            match run_once(env, *f, clients, per_client, &tag) {
                Ok(r) => results.entry(fi).or_default().push(r),
                Err(e) => rep.errors.push(format!("storm {tag}: {e}")),
            }
            // Sockets of the last run (TIME_WAIT, orphans) settle before the next.
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let total = clients * per_client;
    let fmt = |rs: &[Run], f: &dyn Fn(&Run) -> Option<f64>, prec: usize| -> String {
        let v: Vec<f64> = rs.iter().filter_map(f).collect();
        match stat(&v) {
            Some(s) => fmt_stat(&s, prec),
            None => "—".into(),
        }
    };
    type Metric<'a> = (&'a str, Box<dyn Fn(&Run) -> Option<f64>>, usize);
    let metrics: Vec<Metric> = vec![
        (
            "lb marked a backend down during the ramp-up (before the fault)",
            Box::new(|r: &Run| Some(r.flaps_before as f64)),
            0,
        ),
        (
            "lb marked a surviving backend down after the fault",
            Box::new(|r: &Run| Some(r.survivor_downs as f64)),
            0,
        ),
        (
            "lb's failed connects to survivors after the fault",
            Box::new(|r: &Run| r.survivor_connect_errors),
            0,
        ),
        (
            "users displaced (on the faulted backend)",
            Box::new(|r: &Run| Some(r.displaced as f64)),
            0,
        ),
        (
            "lb marked it down, ms after the fault",
            Box::new(|r: &Run| r.detect_ms),
            0,
        ),
        (
            "back online p50, ms after the fault",
            Box::new(|r: &Run| pct(&r.back_ms, 50.0)),
            0,
        ),
        (
            "back online p99, ms after the fault",
            Box::new(|r: &Run| pct(&r.back_ms, 99.0)),
            0,
        ),
        (
            "back online max, ms after the fault",
            Box::new(|r: &Run| r.back_ms.last().copied()),
            0,
        ),
        (
            "clients' reconnect_ms p50 (worst process)",
            Box::new(|r: &Run| r.json_p50),
            0,
        ),
        (
            "clients' reconnect_ms p99 (worst process)",
            Box::new(|r: &Run| r.json_p99),
            0,
        ),
        (
            "clients' reconnect_ms max",
            Box::new(|r: &Run| r.json_max),
            0,
        ),
        (
            "users lost (users_never_back, all clients)",
            Box::new(|r: &Run| Some(r.lost as f64)),
            0,
        ),
        (
            "lb peak CPU, % of one core (500 ms windows)",
            Box::new(|r: &Run| Some(r.peak_cpu_pct)),
            0,
        ),
        (
            "lb peak RSS, MiB",
            Box::new(|r: &Run| Some(r.peak_rss_mib)),
            1,
        ),
        (
            "peak new connections/s to a surviving backend (100 ms windows)",
            Box::new(|r: &Run| Some(r.peak_new_per_s)),
            0,
        ),
    ];
    let mut rows = vec![];
    for (name, f, prec) in &metrics {
        let mut row = vec![name.to_string()];
        for fi in 0..faults.len() {
            row.push(fmt(
                results.get(&fi).map_or(&[][..], |v| v),
                f.as_ref(),
                *prec,
            ));
        }
        rows.push(row);
    }
    let mut target_row = vec!["target".to_string()];
    let mut status_row = vec!["status".to_string()];
    for (fi, f) in faults.iter().enumerate() {
        let rs = results.get(&fi).map_or(&[][..], |v| v);
        let what = format!(
            "storm, {} ({total} users): all back, 0 lost, p99 ≤ {:.1} s{}",
            f.name(),
            f.limit_ms() / 1000.0,
            if *f == Fault::Stop {
                " (fall x interval + timeout + 1 s)"
            } else {
                ""
            }
        );
        target_row.push(format!(
            "all back, 0 lost, p99 ≤ {:.1} s",
            f.limit_ms() / 1000.0
        ));
        let status = if rs.is_empty() {
            Status::Na("no run completed".into())
        } else {
            let p99 = stat(
                &rs.iter()
                    .filter_map(|r| pct(&r.back_ms, 99.0))
                    .collect::<Vec<_>>(),
            )
            .map(|s| s.med);
            let lost = rs.iter().map(|r| r.lost.max(r.not_back)).max().unwrap_or(0);
            let ok = lost == 0 && p99.is_some_and(|p| p <= f.limit_ms());
            let st = Status::of(ok);
            rep.verdict(
                &what,
                st.clone(),
                format!(
                    "p99 {} ms (median of {}), lost {} (worst run)",
                    p99.map_or("—".into(), |p| format!("{p:.0}")),
                    rs.len(),
                    lost
                ),
            );
            st
        };
        status_row.push(status.text());
    }
    rows.push(target_row);
    rows.push(status_row);
    rep.tables.push(Table {
        title: format!(
            "Reconnect storm (lb only): {total} WebSocket users ({clients} x `lb client --users {per_client}`) on 3 `lb backend`s \
             through lb (http checks, interval 1s, fall 2, timeout 500ms, on_backend_down = \"close\"); the busiest backend is \
             faulted. Median [min–max] of {runs} run(s)."
        ),
        headers: vec!["metric".into(), "SIGKILL".into(), "SIGSTOP".into()],
        rows,
    });
    let mut sources: Vec<&str> = results.values().flatten().map(|r| r.rate_source).collect();
    sources.sort();
    sources.dedup();
    if !sources.is_empty() {
        rep.notes.push(format!(
            "Storm: new connections/s measured from: {}.",
            sources.join("; ")
        ));
    }
    rep.notes.push(
        "Storm: \"back online, ms after the fault\" is per displaced user, from the fault to its welcome on a live backend, \
         taken from the clients' timestamped log lines (`offline (was on sN)`, `back online on sM`), over all client \
         processes; the clients' own reconnect_ms (JSON summary) counts from when the client noticed, so it leaves out the \
         detection time of a hang. Users lost: the clients' users_never_back when they are stopped (1 s after every user is \
         back, or 20 s after the fault), or a displaced user with no back-online line. lb CPU: utime+stime from \
         /proc/PID/stat sampled every 100 ms, peak over windows of 500 ms (the counters tick every 10 ms); RSS: VmHWM. \
         New connections/s to a survivor: lb's admin API (`[admin]` on, `GET /backends` sampled every 100 ms), the \
         growth of each surviving backend's `total` (connections lb established to it); if the admin API does not \
         answer, the growth of the survivor's presence map (`GET /users`) instead. Failed connects: the growth of the \
         survivors' `connect_errors` (refused + timeout + other) from just before the fault to the end.".into(),
    );
    Ok(())
}
