//! Triggers that start runs without a request: schedules, polls with a durable cursor and
//! file drops. Each fire, poll or file becomes a delivery in the journal (synced) before
//! its run starts, exactly as an accepted webhook does, so the same machinery dedupes it,
//! resumes it after a crash and dead-letters it when it cannot run.
//!
//! - A schedule's fire is keyed by (pipeline, trigger, scheduled time): a restart finds
//!   the last one in the journal, so it neither fires twice nor forgets what it missed.
//!   A fire that does not run (overlap `skip`, or missed outside the catch-up window) is
//!   journaled, counted and logged too.
//! - A poll's run reads `{{trigger.cursor}}`; the cursor its output returns is committed
//!   with the run's end (`RunJournal::commit_cursor`), so a failed run leaves it.
//! - A file is claimed by a rename into `.processing/`, once its size and mtime have
//!   stood still for `settle`; its run's end moves it to `done/` or `failed/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use sha2::Digest;

use super::alerts::Event;
use super::{App, process_delivery};
use crate::engine::new_run_id;
use crate::journal::{Delivery, Record, RunStart, rfc3339, unix_ms};
use crate::metrics::TriggerCount;
use crate::pipeline::triggers::{
    CatchUp, FileDrop, FileFormat, MAX_FIRES_COUNTED, Overlap, Poll, Schedule,
};
use crate::pipeline::{AlertOn, Trigger, TriggerKind};

/// One trigger of one pipeline, while the server runs.
pub struct TriggerState {
    pub pipeline: String,
    pub trigger: Trigger,
    /// Its runs going on now.
    active: AtomicUsize,
    idle: tokio::sync::Notify,
    /// A `buffer_one` fire is waiting for the running one.
    buffered: AtomicBool,
    live: Mutex<Live>,
}

/// What `GET /v1/triggers` shows beside the journal's record.
#[derive(Default, Clone)]
struct Live {
    state: &'static str,
    next_fire_ms: Option<i64>,
    last_file: Option<Value>,
    /// Files seen but not yet settled.
    waiting: usize,
    /// Messages in the stream the consumer has not been given yet.
    lag: Option<u64>,
    problem: Option<String>,
}

