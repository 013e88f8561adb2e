//! Hot-swappable plugins: each name maps to a slot holding its current version.
//!
//! A new version is compiled and validated (world, `describe()`, config schema, name)
//! before it is switched in atomically; runs pin the version they start with, so runs
//! in flight finish on it. The previous versions are kept for rollback.
//!
//! A new version may instead come in as a *canary*: it serves a share of new runs
//! (spread evenly: with 10%, one run in ten, the first one included) and the current
//! version the rest. Each version counts its invocations, its runs (ok when every
//! invocation in the run succeeded) and its latency, in `GET /v1/plugins` and
//! `/metrics`. With an automatic rule the canary is rolled back as soon as its run error
//! rate exceeds the current version's over the same period by more than the allowed
//! excess, and promoted once it has served enough runs without.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde_json::{Value, json};

use crate::component::{Component, ConfigProblem, Registry, StageContext};
use crate::error::{ErrorKind, StageError};
use crate::metrics::{Metrics, PluginLabels, PluginVersionMetrics};
use crate::plugin::{Plugin, PluginRuntime, WasmComponent};

/// One version of a plugin and what it has done since it was loaded.
pub struct Version {
    pub plugin: Arc<Plugin>,
    pub runs_served: AtomicU64,
    /// Where this version was kept in the upload directory, if it was.
    kept_at: std::sync::OnceLock<PathBuf>,
    metrics: PluginVersionMetrics,
    runs_ok: AtomicU64,
    runs_failed: AtomicU64,
    invocations: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Version {
    fn new(plugin: Arc<Plugin>, metrics: &Metrics) -> Arc<Version> {
        Arc::new(Version {
            metrics: metrics.plugin_version(&PluginLabels {
                plugin: plugin.name.clone(),
                version: plugin.version.clone(),
                sha256: plugin.hash.chars().take(12).collect(),
            }),
            plugin,
            runs_served: AtomicU64::new(0),
            kept_at: std::sync::OnceLock::new(),
            runs_ok: AtomicU64::new(0),
            runs_failed: AtomicU64::new(0),
            invocations: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_us: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("valid bounds"),
            ),
        })
    }

    /// Finished runs: (ok, failed).
    fn runs(&self) -> (u64, u64) {
        (
            self.runs_ok.load(Ordering::SeqCst),
            self.runs_failed.load(Ordering::SeqCst),
        )
    }

    fn stats(&self) -> Value {
        let (ok, failed) = self.runs();
        let latency = self.latency_us.lock().expect("latency lock");
        let ms = |q: f64| {
            (!latency.is_empty())
                .then(|| (latency.value_at_quantile(q) as f64 / 1000.0 * 10.0).round() / 10.0)
        };
        json!({
            "runs_ok": ok,
            "runs_failed": failed,
            "error_rate": error_rate(ok, failed),
            "invocations": self.invocations.load(Ordering::Relaxed),
            "invocation_errors": self.errors.load(Ordering::Relaxed),
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
        })
    }

    fn summary(&self) -> Value {
        json!({"version": self.plugin.version, "sha256": self.plugin.hash})
    }
}

fn error_rate(ok: u64, failed: u64) -> f64 {
    if ok + failed == 0 {
        0.0
    } else {
        failed as f64 / (ok + failed) as f64
    }
}

/// When a canary decides for itself.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AutoRule {
    /// Promoted once it has served this many runs without an error-rate excess.
    pub promote_after: u64,
    /// Rolled back when its run error rate exceeds the current version's (over the
    /// canary's period) by more than this (0.05: five points).
    pub max_error_rate_excess: f64,
}

impl Default for AutoRule {
    fn default() -> Self {
        AutoRule {
            promote_after: 20,
            max_error_rate_excess: 0.0,
        }
    }
}

/// How a new version comes in as a canary.
#[derive(Debug, Clone, Copy)]
pub struct CanarySpec {
    /// Share of new runs, 1 to 100.
    pub percent: u32,
    pub auto: Option<AutoRule>,
}

/// A version serving a share of new runs beside the current one.
pub struct Canary {
    version: Arc<Version>,
    spec: CanarySpec,
    /// The upload, kept on disk only once promoted (a restart serves the current version).
    bytes: Vec<u8>,
    origin: String,
    started: SystemTime,
    /// Runs routed so far (both versions), for the even spread.
    routed: AtomicU64,
    /// The current version's finished runs when the canary began: the two error rates
    /// are compared over the same period.
    baseline: (u64, u64),
}

