//! One frame: a block of stages run as a DAG (the pipeline's own stages, one iteration
//! of a loop body, a try block, a sub-pipeline). The frame is a small state machine:
//! a stage is started when its dependencies are done, and when it finishes, its
//! [`Flow`] says what follows: dependents are released, branches skipped, variables
//! set, the run returned, or a block of governed stages run in child frames (nested
//! futures of the same task) before the controller is asked what comes next.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{Map, Value};

use super::{RunCtx, StageStatus};
use crate::component::{BlockRef, Flow, FrameError, FrameOutcome, RunBlock, StageContext};
use crate::error::{ErrorKind, StageError};
use crate::pipeline::Plan;
use crate::template::{Scope, StageLookup};

/// A stage's result as templates see it.
#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub status: StageStatus,
    pub output: Option<Arc<Value>>,
    pub error: Option<Arc<Value>>,
}

impl Slot {
    fn done(status: StageStatus, output: Option<Arc<Value>>, error: Option<Arc<Value>>) -> Slot {
        Slot {
            status,
            output,
            error,
        }
    }
}

static NULL: Value = Value::Null;
static STATUS: LazyLock<[Value; 5]> = LazyLock::new(|| {
    [
        StageStatus::Pending,
        StageStatus::Running,
        StageStatus::Succeeded,
        StageStatus::Failed,
        StageStatus::Skipped,
    ]
    .map(|s| Value::String(s.as_str().into()))
});

fn status_value(s: StageStatus) -> &'static Value {
    &STATUS[s as usize]
}

/// What the templates of a frame can read: its own stages' results, the controller's
/// view of itself, the variables, and its parent's view (a snapshot).
#[derive(Clone)]
pub(super) struct View {
    pub plan: Arc<Plan>,
    pub slots: HashMap<usize, Slot>,
    /// `(controller, output)`: what `{{stages.CONTROLLER.output}}` reads in this frame.
    pub controller_output: Option<(usize, Arc<Value>)>,
    pub vars: Arc<Map<String, Value>>,
    pub parent: Option<Arc<View>>,
}

enum Found<'a> {
    Override(&'a Arc<Value>),
    Slot(&'a Slot),
}

impl View {
    fn find(&self, i: usize) -> Option<Found<'_>> {
        if let Some((c, v)) = &self.controller_output
            && *c == i
        {
            return Some(Found::Override(v));
        }
        match self.slots.get(&i) {
            Some(s) => Some(Found::Slot(s)),
            None => self.parent.as_ref()?.find(i),
        }
    }

    pub fn output(&self, i: usize) -> Option<&Value> {
        match self.find(i)? {
            Found::Override(v) => Some(v),
            Found::Slot(s) if s.status == StageStatus::Skipped => Some(&NULL),
            Found::Slot(s) => s.output.as_deref(),
        }
    }

    /// The output shared, not copied: a stage's `upstream` is usually its one dependency's.
    fn output_arc(&self, i: usize) -> Option<Arc<Value>> {
        match self.find(i)? {
            Found::Override(v) => Some(v.clone()),
            Found::Slot(s) if s.status == StageStatus::Skipped => None,
            Found::Slot(s) => s.output.clone(),
        }
    }
}

impl StageLookup for View {
    fn stage_field(&self, id: &str, field: &str) -> Option<&Value> {
        let &i = self.plan.index.get(id)?;
        match field {
            "output" => self.output(i),
            "status" => match self.find(i)? {
                Found::Override(_) => Some(status_value(StageStatus::Running)),
                Found::Slot(s) => Some(status_value(s.status)),
            },
            "error" => match self.find(i)? {
                Found::Override(_) => Some(&NULL),
                Found::Slot(s) => s
                    .error
                    .as_deref()
                    .or((s.output.is_some() || s.status == StageStatus::Skipped).then_some(&NULL)),
            },
            _ => None,
        }
    }
    fn has_stage(&self, id: &str) -> bool {
        self.plan.index.contains_key(id)
    }
    fn context(&self, name: &str) -> Option<&Value> {
        self.vars.get(name)
    }
}

