//! Prometheus metrics: every name in [`names`], the two histograms recorded at event time
//! (a proxied connection closing, a health check finishing), and a collector that reads
//! everything else from the counters the data plane already keeps (service stats and
//! backend atomics) at scrape time.
//!
//! Reading at scrape time means nothing on the accept/connect path is counted twice, and
//! services and backends removed by a reload vanish from the next scrape: the collector
//! walks [`Balancer::services`] as it is now. The histograms live in a process-wide table
//! (the hooks are free functions called from deep inside the data and control planes)
//! keyed by service and backend name; each scrape drops the entries of services and
//! backends no longer configured.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::balancer::Backend;
use crate::proxy::Service;
use crate::server::Balancer;

/// Every metric name `lb` exposes, as it appears in the exposition. Counters end in
/// `_total`; histograms are families of `_bucket`, `_sum` and `_count` series.
pub mod names {
    /// Counter `{service}`: client connections accepted.
    pub const CONNECTIONS_ACCEPTED: &str = "lb_connections_accepted_total";
    /// Counter `{service}`: client connections closed because no backend could be reached.
    pub const CONNECTIONS_REJECTED: &str = "lb_connections_rejected_total";
    /// Gauge `{service}`: client connections open now.
    pub const CONNECTIONS_ACTIVE: &str = "lb_connections_active";
    /// Histogram `{service, backend}`: lifetime of proxied connections, in seconds.
    pub const CONNECTION_DURATION: &str = "lb_connection_duration_seconds";
    /// Gauge `{service, backend}`: connections proxied to the backend now.
    pub const BACKEND_CONNECTIONS_ACTIVE: &str = "lb_backend_connections_active";
    /// Counter `{service, backend}`: connections ever established to the backend.
    pub const BACKEND_CONNECTIONS: &str = "lb_backend_connections_total";
    /// Counter `{service, backend}`: bytes from clients to the backend.
    pub const BACKEND_SENT_BYTES: &str = "lb_backend_sent_bytes_total";
    /// Counter `{service, backend}`: bytes from the backend to clients.
    pub const BACKEND_RECEIVED_BYTES: &str = "lb_backend_received_bytes_total";
    /// Counter `{service, backend, kind}`: failed connects, `kind` = refused, timeout, other.
    pub const BACKEND_CONNECT_FAILURES: &str = "lb_backend_connect_failures_total";
    /// Gauge `{service, backend}`: 1 if the health checks say up, else 0.
    pub const BACKEND_UP: &str = "lb_backend_up";
    /// Gauge `{service, backend, state}`: 1 for the state an operator sees (up, down,
    /// draining, disabled), 0 for the other three.
    pub const BACKEND_STATE: &str = "lb_backend_state";
    /// Gauge `{service, backend}`: configured weight.
    pub const BACKEND_WEIGHT: &str = "lb_backend_weight";
    /// Counter `{service, backend}`: state transitions (health, and admin requests).
    pub const BACKEND_TRANSITIONS: &str = "lb_backend_transitions_total";
    /// Histogram `{service, backend}`: duration of active health checks, in seconds.
    pub const CHECK_DURATION: &str = "lb_backend_check_duration_seconds";
    /// Counter `{result}`: configuration reloads, `result` = ok or failed.
    pub const RELOADS: &str = "lb_reloads_total";
    /// Gauge: 1 if the last reload attempt succeeded (or none failed since start), else 0.
    pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "lb_config_last_reload_successful";
    /// Gauge: when the running configuration was applied, in seconds since the epoch.
    pub const CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP: &str =
        "lb_config_last_reload_success_timestamp_seconds";

    /// All of the above, for documentation checks and tests.
    pub const ALL: &[&str] = &[
        CONNECTIONS_ACCEPTED,
        CONNECTIONS_REJECTED,
        CONNECTIONS_ACTIVE,
        CONNECTION_DURATION,
        BACKEND_CONNECTIONS_ACTIVE,
        BACKEND_CONNECTIONS,
        BACKEND_SENT_BYTES,
        BACKEND_RECEIVED_BYTES,
        BACKEND_CONNECT_FAILURES,
        BACKEND_UP,
        BACKEND_STATE,
        BACKEND_WEIGHT,
        BACKEND_TRANSITIONS,
        CHECK_DURATION,
        RELOADS,
        CONFIG_LAST_RELOAD_SUCCESSFUL,
        CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP,
    ];
}