impl Canary {
    /// Whether the next run goes to the canary: run n (from 0) does when
    /// ceil((n+1)·p/100) > ceil(n·p/100), which sends exactly p in every 100, evenly.
    fn takes_next(&self) -> bool {
        to_canary(
            self.routed.fetch_add(1, Ordering::Relaxed),
            self.spec.percent,
        )
    }
}

/// Whether run `n` (from 0) of a canary's period goes to the canary at `percent`.
fn to_canary(n: u64, percent: u32) -> bool {
    let p = percent as u64;
    ((n + 1) * p).div_ceil(100) > (n * p).div_ceil(100)
}

/// Hears of what a canary decided on its own.
pub type Listener = Arc<dyn Fn(Value) + Send + Sync>;

/// What every slot shares: metrics, where promoted uploads are kept, who hears of decisions.
struct Hub {
    metrics: Arc<Metrics>,
    upload_dir: Option<PathBuf>,
    listener: RwLock<Option<Listener>>,
}

impl Hub {
    fn announce(&self, event: Value) {
        if let Some(l) = self.listener.read().expect("listener lock").clone() {
            l(event);
        }
    }
}

pub struct Slot {
    pub name: String,
    current: ArcSwap<Version>,
    canary: ArcSwapOption<Canary>,
    /// Older versions, for rollback. Its lock is also the slot's change lock: every
    /// change of `current` or `canary` is made holding it.
    previous: Mutex<Vec<Arc<Version>>>,
    hub: Arc<Hub>,
}

impl Slot {
    pub fn current(&self) -> Arc<Version> {
        self.current.load_full()
    }

    /// After a canary run ended or failed: promote, roll back, or wait.
    fn judge(&self, canary: &Arc<Canary>) {
        let Some(rule) = canary.spec.auto else {
            return;
        };
        let (c_ok, c_failed) = canary.version.runs();
        let (ok, failed) = self.current().runs();
        let (b_ok, b_failed) = canary.baseline;
        let current_rate = error_rate(ok.saturating_sub(b_ok), failed.saturating_sub(b_failed));
        let canary_rate = error_rate(c_ok, c_failed);
        if c_failed > 0 && canary_rate > current_rate + rule.max_error_rate_excess {
            let why = format!(
                "its run error rate {:.1}% ({c_failed} of {} runs) exceeds the current version's {:.1}% by more than {:.1} points",
                canary_rate * 100.0,
                c_ok + c_failed,
                current_rate * 100.0,
                rule.max_error_rate_excess * 100.0
            );
            self.end_canary(canary, false, &why);
        } else if c_ok >= rule.promote_after {
            let why = format!(
                "{c_ok} runs ok, error rate {:.1}% against the current version's {:.1}%",
                canary_rate * 100.0,
                current_rate * 100.0
            );
            self.end_canary(canary, true, &why);
        }
    }

    /// Promotes or rolls back `canary` if it is still this slot's canary; says whether it did.
    fn end_canary(&self, canary: &Arc<Canary>, promote: bool, why: &str) -> bool {
        let mut previous = self.previous.lock().expect("previous lock");
        let still = self
            .canary
            .load()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, canary));
        if !still {
            return false;
        }
        let name = &self.name;
        let old = self.current();
        let new = &canary.version;
        let (from, to) = (&old.plugin.version, &new.plugin.version);
        let decision = if promote { "promoted" } else { "rolled_back" };
        if promote {
            if let Some(dir) = &self.hub.upload_dir {
                match persist(dir, name, &canary.bytes) {
                    Ok(path) => {
                        let _ = new.kept_at.set(path);
                    }
                    Err(e) => {
                        tracing::warn!(target: "fmhost::serve", plugin = %name, "cannot keep the promoted version on disk: {e}");
                    }
                }
            }
            let replaced = self.current.swap(new.clone());
            previous.push(replaced);
            tracing::info!(target: "fmhost::serve", plugin = %name, decision, current_version = %from, canary_version = %to, origin = %canary.origin,
                "canary of {name} promoted: {to} ({}) now serves every run, {from} kept for rollback; {why}", &new.plugin.hash[..12]);
        } else {
            tracing::warn!(target: "fmhost::serve", plugin = %name, decision, current_version = %from, canary_version = %to, origin = %canary.origin,
                "canary of {name} rolled back: {to} ({}) serves no more runs, {from} serves every run; {why}", &new.plugin.hash[..12]);
        }
        self.canary.store(None);
        drop(previous);
        self.hub.metrics.set_canary_percent(name, 0);
        self.hub.metrics.record_canary_decision(name, decision);
        self.hub.announce(json!({
            "type": "plugin", "name": name, "canary": decision,
            "version": if promote { to } else { from },
            "candidate": {"version": to, "sha256": new.plugin.hash},
            "reason": why,
        }));
        true
    }
}