/// Held by a run a trigger started; the trigger is idle when none is held.
pub struct Active(Arc<TriggerState>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl TriggerState {
    pub fn new(pipeline: &str, trigger: Trigger) -> Arc<TriggerState> {
        Arc::new(TriggerState {
            pipeline: pipeline.to_string(),
            trigger,
            active: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            buffered: AtomicBool::new(false),
            live: Mutex::new(Live {
                state: "idle",
                ..Live::default()
            }),
        })
    }

    pub fn enter(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::SeqCst);
        Active(self.clone())
    }

    fn running(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn update(&self, f: impl FnOnce(&mut Live)) {
        f(&mut self.live.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub(super) fn set_state(&self, state: &'static str) {
        self.update(|l| l.state = state);
    }

    pub(super) fn set_problem(&self, problem: Option<String>) {
        self.update(|l| l.problem = problem);
    }

    pub(super) fn set_lag(&self, lag: u64) {
        self.update(|l| l.lag = Some(lag));
    }

    /// Its entry in `GET /v1/triggers`.
    pub async fn describe(&self, app: &App) -> Value {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let t = &self.trigger;
        let mut v = json!({
            "pipeline": self.pipeline,
            "name": t.name,
            "type": t.type_name(),
            "state": if self.running() > 0 { "running" } else { live.state },
            "running": self.running(),
        });
        if let Some(p) = &live.problem {
            v["problem"] = json!(p);
        }
        let record = app
            .journal
            .trigger_record(&self.pipeline, &t.name)
            .await
            .unwrap_or_default();
        let last = record.last.as_ref().map(
            |(event_id, at, run_id)| json!({"id": event_id, "at": rfc3339(*at), "run_id": run_id}),
        );
        match &t.kind {
            TriggerKind::Webhook(w) => {
                v["path"] = json!(w.path);
                v["signature"] = json!(w.signature);
                v["state"] = json!("listening");
                v["last_delivery"] = json!(last);
            }
            TriggerKind::Schedule(s) => {
                v["cron"] = json!(s.cron_text);
                v["timezone"] = json!(s.timezone.name());
                v["next_fire_at"] = json!(live.next_fire_ms.map(rfc3339));
                v["last_fire_at"] = json!(record.last_fire_ms.map(rfc3339));
                v["skipped"] = json!(record.skipped);
                v["missed"] = json!(record.missed);
                v["last_run"] = json!(last);
            }
            TriggerKind::Poll(p) => {
                v["every"] = json!(humantime::format_duration(p.every).to_string());
                v["next_fire_at"] = json!(live.next_fire_ms.map(rfc3339));
                v["cursor"] = record
                    .cursor
                    .clone()
                    .or_else(|| p.cursor.as_ref().map(|c| c.initial.clone()))
                    .unwrap_or(Value::Null);
                v["last_run"] = json!(last);
            }
            TriggerKind::File(f) => {
                v["dir"] = json!(f.dir.display().to_string());
                v["pattern"] = json!(f.pattern);
                v["last_file"] = live.last_file.clone().unwrap_or(json!(last));
                // Files in the directory not yet settled and taken.
                v["lag"] = json!(live.waiting);
            }
            TriggerKind::Nats(n) => {
                v["stream"] = json!(n.stream);
                v["subject"] = json!(n.subject);
                // Messages not yet delivered to this consumer, as of its last message.
                v["lag"] = json!(live.lag);
                v["last_message"] = json!(last);
            }
        }
        v
    }
}

/// The key `{{trigger}}` carries: which trigger of which type.
fn trigger_of(start: &RunStart) -> Option<(String, String)> {
    let info = start.trigger_info.as_ref()?.as_value();
    Some((
        info["type"].as_str()?.to_string(),
        info["name"].as_str()?.to_string(),
    ))
}

impl App {
    fn trigger_state(&self, pipeline: &str, name: &str) -> Option<&Arc<TriggerState>> {
        self.triggers
            .iter()
            .find(|t| t.pipeline == pipeline && t.trigger.name == name)
    }

    /// The trigger a resumed or recovered run belongs to counts it as running.
    pub(super) fn trigger_guard(&self, start: &RunStart) -> Option<Active> {
        let (_, name) = trigger_of(start)?;
        self.trigger_state(&start.pipeline, &name)
            .map(|t| t.enter())
    }
}

/// Called for every run before it starts: a poll's run commits its cursor with its end.
pub(super) fn prepare_run(
    app: &App,
    plan: &crate::pipeline::Plan,
    watcher: &crate::journal::RunJournal,
) {
    let start = watcher.start();
    let Some((kind, name)) = trigger_of(start) else {
        return;
    };
    if kind != "poll" {
        return;
    }
    let spec = plan.triggers.iter().find_map(|t| match &t.kind {
        TriggerKind::Poll(Poll {
            cursor: Some(c), ..
        }) if t.name == name => Some(c),
        _ => None,
    });
    if let Some(spec) = spec {
        let info = app
            .engine
            .secrets()
            .restore(start.trigger_info.as_ref().expect("checked above"));
        watcher.commit_cursor(&name, spec, info["cursor"].clone());
    }
}

/// Called for every run after it is journaled: a file trigger's file moves to `done/`
/// or `failed/` (a replay's does not: the file already has its place).
pub(super) fn finish_run(start: &RunStart, succeeded: bool) {
    let Some((kind, _)) = trigger_of(start) else {
        return;
    };
    if kind != "file" || start.replay_of.is_some() {
        return;
    }
    let info = start
        .trigger_info
        .as_ref()
        .expect("checked above")
        .as_value();
    if let Some(path) = info["file"]["path"].as_str() {
        settle_file(Path::new(path), succeeded);
    }
}

/// Which of the served triggers a server starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// A server on its own: all of them.
    All,
    /// A cluster's leader: schedules and polls, which must fire once for the cluster.
    Leader,
    /// Every worker of a cluster: file drops (a directory of its own machine) and
    /// queues (whose consumer the workers share).
    Worker,
}

/// Starts the schedule, poll, file and nats triggers of the served pipelines that
/// `part` names; the handles stop them (a leader that lost its leadership).
pub(super) fn start(app: &Arc<App>, part: Part) -> Vec<tokio::task::JoinHandle<()>> {
    let mut started = Vec::new();
    for st in &app.triggers {
        let leads = matches!(
            st.trigger.kind,
            TriggerKind::Schedule(_) | TriggerKind::Poll(_)
        );
        if (part == Part::Leader && !leads) || (part == Part::Worker && leads) {
            continue;
        }
        let (app, st) = (app.clone(), st.clone());
        started.push(match st.trigger.kind.clone() {
            TriggerKind::Webhook(_) => continue,
            TriggerKind::Schedule(s) => {
                tokio::spawn(async move { schedule_loop(app, st, *s).await })
            }
            TriggerKind::Poll(p) => tokio::spawn(async move { poll_loop(app, st, p).await }),
            TriggerKind::File(f) => tokio::spawn(async move { file_loop(app, st, f).await }),
            TriggerKind::Nats(n) => {
                tokio::spawn(async move { super::nats::consume(app, st, *n).await })
            }
        });
    }
    started
}

/// Most missed fires one start catches up (`catch_up: all`); older ones count as missed.
const MAX_CAUGHT_UP: usize = 1_000;

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// Sleeps until `at_ms` (Unix ms); false when the server is closing.
async fn sleep_until(app: &App, at_ms: i64) -> bool {
    let wait = Duration::from_millis((at_ms - now_ms()).max(0) as u64);
    tokio::select! {
        _ = tokio::time::sleep(wait) => !app.closing.is_cancelled(),
        _ = app.closing.cancelled() => false,
    }
}

/// A delivery for a fire, poll, file or message of `st`.
pub(super) fn delivery(
    app: &App,
    st: &TriggerState,
    event_id: String,
    payload: &Value,
    info: Value,
) -> Delivery {
    let secrets = app.engine.secrets();
    Delivery {
        pipeline: st.pipeline.clone(),
        event_id,
        path: st.trigger.name.clone(),
        received_at: now_ms(),
        payload: secrets.store(payload),
        run_id: new_run_id(),
        traceparent: None,
        trigger_info: Some(secrets.store(&info)),
    }
}

/// Runs an accepted delivery of `st` as a tracked task, counted as the trigger's.
pub(super) fn run_delivery(
    app: &Arc<App>,
    st: &Arc<TriggerState>,
    d: Delivery,
    payload: Value,
) -> tokio::task::JoinHandle<()> {
    let guard = st.enter();
    app.engine.outbound.metrics.record_trigger(
        TriggerCount::Fired,
        &st.pipeline,
        &st.trigger.name,
        1,
    );
    let app2 = app.clone();
    app.tracker.spawn(async move {
        let _guard = guard;
        process_delivery(app2, d, payload).await;
    })
}

fn raise(app: &App, st: &TriggerState, on: AlertOn, text: String, fields: Value) {
    if let Some(plan) = app.pipelines.get(&st.pipeline) {
        app.alerter.raise(
            &app.engine,
            plan,
            &Event {
                on,
                subject: st.trigger.name.clone(),
                text,
                fields,
            },
        );
    }
}

// ---- schedules ----

async fn schedule_loop(app: Arc<App>, st: Arc<TriggerState>, s: Schedule) {
    let record = match app
        .journal
        .trigger_record(&st.pipeline, &st.trigger.name)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "schedule stopped: cannot read its fires from the journal: {e}");
            st.update(|l| l.problem = Some(e.to_string()));
            return;
        }
    };
    let now = now_ms();
    // A schedule never fired starts now; one that has catches up from its last fire.
    let mut last = record.last_fire_ms.unwrap_or(now);
    if last < now {
        catch_up(&app, &st, &s, last, now).await;
        last = last.max(now);
    }
    st.update(|l| l.state = "scheduled");
    loop {
        let Some(next) = s.next_after(last) else {
            st.update(|l| {
                l.state = "done";
                l.next_fire_ms = None;
            });
            tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "schedule {} has no further fires", s.cron_text);
            return;
        };
        st.update(|l| l.next_fire_ms = Some(next));
        if !sleep_until(&app, next).await {
            return;
        }
        // Woken late (a stalled machine): every fire that came due goes through the
        // overlap rule in order; none is dropped unrecorded.
        let (due, _) = s.fires_between(last, now_ms(), MAX_FIRES_COUNTED);
        for t in due {
            fire(&app, &st, &s, t).await;
            last = t;
        }
        last = last.max(next);
    }
}

