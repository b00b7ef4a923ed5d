//! Scenarios 1-4, each lb vs HAProxy vs nginx (and a direct connection as the baseline),
//! interleaved run by run so that a noisy moment on the machine hits every peer alike.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::Opts;
use crate::net;
use crate::peers::{self, Env, Peer, Proxy};
use crate::procs::{self, Proc};
use crate::report::{Cell, Report, Row, Status, fmt_num};
use crate::roles;

/// Where a measurement goes: straight to the backend, or through a proxy.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Via {
    Direct,
    P(Peer),
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::P(p) => p.name(),
        }
    }
}

/// Starts a helper role child; returns it and its address.
pub fn start_role(role: &str) -> Result<(Proc, SocketAddr), String> {
    let mut p = Proc::spawn(role, roles::spawn_cmd(role)).map_err(|e| e.to_string())?;
    let line = p
        .wait_line(&["listening on"], Duration::from_secs(10))
        .ok_or_else(|| format!("{role} helper did not start: {}", p.tail()))?;
    let addr = roles::parse_listening(&line).ok_or("cannot parse helper address")?;
    Ok((p, addr))
}

/// Starts every present peer in front of `backend`; a peer that fails to start is
/// reported and left out.
fn start_peers(env: &Env, backend: SocketAddr, rep: &mut Report, what: &str) -> Vec<Proxy> {
    let mut v = vec![];
    for p in env.present() {
        match peers::start(env, p, backend) {
            Ok(px) => v.push(px),
            Err(e) => rep
                .errors
                .push(format!("{what}: {} did not start: {e}", p.name())),
        }
    }
    v
}

fn targets(proxies: &[Proxy]) -> Vec<(Via, SocketAddr)> {
    proxies.iter().map(|p| (Via::P(p.peer), p.addr)).collect()
}

/// A row's peer cells from per-run samples; absent peers get the reason.
fn fill(row: &mut Row, env: &Env, samples: &BTreeMap<Via, Vec<f64>>, ran: &[Peer]) {
    if let Some(v) = samples.get(&Via::Direct) {
        row.direct = Some(Cell::from_runs(v, "failed"));
    }
    for p in Peer::ALL {
        let cell = match env.missing(p) {
            Some(why) => Cell::Skip(short(&why)),
            None if !ran.contains(&p) => Cell::Skip("did not start".into()),
            None => Cell::from_runs(samples.get(&Via::P(p)).map_or(&[][..], |v| v), "failed"),
        };
        row.peers.insert(p, cell);
    }
}

fn short(why: &str) -> String {
    if why.starts_with("not installed") {
        "not installed".into()
    } else if why.starts_with("not selected") {
        "not selected".into()
    } else {
        why.split('(').next().unwrap_or(why).trim().to_string()
    }
}

/// Met, or not met (telling apart a miss within the runs' spread, when `overlap` says so).
fn verdict(ok: bool, overlap: impl Fn() -> Option<bool>) -> Status {
    match (ok, overlap()) {
        (true, _) => Status::Met,
        (false, Some(true)) => Status::NotMetWithinSpread,
        (false, _) => Status::NotMet,
    }
}

/// `lb ≥ k × peer` on medians (higher is better).
fn at_least(row: &Row, env: &Env, peer: Peer, k: f64) -> (Status, String) {
    match (row.med(Peer::Lb), row.med(peer)) {
        (Some(a), Some(b)) if b > 0.0 => (
            verdict(a >= k * b, || {
                let (lo, hi) = (row.range(Peer::Lb)?, row.range(peer)?);
                Some(lo.1 >= k * hi.0)
            }),
            format!(
                "lb {} vs {} {} = {:.2}x",
                fmt_num(a, row.prec),
                peer.name(),
                fmt_num(b, row.prec),
                a / b
            ),
        ),
        _ => (
            Status::Na(match env.missing(peer) {
                Some(w) => format!("{} {}", peer.name(), short(&w)),
                None => "no figure".into(),
            }),
            String::new(),
        ),
    }
}

