//! Process-wide metrics: per-service call counts by outcome and error kind, latency
//! histograms and breaker state, exported in Prometheus text format (`prometheus-client`);
//! exact per-service percentiles for `fmhost run --metrics` (`hdrhistogram`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    outcome: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    pipeline: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    pipeline: String,
    stage: String,
    status: String,
}

/// One version of a plugin: its name, version and the first 12 hex digits of its sha256
/// (two builds may share a version string).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginOutcome {
    plugin: String,
    version: String,
    sha256: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CanaryLabels {
    plugin: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginName {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    pipeline: String,
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    pipeline: String,
    on: String,
    outcome: String,
}

/// What a trigger counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerCount {
    /// A run started by a schedule, poll, file or message.
    Fired,
    /// A schedule's fire not run because the previous run was still running.
    Skipped,
    /// A schedule's fire missed while the server was down, outside its catch-up.
    Missed,
    /// A file trigger's `expect_every` passed without a file.
    NoFile,
    /// A queue message acknowledged: its run is journaled as succeeded (or settled).
    NatsAcked,
    /// A queue message negatively acknowledged after a transient failure, to come back.
    NatsNacked,
    /// A queue message terminated: dead-lettered, not to be delivered again.
    NatsTerminated,
}

pub struct Metrics {
    registry: Registry,
    triggers: [Family<TriggerLabels, Counter>; 7],
    alerts: Family<AlertLabels, Counter>,
    plugin_invocations: Family<PluginOutcome, Counter>,
    plugin_latency: Family<PluginLabels, Histogram, fn() -> Histogram>,
    plugin_runs: Family<PluginOutcome, Counter>,
    canary_percent: Family<PluginName, Gauge>,
    canary_decisions: Family<CanaryLabels, Counter>,
    runs: Family<RunLabels, Counter>,
    stages: Family<StageLabels, Histogram, fn() -> Histogram>,
    calls: Family<CallLabels, Counter>,
    latency: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    breaker: Family<ServiceLabel, Gauge>,
    headroom: Family<ServiceLabel, Gauge>,
    headroom_limit: Family<ServiceLabel, Gauge>,
    drift: Family<ServiceLabel, Counter>,
    stats: Mutex<HashMap<String, ServiceStats>>,
}

/// One service's figures, for tables.
#[derive(Debug, Clone)]
pub struct ServiceStats {
    pub success: u64,
    pub errors: BTreeMap<&'static str, u64>,
    latency_us: hdrhistogram::Histogram<u64>,
    pub breaker: BreakerState,
    /// What the service last said is left of its rate limit, and the limit.
    pub headroom: Option<(u64, Option<u64>)>,
}

impl ServiceStats {
    fn new() -> ServiceStats {
        ServiceStats {
            success: 0,
            errors: BTreeMap::new(),
            latency_us: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid bounds"),
            breaker: BreakerState::Closed,
            headroom: None,
        }
    }

