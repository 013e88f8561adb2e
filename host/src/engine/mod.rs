//! The scheduler: runs a [`Plan`] as a DAG, each stage as soon as its dependencies
//! have succeeded, independent stages concurrently on tokio.
//!
//! It renders each stage's config, hands it to the stage's [`Component`](crate::component::Component)
//! and records the result. It does no IO of its own and cannot tell a built-in from a plugin.
//!
//! A run's stages are futures polled by the run's own task (`FuturesUnordered`), not
//! spawned tasks: a hop between dependent stages then costs no cross-thread wake-up
//! (measured: ~30 µs per stage spawned, ~2 µs polled). Parallelism across cores comes
//! from concurrent runs; within a run, stages overlap on IO.

mod frame;
mod report;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use report::{RunReport, RunStatus, StageReport, StageStatus};

use crate::component::Component;
use crate::error::{ErrorKind, StageError};
use crate::http::{Outbound, RetryPolicy};
use crate::pipeline::{Plan, PlannedStage, RetryPlan};
use crate::secrets::Secrets;
use crate::template::Scope;

/// Shared by every run in a process: the outbound machinery and the secrets.
#[derive(Clone)]
pub struct Engine {
    pub outbound: Outbound,
    /// The current secrets; a reload (a rotated `--secrets` file) swaps them, and each
    /// stage reads them when it starts.
    secrets: Arc<arc_swap::ArcSwap<Secrets>>,
    /// A fixed `now()` for reproducible runs (`FMHOST_NOW`).
    pub fixed_now: Option<Arc<str>>,
}

/// Watches a run as it happens (the run journal). Called on the run's task: keep it quick.
/// Extends the outbound machinery's [`AttemptObserver`](crate::http::AttemptObserver):
/// every attempt a stage makes, from a built-in or a plugin, reaches it too.
pub trait RunObserver: crate::http::AttemptObserver {
    fn run_started(&self, _run_id: &str, _pipeline: &str, _stages: &[StageReport]) {}
    fn stage_updated(&self, _run_id: &str, _stage: &StageReport) {}
}

/// Stage outputs taken from an earlier run instead of running the stages again
/// (replay, and resuming a run interrupted by a crash), or given by a pipeline test's
/// mocks, which may also make a stage fail.
#[derive(Debug, Default, Clone)]
pub struct Reuse {
    /// The run the outputs come from (the run itself when resuming; `mock` in a test).
    pub from_run: String,
    pub outputs: HashMap<String, Arc<Value>>,
    /// Stages that fail with this error instead of running (a test's `error` mocks).
    pub errors: HashMap<String, crate::error::StageError>,
    /// Whether an entry for `ID` also stands for every iteration `ID[i]` (mocks).
    pub every_iteration: bool,
    /// Where stages that failed halfway got to ([`StageError::checkpoint`]): they run
    /// again from there.
    ///
    /// [`StageError::checkpoint`]: crate::error::StageError::checkpoint
    pub checkpoints: HashMap<String, Arc<Value>>,
}

#[derive(Default, Clone)]
pub struct RunOptions {
    /// Told about the run's progress.
    pub observer: Option<Arc<dyn RunObserver>>,
    pub run_id: Option<String>,
    /// A deadline for the whole run.
    pub timeout: Option<Duration>,
    /// Cancels the run: running stages are stopped, the rest skipped.
    pub cancel: CancellationToken,
    /// Stages that do not run: their outputs are taken from here.
    pub reuse: Option<Arc<Reuse>>,
    /// The run's place in a distributed trace (a new trace when `None`).
    pub trace: Option<crate::trace::RunTrace>,
    /// When the run began (Unix ms), if before this call (the journal's start): stage
    /// times count from it, so they line up with attempts' wall-clock times.
    pub started_at_ms: Option<i64>,
    /// What `now()` gives in this run, unless the engine pins it (`FMHOST_NOW`): a
    /// shadow replay gives the recorded run's time.
    pub now: Option<Arc<str>>,
    /// What `{{trigger.*}}` reads: what fired the run (journaled runs get it from their
    /// journal entry); else `{type: "manual", id, fired_at}` of the run itself.
    pub trigger: Option<Value>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("input does not match the pipeline's input schema: {}", .0.join("; "))]
    InvalidInput(Vec<String>),
}