/// Where a frame is: ids of its stages are `{prefix}{id}{suffix}`.
#[derive(Clone)]
pub(super) struct Place {
    pub block: usize,
    pub prefix: Arc<str>,
    pub suffix: Arc<str>,
    pub input: Arc<Value>,
    /// Sub-pipelines this frame is nested in.
    pub depth: usize,
}

impl Place {
    fn id(&self, plan: &Plan, i: usize) -> String {
        format!("{}{}{}", self.prefix, plan.stages[i].id, self.suffix)
    }
}

/// How a frame ended.
pub(super) struct FrameEnd {
    pub result: Result<(), FrameError>,
    /// A `return` stage fired: the value the run (or sub-pipeline) returns.
    pub returned: Option<Value>,
    pub view: View,
}

/// A stage's future finished.
struct Done {
    i: usize,
    result: Result<Flow, StageError>,
    attempts: u32,
    /// Results of stages a controller's block ran that stages after it may read.
    merge: Vec<(usize, Slot)>,
    /// A frame the controller ran returned.
    returned: Option<Value>,
}

/// Sub-pipelines nested in each other at run time, at most.
const MAX_DEPTH: usize = 16;

pub(super) fn run_frame(
    run: Arc<RunCtx>,
    mut view: View,
    place: Place,
) -> BoxFuture<'static, FrameEnd> {
    async move {
        let plan = view.plan.clone();
        let block = &plan.blocks[place.block];
        let per_item = !place.suffix.is_empty();
        let mut waiting: HashMap<usize, usize> = block
            .stages
            .iter()
            .map(|&s| (s, plan.stages[s].wait_on.len()))
            .collect();
        let mut live: HashMap<usize, usize> = HashMap::new();
        let mut skip_marks: HashMap<usize, String> = HashMap::new();
        let mut ready: Vec<usize> = block
            .stages
            .iter()
            .rev()
            .copied()
            .filter(|s| waiting[s] == 0)
            .collect();
        let mut started: HashMap<usize, Instant> = HashMap::new();
        let mut tasks: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        let mut failure: Option<FrameError> = None;
        let mut returned: Option<(Value, String)> = None;

        loop {
            while failure.is_none() && returned.is_none() {
                let Some(i) = ready.pop() else { break };
                let stage = &plan.stages[i];
                let id = place.id(&plan, i);
                let skipped = skip_marks.remove(&i).or_else(|| {
                    (!stage.wait_on.is_empty() && live.get(&i).copied().unwrap_or(0) == 0)
                        .then(|| "every stage it depends on was skipped".to_string())
                });
                if let Some(reason) = skipped {
                    run.skip(&id, stage, &reason);
                    view.slots
                        .insert(i, Slot::done(StageStatus::Skipped, None, None));
                    release(&plan, i, false, &mut waiting, &mut live, &mut ready);
                    continue;
                }
                if let Some((from, output)) = run.reused(&id) {
                    run.reuse_stage(&id, stage, &from, &output);
                    // What the stage decided then is decided again: its branches are
                    // skipped, its variables set, its return ends the run.
                    let directive = run.component(&stage.component).replay(&output);
                    view.slots
                        .insert(i, Slot::done(StageStatus::Succeeded, Some(output), None));
                    for (s, slot) in merged_reuse(&run, &plan, &place, i) {
                        view.slots.insert(s, slot);
                    }
                    let (_, returns) = decide(directive, &plan, &id, &mut skip_marks, &mut view);
                    if let Some(value) = returns {
                        returned = Some((value, id));
                        break;
                    }
                    release(&plan, i, true, &mut waiting, &mut live, &mut ready);
                    continue;
                }
                started.insert(i, Instant::now());
                view.slots
                    .insert(i, Slot::done(StageStatus::Running, None, None));
                tasks.push(start_stage(&run, &view, &place, i, id));
            }
            if tasks.is_empty() || returned.is_some() {
                break;
            }
            let Some(done) = tasks.next().await else {
                break;
            };
            let i = done.i;
            let stage = &plan.stages[i];
            let id = place.id(&plan, i);
            let took = started[&i].elapsed();
            for (s, slot) in done.merge {
                view.slots.insert(s, slot);
            }
            let flow = match (done.returned, done.result) {
                // A frame this controller ran returned: so does this one.
                (Some(value), _) => Flow::Return {
                    output: Value::Null,
                    value,
                },
                (None, Ok(Flow::Run(block))) => {
                    let snapshot = Arc::new(view.clone());
                    tasks.push(run_block(
                        run.clone(),
                        snapshot,
                        place.clone(),
                        i,
                        id,
                        *block,
                        done.attempts,
                    ));
                    continue;
                }
                (None, Ok(flow)) => flow,
                (None, Err(mut error)) => {
                    error.message = run.engine.secrets().redact(&error.message).into_owned();
                    run.finish(
                        &id,
                        stage,
                        Err(&error),
                        done.attempts,
                        took,
                        &plan,
                        per_item,
                    );
                    let as_value = Some(Arc::new(serde_json::to_value(&error).unwrap_or_default()));
                    if stage.optional {
                        let null = Some(Arc::new(Value::Null));
                        view.slots
                            .insert(i, Slot::done(StageStatus::Failed, null, as_value));
                        release(&plan, i, true, &mut waiting, &mut live, &mut ready);
                    } else {
                        view.slots
                            .insert(i, Slot::done(StageStatus::Failed, None, as_value));
                        failure.get_or_insert(FrameError { stage: id, error });
                    }
                    continue;
                }
            };
            let (output, returns) = decide(flow, &plan, &id, &mut skip_marks, &mut view);
            let output = Arc::new(output);
            run.finish(
                &id,
                stage,
                Ok(&output),
                done.attempts,
                took,
                &plan,
                per_item,
            );
            view.slots
                .insert(i, Slot::done(StageStatus::Succeeded, Some(output), None));
            if let Some(value) = returns {
                returned = Some((value, id));
                break;
            }
            release(&plan, i, true, &mut waiting, &mut live, &mut ready);
        }

        if let Some((_, by)) = &returned {
            // Dropping the futures cancels what still runs.
            drop(tasks);
            run.stop_running(
                &place.prefix,
                &place.suffix,
                &format!("cancelled: run returned at stage \"{by}\""),
            );
        }
        // Whatever in this block did not start is skipped; say why.
        let why = match (&failure, &returned) {
            (Some(f), _) if place.prefix.is_empty() && place.suffix.is_empty() => {
                format!("run failed at stage \"{}\"", f.stage)
            }
            (Some(f), _) => format!("stage \"{}\" failed", f.stage),
            (None, Some((_, by))) => format!("run returned at stage \"{by}\""),
            (None, None) => "not reached".to_string(),
        };
        for &s in &block.stages {
            if !view.slots.contains_key(&s) {
                run.skip(&place.id(&plan, s), &plan.stages[s], &why);
            }
        }
        FrameEnd {
            result: failure.map_or(Ok(()), Err),
            returned: returned.map(|(v, _)| v),
            view,
        }
    }
    .boxed()
}