/// The component pipelines see for a swappable plugin.
pub struct SwappableComponent {
    slot: Arc<Slot>,
}

#[async_trait::async_trait]
impl Component for SwappableComponent {
    fn name(&self) -> &str {
        &self.slot.name
    }
    fn version(&self) -> Option<String> {
        Some(self.slot.current().plugin.version.clone())
    }
    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        WasmComponent::new(self.slot.current().plugin.clone()).check_config(config)
    }
    fn sees_secrets(&self) -> bool {
        false
    }
    fn pin(&self) -> Option<Arc<dyn Component>> {
        let canary = self.slot.canary.load_full().filter(|c| c.takes_next());
        let version = match &canary {
            Some(c) => c.version.clone(),
            None => self.slot.current(),
        };
        version.runs_served.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(Pinned {
            inner: WasmComponent::new(version.plugin.clone()),
            version,
            slot: self.slot.clone(),
            canary,
            invoked: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        }))
    }
    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        upstream: Arc<Value>,
    ) -> Result<Value, StageError> {
        // Only reached when a caller did not pin; use the current version.
        WasmComponent::new(self.slot.current().plugin.clone())
            .invoke(ctx, config, upstream)
            .await
    }
}

/// One run's hold on one version: counts the run's invocations and, when the run lets
/// go of it, the run's outcome for that version.
struct Pinned {
    inner: WasmComponent,
    version: Arc<Version>,
    slot: Arc<Slot>,
    /// Set when this run is the canary's.
    canary: Option<Arc<Canary>>,
    invoked: AtomicBool,
    failed: AtomicBool,
}

#[async_trait::async_trait]
impl Component for Pinned {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn version(&self) -> Option<String> {
        self.inner.version()
    }
    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        self.inner.check_config(config)
    }
    fn sees_secrets(&self) -> bool {
        false
    }
    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        upstream: Arc<Value>,
    ) -> Result<Value, StageError> {
        let started = Instant::now();
        let result = self.inner.invoke(ctx, config, upstream).await;
        // A cancelled run says nothing about the version.
        if matches!(&result, Err(e) if e.kind == ErrorKind::Cancelled) {
            return result;
        }
        let ok = result.is_ok();
        let v = &self.version;
        v.invocations.fetch_add(1, Ordering::Relaxed);
        if !ok {
            v.errors.fetch_add(1, Ordering::Relaxed);
        }
        let elapsed = started.elapsed();
        let _ = v
            .latency_us
            .lock()
            .expect("latency lock")
            .record((elapsed.as_micros() as u64).max(1));
        v.metrics.invocation(ok, elapsed);
        self.invoked.store(true, Ordering::SeqCst);
        // A canary's first failure in a run counts the run failed at once, so an
        // automatic rollback does not wait for the run to end.
        if !ok && !self.failed.swap(true, Ordering::SeqCst) {
            v.runs_failed.fetch_add(1, Ordering::SeqCst);
            v.metrics.run(false);
            if let Some(c) = &self.canary {
                self.slot.judge(c);
            }
        }
        result
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if !self.invoked.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst) {
            return;
        }
        let v = &self.version;
        v.runs_ok.fetch_add(1, Ordering::SeqCst);
        v.metrics.run(true);
        if let Some(c) = &self.canary {
            self.slot.judge(c);
        }
    }
}

/// Why a swap was refused; the old version keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{0}")]
    Invalid(String),
    /// The new version asks for more than the current one was granted.
    #[error(
        "{0}; approve it in the same call (PUT ...?approve=true, or fmhost plugins swap --approve) if it should have it"
    )]
    NeedsApproval(String),
    #[error("no plugin named \"{0}\"")]
    Unknown(String),
    #[error("plugin \"{0}\" has no previous version to roll back to")]
    NothingToRollBack(String),
    #[error("plugin \"{0}\" has no canary to promote")]
    NoCanary(String),
}