/// The run of a fire at `t` (Unix ms), journaled before it starts; or it is journaled as
/// skipped when the previous run still runs. A fire already in the journal is not run.
async fn fire(app: &Arc<App>, st: &Arc<TriggerState>, s: &Schedule, t: i64) {
    if st.running() > 0 && s.overlap != Overlap::Allow {
        let buffer = s.overlap == Overlap::BufferOne
            && st
                .buffered
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        if !buffer {
            skip(
                app,
                st,
                t,
                "the previous run is still running (overlap: skip)",
            )
            .await;
            return;
        }
        // Journaled now, so a restart runs it; started when the running one ends.
        let Some((d, payload)) = accept_fire(app, st, s, t).await else {
            st.buffered.store(false, Ordering::SeqCst);
            return;
        };
        let (app, st) = (app.clone(), st.clone());
        tokio::spawn(async move {
            st.until_idle().await;
            st.buffered.store(false, Ordering::SeqCst);
            run_delivery(&app, &st, d, payload);
        });
        return;
    }
    if let Some((d, payload)) = accept_fire(app, st, s, t).await {
        run_delivery(app, st, d, payload);
    }
}

/// The journal's record of fires from `first` to `last` (`count` of them).
fn fire_record(
    st: &TriggerState,
    (first, last, count): (i64, i64, u64),
    outcome: &'static str,
    reason: Option<String>,
    delivery: Option<Delivery>,
) -> Record {
    Record::Fire {
        pipeline: st.pipeline.clone(),
        trigger: st.trigger.name.clone(),
        scheduled_at: first,
        count,
        last_at: last,
        outcome,
        reason,
        delivery: delivery.map(Box::new),
    }
}