/// Carries out a finished stage's directive in its frame: branches not taken are marked
/// for skipping, variables set. Gives back the stage's output, and the value the frame
/// returns when the directive is a `return`.
fn decide(
    flow: Flow,
    plan: &Plan,
    id: &str,
    skip_marks: &mut HashMap<usize, String>,
    view: &mut View,
) -> (Value, Option<Value>) {
    match flow {
        Flow::Output(output) => (output, None),
        Flow::Skip { output, stages } => {
            for s in stages {
                if let Some(&t) = plan.index.get(s.as_str()) {
                    skip_marks.insert(t, format!("branch not taken by \"{id}\""));
                }
            }
            (output, None)
        }
        Flow::Vars { output, vars } => {
            Arc::make_mut(&mut view.vars).extend(vars);
            (output, None)
        }
        Flow::Return { output, value } => (output, Some(value)),
        // Blocks are run by the frame before it gets here.
        Flow::Run(_) => (Value::Null, None),
    }
}

/// A stage finished (`ran` unless skipped): its dependents in the block come closer to ready.
fn release(
    plan: &Plan,
    i: usize,
    ran: bool,
    waiting: &mut HashMap<usize, usize>,
    live: &mut HashMap<usize, usize>,
    ready: &mut Vec<usize>,
) {
    for &d in &plan.stages[i].wakes {
        if ran {
            *live.entry(d).or_default() += 1;
        }
        let w = waiting.get_mut(&d).expect("a dependent is in the block");
        *w -= 1;
        if *w == 0 {
            ready.push(d);
        }
    }
}

