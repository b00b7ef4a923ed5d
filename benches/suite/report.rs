//! Statistics (median, min, max, percentiles), the results table and its Markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::peers::Peer;

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub med: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// Median (mean of the middle two for an even count), min and max.
pub fn stat(v: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        med,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// Nearest-rank percentile of an ascending slice.
pub fn pct<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn fmt_num(x: f64, prec: usize) -> String {
    format!("{x:.prec$}")
}

pub fn fmt_stat(s: &Stat, prec: usize) -> String {
    if s.n <= 1 || (s.min == s.max) {
        fmt_num(s.med, prec)
    } else {
        format!(
            "{} [{}–{}]",
            fmt_num(s.med, prec),
            fmt_num(s.min, prec),
            fmt_num(s.max, prec)
        )
    }
}

#[derive(Clone, Debug)]
pub enum Cell {
    Val(Stat),
    /// Not measured, and why (shown as `—` plus a note).
    Skip(String),
}

impl Cell {
    pub fn from_runs(v: &[f64], why_empty: &str) -> Cell {
        match stat(v) {
            Some(s) => Cell::Val(s),
            None => Cell::Skip(why_empty.to_string()),
        }
    }
    pub fn med(&self) -> Option<f64> {
        match self {
            Cell::Val(s) => Some(s.med),
            Cell::Skip(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Status {
    Met,
    NotMet,
    /// Not met on the medians, but the runs' [min–max] ranges of lb and the peer overlap:
    /// a difference this run cannot tell from noise.
    NotMetWithinSpread,
    Na(String),
}

impl Status {
    pub fn of(ok: bool) -> Status {
        if ok { Status::Met } else { Status::NotMet }
    }
    pub fn text(&self) -> String {
        match self {
            Status::Met => "met".into(),
            Status::NotMet => "**not met**".into(),
            Status::NotMetWithinSpread => "**not met** (ranges overlap)".into(),
            Status::Na(why) => format!("n/a ({why})"),
        }
    }
    /// Both must hold; n/a if either is n/a (and nothing failed).
    pub fn and(self, other: Status) -> Status {
        match (self, other) {
            (Status::NotMet, _) | (_, Status::NotMet) => Status::NotMet,
            (Status::NotMetWithinSpread, _) | (_, Status::NotMetWithinSpread) => {
                Status::NotMetWithinSpread
            }
            (Status::Na(a), _) => Status::Na(a),
            (_, Status::Na(b)) => Status::Na(b),
            _ => Status::Met,
        }
    }
}

/// One line of the side-by-side table.
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub prec: usize,
    /// None: not applicable to a direct connection.
    pub direct: Option<Cell>,
    pub peers: BTreeMap<Peer, Cell>,
    pub target: String,
    pub status: Option<Status>,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, prec: usize) -> Row {
        Row {
            scenario: scenario.into(),
            metric: metric.into(),
            prec,
            direct: None,
            peers: BTreeMap::new(),
            target: String::new(),
            status: None,
        }
    }
    pub fn med(&self, p: Peer) -> Option<f64> {
        self.peers.get(&p).and_then(Cell::med)
    }
    pub fn range(&self, p: Peer) -> Option<(f64, f64)> {
        match self.peers.get(&p)? {
            Cell::Val(s) => Some((s.min, s.max)),
            Cell::Skip(_) => None,
        }
    }
}

/// A target, its verdict and the figures it was judged on (for the summary list).
pub struct Verdict {
    pub what: String,
    pub status: Status,
    pub evidence: String,
}

/// A small free-form table (the storm).
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub tables: Vec<Table>,
    pub verdicts: Vec<Verdict>,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
}

/// `lb ÷ peer` of the medians, when both are positive.
pub fn ratio(lb: Option<f64>, other: Option<f64>) -> String {
    match (lb, other) {
        (Some(a), Some(b)) if a > 0.0 && b > 0.0 => format!("{:.2}x", a / b),
        (Some(_), Some(_)) => "n/a (≤ 0)".into(),
        _ => "—".into(),
    }
}

fn cell_text(c: Option<&Cell>, prec: usize) -> String {
    match c {
        None => "—".into(),
        Some(Cell::Val(s)) => fmt_stat(s, prec),
        Some(Cell::Skip(why)) => format!("— ({why})"),
    }
}

/// A Markdown table with padded columns (readable as plain text too).
pub fn markdown_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut w = vec![3usize; cols];
    for r in std::iter::once(headers).chain(rows.iter().map(|r| r.as_slice())) {
        for (i, c) in r.iter().enumerate().take(cols) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        let mut s = String::from("|");
        for (i, wi) in w.iter().enumerate() {
            let c = r.get(i).map(String::as_str).unwrap_or("");
            let pad = wi - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s.push('\n');
        s
    };
    let mut out = line(headers);
    out.push('|');
    for wi in &w {
        let _ = write!(out, "{}|", "-".repeat(wi + 2));
    }
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

impl Report {
    pub fn main_table(&self, peers: &[Peer]) -> String {
        let others: Vec<Peer> = peers.iter().copied().filter(|p| *p != Peer::Lb).collect();
        let mut headers: Vec<String> = vec![
            "scenario".into(),
            "metric".into(),
            "direct".into(),
            "lb".into(),
        ];
        for p in &others {
            headers.push(p.name().into());
            headers.push(format!("lb ÷ {}", p.name()));
        }
        headers.push("target".into());
        headers.push("status".into());
        let mut rows = vec![];
        for r in &self.rows {
            let mut v = vec![
                r.scenario.clone(),
                r.metric.clone(),
                cell_text(r.direct.as_ref(), r.prec),
                cell_text(r.peers.get(&Peer::Lb), r.prec),
            ];
            for p in &others {
                v.push(cell_text(r.peers.get(p), r.prec));
                v.push(ratio(r.med(Peer::Lb), r.med(*p)));
            }
            v.push(r.target.clone());
            v.push(r.status.as_ref().map(Status::text).unwrap_or_default());
            rows.push(v);
        }
        markdown_table(&headers, &rows)
    }

    pub fn render(&self, peers: &[Peer]) -> String {
        let mut s = String::new();
        if !self.rows.is_empty() {
            s.push_str(&self.main_table(peers));
        }
        for t in &self.tables {
            let _ = write!(s, "\n{}\n\n", t.title);
            s.push_str(&markdown_table(&t.headers, &t.rows));
        }
        if !self.verdicts.is_empty() {
            let met = self
                .verdicts
                .iter()
                .filter(|v| matches!(v.status, Status::Met))
                .count();
            let na = self
                .verdicts
                .iter()
                .filter(|v| matches!(v.status, Status::Na(_)))
                .count();
            let _ = write!(
                s,
                "\nTargets (judged on the medians of this run): {met} of {} met, {} not met, {na} not measured.\n\n",
                self.verdicts.len() - na,
                self.verdicts.len() - na - met
            );
            let rows: Vec<Vec<String>> = self
                .verdicts
                .iter()
                .map(|v| vec![v.what.clone(), v.evidence.clone(), v.status.text()])
                .collect();
            s.push_str(&markdown_table(
                &["target".into(), "measured".into(), "status".into()],
                &rows,
            ));
        }
        if !self.notes.is_empty() {
            s.push_str("\nNotes:\n\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        if !self.errors.is_empty() {
            s.push_str("\nErrors (figures missing from the table):\n\n");
            for e in &self.errors {
                let _ = writeln!(s, "- {e}");
            }
        }
        s
    }

    pub fn verdict(&mut self, what: &str, status: Status, evidence: String) {
        self.verdicts.push(Verdict {
            what: what.into(),
            status,
            evidence,
        });
    }
}