async fn skip(app: &App, st: &TriggerState, t: i64, why: &str) {
    let record = fire_record(st, (t, t, 1), "skipped", Some(why.to_string()), None);
    match app.journal.record_durably(record).await {
        Ok(true) => {
            app.engine.outbound.metrics.record_trigger(
                TriggerCount::Skipped,
                &st.pipeline,
                &st.trigger.name,
                1,
            );
            tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, scheduled_at = %rfc3339(t), "schedule fire at {} skipped: {why}", rfc3339(t));
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, "cannot journal the skipped fire at {}: {e}", rfc3339(t))
        }
    }
}

/// Journals a fire with its delivery; `None` when it was already journaled (or the
/// journal failed, which is logged).
async fn accept_fire(
    app: &App,
    st: &TriggerState,
    s: &Schedule,
    t: i64,
) -> Option<(Delivery, Value)> {
    let event_id = format!("{}@{}", st.trigger.name, rfc3339(t));
    let info = json!({
        "type": "schedule",
        "name": st.trigger.name,
        "id": event_id,
        "fired_at": rfc3339(t),
        "scheduled_at": rfc3339(t),
    });
    let d = delivery(app, st, event_id, &s.input, info);
    let record = fire_record(st, (t, t, 1), "run", None, Some(d.clone()));
    match app.journal.record_durably(record).await {
        Ok(true) => {
            tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, run_id = %d.run_id, "schedule fire at {}: run {}", rfc3339(t), d.run_id);
            Some((d, s.input.clone()))
        }
        Ok(false) => None,
        Err(e) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "fire at {} not run: the journal cannot keep it: {e}", rfc3339(t));
            None
        }
    }
}