/// The `Content-Type` of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Connection lifetimes span milliseconds (a refused upgrade) to days (a WebSocket).
const CONNECTION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Checks take well under a millisecond on a LAN and at most `health.timeout` (500 ms by
/// default) when they fail by timing out.
const CHECK_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

static CONNECTION_DURATIONS: LazyLock<ByBackend> =
    LazyLock::new(|| ByBackend::new(CONNECTION_BUCKETS));
static CHECK_DURATIONS: LazyLock<ByBackend> = LazyLock::new(|| ByBackend::new(CHECK_BUCKETS));

/// A proxied connection ended after `took` (called by the data plane once per connection,
/// after the splice, never on the accept/connect path).
pub fn connection_closed(service: &Service, backend: &Backend, took: Duration) {
    CONNECTION_DURATIONS.observe(&service.name, &backend.name, took);
}

/// An active health check of `backend` finished (passed or failed) after `took`.
pub fn check_finished(backend: &Backend, took: Duration) {
    CHECK_DURATIONS.observe(&backend.service, &backend.name, took);
}

/// Histograms of one service, by backend name.
type BackendHistograms = HashMap<Arc<str>, Histogram>;

/// One histogram per (service, backend), created on first use.
struct ByBackend {
    buckets: &'static [f64],
    /// By service name, then backend name: lookups by `&str` need no allocation.
    map: RwLock<HashMap<Arc<str>, BackendHistograms>>,
}

impl ByBackend {
    fn new(buckets: &'static [f64]) -> ByBackend {
        ByBackend {
            buckets,
            map: RwLock::default(),
        }
    }

    fn observe(&self, service: &Arc<str>, backend: &Arc<str>, took: Duration) {
        let secs = took.as_secs_f64();
        {
            // Usual case: the histogram exists; a shared lock and two lookups by &str.
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = map.get(&**service).and_then(|m| m.get(&**backend)) {
                h.observe(secs);
                return;
            }
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.entry(service.clone())
            .or_default()
            .entry(backend.clone())
            .or_insert_with(|| Histogram::new(self.buckets.iter().copied()))
            .observe(secs);
    }

    /// Drops the histograms of services and backends no longer configured.
    fn retain(&self, services: &[Arc<Service>]) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|service, backends| {
            let Some(s) = services.iter().find(|s| s.name == *service) else {
                return false;
            };
            backends.retain(|name, _| s.backends.find(name).is_some());
            !backends.is_empty()
        });
    }

    fn encode(&self, enc: &mut DescriptorEncoder, name: &str, help: &str) -> fmt::Result {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        // Sorted, so scrapes list series in a stable order.
        let mut series: Vec<(&str, &str, &Histogram)> = map
            .iter()
            .flat_map(|(s, bs)| bs.iter().map(move |(b, h)| (&**s, &**b, h)))
            .collect();
        series.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for (service, backend, h) in series {
            h.encode(m.encode_family(&[("service", service), ("backend", backend)])?)?;
        }
        Ok(())
    }
}

/// The registry `GET /metrics` renders: one collector over a running [`Balancer`].
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry whose collector reads `balancer` at every scrape.
    pub fn new(balancer: Arc<Balancer>) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(BalancerCollector { balancer }));
        Metrics { registry }
    }

    /// The Prometheus text exposition of every metric, as of now.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail, and our collector only fails when it does.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!("metrics: encoding failed: {e}");
        }
        out
    }
}

/// Reads the balancer's live counters at scrape time.
struct BalancerCollector {
    balancer: Arc<Balancer>,
}

impl fmt::Debug for BalancerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancerCollector").finish_non_exhaustive()
    }
}

/// Encodes one metric family from `(labels, value)` pairs.
fn family<S: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (S, M)>,
    metric_type: MetricType,
) -> fmt::Result {
    // The encoder appends `_total` to counters itself; our names already carry it.
    let base = match metric_type {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    let mut m = enc.encode_descriptor(base, help, None, metric_type)?;
    for (labels, metric) in series {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one metric without labels.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter<S: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (S, u64)>,
) -> fmt::Result {
    let series = series.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, series, MetricType::Counter)
}

fn gauge<S: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (S, V)>,
) -> fmt::Result {
    let series = series.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, series, MetricType::Gauge)
}