/// When a controller's output is reused, the stages its once-only blocks ran (try,
/// catch, finally) are taken from the journal too, so stages after it can read them.
fn merged_reuse(run: &RunCtx, plan: &Plan, place: &Place, c: usize) -> Vec<(usize, Slot)> {
    let mut out = Vec::new();
    for &(_, b) in &plan.stages[c].blocks {
        if plan.blocks[b].per_item {
            continue;
        }
        for &s in &plan.blocks[b].stages {
            if let Some((_, output)) = run.reused(&place.id(plan, s)) {
                out.push((s, Slot::done(StageStatus::Succeeded, Some(output), None)));
            }
        }
    }
    out
}

/// Renders a stage's config and starts its component.
fn start_stage(
    run: &Arc<RunCtx>,
    view: &View,
    place: &Place,
    i: usize,
    id: String,
) -> BoxFuture<'static, Done> {
    let plan = &view.plan;
    let stage = &plan.stages[i];
    let component = run.component(&stage.component);
    run.start(&id, stage, component.version(), !place.suffix.is_empty());
    // One reading of the secrets for the whole stage: a rotation applies from the next.
    let secrets = run.engine.secrets();
    let scope = Scope {
        input: &place.input,
        stages: view,
        secrets: &secrets,
        output: None,
        run: &run.run_value,
        now: run.engine.fixed_now.as_deref(),
        keep_secrets: !component.sees_secrets(),
        locals: None,
    };
    let rendered = stage.config.render(&scope);
    let upstream = match stage.deps.as_slice() {
        [] => place.input.clone(),
        [d] => view.output_arc(*d).unwrap_or_else(|| Arc::new(Value::Null)),
        many => Arc::new(Value::Object(
            many.iter()
                .map(|&d| {
                    (
                        plan.stages[d].id.to_string(),
                        view.output(d).cloned().unwrap_or(Value::Null),
                    )
                })
                .collect::<Map<_, _>>(),
        )),
    };
    let retry = stage.retry.as_ref().map(|r| {
        let snapshot = r.condition.as_ref().map(|_| Arc::new(view.clone()));
        run.engine
            .retry_policy(r, snapshot, place.input.clone(), &run.run_value)
    });
    let ctx = StageContext {
        run_id: run.run_id.clone(),
        pipeline: plan.name.clone(),
        stage_id: Arc::from(id.as_str()),
        outbound: run.engine.outbound.clone(),
        secrets,
        retry,
        allowed_hosts: stage.allowed_hosts.clone(),
        secret_grants: stage.secret_grants.clone(),
        trusted_base_url: stage.trusted_base_url,
        service_base_url: stage.service_base_url.clone(),
        deadline: stage.timeout.map(|t| Instant::now() + t),
        retries: AtomicU32::new(0),
        trace: run.trace.stage_span(id.as_str()),
        record: plan.record,
        checkpoint: run
            .reuse
            .as_ref()
            .and_then(|r| r.checkpoints.get(id.as_str()).cloned()),
        budgets: run
            .budget
            .iter()
            .cloned()
            .chain(stage.budget.clone().map(|b| {
                Arc::new(crate::http::budget::Budget::new(
                    format!("stage {id}"),
                    b,
                    Instant::now(),
                ))
            }))
            .collect(),
        observer: run
            .observer
            .clone()
            .map(|o| o as Arc<dyn crate::http::AttemptObserver>),
    };
    let timeout = stage.timeout;
    let injected = run.injected_error(&id);
    let future = async move {
        let result = match rendered {
            Err(e) => Err(StageError::template(format!("config{e}"))),
            // A test's mock makes the stage fail as it says.
            Ok(_) if let Some(e) = injected => Err(e),
            // A run whose time budget is spent starts nothing more.
            Ok(_)
                if let Some(Err(e)) = ctx
                    .budgets
                    .iter()
                    .map(|b| b.check_time())
                    .find(Result::is_err) =>
            {
                Err(e)
            }
            Ok(config) => {
                let call = component.run(&ctx, config, upstream);
                match timeout {
                    Some(t) => tokio::time::timeout(t, call).await.unwrap_or_else(|_| {
                        Err(StageError::new(
                            ErrorKind::Timeout,
                            format!("stage timed out after {}", humantime::format_duration(t)),
                        ))
                    }),
                    None => call.await,
                }
            }
        };
        Done {
            i,
            result,
            attempts: 1 + ctx.retries.load(Ordering::Relaxed),
            merge: Vec::new(),
            returned: None,
        }
    };
    // A panicking component is a host bug, but it fails its stage, not the process.
    std::panic::AssertUnwindSafe(future)
        .catch_unwind()
        .map(move |r| {
            r.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Done {
                    i,
                    result: Err(StageError::internal(format!("component panicked: {what}"))),
                    attempts: 1,
                    merge: Vec::new(),
                    returned: None,
                }
            })
        })
        .boxed()
}