pub fn new_run_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("run_{millis:012x}{:08x}", rand::random::<u32>())
}

/// Everything the frames of one run share: the run's identity, its observer and reuse,
/// the pinned components, and the report being built.
pub(crate) struct RunCtx {
    engine: Engine,
    run_id: Arc<str>,
    run_value: Value,
    observer: Option<Arc<dyn RunObserver>>,
    reuse: Option<Arc<Reuse>>,
    trace: crate::trace::RunTrace,
    /// The pipeline's request budget, spent by every stage of the run.
    budget: Option<Arc<crate::http::budget::Budget>>,
    started: Instant,
    pinned: Mutex<HashMap<usize, Arc<dyn Component>>>,
    reports: Mutex<Reports>,
}

#[derive(Default)]
struct Reports {
    list: Vec<StageReport>,
    at: HashMap<String, usize>,
}

impl RunCtx {
    /// The component a stage runs, resolved once per run (hot swaps leave a run alone).
    fn component(&self, c: &Arc<dyn Component>) -> Arc<dyn Component> {
        let key = Arc::as_ptr(c) as *const () as usize;
        self.pinned
            .lock()
            .expect("pinned")
            .entry(key)
            .or_insert_with(|| c.pin().unwrap_or_else(|| c.clone()))
            .clone()
    }

    fn reused(&self, id: &str) -> Option<(String, Arc<Value>)> {
        let r = self.reuse.as_ref()?;
        r.outputs
            .get(id)
            .or_else(|| {
                r.every_iteration
                    .then(|| r.outputs.get(base_id(id)))
                    .flatten()
            })
            .map(|o| (r.from_run.clone(), o.clone()))
    }

    /// The error a test's mock makes this stage fail with, if any.
    fn injected_error(&self, id: &str) -> Option<StageError> {
        let r = self.reuse.as_ref()?;
        r.errors
            .get(id)
            .or_else(|| {
                r.every_iteration
                    .then(|| r.errors.get(base_id(id)))
                    .flatten()
            })
            .cloned()
    }

    /// Changes stage `id`'s report (creating it: an iteration or a sub-pipeline's stage)
    /// and tells the observer.
    fn update(&self, id: &str, stage: &PlannedStage, f: impl FnOnce(&mut StageReport)) {
        self.update_then(id, stage, f, |_| {});
    }