/// A served pipeline's stage that uses a plugin, so a swap can check its config first.
pub struct StageUse {
    pub pipeline: String,
    pub stage: String,
    /// Canonical component name.
    pub component: String,
    pub config: Value,
}

pub struct PluginRegistry {
    runtime: Arc<PluginRuntime>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    uses: RwLock<Vec<StageUse>>,
    /// Where uploaded versions are kept, so a restart serves what was last swapped in.
    hub: Arc<Hub>,
}

impl PluginRegistry {
    /// `upload_dir` is where uploaded versions are kept, so a restart serves what was
    /// last swapped in or promoted.
    pub fn new(
        runtime: Arc<PluginRuntime>,
        plugins: Vec<Arc<Plugin>>,
        upload_dir: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> PluginRegistry {
        let hub = Arc::new(Hub {
            metrics,
            upload_dir,
            listener: RwLock::new(None),
        });
        let slots = plugins
            .into_iter()
            .map(|p| {
                let name = p.name.clone();
                (
                    name.clone(),
                    Arc::new(Slot {
                        name,
                        current: ArcSwap::new(Version::new(p, &hub.metrics)),
                        canary: ArcSwapOption::empty(),
                        previous: Mutex::new(Vec::new()),
                        hub: hub.clone(),
                    }),
                )
            })
            .collect();
        PluginRegistry {
            runtime,
            slots: RwLock::new(slots),
            uses: RwLock::default(),
            hub,
        }
    }

    /// Who hears of what a canary decided on its own (the event stream).
    pub fn set_listener(&self, listener: Listener) {
        *self.hub.listener.write().expect("listener lock") = Some(listener);
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, SwapError> {
        self.slots
            .read()
            .expect("slots lock")
            .get(name)
            .cloned()
            .ok_or_else(|| SwapError::Unknown(name.to_string()))
    }

    /// Tells the registry which served stages use which plugin.
    pub fn set_uses(&self, uses: Vec<StageUse>) {
        *self.uses.write().expect("uses lock") = uses;
    }

    /// The built-ins plus a swappable component per plugin, for compiling pipelines.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::builtins();
        for slot in self.slots.read().expect("slots lock").values() {
            r.register(Arc::new(SwappableComponent { slot: slot.clone() }));
        }
        r
    }

    pub fn list(&self) -> Vec<Value> {
        self.slots
            .read()
            .expect("slots lock")
            .values()
            .map(|slot| {
                let v = slot.current();
                let p = &v.plugin;
                json!({
                    "name": slot.name,
                    "version": p.version,
                    "world": p.kind,
                    "sha256": p.hash,
                    "loaded_at": humantime::format_rfc3339_seconds(p.loaded_at).to_string(),
                    "runs_served": v.runs_served.load(Ordering::Relaxed),
                    "stats": v.stats(),
                    "file": p.path.display().to_string(),
                    "previous_versions": slot.previous.lock().expect("previous lock").iter().map(|v| v.summary()).collect::<Vec<_>>(),
                    "canary": slot.canary.load().as_ref().map(|c| json!({
                        "version": c.version.plugin.version,
                        "sha256": c.version.plugin.hash,
                        "percent": c.spec.percent,
                        "auto": c.spec.auto,
                        "since": humantime::format_rfc3339_seconds(c.started).to_string(),
                        "origin": c.origin,
                        "runs_served": c.version.runs_served.load(Ordering::Relaxed),
                        "stats": c.version.stats(),
                    })),
                })
            })
            .collect()
    }

    /// Compiles and validates `bytes`, then switches `name` to it, or with `canary` starts
    /// it as a canary beside the current version. Returns (current, new) versions.
    /// `approve` is the operator approving, in this call, hosts or a world the current
    /// version was not granted.
    pub async fn swap(
        &self,
        name: &str,
        bytes: &[u8],
        origin: &str,
        approve: bool,
        canary: Option<CanarySpec>,
    ) -> Result<(Option<String>, Arc<Plugin>), SwapError> {
        let started = Instant::now();
        let shown = PathBuf::from(origin);
        let plugin = self
            .runtime
            .load_bytes(&shown, bytes)
            .await
            .map_err(|e| SwapError::Invalid(e.to_string()))?;
        self.swap_loaded(name, bytes, plugin, origin, approve, canary, started)
    }

    #[allow(clippy::too_many_arguments)]
    fn swap_loaded(
        &self,
        name: &str,
        bytes: &[u8],
        plugin: Plugin,
        origin: &str,
        approve: bool,
        canary: Option<CanarySpec>,
        started: Instant,
    ) -> Result<(Option<String>, Arc<Plugin>), SwapError> {
        if let Some(c) = canary
            && !(1..=100).contains(&c.percent)
        {
            return Err(SwapError::Invalid(format!(
                "a canary's share is a percentage from 1 to 100, not {}",
                c.percent
            )));
        }
        if plugin.name != name {
            return Err(SwapError::Invalid(format!(
                "the component names itself \"{}\", not \"{name}\"",
                plugin.name
            )));
        }
        let slot = self.slot(name)?;
        let old = slot.current();
        if old.plugin.hash == plugin.hash {
            if canary.is_some() {
                return Err(SwapError::Invalid(format!(
                    "the upload is the version of \"{name}\" that serves now ({}, sha256 {}): there is nothing to try as a canary",
                    old.plugin.version,
                    &old.plugin.hash[..12]
                )));
            }
            return Ok((Some(old.plugin.version.clone()), old.plugin.clone()));
        }
        let mut asks = Vec::new();
        if old.plugin.kind != plugin.kind {
            asks.push(format!(
                "it is a {} where the current version is a {}",
                world_name(plugin.kind),
                world_name(old.plugin.kind)
            ));
        }
        let new_hosts: Vec<String> = plugin
            .allowed_hosts
            .iter()
            .filter(|h| !old.plugin.allowed_hosts.contains(h))
            .cloned()
            .collect();
        if !new_hosts.is_empty() {
            asks.push(format!(
                "it asks for host(s) {} that the current version was not granted",
                new_hosts.join(", ")
            ));
        }
        if !asks.is_empty() && !approve {
            return Err(SwapError::NeedsApproval(format!(
                "the new version of \"{name}\" asks for more: {}",
                asks.join("; ")
            )));
        }
        let problems: Vec<String> = self
            .uses
            .read()
            .expect("uses lock")
            .iter()
            .filter(|u| u.component == crate::component::canonical_name(name))
            .flat_map(|u| {
                plugin.check_config(&u.config).into_iter().map(move |p| {
                    format!(
                        "pipeline {} stage \"{}\": config{}: {}",
                        u.pipeline, u.stage, p.path, p.message
                    )
                })
            })
            .collect();
        if !problems.is_empty() {
            return Err(SwapError::Invalid(format!(
                "the new version's config schema rejects served stages: {}",
                problems.join("; ")
            )));
        }
        if approve && !new_hosts.is_empty() {
            self.runtime.approve_hosts(name, &new_hosts);
        }
        if let Some(spec) = canary {
            return Ok(self.start_canary(&slot, plugin, bytes, origin, spec));
        }
        let mut plugin = plugin;
        if let Some(dir) = &self.hub.upload_dir {
            match persist(dir, name, bytes) {
                Ok(path) => plugin.path = path,
                Err(e) => {
                    tracing::warn!(target: "fmhost::serve", plugin = name, "cannot keep the uploaded version on disk: {e}");
                }
            }
        }
        let plugin = Arc::new(plugin);
        let new = Version::new(plugin.clone(), &self.hub.metrics);
        {
            let mut previous = slot.previous.lock().expect("previous lock");
            previous.push(slot.current.swap(new));
            // A whole swap ends a canary: the operator chose a version for every run.
            if let Some(c) = slot.canary.swap(None) {
                self.hub.metrics.set_canary_percent(name, 0);
                tracing::info!(target: "fmhost::serve", plugin = name, "the canary {} of {name} ends: a new version was swapped in", c.version.plugin.version);
            }
        }
        tracing::info!(
            target: "fmhost::serve",
            plugin = name,
            old_version = %old.plugin.version,
            old_sha256 = %&old.plugin.hash[..12],
            new_version = %plugin.version,
            new_sha256 = %&plugin.hash[..12],
            origin,
            swap_ms = started.elapsed().as_millis() as u64,
            "swapped plugin {name}: {} ({}) -> {} ({}) from {origin} in {} ms",
            old.plugin.version,
            &old.plugin.hash[..12],
            plugin.version,
            &plugin.hash[..12],
            started.elapsed().as_millis()
        );
        Ok((Some(old.plugin.version.clone()), plugin))
    }

    fn start_canary(
        &self,
        slot: &Arc<Slot>,
        plugin: Plugin,
        bytes: &[u8],
        origin: &str,
        spec: CanarySpec,
    ) -> (Option<String>, Arc<Plugin>) {
        let name = &slot.name;
        let plugin = Arc::new(plugin);
        let _change = slot.previous.lock().expect("previous lock");
        let current = slot.current();
        let canary = Arc::new(Canary {
            version: Version::new(plugin.clone(), &self.hub.metrics),
            spec,
            bytes: bytes.to_vec(),
            origin: origin.to_string(),
            started: SystemTime::now(),
            routed: AtomicU64::new(0),
            baseline: current.runs(),
        });
        if let Some(old) = slot.canary.swap(Some(canary)) {
            tracing::info!(target: "fmhost::serve", plugin = %name, "the canary {} of {name} is replaced", old.version.plugin.version);
        }
        self.hub.metrics.set_canary_percent(name, spec.percent);
        let rule = match spec.auto {
            Some(r) => format!(
                "promoted after {} ok runs, rolled back at an error rate more than {:.1} points above the current version's",
                r.promote_after,
                r.max_error_rate_excess * 100.0
            ),
            None => "promote or roll it back by hand".to_string(),
        };
        tracing::info!(target: "fmhost::serve", plugin = %name, canary_version = %plugin.version, percent = spec.percent, origin,
            "canary of {name}: {} ({}) serves {}% of new runs, {} the rest; {rule}",
            plugin.version, &plugin.hash[..12], spec.percent, current.plugin.version);
        (Some(current.plugin.version.clone()), plugin)
    }

    /// The components with `bytes` (a candidate version of plugin `name`, compiled and
    /// checked here) in the plugin's place, for a shadow test; nothing is swapped.
    pub async fn with_candidate(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<(Registry, Arc<Plugin>), SwapError> {
        self.slot(name)?;
        let plugin = self
            .runtime
            .load_bytes(&PathBuf::from(format!("candidate:{name}")), bytes)
            .await
            .map_err(|e| SwapError::Invalid(e.to_string()))?;
        if plugin.name != name {
            return Err(SwapError::Invalid(format!(
                "the component names itself \"{}\", not \"{name}\"",
                plugin.name
            )));
        }
        let plugin = Arc::new(plugin);
        let mut registry = self.registry();
        registry.register(Arc::new(WasmComponent::new(plugin.clone())));
        Ok((registry, plugin))
    }

    /// Every secret name the operator's policy grants a plugin.
    pub fn granted_secrets(&self) -> Vec<String> {
        self.runtime.policy().granted_secrets()
    }

    /// Makes the canary serve every run. Returns (old, new) versions.
    pub fn promote(&self, name: &str) -> Result<(String, String), SwapError> {
        let slot = self.slot(name)?;
        let canary = slot
            .canary
            .load_full()
            .ok_or_else(|| SwapError::NoCanary(name.to_string()))?;
        let from = slot.current().plugin.version.clone();
        if !slot.end_canary(&canary, true, "promoted by the operator") {
            return Err(SwapError::NoCanary(name.to_string()));
        }
        Ok((from, canary.version.plugin.version.clone()))
    }

    /// Ends a canary if there is one, else goes back to the version before the
    /// current one. Returns (from, to) versions.
    pub fn rollback(&self, name: &str) -> Result<(String, String), SwapError> {
        let slot = self.slot(name)?;
        if let Some(canary) = slot.canary.load_full()
            && slot.end_canary(&canary, false, "rolled back by the operator")
        {
            return Ok((
                canary.version.plugin.version.clone(),
                slot.current().plugin.version.clone(),
            ));
        }
        let mut previous_versions = slot.previous.lock().expect("previous lock");
        let previous = previous_versions
            .pop()
            .ok_or_else(|| SwapError::NothingToRollBack(name.to_string()))?;
        let to = previous.plugin.version.clone();
        let from = slot.current.swap(previous);
        drop(previous_versions);
        // The version rolled back from must not come back at the next start.
        if let Some(kept) = from.kept_at.get() {
            let _ = std::fs::remove_file(kept);
        } else if let Some(dir) = &self.hub.upload_dir
            && from.plugin.path.parent() == Some(dir.as_path())
        {
            let _ = std::fs::remove_file(&from.plugin.path);
        }
        tracing::info!(target: "fmhost::serve", plugin = name, old_version = %from.plugin.version, new_version = %to, "rolled back plugin {name}: {} -> {to}", from.plugin.version);
        Ok((from.plugin.version.clone(), to))
    }

    /// Swaps in a component file dropped into a watched directory.
    pub async fn swap_file(&self, path: &Path) {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(target: "fmhost::serve", file = %path.display(), "cannot read plugin file: {e}");
                return;
            }
        };
        let plugin = match self.runtime.load_bytes(path, &bytes).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(target: "fmhost::serve", file = %path.display(), "refused plugin file; the current version keeps serving: {e}");
                return;
            }
        };
        let name = plugin.name.clone();
        let origin = path.display().to_string();
        // A file dropped into a watched directory is never approved for more than the current version has.
        if let Err(e) =
            self.swap_loaded(&name, &bytes, plugin, &origin, false, None, Instant::now())
        {
            tracing::warn!(target: "fmhost::serve", file = %path.display(), "refused plugin file; the current version keeps serving: {e}");
        }
    }
}