/// The fires in `(last, now]`, missed while no server ran: those inside the catch-up
/// window run per `catch_up`, the others are journaled and counted as missed.
async fn catch_up(app: &Arc<App>, st: &Arc<TriggerState>, s: &Schedule, last: i64, now: i64) {
    let (due, more) = s.fires_between(last, now, MAX_FIRES_COUNTED);
    if due.is_empty() {
        return;
    }
    // Fires inside the window are a suffix of `due`; the ones caught up are its tail.
    let window_start = now - s.catch_up_window.as_millis() as i64;
    let inside = due.len() - due.partition_point(|&t| t < window_start);
    let caught = match s.catch_up {
        CatchUp::None => 0,
        CatchUp::Last => inside.min(1),
        CatchUp::All => inside.min(MAX_CAUGHT_UP),
    };
    let (missed, run) = due.split_at(due.len() - caught);
    if let (Some(&first), Some(&last_missed)) = (missed.first(), missed.last()) {
        let count = missed.len() as u64;
        let why = match s.catch_up {
            CatchUp::None => "the server was not running (catch_up: none)".to_string(),
            _ => format!(
                "the server was not running, and {} (catch_up: {}, window {})",
                if s.catch_up == CatchUp::Last {
                    "only the latest fire in the window is caught up"
                } else {
                    "these are outside the catch-up window"
                },
                serde_json::to_value(s.catch_up)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or(""),
                humantime::format_duration(s.catch_up_window)
            ),
        };
        let record = fire_record(
            st,
            (first, last_missed, count),
            "missed",
            Some(why.clone()),
            None,
        );
        match app.journal.record_durably(record).await {
            Ok(_) => {
                app.engine.outbound.metrics.record_trigger(
                    TriggerCount::Missed,
                    &st.pipeline,
                    &st.trigger.name,
                    count,
                );
                let plus = if more { " or more" } else { "" };
                tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, missed = count, "schedule missed {count}{plus} fire(s) from {} to {}: {why}", rfc3339(first), rfc3339(last_missed));
                raise(
                    app,
                    st,
                    AlertOn::ScheduleMissed,
                    format!(
                        "schedule {} missed {count}{plus} fire(s) from {} to {}",
                        st.trigger.name,
                        rfc3339(first),
                        rfc3339(last_missed)
                    ),
                    json!({"trigger": st.trigger.name, "missed": count, "from": rfc3339(first), "to": rfc3339(last_missed)}),
                );
            }
            Err(e) => {
                tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, "cannot journal missed fires: {e}")
            }
        }
    }
    for &t in run {
        if s.overlap != Overlap::Allow {
            st.until_idle().await;
        }
        tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "catching up the fire at {}", rfc3339(t));
        if let Some((d, payload)) = accept_fire(app, st, s, t).await {
            run_delivery(app, st, d, payload);
        }
    }
}

// ---- polls ----

async fn poll_loop(app: Arc<App>, st: Arc<TriggerState>, p: Poll) {
    st.update(|l| l.state = "polling");
    loop {
        // One poll at a time: the next reads the cursor the last one left.
        st.until_idle().await;
        if app.closing.is_cancelled() {
            return;
        }
        let cursor = match app
            .journal
            .trigger_record(&st.pipeline, &st.trigger.name)
            .await
        {
            Ok(r) => r
                .cursor
                .or_else(|| p.cursor.as_ref().map(|c| c.initial.clone()))
                .unwrap_or(Value::Null),
            Err(e) => {
                tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "poll skipped: cannot read its cursor: {e}");
                st.update(|l| l.problem = Some(e.to_string()));
                if !sleep_until(&app, now_ms() + p.every.as_millis() as i64).await {
                    return;
                }
                continue;
            }
        };
        st.update(|l| l.problem = None);
        let fired = now_ms();
        let event_id = format!("{}@{}", st.trigger.name, rfc3339(fired));
        let info = json!({
            "type": "poll",
            "name": st.trigger.name,
            "id": event_id,
            "fired_at": rfc3339(fired),
            "cursor": cursor,
        });
        let d = delivery(&app, &st, event_id, &p.input, info);
        match app.journal.accept_delivery(d.clone()).await {
            Ok(true) => {
                tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, run_id = %d.run_id, "poll: run {} from cursor {}", d.run_id, app.engine.secrets().redact(&cursor.to_string()));
                let _ = run_delivery(&app, &st, d, p.input.clone()).await;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "poll not run: the journal cannot keep it: {e}")
            }
        }
        let next = fired + p.every.as_millis() as i64;
        st.update(|l| l.next_fire_ms = Some(next));
        if !sleep_until(&app, next).await {
            return;
        }
    }
}

// ---- files ----

const PROCESSING: &str = ".processing";

