//! Selection policies over an eligible snapshot. Pure functions; `skip` excludes backends
//! already tried by this connection. Backends are few, so linear scans beat structure.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::RngExt;

use super::{Backend, Entry};

/// nginx's smooth weighted round-robin, unrolled once into a schedule: weights 5,1,1
/// give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c, so no backend gets a burst.
pub(super) fn smooth_schedule(entries: &[Entry]) -> Vec<u32> {
    let total: i64 = entries.iter().map(|e| e.weight as i64).sum();
    let mut current = vec![0i64; entries.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, e) in entries.iter().enumerate() {
            current[i] += e.weight as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

pub(super) fn round_robin<'a>(
    entries: &'a [Entry],
    schedule: &[u32],
    start: usize,
    skip: impl Fn(&Arc<Backend>) -> bool,
) -> Option<&'a Arc<Backend>> {
    let n = schedule.len();
    (0..n)
        .map(|i| &entries[schedule[(start + i) % n] as usize].backend)
        .find(|b| !skip(b))
}

pub(super) fn weighted_random(
    entries: &[Entry],
    skip: impl Fn(&Arc<Backend>) -> bool,
) -> Option<&Arc<Backend>> {
    let total: u64 = entries
        .iter()
        .filter(|e| !skip(&e.backend))
        .map(|e| e.weight as u64)
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = rand::rng().random_range(0..total);
    for e in entries.iter().filter(|e| !skip(&e.backend)) {
        if r < e.weight as u64 {
            return Some(&e.backend);
        }
        r -= e.weight as u64;
    }
    None
}

/// Two weighted random choices; fewer active connections per unit of weight wins.
/// Two choices rather than the global minimum so a backend that just came up is not
/// stampeded by every new connection at once (it only wins the draws it is part of).
pub(super) fn least_conn(
    entries: &[Entry],
    skip: impl Fn(&Arc<Backend>) -> bool + Copy,
) -> Option<&Arc<Backend>> {
    let a = weighted_random(entries, skip)?;
    let b = weighted_random(entries, |x| skip(x) || Arc::ptr_eq(x, a)).unwrap_or(a);
    let load = |x: &Backend| x.active.load(Ordering::Relaxed) as u64;
    let weight = |x: &Arc<Backend>| {
        entries
            .iter()
            .find(|e| Arc::ptr_eq(&e.backend, x))
            .map_or(1, |e| e.weight as u64)
    };
    // Compare active/weight without division: a/wa <= b/wb  <=>  a*wb <= b*wa.
    if load(a) * weight(b) <= load(b) * weight(a) {
        Some(a)
    } else {
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::BackendState;
    use crate::config::BackendConfig;

    fn be(name: &str, weight: u32) -> Entry {
        Entry {
            backend: Arc::new(Backend::new(
                "svc".into(),
                &BackendConfig {
                    name: name.into(),
                    addr: "127.0.0.1:1".parse().unwrap(),
                    weight,
                },
                BackendState::Up,
                &tokio_util::sync::CancellationToken::new(),
            )),
            weight,
        }
    }

    #[test]
    fn smooth_schedule_interleaves() {
        let es = vec![be("a", 5), be("b", 1), be("c", 1)];
        let names: String = smooth_schedule(&es)
            .iter()
            .map(|&i| es[i as usize].backend.name.to_string())
            .collect();
        assert_eq!(names, "aabacaa");
    }

    #[test]
    fn round_robin_skips_tried() {
        let es = vec![be("a", 1), be("b", 1)];
        let sched = smooth_schedule(&es);
        let first = round_robin(&es, &sched, 0, |_| false).unwrap().clone();
        let second = round_robin(&es, &sched, 0, |b| Arc::ptr_eq(b, &first)).unwrap();
        assert!(!Arc::ptr_eq(&first, second));
        assert!(round_robin(&es, &sched, 0, |_| true).is_none());
    }

    #[test]
    fn least_conn_prefers_idle() {
        let es = vec![be("a", 1), be("b", 1)];
        es[0].backend.active.store(10, Ordering::Relaxed);
        for _ in 0..50 {
            assert_eq!(&*least_conn(&es, |_| false).unwrap().name, "b");
        }
    }

    #[test]
    fn weighted_random_respects_weights() {
        let es = vec![be("a", 3), be("b", 1)];
        let a = (0..4000)
            .filter(|_| &*weighted_random(&es, |_| false).unwrap().name == "a")
            .count();
        assert!((2700..3300).contains(&a), "a picked {a} of 4000");
    }
}