    /// [`update`](Self::update), then `after` on the report once the observer has seen it.
    fn update_then(
        &self,
        id: &str,
        stage: &PlannedStage,
        f: impl FnOnce(&mut StageReport),
        after: impl FnOnce(&mut StageReport),
    ) {
        let mut reports = self.reports.lock().expect("reports");
        let k = match reports.at.get(id) {
            Some(&k) => k,
            None => {
                let k = reports.list.len();
                reports.list.push(StageReport::pending(id, stage));
                reports.at.insert(id.to_string(), k);
                k
            }
        };
        let report = &mut reports.list[k];
        f(report);
        if let Some(o) = &self.observer {
            o.stage_updated(&self.run_id, report);
        }
        after(report);
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn start(&self, id: &str, stage: &PlannedStage, version: Option<String>, per_item: bool) {
        let at = self.elapsed_ms();
        // A loop's iterations log at debug level; the loop itself reports progress.
        if per_item {
            tracing::debug!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "started", "{id}: started");
        } else {
            tracing::info!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "started", "{id}: started");
        }
        self.update(id, stage, |r| {
            r.status = StageStatus::Running;
            r.started_ms = Some(at);
            r.version = version;
        });
    }

    fn skip(&self, id: &str, stage: &PlannedStage, why: &str) {
        tracing::info!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "skipped", "{id}: skipped ({why})");
        self.update(id, stage, |r| {
            r.status = StageStatus::Skipped;
            r.skipped_because = Some(why.to_string());
        });
    }

    fn reuse_stage(&self, id: &str, stage: &PlannedStage, from: &str, output: &Arc<Value>) {
        let at = self.elapsed_ms();
        tracing::info!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "reused", from_run = %from, "{id}: output reused from run {from}");
        self.update(id, stage, |r| {
            r.status = StageStatus::Succeeded;
            r.started_ms = Some(at);
            r.duration_ms = Some(0);
            r.reused_from = Some(from.to_string());
            r.output = Some(output.clone());
        });
    }

    /// A stage ended: its report, its progress line and its metrics.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        id: &str,
        stage: &PlannedStage,
        result: Result<&Arc<Value>, &StageError>,
        attempts: u32,
        took: Duration,
        plan: &Plan,
        per_item: bool,
    ) {
        let ms = took.as_millis() as u64;
        let plural = if attempts == 1 { "" } else { "s" };
        let status = match result {
            Ok(_) => StageStatus::Succeeded,
            Err(_) => StageStatus::Failed,
        };
        match result {
            Ok(_) if per_item => {
                tracing::debug!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "succeeded", duration_ms = ms, attempts, "{id}: done in {ms} ms ({attempts} attempt{plural})")
            }
            Ok(_) => {
                tracing::info!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "succeeded", duration_ms = ms, attempts, "{id}: done in {ms} ms ({attempts} attempt{plural})")
            }
            Err(error) if stage.optional => {
                tracing::warn!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "failed", optional = true, duration_ms = ms, attempts, error_kind = error.kind.as_str(), error = %error.message, "{id}: failed after {ms} ms ({attempts} attempt{plural}), optional so its output is null: {error}")
            }
            Err(error) => {
                tracing::error!(target: "fmhost::progress", run_id = &*self.run_id, stage = id, event = "failed", duration_ms = ms, attempts, error_kind = error.kind.as_str(), error = %error.message, "{id}: failed after {ms} ms ({attempts} attempt{plural}): {error}")
            }
        }
        // A loop iteration's output goes to the observer (the journal) and to the loop's
        // results; the run's report keeps its status, so a run's memory does not grow
        // with the item count beyond the collected results.
        self.update_then(
            id,
            stage,
            |r| {
                r.status = status;
                r.duration_ms = Some(ms);
                r.attempts = attempts;
                match result {
                    Ok(v) => r.output = Some(v.clone()),
                    Err(e) => {
                        r.error = Some(e.clone());
                        if stage.optional {
                            r.output = Some(Arc::new(Value::Null));
                        }
                    }
                }
            },
            |r| {
                if per_item {
                    r.output = None;
                }
            },
        );
        // By the stage's own id: iterations share one series.
        self.engine
            .outbound
            .metrics
            .record_stage(&plan.name, &stage.id, status.as_str(), took);
    }

    /// Marks stages still running under `prefix`...`suffix` as failed with `why`
    /// (their futures were dropped).
    fn stop_running(&self, prefix: &str, suffix: &str, why: &str) {
        let now = self.elapsed_ms();
        let kind = if why.contains("time") {
            ErrorKind::Timeout
        } else {
            ErrorKind::Cancelled
        };
        let mut reports = self.reports.lock().expect("reports");
        for r in reports.list.iter_mut().filter(|r| {
            r.status == StageStatus::Running && r.id.starts_with(prefix) && r.id.contains(suffix)
        }) {
            r.status = StageStatus::Failed;
            r.error = Some(StageError::new(kind, why));
            r.duration_ms = r.started_ms.map(|s| now.saturating_sub(s));
            if let Some(o) = &self.observer {
                o.stage_updated(&self.run_id, r);
            }
        }
    }

    /// A finished frame of a whole pipeline: its output (the `output_stage`, the single
    /// sink, or an object keyed by sink), checked against the output schema.
    fn assemble(&self, view: &frame::View) -> Result<Value, StageError> {
        let plan = &view.plan;
        let out = |s: usize| view.output(s).cloned().unwrap_or(Value::Null);
        let value = match plan.sinks.as_slice() {
            [one] => out(*one),
            many => Value::Object(
                many.iter()
                    .map(|&s| (plan.stages[s].id.to_string(), out(s)))
                    .collect(),
            ),
        };
        self.check_output(plan, value)
    }

    fn check_output(&self, plan: &Plan, value: Value) -> Result<Value, StageError> {
        if let Some(schema) = &plan.output_schema {
            let violations = crate::schema::violations(schema, &value);
            if !violations.is_empty() {
                return Err(StageError::validation(format!(
                    "output does not match the pipeline's output schema: {}",
                    violations.join("; ")
                )));
            }
        }
        Ok(value)
    }
}