/// `lb ≤ peer` on medians (lower is better).
fn at_most(row: &Row, env: &Env, peer: Peer, strict: bool) -> (Status, String) {
    match (row.med(Peer::Lb), row.med(peer)) {
        (Some(a), Some(b)) => (
            verdict(if strict { a < b } else { a <= b }, || {
                let (l, p) = (row.range(Peer::Lb)?, row.range(peer)?);
                Some(l.0 <= p.1)
            }),
            format!(
                "lb {} vs {} {}",
                fmt_num(a, row.prec),
                peer.name(),
                fmt_num(b, row.prec)
            ),
        ),
        _ => (
            Status::Na(match env.missing(peer) {
                Some(w) => format!("{} {}", peer.name(), short(&w)),
                None => "no figure".into(),
            }),
            String::new(),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Bulk throughput

/// One bulk measurement: (Gbit/s, bytes).
fn bulk_once(
    env: &Env,
    backend_port: u16,
    via: SocketAddr,
    streams: usize,
    secs: u64,
) -> Result<(f64, u64), String> {
    let Some(iperf) = &env.iperf3 else {
        let (bytes, s) = net::bulk_own(via, streams, Duration::from_secs(secs))?;
        return Ok((bytes as f64 * 8.0 / s / 1e9, bytes));
    };
    // A fresh one-off server per measurement: no state carried over from a failed run.
    let mut server = Command::new(iperf);
    server.args([
        "-s",
        "-1",
        "-B",
        "127.0.0.1",
        "-p",
        &backend_port.to_string(),
    ]);
    let mut server = Proc::spawn("iperf3-s", server).map_err(|e| e.to_string())?;
    procs::wait_listening(&mut server, backend_port, Duration::from_secs(5))?;
    let mut client = Command::new(iperf);
    client.args([
        "-c",
        &via.ip().to_string(),
        "-p",
        &via.port().to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    let mut client = Proc::spawn("iperf3-c", client).map_err(|e| e.to_string())?;
    if client.wait_exit(Duration::from_secs(secs + 20)).is_none() {
        return Err("iperf3 client did not finish in time".into());
    }
    let _ = server.wait_exit(Duration::from_secs(3));
    let json = client.stdout().join("\n");
    let v: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| format!("iperf3 output: {e}: {}", client.tail()))?;
    if let Some(e) = v.get("error") {
        return Err(format!("iperf3: {e}"));
    }
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .ok_or("no end.sum_received in iperf3 output")?;
    let bytes = sum["bytes"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, bytes))
}

pub fn bulk(env: &Env, opts: &Opts, rep: &mut Report) -> Result<(), String> {
    let secs = if opts.quick { 2 } else { 10 };
    let runs = opts.runs.unwrap_or(if opts.quick { 2 } else { 3 });
    // iperf3 runs as a one-off server per measurement on a fixed port; without it, a sink.
    let (_sink, backend) = if env.iperf3.is_some() {
        (None, SocketAddr::from(([127, 0, 0, 1], procs::free_port())))
    } else {
        let (p, a) = start_role("sink")?;
        (Some(p), a)
    };
    let proxies = start_peers(env, backend, rep, "bulk");
    let ran: Vec<Peer> = proxies.iter().map(|p| p.peer).collect();
    let mut vias = vec![(Via::Direct, backend)];
    vias.extend(targets(&proxies));
    let stream_counts: &[usize] = if opts.quick { &[1] } else { &[1, 8] };
    for &streams in [1usize, 8].iter() {
        let label = if streams == 1 {
            "bulk, 1 stream".to_string()
        } else {
            format!("bulk, {streams} streams")
        };
        let mut row = Row::new(&label, &format!("Gbit/s ({secs} s)"), 2);
        let mut cpu_row = Row::new(&label, "proxy CPU s per GB", 3);
        if !stream_counts.contains(&streams) {
            let skip = Cell::Skip("quick mode".into());
            row.direct = Some(skip.clone());
            for p in Peer::ALL {
                row.peers.insert(p, skip.clone());
                cpu_row.peers.insert(p, skip.clone());
            }
            row.target = "≥ 1.0x haproxy, ≥ 1.5x nginx".into();
            row.status = Some(Status::Na("quick mode".into()));
            rep.rows.push(row);
            rep.rows.push(cpu_row);
            continue;
        }
        let mut gbps: BTreeMap<Via, Vec<f64>> = BTreeMap::new();
        let mut cpu: BTreeMap<Via, Vec<f64>> = BTreeMap::new();
        for run in 0..runs {
            for &(via, addr) in &vias {
                let proxy = proxies.iter().find(|p| Via::P(p.peer) == via);
                let cpu0 = proxy.map(Proxy::cpu_secs);
                let mut r = bulk_once(env, backend.port(), addr, streams, secs);
                if r.is_err() {
                    std::thread::sleep(Duration::from_secs(1));
                    r = bulk_once(env, backend.port(), addr, streams, secs);
                }
                match r {
                    Ok((g, bytes)) => {
                        eprintln!(
                            "  {label} run {}/{runs} {:<8} {g:.2} Gbit/s",
                            run + 1,
                            via.name()
                        );
                        gbps.entry(via).or_default().push(g);
                        if let (Some(c0), Some(p)) = (cpu0, proxy)
                            && bytes > 0
                        {
                            cpu.entry(via)
                                .or_default()
                                .push((p.cpu_secs() - c0) / (bytes as f64 / 1e9));
                        }
                    }
                    Err(e) => {
                        rep.errors
                            .push(format!("{label}, {} run {}: {e}", via.name(), run + 1))
                    }
                }
            }
        }
        fill(&mut row, env, &gbps, &ran);
        fill(&mut cpu_row, env, &cpu, &ran);
        cpu_row.direct = None;
        row.target = "≥ 1.0x haproxy, ≥ 1.5x nginx".into();
        let (s1, e1) = at_least(&row, env, Peer::Haproxy, 1.0);
        let (s2, e2) = at_least(&row, env, Peer::Nginx, 1.5);
        rep.verdict(
            &format!("{label}: lb ≥ 1.0x HAProxy (splice)"),
            s1.clone(),
            e1,
        );
        rep.verdict(&format!("{label}: lb ≥ 1.5x nginx"), s2.clone(), e2);
        row.status = Some(s1.and(s2));
        rep.rows.push(row);
        rep.rows.push(cpu_row);
    }
    rep.notes.push(format!(
        "Bulk: {}, one direction (client → proxy → server), {secs} s per run. \
         CPU s per GB: the proxy's utime+stime over the run divided by the GB moved. \
         The load generator, the server and the proxy share the 2 cores, so every proxy is CPU-bound \
         here: throughput ratios stay near 1, and CPU s per GB shows the proxy's own cost per byte.",
        if env.iperf3.is_some() {
            "iperf3 -c through the proxy to a one-off iperf3 -s (control and data connections all proxied; \
             one thread each for client and server); Gbit/s as received by the server"
        } else {
            "the suite's own generator (iperf3 not installed or LB_SUITE_NO_IPERF3 set): threads writing 128 KiB \
             chunks to a sink process; Gbit/s as written by the client"
        }
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. Connection rate and 3. latency (same echo backend)

pub const RATE_CLIENTS: usize = 64;
pub const LAT_CONNS: usize = 100;
pub const LAT_EVERY: Duration = Duration::from_millis(10);

pub fn rate_and_latency(
    env: &Env,
    opts: &Opts,
    rt: &Runtime,
    rep: &mut Report,
    do_rate: bool,
    do_lat: bool,
) -> Result<(), String> {
    let (_echo, backend) = start_role("echo")?;
    let proxies = start_peers(env, backend, rep, "echo scenarios");
    let ran: Vec<Peer> = proxies.iter().map(|p| p.peer).collect();
    let mut vias = vec![(Via::Direct, backend)];
    vias.extend(targets(&proxies));
    let runs = opts.runs.unwrap_or(if opts.quick { 2 } else { 3 });

    if do_rate {
        let secs = if opts.quick { 2 } else { 4 };
        // Warm-up: first connections, thread pools, the backend's accept path.
        for &(_, addr) in &vias {
            rt.block_on(net::conn_rate(
                addr,
                RATE_CLIENTS,
                Duration::from_millis(300),
            ));
        }
        let mut rate: BTreeMap<Via, Vec<f64>> = BTreeMap::new();
        let mut cpu: BTreeMap<Via, Vec<f64>> = BTreeMap::new();
        let mut failures = 0;
        for run in 0..runs {
            for &(via, addr) in &vias {
                let proxy = proxies.iter().find(|p| Via::P(p.peer) == via);
                let cpu0 = proxy.map(Proxy::cpu_secs);
                let (ok, failed, elapsed) = rt.block_on(net::conn_rate(
                    addr,
                    RATE_CLIENTS,
                    Duration::from_secs(secs),
                ));
                failures += failed;
                let r = ok as f64 / elapsed;
                eprintln!(
                    "  conn rate run {}/{runs} {:<8} {r:.0}/s ({failed} failed)",
                    run + 1,
                    via.name()
                );
                rate.entry(via).or_default().push(r);
                if let (Some(c0), Some(p)) = (cpu0, proxy)
                    && ok > 0
                {
                    cpu.entry(via)
                        .or_default()
                        .push((p.cpu_secs() - c0) / ok as f64 * 1e5);
                }
                // Let the TIME_WAIT backlog of this run drain a little before the next.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        let scen = format!("conn rate, {RATE_CLIENTS} clients");
        let mut row = Row::new(&scen, "conn/s", 0);
        fill(&mut row, env, &rate, &ran);
        let mut cpu_row = Row::new(&scen, "proxy CPU s per 100k conns", 2);
        fill(&mut cpu_row, env, &cpu, &ran);
        cpu_row.direct = None;
        let (s1, e1) = at_least(&row, env, Peer::Haproxy, 1.0);
        // Strictly fewer CPU seconds, as the target says.
        let (s2, e2) = at_most(&cpu_row, env, Peer::Haproxy, true);
        row.target = "≥ 1.0x haproxy".into();
        row.status = Some(s1.clone());
        cpu_row.target = "< haproxy".into();
        cpu_row.status = Some(s2.clone());
        rep.verdict("conn rate: lb ≥ 1.0x HAProxy conn/s", s1, e1);
        rep.verdict(
            "conn rate: lb fewer CPU s per 100k conns than HAProxy",
            s2,
            e2,
        );
        rep.rows.push(row);
        rep.rows.push(cpu_row);
        rep.notes.push(format!(
            "Connection rate: {RATE_CLIENTS} concurrent clients, each in a loop: connect, send 64 B, read the 64 B echo, close; \
             {secs} s per run, sources spread over 127.0.0.10-73. CPU: utime+stime of all the proxy's processes \
             (/proc/PID/stat, summed over the process group: nginx master + workers). {failures} connection(s) failed in all."
        ));
    }

    if do_lat {
        let secs = if opts.quick { 2 } else { 5 };
        let pcts = [50.0, 99.0, 99.9];
        // Per run and target: the three percentiles (µs).
        let mut abs: BTreeMap<Via, Vec<[f64; 3]>> = BTreeMap::new();
        let mut broken = 0;
        let mut samples = 0;
        for run in 0..runs {
            for &(via, addr) in &vias {
                let (rtts, failed) = rt.block_on(net::pingpong(
                    addr,
                    LAT_CONNS,
                    LAT_EVERY,
                    Duration::from_secs(secs),
                ));
                broken += failed;
                if rtts.is_empty() {
                    rep.errors.push(format!(
                        "latency run {} via {}: no samples",
                        run + 1,
                        via.name()
                    ));
                    continue;
                }
                samples = rtts.len();
                let p: [f64; 3] = pcts.map(|q| crate::report::pct(&rtts, q).unwrap_or(f64::NAN));
                eprintln!(
                    "  latency run {}/{runs} {:<8} p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs ({} samples)",
                    run + 1,
                    via.name(),
                    p[0],
                    p[1],
                    p[2],
                    rtts.len()
                );
                abs.entry(via).or_default().push(p);
            }
        }
        let scen = format!(
            "latency, {LAT_CONNS} conns x {}/s",
            1000 / LAT_EVERY.as_millis()
        );
        for (i, name) in ["p50", "p99", "p99.9"].iter().enumerate() {
            let mut row = Row::new(&scen, &format!("added {name} µs (direct: RTT)"), 0);
            let m: BTreeMap<Via, Vec<f64>> = abs
                .iter()
                .map(|(k, v)| (*k, v.iter().map(|a| a[i]).collect()))
                .collect();
            fill(&mut row, env, &m, &ran);
            // Added = the proxy's runs minus the median direct figure (subtracting run by
            // run would add the direct runs' noise to every cell).
            if let Some(Cell::Val(d)) = row.direct.clone() {
                for cell in row.peers.values_mut() {
                    if let Cell::Val(s) = cell {
                        s.med -= d.med;
                        s.min -= d.med;
                        s.max -= d.med;
                    }
                }
            } else {
                for cell in row.peers.values_mut() {
                    *cell = Cell::Skip("no direct figure".into());
                }
            }
            if i == 1 {
                let (s, e) = at_most(&row, env, Peer::Haproxy, false);
                row.target = "≤ haproxy".into();
                row.status = Some(s.clone());
                rep.verdict("latency: lb added p99 ≤ HAProxy's", s, e);
            }
            rep.rows.push(row);
        }
        rep.notes.push(format!(
            "Latency: {LAT_CONNS} persistent connections, each sending 64 B every {} ms (phases spread) and timing the echo; \
             {secs} s per run (~{samples} round trips per run and target). \"added\" = the proxy's percentile (median [min–max] over \
             runs) minus the median direct percentile; the direct column shows the direct RTT itself. Client, proxy and \
             echo server share the 2 cores, so the tails (p99, p99.9) mostly show scheduling noise. {broken} connection(s) broke.",
            LAT_EVERY.as_millis()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Idle memory

pub fn idle(env: &Env, opts: &Opts, rt: &Runtime, rep: &mut Report) -> Result<(), String> {
    let counts: Vec<usize> = if opts.quick {
        vec![1000]
    } else {
        vec![1000, 9000]
    };
    let runs = opts.runs.unwrap_or(if opts.quick { 1 } else { 3 });
    // Rows: growth / N at 1,000, at 9,000, and the marginal (9,000 - 1,000) / 8,000.
    let mut per: Vec<BTreeMap<Via, Vec<f64>>> = vec![BTreeMap::new(); 3];
    let mut ran = vec![];
    let mut pss_used = true;
    for run in 0..runs {
        for peer in env.present() {
            let (_hold, backend) = start_role("hold")?;
            let proxy = match peers::start(env, peer, backend) {
                Ok(p) => p,
                Err(e) => {
                    rep.errors
                        .push(format!("idle: {} did not start: {e}", peer.name()));
                    continue;
                }
            };
            if !ran.contains(&peer) {
                ran.push(peer);
            }
            let mem = |p: &Proxy| {
                let (pss, rss) = p.mem_kib();
                pss.unwrap_or(rss) as f64
            };
            pss_used &= proxy.mem_kib().0.is_some();
            // Warm-up with a few connections (lazy initialisation), then the baseline. Few,
            // so that little freed memory is left for the measured connections to reuse.
            for i in 0..4 {
                let (warm, _) = rt.block_on(net::open_idle(proxy.addr, i, 1));
                net::abort_all(warm);
            }
            std::thread::sleep(Duration::from_millis(700));
            let base = mem(&proxy);
            let mut held = vec![];
            let mut next = 4;
            let mut at = vec![];
            for &n in &counts {
                let want = n.saturating_sub(held.len());
                let (mut open, failed) = rt.block_on(net::open_idle(proxy.addr, next, want));
                next += want;
                held.append(&mut open);
                if failed > 0 {
                    rep.errors.push(format!(
                        "idle {n}, {} run {}: {failed} connection(s) failed",
                        peer.name(),
                        run + 1
                    ));
                }
                std::thread::sleep(Duration::from_millis(1000));
                let now = mem(&proxy);
                let k = (now - base) / held.len().max(1) as f64;
                eprintln!(
                    "  idle run {}/{runs} {:<8} {} conns: +{:.0} KiB = {k:.2} KiB/conn",
                    run + 1,
                    peer.name(),
                    held.len(),
                    now - base
                );
                per[at.len()].entry(Via::P(peer)).or_default().push(k);
                at.push((held.len(), now));
            }
            if let [(n1, m1), (n2, m2)] = at[..]
                && n2 > n1
            {
                per[2]
                    .entry(Via::P(peer))
                    .or_default()
                    .push((m2 - m1) / (n2 - n1) as f64);
            }
            net::abort_all(held);
            drop(proxy);
        }
    }
    for (ci, label) in [
        "idle, 1,000 conns",
        "idle, 9,000 conns",
        "idle, 1,000 → 9,000",
    ]
    .iter()
    .enumerate()
    {
        let metric = if ci == 2 {
            "KiB per added conn"
        } else {
            "KiB per conn"
        };
        let mut row = Row::new(label, metric, 2);
        row.target = "≤ 2 KiB, ≤ haproxy".into();
        if ci > 0 && counts.len() < 2 {
            for p in Peer::ALL {
                row.peers.insert(p, Cell::Skip("quick mode".into()));
            }
            row.status = Some(Status::Na("quick mode".into()));
            rep.rows.push(row);
            continue;
        }
        fill(&mut row, env, &per[ci], &ran);
        row.direct = None;
        let abs = match row.med(Peer::Lb) {
            Some(k) => Status::of(k <= 2.0),
            None => Status::Na("no figure".into()),
        };
        let (vs, e) = at_most(&row, env, Peer::Haproxy, false);
        rep.verdict(
            &format!("{label}: lb ≤ 2 KiB user-space per connection"),
            abs.clone(),
            row.med(Peer::Lb)
                .map(|k| format!("lb {k:.2} KiB"))
                .unwrap_or_default(),
        );
        rep.verdict(
            &format!("{label}: lb ≤ HAProxy per connection"),
            vs.clone(),
            e,
        );
        row.status = Some(abs.and(vs));
        rep.rows.push(row);
    }
    rep.notes.push(format!(
        "Idle memory: growth of the proxy's {} (summed over its processes; user-space memory: kernel socket buffers are \
         not in it) from a baseline taken after 4 warm-up connections to N idle proxied connections, divided by N; \
         \"1,000 → 9,000\" is the marginal cost of the last 8,000, the figure to extrapolate to a million (KiB per \
         connection x 1,000,000 ≈ that many GiB, x 0.95). Each connection exchanged 64 B each way once (so it is \
         established end to end and has moved data), then stays idle; the backend is a separate holder process. Memory \
         an allocator kept from earlier frees is reused without growth, so small N can read low.",
        if pss_used { "PSS (/proc/PID/smaps_rollup)" } else { "RSS (VmRSS)" }
    ));
    Ok(())
}