fn world_name(w: crate::plugin::World) -> &'static str {
    match w {
        crate::plugin::World::Transform => "transform",
        crate::plugin::World::Connector => "connector",
    }
}

/// Keeps an uploaded version in the state directory, where the next start finds it
/// (the newest file of a name wins). Older uploads of the name beyond the last few go.
fn persist(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let path = dir.join(format!("{name}-{stamp}.wasm"));
    let tmp = dir.join(format!(".{name}-{stamp}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    let mut older: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| {
                    f.strip_prefix(name)?
                        .strip_prefix('-')?
                        .strip_suffix(".wasm")
                })
                .is_some_and(|stamp| stamp.chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    older.sort();
    let keep = 5;
    if older.len() > keep {
        for p in &older[..older.len() - keep] {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(path)
}

/// Watches plugin directories and swaps in complete `.wasm` files: an event starts a
/// quiet period, and a file is acted on once it has stopped changing.
pub fn watch(
    registry: Arc<PluginRegistry>,
    dirs: Vec<PathBuf>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && matches!(
                event.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Access(notify::event::AccessKind::Close(_))
            )
        {
            for p in event.paths {
                if p.extension().is_some_and(|e| e == "wasm") {
                    let _ = tx.send(p);
                }
            }
        }
    })?;
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        let quiet = Duration::from_millis(300);
        let mut pending: BTreeMap<PathBuf, Instant> = BTreeMap::new();
        loop {
            let next = pending.values().min().map(|t| *t + quiet);
            tokio::select! {
                got = rx.recv() => match got {
                    Some(p) => { pending.insert(p, Instant::now()); }
                    None => break,
                },
                _ = async { match next { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                    let now = Instant::now();
                    let ready: Vec<PathBuf> = pending.iter().filter(|(_, t)| now.duration_since(**t) >= quiet).map(|(p, _)| p.clone()).collect();
                    for p in ready {
                        pending.remove(&p);
                        if p.exists() {
                            registry.swap_file(&p).await;
                        }
                    }
                }
            }
        }
    });
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::to_canary;

    #[test]
    fn a_canary_gets_its_share_evenly_from_the_first_run() {
        for percent in [1, 10, 33, 50, 99, 100] {
            let picked: Vec<u64> = (0..1000).filter(|&n| to_canary(n, percent)).collect();
            assert_eq!(picked.len() as u32, percent * 10, "{percent}%");
            assert_eq!(picked[0], 0, "{percent}%: the first run goes to the canary");
            // Never two canary runs closer than the share allows.
            let gap = 100 / percent as u64;
            assert!(
                picked.windows(2).all(|w| w[1] - w[0] >= gap.max(1)),
                "{percent}%"
            );
        }
        let ten: Vec<u64> = (0..30).filter(|&n| to_canary(n, 10)).collect();
        assert_eq!(ten, [0, 10, 20]);
    }
}