/// Runs a controller's block in child frames, at most `max_parallel` at once, then asks
/// the controller what follows.
fn run_block(
    run: Arc<RunCtx>,
    parent: Arc<View>,
    place: Place,
    c: usize,
    id: String,
    block: RunBlock,
    attempts: u32,
) -> BoxFuture<'static, Done> {
    async move {
        let fail = |error: StageError| Done {
            i: c,
            result: Err(error),
            attempts,
            merge: Vec::new(),
            returned: None,
        };
        let stage = &parent.plan.stages[c];
        // Which stages, and how their frames sit under this one.
        let (plan, b, inherit, prefix, depth) = match &block.block {
            BlockRef::Field(field) => match stage.blocks.iter().find(|(f, _)| f == field) {
                Some(&(_, b)) => (parent.plan.clone(), b, true, place.prefix.clone(), place.depth),
                None => return fail(StageError::internal(format!("{id}: no block {field}"))),
            },
            BlockRef::Pipeline(name) => match &stage.subplan {
                Some(p) if place.depth < MAX_DEPTH => (p.clone(), 0, false, Arc::from(format!("{id}/")), place.depth + 1),
                Some(_) => {
                    return fail(StageError::validation(format!(
                        "{id}: sub-pipelines nested deeper than {MAX_DEPTH} levels"
                    )));
                }
                None => return fail(StageError::internal(format!("{id}: sub-pipeline {name} was not loaded"))),
            },
        };
        let per_item = plan.blocks[b].per_item;
        let result_stage = if inherit { plan.blocks[b].result } else { None };
        let total = block.total;
        let mut frames = block.frames.enumerate();
        let mut running = FuturesUnordered::new();
        let mut outcomes: Vec<FrameOutcome> = Vec::with_capacity(total);
        let mut merge = Vec::new();
        let mut stop = false;
        let mut done = 0usize;
        let progress_every = (total / 10).max(1);
        let deadline = block.timeout.map(|t| (tokio::time::Instant::now() + t, t));
        loop {
            while !stop && running.len() < block.max_parallel.max(1) {
                let Some((k, spec)) = frames.next() else { break };
                let mut vars = if inherit { (*parent.vars).clone() } else { base_vars(&run, &plan) };
                vars.extend(spec.vars);
                let view = View {
                    plan: plan.clone(),
                    slots: HashMap::new(),
                    controller_output: if inherit {
                        spec.controller_output.map(|v| (c, Arc::new(v)))
                    } else {
                        None
                    },
                    vars: Arc::new(vars),
                    parent: inherit.then(|| parent.clone()),
                };
                let child = Place {
                    block: b,
                    prefix: prefix.clone(),
                    suffix: if inherit {
                        Arc::from(format!("{}{}", place.suffix, spec.suffix))
                    } else {
                        Arc::from(spec.suffix.as_str())
                    },
                    input: match spec.input {
                        Some(v) => Arc::new(v),
                        None => place.input.clone(),
                    },
                    depth,
                };
                running.push(run_frame(run.clone(), view, child).map(move |end| (k, end)));
            }
            if running.is_empty() {
                break;
            }
            let next = match deadline {
                Some((at, _)) => tokio::time::timeout_at(at, running.next()).await.ok(),
                None => Some(running.next().await),
            };
            let Some(Some((k, end))) = next else {
                // Out of time: what still runs is cancelled.
                let t = deadline.map(|(_, t)| t).unwrap_or_default();
                drop(running);
                run.stop_running(&prefix, "", "stopped: out of time");
                outcomes.push(FrameOutcome {
                    index: usize::MAX,
                    result: Err(FrameError {
                        stage: id.clone(),
                        error: StageError::new(
                            ErrorKind::Timeout,
                            format!("{id} timed out after {}", humantime::format_duration(t)),
                        ),
                    }),
                });
                break;
            };
            done += 1;
            if total >= 100 && done.is_multiple_of(progress_every) {
                tracing::info!(target: "fmhost::progress", run_id = &*run.run_id, stage = id.as_str(), event = "progress", done, total, "{id}: {done}/{total} done");
            }
            if let Some(value) = end.returned {
                if inherit {
                    // `return` inside a loop or a try ends the run.
                    return Done { i: c, result: Ok(Flow::Output(Value::Null)), attempts, merge, returned: Some(value) };
                }
                outcomes.push(FrameOutcome { index: k, result: Ok(value) });
                continue;
            }
            let result = match end.result {
                Err(e) => {
                    stop |= block.stop_on_error;
                    Err(e)
                }
                Ok(()) if inherit => Ok(result_stage.and_then(|s| end.view.output(s).cloned()).unwrap_or(Value::Null)),
                Ok(()) => run.assemble(&end.view).map_err(|error| FrameError { stage: id.clone(), error }),
            };
            if inherit && !per_item {
                merge.extend(end.view.slots);
            }
            outcomes.push(FrameOutcome { index: k, result });
        }
        outcomes.sort_by_key(|o| o.index);
        let len = outcomes.len();
        if let Some(last) = outcomes.last_mut().filter(|o| o.index == usize::MAX) {
            last.index = len - 1;
        }
        let result = (block.then)(outcomes);
        Done { i: c, result, attempts, merge, returned: None }
    }
    .boxed()
}

/// The variables every frame of `plan` starts with.
pub(super) fn base_vars(run: &RunCtx, plan: &Plan) -> Map<String, Value> {
    let mut vars = Map::new();
    vars.insert("run_id".into(), Value::String(run.run_id.to_string()));
    vars.insert("pipeline_id".into(), Value::String(plan.name.to_string()));
    vars.insert("pipeline".into(), Value::String(plan.name.to_string()));
    vars
}