impl Collector for BalancerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use names::*;
        use std::sync::atomic::Ordering::Relaxed;

        let services = self.balancer.services();
        let svc = |s: &Arc<Service>| [("service", s.name.to_string())];
        counter(
            &mut enc,
            CONNECTIONS_ACCEPTED,
            "Client connections accepted.",
            services
                .iter()
                .map(|s| (svc(s), s.stats.accepted.load(Relaxed))),
        )?;
        counter(
            &mut enc,
            CONNECTIONS_REJECTED,
            "Client connections closed because no backend could be reached.",
            services
                .iter()
                .map(|s| (svc(s), s.stats.rejected.load(Relaxed))),
        )?;
        gauge(
            &mut enc,
            CONNECTIONS_ACTIVE,
            "Client connections open now.",
            services
                .iter()
                .map(|s| (svc(s), s.stats.active.load(Relaxed) as u64)),
        )?;

        let backends: Vec<Arc<Backend>> = services
            .iter()
            .flat_map(|s| s.backends.members().iter().cloned().collect::<Vec<_>>())
            .collect();
        let per_backend = |value: fn(&Backend) -> u64| {
            backends
                .iter()
                .map(move |b| (lb(b), value(b)))
                .collect::<Vec<_>>()
        };
        gauge(
            &mut enc,
            BACKEND_CONNECTIONS_ACTIVE,
            "Connections proxied to the backend now.",
            per_backend(|b| b.active.load(Relaxed) as u64),
        )?;
        counter(
            &mut enc,
            BACKEND_CONNECTIONS,
            "Connections ever established to the backend.",
            per_backend(|b| b.total.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            BACKEND_SENT_BYTES,
            "Bytes forwarded from clients to the backend.",
            per_backend(|b| b.bytes_to.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            BACKEND_RECEIVED_BYTES,
            "Bytes forwarded from the backend to clients.",
            per_backend(|b| b.bytes_from.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            BACKEND_CONNECT_FAILURES,
            "Failed connects to the backend by kind (refused, timeout, other).",
            backends.iter().flat_map(|b| {
                let e = &b.connect_errors;
                [
                    ("refused", e.refused.load(Relaxed)),
                    ("timeout", e.timeout.load(Relaxed)),
                    ("other", e.other.load(Relaxed)),
                ]
                .map(|(kind, v)| {
                    let [s, n] = lb(b);
                    ([s, n, ("kind", kind.to_string())], v)
                })
            }),
        )?;
        gauge(
            &mut enc,
            BACKEND_UP,
            "1 if the health checks say the backend is up, else 0.",
            per_backend(|b| u64::from(b.health() == crate::balancer::BackendState::Up)),
        )?;
        gauge(
            &mut enc,
            BACKEND_STATE,
            "1 for the backend's state as an operator sees it (up, down, draining, disabled).",
            backends.iter().flat_map(|b| {
                let now = b.state_label();
                ["up", "down", "draining", "disabled"].map(|state| {
                    let [s, n] = lb(b);
                    (
                        [s, n, ("state", state.to_string())],
                        u64::from(state == now),
                    )
                })
            }),
        )?;
        gauge(
            &mut enc,
            BACKEND_WEIGHT,
            "Configured weight of the backend.",
            per_backend(|b| u64::from(b.weight())),
        )?;
        counter(
            &mut enc,
            BACKEND_TRANSITIONS,
            "State transitions of the backend (health checks and admin requests).",
            per_backend(|b| b.transitions.load(Relaxed)),
        )?;

        CONNECTION_DURATIONS.retain(&services);
        CONNECTION_DURATIONS.encode(
            &mut enc,
            CONNECTION_DURATION,
            "Lifetime of proxied connections in seconds.",
        )?;
        CHECK_DURATIONS.retain(&services);
        CHECK_DURATIONS.encode(
            &mut enc,
            CHECK_DURATION,
            "Duration of active health checks in seconds (passed and failed).",
        )?;

        let reload = self.balancer.reload_status();
        counter(
            &mut enc,
            RELOADS,
            "Configuration reloads by result (ok, failed).",
            [
                ([("result", "ok")], reload.ok),
                ([("result", "failed")], reload.failed),
            ],
        )?;
        single(
            &mut enc,
            CONFIG_LAST_RELOAD_SUCCESSFUL,
            "1 if the last configuration reload succeeded (or none was tried), else 0.",
            ConstGauge::new(u64::from(reload.last_error.is_none())),
        )?;
        if let Some(t) = reload.last_ok_at {
            single(
                &mut enc,
                CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP,
                "When the running configuration was applied, in seconds since the epoch.",
                ConstGauge::new(unix_seconds(t)),
            )?;
        }
        Ok(())
    }
}

/// The `{service, backend}` labels of `b`.
fn lb(b: &Backend) -> [(&'static str, String); 2] {
    [
        ("service", b.service.to_string()),
        ("backend", b.name.to_string()),
    ]
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn names_follow_the_conventions_and_are_documented() {
        let readme = include_str!("../README.md");
        for (i, name) in names::ALL.iter().enumerate() {
            assert!(name.starts_with("lb_"), "{name}");
            assert!(!names::ALL[..i].contains(name), "{name} twice");
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "{name} not in README"
            );
        }
    }
}