    pub fn calls(&self) -> u64 {
        self.success + self.errors.values().sum::<u64>()
    }
    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// One plugin version's series (see [`Metrics::plugin_version`]).
#[derive(Clone)]
pub struct PluginVersionMetrics {
    invocations_ok: Counter,
    invocations_error: Counter,
    runs_ok: Counter,
    runs_failed: Counter,
    latency: Histogram,
}

impl PluginVersionMetrics {
    /// One invocation.
    pub fn invocation(&self, ok: bool, elapsed: Duration) {
        if ok {
            self.invocations_ok.inc();
        } else {
            self.invocations_error.inc();
        }
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// One run the version served, ok when every invocation in it succeeded.
    pub fn run(&self, ok: bool) {
        if ok {
            self.runs_ok.inc();
        } else {
            self.runs_failed.inc();
        }
    }
}

fn plugin_outcome(v: &PluginLabels, outcome: &str) -> PluginOutcome {
    PluginOutcome {
        plugin: v.plugin.clone(),
        version: v.version.clone(),
        sha256: v.sha256.clone(),
        outcome: outcome.into(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fmhost");
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<ServiceLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let breaker = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "upstream_calls",
            "Outbound call attempts by service, outcome and error kind",
            calls.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Outbound call attempt latency by service",
            latency.clone(),
        );
        registry.register(
            "circuit_state",
            "Circuit breaker state by service (0 closed, 1 open, 2 half-open)",
            breaker.clone(),
        );
        let headroom = Family::<ServiceLabel, Gauge>::default();
        let headroom_limit = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "rate_limit_remaining",
            "Requests left in the service's rate-limit window, as its last response said",
            headroom.clone(),
        );
        registry.register(
            "rate_limit_limit",
            "The service's rate limit per window, as its last response said",
            headroom_limit.clone(),
        );
        let drift = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "schema_drift",
            "Departures of recorded answers from the shape learned for their endpoint",
            drift.clone(),
        );
        let runs = Family::<RunLabels, Counter>::default();
        let stages = Family::<StageLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register("runs", "Finished runs by pipeline and status", runs.clone());
        registry.register(
            "stage_duration_seconds",
            "Stage duration by pipeline, stage and status",
            stages.clone(),
        );
        let plugin_invocations = Family::<PluginOutcome, Counter>::default();
        let plugin_latency =
            Family::<PluginLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let plugin_runs = Family::<PluginOutcome, Counter>::default();
        let canary_percent = Family::<PluginName, Gauge>::default();
        let canary_decisions = Family::<CanaryLabels, Counter>::default();
        registry.register(
            "plugin_invocations",
            "Plugin invocations by plugin version and outcome (ok, error)",
            plugin_invocations.clone(),
        );
        registry.register(
            "plugin_invocation_seconds",
            "Plugin invocation latency by plugin version",
            plugin_latency.clone(),
        );
        registry.register(
            "plugin_runs",
            "Runs a plugin version served, by outcome (ok: every invocation succeeded)",
            plugin_runs.clone(),
        );
        registry.register(
            "plugin_canary_percent",
            "Share of new runs sent to a plugin's canary version (0: no canary)",
            canary_percent.clone(),
        );
        registry.register(
            "plugin_canary_decisions",
            "Canaries promoted or rolled back, by plugin and decision",
            canary_decisions.clone(),
        );
        let triggers: [Family<TriggerLabels, Counter>; 7] = Default::default();
        for (family, (name, help)) in triggers.iter().zip([
            (
                "trigger_fires",
                "Runs started by schedules, polls, files and queue messages, by pipeline and trigger",
            ),
            (
                "schedule_skipped",
                "Schedule fires not run because the previous run was still running (overlap: skip)",
            ),
            (
                "schedule_missed",
                "Schedule fires missed while the server was down, outside the catch-up",
            ),
            (
                "trigger_no_file",
                "Times a file trigger's expect_every passed without a file",
            ),
            (
                "nats_acked",
                "NATS messages acknowledged after their run was journaled",
            ),
            (
                "nats_nacked",
                "NATS messages negatively acknowledged after a transient failure (redelivered with backoff)",
            ),
            (
                "nats_terminated",
                "NATS messages terminated: dead-lettered, poison or out of deliveries",
            ),
        ]) {
            registry.register(name, help, family.clone());
        }
        let alerts = Family::<AlertLabels, Counter>::default();
        registry.register(
            "alerts",
            "Alerts by pipeline, condition and outcome (sent, failed, suppressed by the cool-down)",
            alerts.clone(),
        );
        Metrics {
            registry,
            triggers,
            alerts,
            plugin_invocations,
            plugin_latency,
            plugin_runs,
            canary_percent,
            canary_decisions,
            runs,
            stages,
            calls,
            latency,
            breaker,
            headroom,
            headroom_limit,
            drift,
            stats: Mutex::new(HashMap::new()),
        }
    }

    /// Records one call attempt: `kind` is `None` for a success.
    pub fn record_call(&self, service: &str, kind: Option<ErrorKind>, elapsed: Duration) {
        let outcome = if kind.is_some() { "error" } else { "success" };
        let kind_name = kind.map(ErrorKind::as_str).unwrap_or("");
        self.calls
            .get_or_create(&CallLabels {
                service: service.into(),
                outcome: outcome.into(),
                kind: kind_name.into(),
            })
            .inc();
        let sent = kind != Some(ErrorKind::CircuitOpen);
        if sent {
            self.latency
                .get_or_create(&ServiceLabel {
                    service: service.into(),
                })
                .observe(elapsed.as_secs_f64());
        }
        let mut stats = self.stats.lock().expect("metrics lock");
        let s = stats
            .entry(service.to_string())
            .or_insert_with(ServiceStats::new);
        match kind {
            None => s.success += 1,
            Some(k) => *s.errors.entry(k.as_str()).or_default() += 1,
        }
        if sent {
            let _ = s.latency_us.record((elapsed.as_micros() as u64).max(1));
        }
    }