async fn file_loop(app: Arc<App>, st: Arc<TriggerState>, f: FileDrop) {
    for sub in [PROCESSING, "done", "failed"] {
        if let Err(e) = std::fs::create_dir_all(f.dir.join(sub)) {
            let why = format!("{}: {e}", f.dir.join(sub).display());
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "file trigger stopped: {why}");
            st.update(|l| l.problem = Some(why));
            return;
        }
    }
    st.update(|l| l.state = "watching");
    // Claimed before a restart: run (or settle) them first.
    let mut claimed: Vec<PathBuf> = std::fs::read_dir(f.dir.join(PROCESSING))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    claimed.sort();
    for path in claimed {
        take(&app, &st, &f, path).await;
    }
    let mut last_file_at = Instant::now();
    if let Ok(r) = app
        .journal
        .trigger_record(&st.pipeline, &st.trigger.name)
        .await
        && let Some((_, at, _)) = r.last
    {
        let ago = Duration::from_millis((now_ms() - at).max(0) as u64);
        last_file_at = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
    }
    let mut seen: HashMap<String, (u64, SystemTime, Instant)> = HashMap::new();
    let tick = (f.settle / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = app.closing.cancelled() => return,
        }
        let mut ready = Vec::new();
        let mut present = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&f.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !f.matcher.is_match(&name) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            present.insert(name.clone());
            let (len, mtime) = (
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            );
            let still = mtime.elapsed().unwrap_or_default() >= f.settle;
            match seen.get(&name) {
                Some(&(l, m, since)) if l == len && m == mtime => {
                    if still && since.elapsed() >= f.settle {
                        ready.push(name);
                    }
                }
                _ => {
                    seen.insert(name, (len, mtime, Instant::now()));
                }
            }
        }
        seen.retain(|name, _| present.contains(name));
        for name in ready {
            seen.remove(&name);
            let target = f.dir.join(PROCESSING).join(&name);
            if target.exists() {
                continue; // the same name is being processed; it waits its turn
            }
            match std::fs::rename(f.dir.join(&name), &target) {
                Ok(()) => {
                    last_file_at = Instant::now();
                    take(&app, &st, &f, target).await;
                }
                Err(e) => {
                    tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, "cannot claim {name}: {e}")
                }
            }
        }
        st.update(|l| l.waiting = seen.len());
        if let Some(every) = f.expect_every
            && last_file_at.elapsed() >= every
        {
            last_file_at = Instant::now();
            app.engine.outbound.metrics.record_trigger(
                TriggerCount::NoFile,
                &st.pipeline,
                &st.trigger.name,
                1,
            );
            let text = format!(
                "no file matching {} arrived in {} within {}",
                f.pattern,
                f.dir.display(),
                humantime::format_duration(every)
            );
            tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "{text}");
            raise(
                &app,
                &st,
                AlertOn::NoFile,
                text,
                json!({"trigger": st.trigger.name, "dir": f.dir.display().to_string(), "pattern": f.pattern}),
            );
        }
    }
}

/// Runs a claimed file (in `.processing/`), once per content: a file whose content ran
/// before is settled by that run's outcome instead.
async fn take(app: &Arc<App>, st: &Arc<TriggerState>, f: &FileDrop, path: PathBuf) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Reading, hashing and parsing a large file are kept off the server's threads.
    let read = {
        let (path, max) = (path.clone(), f.max_bytes);
        tokio::task::spawn_blocking(move || {
            read_capped(&path, max).map(|b| {
                let sha = hex::encode(sha2::Sha256::digest(&b));
                (b, sha)
            })
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    let (bytes, sha) = match read {
        Ok(b) => b,
        Err(why) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "{name}: {why}; moved to failed/");
            settle_file(&path, false);
            return;
        }
    };
    let event_id = format!("{}:sha256:{sha}", st.trigger.name);
    match app.journal.delivery(&st.pipeline, &event_id).await {
        Ok(Some((d, done))) => {
            if done {
                let ok = matches!(app.journal.run(&d.run_id).await, Ok(Some(r)) if r.summary.status == "succeeded");
                tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, run_id = %d.run_id, "{name}: this content ran before (run {}); not run again", d.run_id);
                settle_file(&path, ok);
            }
            // Otherwise its run is under way (recovered at start): its end settles it.
            return;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, "{name}: the journal cannot be read ({e}); left in .processing/ for the next start");
            return;
        }
    }
    let file = json!({
        "name": name,
        "path": path.display().to_string(),
        "size": bytes.len(),
        "sha256": sha,
    });
    let fired = now_ms();
    let info = json!({
        "type": "file",
        "name": st.trigger.name,
        "id": event_id,
        "fired_at": rfc3339(fired),
        "file": file,
    });
    st.update(|l| l.last_file = Some(json!({"name": name, "at": rfc3339(fired), "sha256": sha})));
    let parsed = {
        let (format, name) = (f.format, name.clone());
        tokio::task::spawn_blocking(move || parse_records(&bytes, format, &name))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    let (records, problem) = match parsed {
        Ok(records) => (records, None),
        Err(why) => (Value::Null, Some(why)),
    };
    let payload = json!({"file": file, "records": records});
    let d = delivery(app, st, event_id, &payload, info);
    match app.journal.accept_delivery(d.clone()).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, "{name}: not run, the journal cannot keep it ({e}); left in .processing/ for the next start");
            return;
        }
    }
    match problem {
        None => {
            tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, run_id = %d.run_id, "{name}: run {}", d.run_id);
            run_delivery(app, st, d, payload);
        }
        // The run fails at once, dead-lettered with the place of the problem; the
        // file goes to failed/ with that run's end.
        Some(why) => super::reject_delivery(app, &d, &why, "validation").await,
    }
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than max_bytes ({max})"));
    }
    Ok(bytes)
}

