//! 5. Reconnect storm (lb only): WebSocket users (`lb client`, several processes) on three
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
}

fn lb_config(listen: SocketAddr, backends: &[(String, SocketAddr)]) -> String {
    let mut s = format!(
        "[[service]]\nname = \"storm\"\nlisten = \"{listen}\"\non_backend_down = \"close\"\n\n\
         [service.health]\ncheck = \"http\"\ninterval = \"1s\"\nfall = 2\ntimeout = \"500ms\"\n"
    );
    for (name, addr) in backends {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddr = \"{addr}\"\n"
        ));
    }
    s
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
    std::fs::write(&cfg, lb_config(listen, &named)).map_err(|e| e.to_string())?;
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
        fleet.push(Proc::spawn(&format!("client{}", c + 1), cmd).map_err(|e| e.to_string())?);
    }
    for f in fleet.iter_mut() {
        f.wait_line(&["users online after"], Duration::from_secs(60))
            .ok_or_else(|| format!("{}: not all users online within 60 s: {}", f.name, f.tail()))?;
    }
    let counts = |bs: &[(String, SocketAddr, Proc)]| -> Vec<Option<usize>> {
        bs.iter().map(|b| users_on(b.1)).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let before = loop {
        let c = counts(&backends);
        if c.iter().map(|x| x.unwrap_or(0)).sum::<usize>() >= total || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_millis(1000));
    let before: Vec<usize> = counts(&backends)
        .into_iter()
        .zip(before)
        .map(|(a, b)| a.or(b).unwrap_or(0))
        .collect();
    let online: usize = before.iter().sum();
    if online < total {
        return Err(format!(
            "only {online}/{total} users on the backends before the fault"
        ));
    }
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
    let t0 = Instant::now();
    backends[victim].2.signal(fault.signal());

    // Sample lb and the survivors every 100 ms until every user is back (+1 s), or 20 s.
    let mut samples: Vec<(f64, f64, Option<u64>, Vec<Option<usize>>)> = vec![];
    let mut all_back_at = None;
    let mut next = t0;
    loop {
        let t = t0.elapsed().as_secs_f64();
        let cpu = procs::cpu_secs(lb_pid);
        let rss = procs::rss_kib(lb_pid);
        let c: Vec<Option<usize>> = survivors.iter().map(|i| users_on(backends[*i].1)).collect();
        let sum: usize = c.iter().map(|x| x.unwrap_or(0)).sum();
        samples.push((t, cpu, rss, c));
        if sum >= total && all_back_at.is_none() {
            all_back_at = Some(t);
        }
        if all_back_at.is_some_and(|a| t > a + 1.0) || t > 20.0 {
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
        .find(|l| l.contains(&format!("backend {victim_id} is down")))
        .and_then(|l| line_ts(l))
        .map(|t| (t - t0_wall) * 1000.0);

    // lb's peak CPU (100 ms windows), peak RSS, and the survivors' peak session rate.
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let dt = b.0 - a.0;
        if dt <= 0.0 {
            continue;
        }
        run.peak_cpu_pct = run.peak_cpu_pct.max((b.1 - a.1) / dt * 100.0);
        for (x, y) in a.3.iter().zip(&b.3) {
            if let (Some(x), Some(y)) = (x, y) {
                run.peak_new_per_s = run.peak_new_per_s.max((*y as f64 - *x as f64) / dt);
            }
        }
    }
    let sampled_peak = samples.iter().filter_map(|s| s.2).max().unwrap_or(0);
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
            "lb peak CPU, % of one core (100 ms windows)",
            Box::new(|r: &Run| Some(r.peak_cpu_pct)),
            0,
        ),
        (
            "lb peak RSS, MiB",
            Box::new(|r: &Run| Some(r.peak_rss_mib)),
            1,
        ),
        (
            "peak new sessions/s on a surviving backend (100 ms windows)",
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
    rep.notes.push(
        "Storm: \"back online, ms after the fault\" is per displaced user, from the fault to its welcome on a live backend, \
         taken from the clients' timestamped log lines (`offline (was on sN)`, `back online on sM`), over all client \
         processes; the clients' own reconnect_ms (JSON summary) counts from when the client noticed, so it leaves out the \
         detection time of a hang. Users lost: the clients' users_never_back at the end, or a displaced user with no \
         back-online line. lb CPU: utime+stime from /proc/PID/stat sampled every 100 ms (10 ms tick resolution); RSS: VmHWM. \
         New sessions/s: lb has no admin API with per-backend totals yet, so the growth of each survivor's presence map \
         (`GET /users`, sampled every 100 ms) is used: WebSocket sessions welcomed per second, net of sessions closed."
            .into(),
    );
    Ok(())
}