    /// The series of one plugin version, looked up once so that counting an invocation
    /// costs no label lookup.
    pub fn plugin_version(&self, version: &PluginLabels) -> PluginVersionMetrics {
        let counter = |family: &Family<PluginOutcome, Counter>, outcome: &str| {
            family
                .get_or_create(&plugin_outcome(version, outcome))
                .clone()
        };
        PluginVersionMetrics {
            invocations_ok: counter(&self.plugin_invocations, "ok"),
            invocations_error: counter(&self.plugin_invocations, "error"),
            runs_ok: counter(&self.plugin_runs, "ok"),
            runs_failed: counter(&self.plugin_runs, "failed"),
            latency: self.plugin_latency.get_or_create(version).clone(),
        }
    }

    pub fn set_canary_percent(&self, plugin: &str, percent: u32) {
        self.canary_percent
            .get_or_create(&PluginName {
                plugin: plugin.into(),
            })
            .set(percent as i64);
    }

    /// A canary promoted or rolled back (`decision`: promoted, rolled_back).
    pub fn record_canary_decision(&self, plugin: &str, decision: &str) {
        self.canary_decisions
            .get_or_create(&CanaryLabels {
                plugin: plugin.into(),
                decision: decision.into(),
            })
            .inc();
    }

    pub fn record_trigger(&self, what: TriggerCount, pipeline: &str, trigger: &str, n: u64) {
        self.triggers[what as usize]
            .get_or_create(&TriggerLabels {
                pipeline: pipeline.into(),
                trigger: trigger.into(),
            })
            .inc_by(n);
    }

    pub fn record_alert(&self, pipeline: &str, on: &str, outcome: &str) {
        self.alerts
            .get_or_create(&AlertLabels {
                pipeline: pipeline.into(),
                on: on.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn record_run(&self, pipeline: &str, status: &str) {
        let status = status.to_string();
        self.runs
            .get_or_create(&RunLabels {
                pipeline: pipeline.into(),
                status,
            })
            .inc();
    }

    pub fn record_stage(&self, pipeline: &str, stage: &str, status: &str, elapsed: Duration) {
        let status = status.to_string();
        self.stages
            .get_or_create(&StageLabels {
                pipeline: pipeline.into(),
                stage: stage.into(),
                status,
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_breaker(&self, service: &str, state: BreakerState) {
        let value = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.breaker
            .get_or_create(&ServiceLabel {
                service: service.into(),
            })
            .set(value);
        if let Some(s) = self.stats.lock().expect("metrics lock").get_mut(service) {
            s.breaker = state;
        }
    }

    /// Departures from a service's learned answer shape (schema drift).
    pub fn record_drift(&self, service: &str, n: usize) {
        self.drift
            .get_or_create(&ServiceLabel {
                service: service.into(),
            })
            .inc_by(n as u64);
    }

    /// What a service's last response said is left of its rate limit.
    pub fn set_headroom(&self, service: &str, remaining: u64, limit: Option<u64>) {
        let label = ServiceLabel {
            service: service.into(),
        };
        self.headroom
            .get_or_create(&label)
            .set(remaining.min(i64::MAX as u64) as i64);
        if let Some(l) = limit {
            self.headroom_limit
                .get_or_create(&label)
                .set(l.min(i64::MAX as u64) as i64);
        }
        self.stats
            .lock()
            .expect("metrics lock")
            .entry(service.to_string())
            .or_insert_with(ServiceStats::new)
            .headroom = Some((remaining, limit));
    }

    pub fn snapshot(&self) -> BTreeMap<String, ServiceStats> {
        self.stats
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Everything in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A per-service table for humans.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<28} {:>6} {:>6} {:>8} {:>8}  {:<9} {:>11}  {}\n",
            "SERVICE", "CALLS", "OK", "P50 MS", "P99 MS", "BREAKER", "HEADROOM", "ERRORS"
        );
        for (name, s) in self.snapshot() {
            let errors = if s.errors.is_empty() {
                "-".to_string()
            } else {
                s.errors
                    .iter()
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let headroom = match s.headroom {
                Some((left, Some(limit))) => format!("{left}/{limit}"),
                Some((left, None)) => left.to_string(),
                None => "-".into(),
            };
            out.push_str(&format!(
                "{:<28} {:>6} {:>6} {:>8.1} {:>8.1}  {:<9} {:>11}  {}\n",
                name,
                s.calls(),
                s.success,
                s.percentile_ms(0.5),
                s.percentile_ms(0.99),
                s.breaker.as_str(),
                headroom,
                errors
            ));
        }
        out
    }
}

/// A circuit breaker's state (the breaker itself is `http::service`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}