/// The records of a file: CSV rows as objects keyed by the header row, JSON as parsed,
/// NDJSON as a list. An error names the file, line and column.
pub fn parse_records(bytes: &[u8], format: FileFormat, name: &str) -> Result<Value, String> {
    match format {
        FileFormat::Json => serde_json::from_slice(bytes)
            .map_err(|e| format!("{name} line {} column {}: {e}", e.line(), e.column())),
        FileFormat::Ndjson => {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                let line = bytes[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                format!("{name} line {line}: not UTF-8")
            })?;
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                out.push(
                    serde_json::from_str(line)
                        .map_err(|e| format!("{name} line {} column {}: {e}", i + 1, e.column()))?,
                );
            }
            Ok(Value::Array(out))
        }
        FileFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new().from_reader(bytes);
            let headers = reader
                .headers()
                .map_err(|e| csv_error(name, &e, 0))?
                .clone();
            let mut out = Vec::new();
            for row in reader.records() {
                let row = row.map_err(|e| csv_error(name, &e, headers.len()))?;
                let obj: serde_json::Map<String, Value> = headers
                    .iter()
                    .zip(row.iter())
                    .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
                    .collect();
                out.push(Value::Object(obj));
            }
            Ok(Value::Array(out))
        }
    }
}

fn csv_error(name: &str, e: &csv::Error, header_len: usize) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { pos, len, .. } => {
            let line = pos.as_ref().map_or(0, |p| p.line());
            let column = (*len as usize).min(header_len) + 1;
            format!(
                "{name} line {line} column {column}: the row has {len} field(s), the header row {header_len}"
            )
        }
        csv::ErrorKind::Utf8 { pos, err } => format!(
            "{name} line {} column {}: not UTF-8",
            pos.as_ref().map_or(0, |p| p.line()),
            err.field() + 1
        ),
        _ => format!("{name}: {e}"),
    }
}

/// Moves a file out of `.processing/` into `done/` or `failed/` beside it, under its own
/// name (a name already there gets `.1`, `.2`, ... before its extension): raw files are kept.
fn settle_file(path: &Path, succeeded: bool) {
    let Some(dir) = path.parent().and_then(Path::parent) else {
        return;
    };
    if !path.exists() {
        return;
    }
    let to = dir.join(if succeeded { "done" } else { "failed" });
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    let mut target = to.join(&name);
    let mut n = 1;
    while target.exists() {
        target = to.join(format!("{stem}.{n}{ext}"));
        n += 1;
    }
    if let Err(e) = std::fs::create_dir_all(&to).and_then(|_| std::fs::rename(path, &target)) {
        tracing::error!(target: "fmhost::triggers", "cannot move {} to {}: {e}", path.display(), target.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_row_is_named_by_file_line_and_column() {
        let csv = b"id,name,email\n1,Ada,ada@example.com\n2,Bob\n";
        let err = parse_records(csv, FileFormat::Csv, "people.csv").unwrap_err();
        assert_eq!(
            err,
            "people.csv line 3 column 3: the row has 2 field(s), the header row 3"
        );
        let ok = parse_records(b"id,name\n1,Ada\n", FileFormat::Csv, "p.csv").unwrap();
        assert_eq!(ok, json!([{"id": "1", "name": "Ada"}]));
        let err =
            parse_records(b"{\"a\":1}\n{\"a\":\n", FileFormat::Ndjson, "e.ndjson").unwrap_err();
        assert!(err.starts_with("e.ndjson line 2 column"), "{err}");
    }
}