impl StageReport {
    fn pending(id: &str, stage: &PlannedStage) -> StageReport {
        StageReport {
            id: id.to_string(),
            component: stage.component_name.clone(),
            version: None,
            status: StageStatus::Pending,
            optional: stage.optional,
            started_ms: None,
            duration_ms: None,
            attempts: 0,
            error: None,
            skipped_because: None,
            reused_from: None,
            output: None,
        }
    }
}

impl Engine {
    pub fn new(secrets: Secrets) -> Engine {
        Engine {
            outbound: Outbound::new(),
            secrets: Arc::new(arc_swap::ArcSwap::from_pointee(secrets)),
            fixed_now: None,
        }
    }

    /// The secrets as they are now.
    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets.load_full()
    }

    /// The engine's secrets as they change (what a run's journal masks with).
    pub fn secrets_handle(&self) -> Arc<arc_swap::ArcSwap<Secrets>> {
        self.secrets.clone()
    }

    /// Replaces the secrets: stages that start from now on use these.
    pub fn set_secrets(&self, secrets: Secrets) {
        self.secrets.store(Arc::new(secrets));
    }

    /// Checks `input` against the pipeline's input schema.
    pub fn check_input(plan: &Plan, input: &Value) -> Result<(), RunError> {
        match &plan.input_schema {
            Some(v) => {
                let violations = crate::schema::violations(v, input);
                if violations.is_empty() {
                    Ok(())
                } else {
                    Err(RunError::InvalidInput(violations))
                }
            }
            None => Ok(()),
        }
    }

    /// Runs `plan` to completion (or failure, return, timeout, cancellation).
    pub async fn run(
        &self,
        plan: Arc<Plan>,
        input: Value,
        opts: RunOptions,
    ) -> Result<RunReport, RunError> {
        Self::check_input(&plan, &input)?;
        for (name, policy) in &plan.services {
            // A conflicting declaration is reported (once) and changes nothing.
            let _ =
                self.outbound
                    .services
                    .configure(name, policy, &format!("pipeline {}", plan.name));
        }
        let run_id: Arc<str> = Arc::from(opts.run_id.clone().unwrap_or_else(new_run_id));
        let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        // Stages of loop bodies are reported per iteration (`ID[i]`), as they run.
        let mut reports = Reports::default();
        for s in plan.stages.iter().filter(|s| !in_loop(&plan, s.block)) {
            reports.at.insert(s.id.to_string(), reports.list.len());
            reports.list.push(StageReport::pending(&s.id, s));
        }
        let n = plan.stages.len();
        tracing::info!(target: "fmhost::progress", run_id = &*run_id, pipeline = &*plan.name, stages = n, "run {run_id} of {} started ({n} stages)", plan.name);
        if let Some(o) = &opts.observer {
            o.run_started(&run_id, &plan.name, &reports.list);
        }
        let mut engine = self.clone();
        if engine.fixed_now.is_none() {
            engine.fixed_now = opts.now.clone();
        }
        let run = Arc::new(RunCtx {
            engine,
            run_value: json!({
                "id": &*run_id,
                "pipeline": &*plan.name,
                "trigger": opts.trigger.clone().unwrap_or_else(|| json!({
                    "type": "manual",
                    "id": &*run_id,
                    "fired_at": &started_at,
                })),
            }),
            run_id: run_id.clone(),
            observer: opts.observer.clone(),
            reuse: opts.reuse.clone(),
            budget: plan.budget.clone().map(|b| {
                Arc::new(crate::http::budget::Budget::new(
                    "run".into(),
                    b,
                    Instant::now(),
                ))
            }),
            trace: opts
                .trace
                .clone()
                .unwrap_or_else(|| crate::trace::RunTrace::start(&run_id, None)),
            started: opts
                .started_at_ms
                .and_then(|t| {
                    let ago = crate::time::unix_ms(SystemTime::now()).saturating_sub(t);
                    Instant::now().checked_sub(Duration::from_millis(ago.clamp(0, 60_000) as u64))
                })
                .unwrap_or_else(Instant::now),
            pinned: Mutex::new(HashMap::new()),
            reports: Mutex::new(reports),
        });
        let view = frame::View {
            plan: plan.clone(),
            slots: HashMap::new(),
            controller_output: None,
            vars: Arc::new(frame::base_vars(&run, &plan)),
            parent: None,
        };
        let place = frame::Place {
            block: 0,
            prefix: Arc::from(""),
            suffix: Arc::from(""),
            input: Arc::new(input),
            depth: 0,
        };
        let root = frame::run_frame(run.clone(), view, place);
        let run_deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut failure: Option<(RunStatus, String)> = None;
        let end = tokio::select! {
            end = root => Some(end),
            _ = sleep_until(run_deadline) => {
                let t = opts.timeout.unwrap_or_default();
                failure = Some((RunStatus::TimedOut, format!("run timed out after {}", humantime::format_duration(t))));
                None
            }
            _ = opts.cancel.cancelled() => {
                failure = Some((RunStatus::Cancelled, "run cancelled".into()));
                None
            }
        };
        let mut output = None;
        let mut failed_stage = None;
        match end {
            None => {
                // Stopped: the dropped futures cancelled every stage still running.
                let why = if matches!(failure, Some((RunStatus::TimedOut, _))) {
                    "stopped: run timed out"
                } else {
                    "stopped: run cancelled"
                };
                run.stop_running("", "", why);
            }
            Some(end) => match (end.result, end.returned) {
                (Err(e), _) => {
                    let attempts = {
                        let reports = run.reports.lock().expect("reports");
                        reports
                            .at
                            .get(&e.stage)
                            .map_or(1, |&k| reports.list[k].attempts)
                            .max(1)
                    };
                    let plural = if attempts == 1 { "" } else { "s" };
                    failed_stage = Some(e.stage.clone());
                    failure = Some((
                        RunStatus::Failed,
                        format!(
                            "stage \"{}\" failed after {attempts} attempt{plural}: {}",
                            e.stage, e.error
                        ),
                    ));
                }
                (Ok(()), Some(value)) => match run.check_output(&plan, value) {
                    Ok(v) => output = Some(v),
                    Err(e) => failure = Some((RunStatus::Failed, e.message)),
                },
                (Ok(()), None) => match run.assemble(&end.view) {
                    Ok(v) => output = Some(v),
                    Err(e) => failure = Some((RunStatus::Failed, e.message)),
                },
            },
        }
        let (status, error) = match failure {
            None => (RunStatus::Succeeded, None),
            Some((status, why)) => (status, Some(why)),
        };
        // Whatever never started was skipped; say why.
        let first_failed = if error.is_none() {
            None
        } else if failed_stage.is_some() {
            failed_stage.clone()
        } else {
            let reports = run.reports.lock().expect("reports");
            reports
                .list
                .iter()
                .find(|r| r.status == StageStatus::Failed && !r.optional)
                .map(|r| r.id.clone())
        };
        let pending: Vec<(String, usize)> = {
            let reports = run.reports.lock().expect("reports");
            reports
                .list
                .iter()
                .filter(|r| r.status == StageStatus::Pending)
                .filter_map(|r| plan.stage_index(&r.id).map(|i| (r.id.clone(), i)))
                .collect()
        };
        for (id, i) in pending {
            let why = match (&first_failed, &error) {
                (Some(f), _) => format!("run failed at stage \"{f}\""),
                (None, Some(why)) => why.clone(),
                (None, None) => "not reached".into(),
            };
            run.skip(&id, &plan.stages[i], &why);
        }
        let duration_ms = run.elapsed_ms();
        self.outbound
            .metrics
            .record_run(&plan.name, status.as_str());
        match &error {
            None => {
                tracing::info!(target: "fmhost::progress", run_id = &*run_id, event = "run-finished", status = "succeeded", duration_ms, "run {run_id} succeeded in {duration_ms} ms")
            }
            Some(why) => {
                tracing::error!(target: "fmhost::progress", run_id = &*run_id, event = "run-finished", status = ?status, duration_ms, "run {run_id} {}: {why}", match status { RunStatus::Cancelled => "cancelled", RunStatus::TimedOut => "timed out", _ => "failed" })
            }
        }
        let stages = std::mem::take(&mut run.reports.lock().expect("reports").list);
        let mut report = RunReport {
            run_id: run_id.to_string(),
            pipeline: plan.name.to_string(),
            status,
            started_at,
            duration_ms,
            output,
            error,
            failed_stage,
            stages,
            trace: Some(run.trace.clone()),
        };
        // What leaves the engine leaves the process (stdout, report files, API answers,
        // traces): an upstream that echoed a credential does not hand it back here.
        report.redact(&self.secrets());
        Ok(report)
    }

    fn retry_policy(
        &self,
        r: &RetryPlan,
        snapshot: Option<Arc<frame::View>>,
        input: Arc<Value>,
        run: &Value,
    ) -> RetryPolicy {
        let condition = r.condition.clone().zip(snapshot).map(|(template, snap)| {
            let secrets = self.secrets();
            let run = run.clone();
            let now = self.fixed_now.clone();
            Arc::new(move |output: &Value| {
                let scope = Scope {
                    input: &input,
                    stages: &*snap,
                    secrets: &secrets,
                    output: Some(output),
                    run: &run,
                    now: now.as_deref(),
                    keep_secrets: false,
                    locals: None,
                };
                template.render(&scope).map(|v| crate::template::truthy(&v))
            }) as crate::http::retry::Condition
        });
        RetryPolicy {
            max_attempts: r.spec.max_attempts.max(1),
            base_delay: Duration::from_secs_f64(r.spec.delay_seconds),
            multiplier: r.spec.backoff_multiplier,
            max_delay: r
                .spec
                .max_delay_seconds
                .map(Duration::from_secs_f64)
                .unwrap_or(Duration::from_secs(30)),
            condition,
            ..RetryPolicy::no_retry()
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Whether block `b` is (inside) a loop body, whose stages run per item.
fn in_loop(plan: &Plan, mut b: usize) -> bool {
    loop {
        let block = &plan.blocks[b];
        if block.per_item {
            return true;
        }
        match block.controller {
            Some(c) => b = plan.stages[c].block,
            None => return false,
        }
    }
}

/// `upsert` for `upsert[3]` and `loop[2]/inner[0]`'s last part: the stage as written.
fn base_id(id: &str) -> &str {
    let last = id.rsplit('/').next().unwrap_or(id);
    last.split('[').next().unwrap_or(last)
}
