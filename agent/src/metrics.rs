//! Prometheus metrics (SPEC §8) and the HTTP endpoint that serves them with
//! `/readyz`. Datapath counters are read from the kernel at scrape time and
//! summed over CPUs, through a [`CounterSource`] that never waits for a policy
//! apply; their `verdict`/`reason` labels come from `Stat`, so kernel and
//! metric names cannot drift.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use keyfence_common::stats::Stat;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    datapath::{DatapathReader, Labels},
    maps::stats::CounterSnapshot,
    shim::outcome::Outcome,
};

/// Where a scrape reads the datapath's counters and the names that label
/// them. It must not wait for the datapath's writer: a scrape during a long
/// policy apply answers at once.
pub trait CounterSource: Send + Sync {
    /// The names as of the last attach or apply.
    fn labels(&self) -> Arc<Labels>;
    /// The counters of the interfaces `labels` names.
    fn counters(&self, labels: &Labels) -> anyhow::Result<CounterSnapshot>;
}

impl CounterSource for DatapathReader {
    fn labels(&self) -> Arc<Labels> {
        DatapathReader::labels(self)
    }

    fn counters(&self, labels: &Labels) -> anyhow::Result<CounterSnapshot> {
        DatapathReader::counters(self, labels)
    }
}

/// The datapath's counter source, once there is one (never with `mode: off`).
type SharedSource = Arc<OnceLock<Box<dyn CounterSource>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Every metric the agent owns apart from the datapath counters.
pub struct Metrics {
    pub registry: Registry,
    pub keys: Gauge,
    pub policy_prefixes: Family<ListenerLabel, Gauge>,
    pub policy_apply_seconds: Histogram,
    pub config_last_reload_successful: Gauge,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub drop_samples: Counter,
    /// 1 while the maps match the policy; 0 after a failed write until a
    /// reconcile succeeds (`/readyz` answers degraded meanwhile).
    pub datapath_in_sync: Gauge,
    pub datapath_write_failures: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<ListenerLabel, Histogram>,
    /// Connection admission and timeouts of every server (`crate::conn`).
    pub connections: crate::conn::ConnMetrics,
    /// `keyfence_config_warnings{warning}` (see `config_warnings`).
    pub config_warnings: crate::config_warnings::WarningGauges,
    /// Failed and throttled management API attempts, lockouts.
    pub management: crate::management::throttle::ManagementMetrics,
    /// `keyfence_store_up` and the fleet's progress (`store::fleet`).
    pub fleet: crate::store::fleet::FleetMetrics,
    refusal_logs: crate::ratelimit::RateLimiter,
    datapath: SharedSource,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub listener: String,
    pub outcome: &'static str,
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        let datapath = SharedSource::default();
        let mut registry = Registry::default();
        let keys = Gauge::default();
        registry.register("keyfence_keys", "API keys known to the agent", keys.clone());
        let policy_prefixes = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "keyfence_policy_prefixes",
            "Prefixes in the packet-level allow set of each listener (0 when open)",
            policy_prefixes.clone(),
        );
        let policy_apply_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "keyfence_policy_apply_seconds",
            "Time from a policy change to its enforcement in the datapath",
            policy_apply_seconds.clone(),
        );
        let config_last_reload_successful = Gauge::default();
        registry.register(
            "keyfence_config_last_reload_successful",
            "1 if the last configuration load succeeded",
            config_last_reload_successful.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "keyfence_config_reloads",
            "Configuration reloads by result",
            config_reloads.clone(),
        );
        let drop_samples = Counter::default();
        registry.register(
            "keyfence_datapath_drop_samples",
            "Dropped packets sampled to the log (rate-limited in the kernel)",
            drop_samples.clone(),
        );
        let datapath_in_sync = Gauge::default();
        datapath_in_sync.set(1);
        registry.register(
            "keyfence_datapath_in_sync",
            "1 while the datapath maps match the policy, 0 while a reconcile is pending",
            datapath_in_sync.clone(),
        );
        let datapath_write_failures = Counter::default();
        registry.register(
            "keyfence_datapath_write_failures",
            "Datapath map writes the kernel refused (each one schedules a full reconcile)",
            datapath_write_failures.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "keyfence_http_requests",
            "Requests answered by the shim, by listener and outcome",
            http_requests.clone(),
        );
        let http_duration = Family::<ListenerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
        });
        registry.register(
            "keyfence_http_request_duration_seconds",
            "Time from request head to response head, including the upstream",
            http_duration.clone(),
        );
        let connections = crate::conn::ConnMetrics::register(&mut registry);
        let config_warnings = crate::config_warnings::register(&mut registry);
        let management = crate::management::throttle::ManagementMetrics::register(&mut registry);
        let fleet = crate::store::fleet::FleetMetrics::register(&mut registry);
        registry.register_collector(Box::new(DatapathCollector {
            source: datapath.clone(),
        }));
        Self {
            registry,
            keys,
            policy_prefixes,
            policy_apply_seconds,
            config_last_reload_successful,
            config_reloads,
            drop_samples,
            datapath_in_sync,
            datapath_write_failures,
            http_requests,
            http_duration,
            connections,
            config_warnings,
            management,
            fleet,
            refusal_logs: crate::ratelimit::RateLimiter::new(20, std::time::Duration::from_secs(1)),
            datapath,
        }
    }

    /// Read the datapath's counters from `source` from now on (set once,
    /// when the datapath opens).
    pub fn count_datapath(&self, source: impl CounterSource + 'static) {
        if self.datapath.set(Box::new(source)).is_err() {
            tracing::warn!("the datapath's counter source is set already");
        }
    }

    /// Count one answered request.
    pub fn observe_http(&self, listener: &str, outcome: Outcome, took: std::time::Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                listener: listener.to_string(),
                outcome: outcome.label(),
            })
            .inc();
        self.http_duration
            .get_or_create(&ListenerLabel {
                listener: listener.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// One structured line per refused (or report-only) request: key id
    /// (`-` when no valid key was presented), client address, listener and
    /// reason (the outcome's label); rate-limited so a flood cannot fill
    /// disks (the counters stay exact).
    pub fn refusal_log(
        &self,
        listener: &str,
        key_id: Option<&str>,
        ip: Option<std::net::IpAddr>,
        outcome: Outcome,
    ) {
        if self.refusal_logs.allow() {
            let client = ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
            let key_id = key_id.unwrap_or("-");
            let reason = outcome.label();
            if outcome == Outcome::ReportOnly {
                tracing::info!(
                    listener,
                    key_id,
                    client,
                    reason,
                    "request outside the key's list passed (report-only key)"
                );
            } else {
                tracing::info!(listener, key_id, client, reason, "request refused");
            }
        }
    }

    /// The registry in Prometheus text format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    interface: String,
    listener: String,
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachedLabels {
    interface: String,
    mode: &'static str,
    /// `xdp native`, `xdp generic`, `tcx` or `tc-netlink`.
    path: &'static str,
}

/// Reads the kernel's counters on every scrape.
struct DatapathCollector {
    source: SharedSource,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.get() else {
            return Ok(());
        };
        let labels = source.labels();
        let snapshot = match source.counters(&labels) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading datapath counters");
                return Ok(());
            }
        };
        let mut interfaces: Vec<(u32, String)> = vec![(0, "other".into())];
        interfaces.extend(
            labels
                .attachments
                .iter()
                .map(|a| (a.slot, a.interface.clone())),
        );
        let mut listeners: Vec<(u32, String)> = vec![(0, "none".into())];
        listeners.extend(
            labels
                .listeners
                .iter()
                .map(|(name, slot)| (*slot, name.clone())),
        );

        {
            let mut packets = encoder.encode_descriptor(
                "keyfence_datapath_packets",
                "Packets seen by the datapath, by interface, listener, verdict and reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (iface_slot, interface) in &interfaces {
                for (listener_slot, listener) in &listeners {
                    for stat in Stat::ALL {
                        let labels = PacketLabels {
                            interface: interface.clone(),
                            listener: listener.clone(),
                            verdict: stat.verdict(),
                            reason: stat.reason(),
                        };
                        ConstCounter::new(snapshot.get(*iface_slot, *listener_slot, stat))
                            .encode(packets.encode_family(&labels)?)?;
                    }
                }
            }
        }

        let mut attached = encoder.encode_descriptor(
            "keyfence_datapath_attached",
            "1 for every interface the datapath is attached to, with the mode in use",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for a in &labels.attachments {
            let labels = AttachedLabels {
                interface: a.interface.clone(),
                mode: a.mode.label(),
                path: a.mode.path(),
            };
            ConstGauge::new(1i64).encode(attached.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic
/// text format (0.0.4) otherwise: curl, `promtool check metrics` and older
/// scrapers read that one.
async fn metrics_handler(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let metrics = state.metrics.clone();
    // Counter reads are syscalls: keep them off the async workers.
    let body = tokio::task::spawn_blocking(move || metrics.render())
        .await
        .unwrap_or_default();
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
    } else {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_text_format(&body),
        )
    }
}

/// OpenMetrics text as the classic Prometheus text format: a counter family
/// is named by its sample name (`x_total`) in `# HELP`/`# TYPE`, and there is
/// no `# UNIT` or `# EOF`.
#[must_use]
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total ");
                    out.push_str(tail);
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `ready` (200) once serving; `degraded` (still 200: every listener
/// serves and the shim enforces every key, the datapath fails open where its
/// maps are behind) while a datapath reconcile is pending; `not ready` (503)
/// before the start completes and while stopping.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    } else if state.metrics.datapath_in_sync.get() == 0 {
        (
            StatusCode::OK,
            "degraded: datapath maps do not match the policy (reconciling)\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Bind the metrics listener now (so a bad address fails the start), serve later.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics on {addr}"))
}

/// Serve `/metrics` and `/readyz` until `shutdown` resolves, with the same
/// header and idle timeouts as the listeners and the right to use the
/// descriptors they leave free (`crate::conn`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let gate = crate::conn::Gate::new(
        "metrics",
        crate::conn::Reserve::Use,
        crate::conn::ConnLimits::default(),
        Vec::new(),
        metrics.connections.clone(),
    );
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/readyz", get(readyz))
        .with_state(HttpState { metrics, ready });
    crate::conn::serve_router(listener, app, gate, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::to_text_format;

    #[test]
    fn openmetrics_to_the_classic_text_format() {
        let om = "# HELP keyfence_http_requests Requests.\n# TYPE keyfence_http_requests counter\n\
                  keyfence_http_requests_total{listener=\"api\"} 3\n\
                  # HELP keyfence_keys Keys.\n# TYPE keyfence_keys gauge\nkeyfence_keys 2\n\
                  # HELP d Seconds.\n# TYPE d histogram\n# UNIT d seconds\nd_bucket{le=\"+Inf\"} 1\nd_sum 0.5\nd_count 1\n# EOF\n";
        let text = to_text_format(om);
        assert_eq!(
            text,
            "# HELP keyfence_http_requests_total Requests.\n# TYPE keyfence_http_requests_total counter\n\
             keyfence_http_requests_total{listener=\"api\"} 3\n\
             # HELP keyfence_keys Keys.\n# TYPE keyfence_keys gauge\nkeyfence_keys 2\n\
             # HELP d Seconds.\n# TYPE d histogram\nd_bucket{le=\"+Inf\"} 1\nd_sum 0.5\nd_count 1\n"
        );
    }
}
