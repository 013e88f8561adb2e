//! The run journal: every run, stage, outbound attempt and stage output, the webhook
//! deliveries a server accepted, and the dead-letter queue, in an embedded store.
//!
//! Writers never wait on the store: records go down a channel to one writer thread,
//! which commits whatever has queued up as one transaction ([`Backend::write`]). A
//! caller that needs its records on disk awaits [`Journal::commit`]: a run is reported
//! done only after its last records are committed, and a webhook is acknowledged only
//! after its delivery is committed with a full sync. Reads use their own connection.
//!
//! [`Backend`] is the small trait a store implements; [`sqlite`] is the default (and
//! only) one. Its schema is documented in `docs/journal.md`.

pub mod postgres;
pub mod replay;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::engine::{RunObserver, RunReport, RunStatus, StageReport, StageStatus};
use crate::http::Attempt;
use crate::secrets::{Secrets, Stored};

/// This machine's name, recorded with each run so a process's liveness is only judged
/// here. Read once per process.
pub fn hostname() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_default()
    })
    .clone()
}

/// Whether process `pid` on this machine is still running.
pub fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

pub use crate::time::{parse_time, rfc3339, unix_ms};

#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    #[error(
        "journal {path} is not a usable fmhost journal ({why}); move it aside to start a new one, or restore it from a backup"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "journal {path} is locked by another process and stayed locked for {waited_ms} ms; another fmhost may be holding it (FMHOST_JOURNAL_BUSY_TIMEOUT sets how long to wait)"
    )]
    Locked { path: PathBuf, waited_ms: u64 },
    #[error(
        "journal {path} has schema version {found}, newer than this fmhost understands ({known}); use a newer fmhost"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("journal {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error("journal: the writer has stopped")]
    Closed,
}

/// JSON as a journal stores it: text.
pub(crate) fn json_text(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(crate) fn parse_json(text: Option<String>) -> Option<Value> {
    text.and_then(|t| parse_value(&t))
}

/// Reads back a value this journal wrote, at whatever depth it was written: a stage may
/// nest a parsed body (serde_json's 128 levels) inside its own output, so reading with
/// the parser's default limit would turn such an output into `null`. The stack grows on
/// demand instead of overflowing.
pub(crate) fn parse_value(text: &str) -> Option<Value> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let value = Value::deserialize(serde_stacker::Deserializer::new(&mut de)).ok()?;
    de.end().ok()?;
    Some(value)
}

/// The columns a run's summary is read from, in [`RunSummary`]'s order (both backends).
pub(crate) const SUMMARY_COLUMNS: &str = "id, pipeline, status, trigger, started_at, duration_ms, error, error_kind, replay_of, trace_id";

/// A dead letter with its run's input, for both backends to filter further.
pub(crate) const DEAD_LETTER_SELECT: &str =
    "SELECT d.id, d.kind, d.status, d.pipeline, d.run_id, d.first_run_id, d.event_id,
    d.reason, d.error_kind, d.retries, d.created_at, d.updated_at, d.resolved_by, r.input
    FROM dead_letters d LEFT JOIN runs r ON r.id = d.run_id";

static LOCATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Puts the journal in PostgreSQL at `url` for this process (`fmhost --journal URL`);
/// otherwise `FMHOST_JOURNAL` decides, and without it the journal is SQLite in the state
/// directory. The first call wins.
pub fn set_location(url: &str) {
    let _ = LOCATION.set(url.to_string());
}

/// The PostgreSQL URL the journal lives at, if one is configured.
pub fn location() -> Result<Option<String>, JournalError> {
    let url = match LOCATION.get() {
        Some(url) => url.clone(),
        None => match std::env::var("FMHOST_JOURNAL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => return Ok(None),
        },
    };
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("postgres" | "postgresql")) {
        return Err(JournalError::Io {
            path: PathBuf::from(postgres::display_url(&url)),
            why: "--journal (FMHOST_JOURNAL) must be a postgres:// or postgresql:// URL; leave it unset for the SQLite journal in the state directory".into(),
        });
    }
    Ok(Some(url))
}

/// This process as a worker of a cluster (`fmhost serve --cluster`): the runs it starts
/// are leased to it in the journal, renewed while it lives ([`Record::RenewLeases`]).
#[derive(Debug, Clone)]
pub struct Worker {
    pub id: String,
    /// How long a lease lasts without renewal; a queued run waits as long for a taker.
    pub lease_ms: i64,
}

static WORKER: std::sync::OnceLock<Worker> = std::sync::OnceLock::new();

/// Makes this process a cluster worker; the first call wins.
pub fn set_worker(worker: Worker) {
    let _ = WORKER.set(worker);
}

/// This process as a cluster worker, if it is one.
pub fn worker() -> Option<&'static Worker> {
    WORKER.get()
}

/// How long a queued run may wait for a worker, in leases, before the leader queues it
/// again (its message may have been lost with the worker that was publishing it).
pub const QUEUED_LEASES: i64 = 6;

/// A run's lease as its start is written at `now`: the worker that runs it (none while
/// it is queued for any worker to take) and until when, or nothing outside a cluster.
pub(crate) fn lease_of(start: &RunStart, now: i64) -> (Option<String>, Option<i64>) {
    match worker() {
        Some(w) => (
            (!start.queued).then(|| w.id.clone()),
            Some(now + w.lease_ms * if start.queued { QUEUED_LEASES } else { 1 }),
        ),
        None => (None, None),
    }
}

/// Whether there is a journal to read for the state directory `dir`: a PostgreSQL one
/// is configured, or `DIR/journal.db` exists (reading must not create one).
pub fn readable(dir: &Path) -> bool {
    matches!(location(), Ok(Some(_))) || dir.join("journal.db").exists()
}

/// Who started a run; a server resumes only its own interrupted runs.
pub const OWNER_SERVE: &str = "serve";
pub const OWNER_CLI: &str = "cli";

/// Where a run's pipeline, plugins and secrets came from (paths, never values), so a
/// replay is one command.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rerun {
    /// The pipeline file, absolute.
    pub pipeline_file: Option<String>,
    /// The `--plugins` directories, absolute.
    pub plugin_dirs: Vec<String>,
    /// The `--secrets` file, absolute.
    pub secrets_file: Option<String>,
}

impl Rerun {
    pub fn new(
        pipeline_file: Option<&Path>,
        plugin_dirs: &[PathBuf],
        secrets_file: Option<&Path>,
    ) -> Rerun {
        let absolute = |p: &Path| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        Rerun {
            pipeline_file: pipeline_file.map(absolute),
            plugin_dirs: plugin_dirs.iter().map(|p| absolute(p)).collect(),
            secrets_file: secrets_file.map(absolute),
        }
    }
}

/// What the journal knows about a run before it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunStart {
    pub run_id: String,
    pub pipeline: String,
    pub rerun: Rerun,
    /// `cli`, `api`, `webhook`, `replay`, `resume`, `dlq-retry`.
    pub trigger: String,
    pub owner: String,
    /// The run's input as journaled: `{{secrets.NAME}}` in place of secret values.
    pub input: Stored,
    pub replay_of: Option<String>,
    pub replay_from: Option<String>,
    pub started_at: i64,
    /// The run's place in a distributed trace: a new trace unless the caller sent one.
    pub trace: crate::trace::RunTrace,
    /// What `{{trigger.*}}` reads (`type`, `id`, `fired_at`, a poll's `cursor`, ...), as
    /// journaled; kept by a resume and a replay, so keys derived from it stay the same.
    #[serde(default)]
    pub trigger_info: Option<Stored>,
    /// In a cluster: started for any worker to take from the work queue, not by this one.
    #[serde(default)]
    pub queued: bool,
}

impl RunStart {
    /// A run starting now; not a replay.
    pub fn new(
        run_id: String,
        pipeline: &str,
        rerun: Rerun,
        trigger: &str,
        owner: &str,
        input: Stored,
    ) -> RunStart {
        RunStart {
            trace: crate::trace::RunTrace::start(&run_id, None),
            run_id,
            pipeline: pipeline.to_string(),
            rerun,
            trigger: trigger.to_string(),
            owner: owner.to_string(),
            input,
            replay_of: None,
            replay_from: None,
            started_at: unix_ms(SystemTime::now()),
            trigger_info: None,
            queued: false,
        }
    }

    /// What the run reads as `{{trigger}}`: what fired it, else `{type, id, fired_at}`
    /// of the run itself (`api`, `cli`, ...).
    pub fn trigger_value(&self, secrets: &Secrets) -> Value {
        match &self.trigger_info {
            Some(t) => secrets.restore(t),
            None => serde_json::json!({
                "type": self.trigger,
                "id": self.run_id,
                "fired_at": rfc3339(self.started_at),
            }),
        }
    }
}

/// The largest cursor committed, as JSON text.
pub const MAX_CURSOR_BYTES: usize = 64 << 10;

/// A poll trigger's cursor, moved when its run succeeds: in the same transaction as the
/// run's end, and only if nobody set it since the run read it.
#[derive(Debug, Clone)]
pub struct CursorCommit {
    pub pipeline: String,
    pub trigger: String,
    /// What the run started from; the commit applies only while the cursor still is this.
    pub expected: Value,
    pub value: Value,
}

/// What the journal knows of one trigger (`GET /v1/triggers`, `fmhost schedules list`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TriggerRecord {
    /// The latest scheduled time a schedule fired, was skipped or missed (Unix ms).
    pub last_fire_ms: Option<i64>,
    /// Fires that did not run because the previous run was still running.
    pub skipped: u64,
    /// Fires missed while the server was down, outside the catch-up.
    pub missed: u64,
    pub cursor: Option<Value>,
    pub cursor_updated_ms: Option<i64>,
    /// The newest delivery (fire, poll, file): event id, received (Unix ms), run id.
    pub last: Option<(String, i64, String)>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub run_id: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub error_kind: Option<String>,
    pub output: Option<Value>,
    pub duration_ms: u64,
    pub finished_at: i64,
    /// The run this one replays: a success resolves its open dead letter; a failure
    /// moves that entry here instead of adding a second one.
    pub replay_of: Option<String>,
    /// Set for a failure that goes to the dead-letter queue.
    pub dead_letter: Option<NewDeadLetter>,
    /// A succeeded poll run's next cursor.
    pub cursor: Option<CursorCommit>,
    /// The pipeline document it ran (`pipelines.hash`).
    pub pipeline_hash: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// `run` or `webhook`.
    pub kind: String,
    pub pipeline: String,
    pub reason: String,
    pub error_kind: Option<String>,
}

/// An accepted webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub pipeline: String,
    pub event_id: String,
    pub path: String,
    pub received_at: i64,
    /// As journaled ([`Secrets::store`]); the run gets [`Secrets::restore`] of it.
    pub payload: Stored,
    /// The run that processes it (assigned when it is accepted).
    pub run_id: String,
    /// The sender's W3C `traceparent`, so the run joins its trace.
    pub traceparent: Option<String>,
    /// What its run reads as `{{trigger}}` (as journaled).
    #[serde(default)]
    pub trigger_info: Option<Stored>,
}

/// One write. Records are applied in order, a batch at a time.
#[derive(Debug, Clone)]
pub enum Record {
    RunStarted(RunStart),
    /// A stage's state; `position` is its place in the pipeline (set on first write).
    Stage {
        run_id: String,
        position: u32,
        stage: StageReport,
    },
    Attempt {
        run_id: String,
        stage_id: String,
        attempt: Attempt,
    },
    RunFinished(RunEnd),
    /// A restarted server picked the run up again.
    RunResumed {
        run_id: String,
    },
    /// Stored unless `(pipeline, event_id)` is known; [`Backend::write`] says which.
    Delivery(Delivery),
    DropDeadLetter {
        id: i64,
    },
    /// Removes a finished run and everything recorded with it (retention).
    Forget {
        run_id: String,
    },
    /// A schedule's fire (or a run of missed ones), keyed by (pipeline, trigger,
    /// scheduled time): `outcome` is `run` (with its delivery, stored in the same
    /// transaction), `skipped` or `missed`. [`Backend::write`] says whether it is new.
    Fire {
        pipeline: String,
        trigger: String,
        scheduled_at: i64,
        /// For `missed`: how many fires, up to and including `last_at`.
        count: u64,
        last_at: i64,
        outcome: &'static str,
        reason: Option<String>,
        delivery: Option<Box<Delivery>>,
    },
    /// An operator's `fmhost cursors set`.
    SetCursor {
        pipeline: String,
        trigger: String,
        value: Value,
    },
    /// A pipeline document, kept once per content (SHA-256); a run names the one it
    /// ran with its end (`RunEnd::pipeline_hash`).
    Pipeline {
        hash: String,
        document: String,
    },
    /// A cluster worker's heartbeat: the runs it holds stay its own until `until`.
    RenewLeases {
        worker: String,
        until: i64,
    },
}

/// What [`Journal::prune`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pruned {
    /// Runs removed, with their stages, attempts, finished deliveries and closed dead letters.
    pub removed: usize,
    /// Old runs kept: still running, with an open dead letter, or failed (`keep_failed`).
    pub kept: usize,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub owner: Option<String>,
    /// Only runs recorded by processes on this machine that are no longer alive.
    pub abandoned: bool,
    /// Only runs no later run replays (the ends of replay chains).
    pub not_replayed: bool,
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub pipeline: String,
    pub status: String,
    pub trigger: String,
    pub started_at: String,
    /// `started_at` in Unix milliseconds.
    #[serde(default)]
    pub started_at_ms: i64,
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
    /// The W3C trace id of the run (its latest start, when resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A stage as journaled: its report plus every outbound attempt it made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageDetail {
    #[serde(flatten)]
    pub report: StageReport,
    pub calls: Vec<Attempt>,
}

/// Everything the journal holds about one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub owner: String,
    #[serde(flatten)]
    pub rerun: Rerun,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_from: Option<String>,
    /// Later runs that replay this one.
    pub replayed_by: Vec<String>,
    /// How many times a restarted server resumed it.
    pub resumed: u32,
    pub finished_at: Option<String>,
    /// As journaled: [`Secrets::restore`] gives the input the run had.
    pub input: Stored,
    pub output: Option<Value>,
    /// The open dead-letter entry for this run, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<i64>,
    /// The run's span and the caller's, when it joined a trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::RunTrace>,
    /// What fired it (`{{trigger}}`), when a trigger did.
    #[serde(
        default,
        rename = "trigger_detail",
        skip_serializing_if = "Option::is_none"
    )]
    pub trigger_info: Option<Stored>,
    pub stages: Vec<StageDetail>,
}

impl RunDetail {
    pub fn stage(&self, id: &str) -> Option<&StageDetail> {
        self.stages.iter().find(|s| s.report.id == id)
    }

    /// The journal entry to run it again under the same id (resume, or fail it for good).
    pub fn restart(&self, owner: &str) -> RunStart {
        // The same trace as before, in a new span: one trace per run id.
        let fresh = crate::trace::RunTrace::start(&self.summary.run_id, None);
        let trace = match &self.trace {
            Some(t) => crate::trace::RunTrace {
                span_id: fresh.span_id,
                ..t.clone()
            },
            None => fresh,
        };
        RunStart {
            replay_of: self.summary.replay_of.clone(),
            replay_from: self.replay_from.clone(),
            trace,
            trigger_info: self.trigger_info.clone(),
            ..RunStart::new(
                self.summary.run_id.clone(),
                &self.summary.pipeline,
                self.rerun.clone(),
                &self.summary.trigger,
                owner,
                self.input.clone(),
            )
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    pub pipeline: Option<String>,
    /// `open` (the default), `resolved`, `dropped`; `None` for all.
    pub status: Option<String>,
    /// Only the entry of this delivery (`Delivery::event_id`).
    pub event_id: Option<String>,
    pub limit: usize,
}

/// A dead-letter entry: a failed run or an unprocessable delivery, with all it takes
/// to retry it (the run it points at holds the pipeline, input and stage outputs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: i64,
    /// `run` or `webhook`.
    pub kind: String,
    /// `open`, `resolved` or `dropped`.
    pub status: String,
    pub pipeline: String,
    /// The latest run for this entry; retrying replays it.
    pub run_id: String,
    /// The run that first failed.
    pub first_run_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub reason: String,
    pub error_kind: Option<String>,
    /// Sent upstream as `X-Correlation-Id` by the failed run.
    pub correlation_id: String,
    pub retries: u32,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    pub input: Stored,
}

/// A journal store. Writes come from one thread, a batch at a time; reads from another
/// instance. A second backend (Postgres, for several hosts) implements the same.
pub trait Backend: Send + 'static {
    /// Applies `batch` in one transaction; with `durable`, synced to stable storage
    /// before returning. Returns, per record, whether it changed anything (a
    /// `Delivery` already known changes nothing).
    fn write(&mut self, batch: &[Record], durable: bool) -> Result<Vec<bool>, JournalError>;
    fn runs(&mut self, filter: &RunFilter) -> Result<Vec<RunSummary>, JournalError>;
    fn run(&mut self, id: &str) -> Result<Option<RunDetail>, JournalError>;
    /// Accepted deliveries whose run has not finished.
    fn pending_deliveries(&mut self) -> Result<Vec<Delivery>, JournalError>;
    /// A delivery by its key, and whether its run has finished.
    fn delivery(
        &mut self,
        pipeline: &str,
        event_id: &str,
    ) -> Result<Option<(Delivery, bool)>, JournalError>;
    /// What is journaled of one trigger: fires, skips, misses, cursor, newest delivery.
    fn trigger_record(
        &mut self,
        pipeline: &str,
        trigger: &str,
    ) -> Result<TriggerRecord, JournalError>;
    fn dead_letters(&mut self, filter: &DlqFilter) -> Result<Vec<DeadLetter>, JournalError>;
    fn dead_letter(&mut self, id: i64) -> Result<Option<DeadLetter>, JournalError>;
    /// The pipeline document run `run_id` ran, by its content hash.
    fn pipeline_document(&mut self, run_id: &str) -> Result<Option<String>, JournalError>;
    /// The newest `limit` recorded successful answers, oldest first, as (service,
    /// method, recorded exchange).
    fn recorded_answers(
        &mut self,
        limit: usize,
    ) -> Result<Vec<(String, String, crate::http::Recorded)>, JournalError>;
    /// A cluster's leases and shared quotas; only a journal several hosts share has them.
    fn cluster(&mut self) -> Result<&mut dyn ClusterBackend, JournalError> {
        Err(JournalError::Io {
            path: PathBuf::from("journal.db"),
            why: "a cluster needs a PostgreSQL journal (--journal postgres://...)".into(),
        })
    }
}

/// A plugin change one worker of a cluster made, for the others.
#[derive(Debug, Clone)]
pub struct PluginEvent {
    pub seq: i64,
    pub name: String,
    /// `swap` or `rollback`.
    pub action: String,
    pub sha256: Option<String>,
    /// The operator approved hosts or a world beyond the previous version's.
    pub approve: bool,
    pub worker: String,
}

/// What the workers of a cluster share through the journal: who runs which run (leases,
/// compared and set in one statement) and each service's rate limit.
pub trait ClusterBackend {
    /// Takes queued run `run_id` for `worker` until `until`; false if another worker
    /// has it or it is not running.
    fn claim(&mut self, run_id: &str, worker: &str, until: i64) -> Result<bool, JournalError>;
    /// Up to `limit` running runs whose lease ran out before `now`, with the worker
    /// that held each (none for a queued run nobody took).
    fn expired(
        &mut self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>)>, JournalError>;
    /// Puts run `run_id` back in the queue until `until`, if its lease is still the
    /// expired one of `worker`; false if anything changed meanwhile.
    fn requeue(
        &mut self,
        run_id: &str,
        worker: Option<&str>,
        now: i64,
        until: i64,
    ) -> Result<bool, JournalError>;
    /// Accepted deliveries received before `before` whose run was never journaled.
    fn orphaned(&mut self, before: i64) -> Result<Vec<Delivery>, JournalError>;
    /// Records a plugin change made on `worker` (`swap` to the component `blob`, kept
    /// by its SHA-256, or `rollback`) for the other workers to make; returns its number.
    fn announce_plugin(
        &mut self,
        name: &str,
        action: &str,
        blob: Option<(&str, &[u8])>,
        approve: bool,
        worker: &str,
    ) -> Result<i64, JournalError>;
    /// The plugin changes numbered above `after`, in order.
    fn plugin_events(&mut self, after: i64) -> Result<Vec<PluginEvent>, JournalError>;
    /// A component kept by [`ClusterBackend::announce_plugin`], by its SHA-256.
    fn plugin_blob(&mut self, sha256: &str) -> Result<Option<Vec<u8>>, JournalError>;
    /// Opens `service`'s circuit for the cluster for `open_ms` from now (the database's
    /// clock), as `worker` found it must be.
    fn open_circuit(
        &mut self,
        service: &str,
        open_ms: i64,
        worker: &str,
    ) -> Result<(), JournalError>;
    /// The circuits open now: service, milliseconds left, the worker that opened it.
    fn open_circuits(&mut self) -> Result<Vec<(String, i64, String)>, JournalError>;
    /// One call's place in `service`'s shared rate limit (a GCRA on the database's
    /// clock: one call per `period_us`, `burst` at once): zero when taken, else how many
    /// microseconds to wait before asking again.
    fn take_token(
        &mut self,
        service: &str,
        period_us: i64,
        burst: u32,
    ) -> Result<i64, JournalError>;
}

enum Msg {
    /// A record; `durable` makes its batch synced to stable storage; the reply comes
    /// once the batch is committed.
    Write {
        record: Box<Record>,
        durable: bool,
        reply: Option<oneshot::Sender<Result<bool, JournalError>>>,
    },
    Commit {
        durable: bool,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
}

/// A handle on the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

type OpenReader = Box<dyn Fn() -> Result<Box<dyn Backend>, JournalError> + Send + Sync>;

struct Inner {
    tx: mpsc::Sender<Msg>,
    /// Opened on the first read: `fmhost run` never reads.
    reader: Mutex<Option<Box<dyn Backend>>>,
    open_reader: OpenReader,
    path: PathBuf,
    /// Pipeline documents (by hash) this handle has queued: each is sent once.
    documents: Mutex<std::collections::HashSet<String>>,
}

impl Journal {
    /// Opens (creating and migrating) the SQLite journal `DIR/journal.db` for reading
    /// and writing; fails if another process holds the write lock too long.
    /// With a PostgreSQL journal configured ([`set_location`], `FMHOST_JOURNAL`), opens
    /// that instead, and `dir` holds only the rest of the state.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        match location()? {
            Some(url) => Self::open_postgres(&url),
            None => Self::open_sqlite(dir, true),
        }
    }

    /// Opens the journal to read it: works while another process is writing.
    pub fn open_for_reading(dir: &Path) -> Result<Journal, JournalError> {
        match location()? {
            Some(url) => Self::open_postgres(&url),
            None => Self::open_sqlite(dir, false),
        }
    }

    /// The PostgreSQL journal at `url`, created and migrated on first use.
    pub fn open_postgres(url: &str) -> Result<Journal, JournalError> {
        let writer = postgres::PgBackend::open(url)?;
        let url = url.to_string();
        let open_reader: OpenReader =
            Box::new(move || Ok(Box::new(postgres::PgBackend::open(&url)?) as Box<dyn Backend>));
        Ok(Journal::with_backends(
            writer.shown().to_path_buf(),
            Box::new(writer),
            open_reader,
        ))
    }

    fn open_sqlite(dir: &Path, write: bool) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|e| JournalError::Io {
            path: dir.to_path_buf(),
            why: e.to_string(),
        })?;
        let path = dir.join("journal.db");
        let writer = if write {
            sqlite::SqliteBackend::open_writer(&path)?
        } else {
            sqlite::SqliteBackend::open(&path)?
        };
        let reader_path = path.clone();
        let open_reader: OpenReader = Box::new(move || {
            Ok(Box::new(sqlite::SqliteBackend::open(&reader_path)?) as Box<dyn Backend>)
        });
        Ok(Journal::with_backends(path, Box::new(writer), open_reader))
    }

    /// A journal over any backend: `writer` moves to the writer thread; `open_reader`
    /// opens the instance reads go to, when the first read comes.
    pub fn with_backends(
        path: PathBuf,
        mut writer: Box<dyn Backend>,
        open_reader: OpenReader,
    ) -> Journal {
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("fmhost-journal".into())
            .spawn(move || writer_loop(&mut *writer, rx))
            .expect("spawn the journal writer thread");
        Journal {
            inner: Arc::new(Inner {
                tx,
                reader: Mutex::new(None),
                open_reader,
                path,
                documents: Mutex::default(),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Queues a record; it is committed with the next batch.
    pub fn record(&self, record: Record) {
        // A stopped writer has already reported why; commit() says so to whoever waits.
        let _ = self.inner.tx.send(Msg::Write {
            record: Box::new(record),
            durable: false,
            reply: None,
        });
    }

    /// Writes a record and waits until it, and everything queued before it, is committed
    /// and synced to stable storage. `false` if it changed nothing.
    pub async fn record_durably(&self, record: Record) -> Result<bool, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Write {
                record: Box::new(record),
                durable: true,
                reply: Some(reply),
            })
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Waits until everything queued so far is committed; `durable` also syncs it to
    /// stable storage (otherwise it survives a crash of this process, not of the machine).
    pub async fn commit(&self, durable: bool) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Commit { durable, reply })
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Queues a pipeline document unless this handle already has; runs name it by hash.
    pub fn store_document(&self, document: &crate::pipeline::Document) {
        let mut sent = self
            .inner
            .documents
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if sent.insert(document.hash.clone()) {
            self.record(Record::Pipeline {
                hash: document.hash.clone(),
                document: document.text.clone(),
            });
        }
    }

    /// Stores an accepted webhook delivery durably; `false` if it was already known.
    pub async fn accept_delivery(&self, d: Delivery) -> Result<bool, JournalError> {
        self.record_durably(Record::Delivery(d)).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn Backend) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = inner.reader.lock().unwrap_or_else(|p| p.into_inner());
            if reader.is_none() {
                *reader = Some((inner.open_reader)()?);
            }
            let reader = reader.as_mut().expect("opened above");
            sqlite::retry_busy(sqlite::busy_timeout(), || f(&mut **reader))
        })
        .await
        .map_err(|_| JournalError::Closed)?
    }

    /// A cluster operation on the shared journal ([`ClusterBackend`]).
    pub async fn cluster<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn ClusterBackend) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        self.read(move |b| f(b.cluster()?)).await
    }

    pub async fn runs(&self, filter: RunFilter) -> Result<Vec<RunSummary>, JournalError> {
        self.read(move |b| b.runs(&filter)).await
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunDetail>, JournalError> {
        let id = id.to_string();
        self.read(move |b| b.run(&id)).await
    }

    pub async fn pending_deliveries(&self) -> Result<Vec<Delivery>, JournalError> {
        self.read(|b| b.pending_deliveries()).await
    }

    pub async fn delivery(
        &self,
        pipeline: &str,
        event_id: &str,
    ) -> Result<Option<(Delivery, bool)>, JournalError> {
        let (p, e) = (pipeline.to_string(), event_id.to_string());
        self.read(move |b| b.delivery(&p, &e)).await
    }

    pub async fn trigger_record(
        &self,
        pipeline: &str,
        trigger: &str,
    ) -> Result<TriggerRecord, JournalError> {
        let (p, t) = (pipeline.to_string(), trigger.to_string());
        self.read(move |b| b.trigger_record(&p, &t)).await
    }

    pub async fn dead_letters(&self, filter: DlqFilter) -> Result<Vec<DeadLetter>, JournalError> {
        self.read(move |b| b.dead_letters(&filter)).await
    }

    pub async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, JournalError> {
        self.read(move |b| b.dead_letter(id)).await
    }

    /// Fails and dead-letters the `running` runs of `owner` whose process on this machine
    /// has died (a `kill -9` of `fmhost run`), so none stays `running` for ever.
    pub async fn sweep_abandoned(&self, owner: &str) -> Result<Vec<String>, JournalError> {
        let abandoned = self
            .runs(RunFilter {
                status: Some("running".into()),
                owner: Some(owner.into()),
                abandoned: true,
                ..RunFilter::default()
            })
            .await?;
        let mut swept = Vec::new();
        for s in abandoned {
            let Some(run) = self.run(&s.run_id).await? else {
                continue;
            };
            let watcher = RunJournal::new(
                self.clone(),
                run.restart(owner),
                Arc::new(Secrets::from_pairs(Vec::<(String, String)>::new())),
            );
            watcher
                .reject(
                    "interrupted: the process running it exited before it finished",
                    "interrupted",
                    false,
                )
                .await?;
            tracing::warn!(target: "fmhost::journal", run_id = %s.run_id, "run {} was interrupted (its process is gone): failed and dead-lettered", s.run_id);
            swept.push(s.run_id);
        }
        Ok(swept)
    }

    /// Removes the runs that started before `before_ms`, except those still running,
    /// those with an open dead letter (a retry needs them) and, with `keep_failed`, those
    /// that did not succeed. With `dry_run`, only counts.
    pub async fn prune(
        &self,
        before_ms: i64,
        keep_failed: bool,
        dry_run: bool,
    ) -> Result<Pruned, JournalError> {
        let old = self
            .runs(RunFilter {
                until_ms: Some(before_ms),
                limit: 0,
                ..RunFilter::default()
            })
            .await?;
        let open: std::collections::HashSet<String> = self
            .dead_letters(DlqFilter {
                status: Some("open".into()),
                limit: 0,
                ..DlqFilter::default()
            })
            .await?
            .into_iter()
            .map(|d| d.run_id)
            .collect();
        let mut pruned = Pruned::default();
        for (n, r) in old.iter().enumerate() {
            let keep = r.status == "running"
                || open.contains(&r.run_id)
                || (keep_failed && r.status != "succeeded");
            if keep {
                pruned.kept += 1;
                continue;
            }
            pruned.removed += 1;
            if !dry_run {
                self.record(Record::Forget {
                    run_id: r.run_id.clone(),
                });
                if n % 512 == 511 {
                    self.commit(false).await?;
                }
            }
        }
        if !dry_run {
            self.commit(true).await?;
        }
        Ok(pruned)
    }

    /// The pipeline document a run ran, if the journal kept it.
    /// The newest `limit` recorded successful answers, oldest first (schema drift
    /// learns its shapes again from them when a server starts).
    pub async fn recorded_answers(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, String, crate::http::Recorded)>, JournalError> {
        self.read(move |b| b.recorded_answers(limit)).await
    }

    pub async fn pipeline_document(&self, run_id: &str) -> Result<Option<String>, JournalError> {
        let id = run_id.to_string();
        self.read(move |b| b.pipeline_document(&id)).await
    }

    /// Drops an open dead-letter entry; `false` if there is no open entry with that id.
    pub async fn drop_dead_letter(&self, id: i64) -> Result<bool, JournalError> {
        self.record_durably(Record::DropDeadLetter { id }).await
    }
}

/// The writer thread: takes whatever has queued up and commits it as one transaction.
fn writer_loop(backend: &mut dyn Backend, rx: mpsc::Receiver<Msg>) {
    const MAX_BATCH: usize = 4096;
    // A failed batch is reported to every commit that follows, until one is reported.
    let mut lost: Option<JournalError> = None;
    while let Ok(first) = rx.recv() {
        let mut msgs = vec![first];
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        let durable = msgs.iter().any(|m| {
            matches!(
                m,
                Msg::Commit { durable: true, .. } | Msg::Write { durable: true, .. }
            )
        });
        let mut records = Vec::new();
        let mut replies = Vec::new();
        let mut commits = Vec::new();
        for m in msgs {
            match m {
                Msg::Write {
                    record,
                    reply,
                    durable,
                } => {
                    if let Some(reply) = reply {
                        replies.push((records.len(), durable, reply));
                    }
                    records.push(*record);
                }
                Msg::Commit { reply, .. } => commits.push(reply),
            }
        }
        let (records, index) = coalesce(records);
        let result = if records.is_empty() && !durable {
            Ok(Vec::new())
        } else {
            backend.write(&records, durable)
        };
        let changed = match result {
            // Back to one answer per record queued (a dropped row changed nothing).
            Ok(changed) => index
                .iter()
                .map(|i| i.and_then(|i| changed.get(i).copied()).unwrap_or(false))
                .collect(),
            Err(e) => {
                tracing::error!(target: "fmhost::journal", records = records.len(), "journal write failed: {e}");
                lost = Some(e);
                Vec::new()
            }
        };
        // Whoever waits for a commit or a durable write learns of any batch lost since
        // the last such answer; a plain write's reply speaks only of its own batch.
        let waited = !commits.is_empty() || replies.iter().any(|(_, durable, _)| *durable);
        for (i, durable, reply) in replies {
            let _ = reply.send(match &lost {
                Some(e) if durable || i >= changed.len() => Err(e.clone()),
                _ => Ok(changed.get(i).copied().unwrap_or(false)),
            });
        }
        for reply in commits {
            let _ = reply.send(lost.clone().map_or(Ok(()), Err));
        }
        if waited {
            lost = None;
        }
    }
}

/// Drops every stage row of a batch that a later row of the same stage in the same
/// batch replaces anyway: a row that is not `pending` always overwrites (the store's
/// rule), so only the last of a stage's `pending`, `running`, `succeeded` needs writing.
/// The survivor takes the earliest row's position, which is what the first insert would
/// have stored. Returns the rows to write and, per row queued, its index among them.
fn coalesce(records: Vec<Record>) -> (Vec<Record>, Vec<Option<usize>>) {
    let mut slots: Vec<Option<Record>> = records.into_iter().map(Some).collect();
    // (run, stage) -> index of the non-pending row that overwrites the earlier ones.
    let mut survivors: std::collections::HashMap<(String, String), usize> =
        std::collections::HashMap::new();
    for i in (0..slots.len()).rev() {
        let Some(Record::Stage {
            run_id,
            position,
            stage,
        }) = &slots[i]
        else {
            continue;
        };
        let key = (run_id.clone(), stage.id.clone());
        if let Some(&j) = survivors.get(&key) {
            let earlier = *position;
            if let Some(Record::Stage { position, .. }) = &mut slots[j] {
                *position = earlier;
            }
            slots[i] = None;
        } else if stage.status != StageStatus::Pending {
            survivors.insert(key, i);
        }
    }
    let mut index = Vec::with_capacity(slots.len());
    let mut kept = Vec::with_capacity(slots.len());
    for slot in slots {
        index.push(slot.is_some().then_some(kept.len()));
        kept.extend(slot);
    }
    (kept, index)
}

/// Journals one run: the engine's observer while it runs, then [`finish`](Self::finish).
pub struct RunJournal {
    journal: Journal,
    start: RunStart,
    /// The secrets when the run started.
    secrets: Arc<Secrets>,
    /// The engine's current secrets: a file rotated while the run goes on brings new
    /// values, which are masked too.
    live: Option<Arc<arc_swap::ArcSwap<Secrets>>>,
    /// A poll run's cursor: moved when the run succeeds (see [`CursorCommit`]).
    cursor: std::sync::OnceLock<(String, crate::pipeline::triggers::CursorSpec, Value)>,
    /// The hash of the pipeline document the run runs, recorded with its end.
    pipeline_hash: std::sync::OnceLock<String>,
}

impl RunJournal {
    pub fn new(journal: Journal, start: RunStart, secrets: Arc<Secrets>) -> Arc<RunJournal> {
        Arc::new(RunJournal {
            journal,
            start,
            secrets,
            live: None,
            cursor: Default::default(),
            pipeline_hash: Default::default(),
        })
    }

    /// A run of `engine`: what it writes is masked with the secrets as they were at the
    /// start and as they are when it writes.
    pub fn following(
        journal: Journal,
        start: RunStart,
        engine: &crate::engine::Engine,
    ) -> Arc<RunJournal> {
        let secrets = engine.secrets();
        Arc::new(RunJournal {
            journal,
            start,
            secrets,
            live: Some(engine.secrets_handle()),
            cursor: Default::default(),
            pipeline_hash: Default::default(),
        })
    }

    /// The secrets that differ from the start's, if a rotation brought new ones.
    fn rotated(&self) -> Option<Arc<Secrets>> {
        let now = self.live.as_ref()?.load_full();
        (!Arc::ptr_eq(&now, &self.secrets)).then_some(now)
    }

    fn mask(&self, v: &Value) -> Value {
        let mut stored = self.secrets.store(v);
        if let Some(now) = self.rotated() {
            stored = now.store_more(stored);
        }
        stored.as_value().clone()
    }

    pub fn start(&self) -> &RunStart {
        &self.start
    }

    /// Commits the cursor the run's output holds at `spec.from_output`, with the run's
    /// end, if it succeeds and the cursor of `trigger` is still `expected`.
    pub fn commit_cursor(
        &self,
        trigger: &str,
        spec: &crate::pipeline::triggers::CursorSpec,
        expected: Value,
    ) {
        let _ = self
            .cursor
            .set((trigger.to_string(), spec.clone(), expected));
    }

    /// Records the run as started before the engine does (so it can be looked up at once).
    pub fn announce(&self) {
        self.journal.record(Record::RunStarted(self.start.clone()));
    }

    fn stage(&self, run_id: &str, position: u32, stage: &StageReport) {
        let mut stage = stage.clone();
        if let Some(out) = &stage.output {
            let mut masked = self.secrets.store_shared(out);
            if let Some(now) = self.rotated() {
                masked = now.store_more_shared(&masked);
            }
            stage.output = Some(masked);
        }
        if let Some(c) = stage.error.as_mut().and_then(|e| e.checkpoint.as_mut()) {
            **c = self.mask(c);
        }
        self.journal.record(Record::Stage {
            run_id: run_id.to_string(),
            position,
            stage,
        });
    }

    /// Records how the run ended (dead-lettering a failure) and waits until the whole
    /// run is committed to stable storage.
    pub async fn finish(&self, report: &RunReport) -> Result<(), JournalError> {
        let output = report.output.as_ref().map(|v| self.mask(v));
        let cursor = match (self.cursor.get(), &output) {
            (Some((trigger, spec, expected)), Some(out))
                if report.status == RunStatus::Succeeded =>
            {
                match spec.read(out) {
                    // A vendor's answer decides the cursor: one that could not be a
                    // position (larger than 64 KiB as JSON) is not kept.
                    Some(next) if next.to_string().len() > MAX_CURSOR_BYTES => {
                        tracing::warn!(target: "fmhost::journal", run_id = %report.run_id, "run {} returned a cursor larger than {MAX_CURSOR_BYTES} bytes at `{}`; the cursor of trigger {trigger} stays where it was", report.run_id, spec.from_output);
                        None
                    }
                    Some(next) => Some(CursorCommit {
                        pipeline: self.start.pipeline.clone(),
                        trigger: trigger.clone(),
                        expected: expected.clone(),
                        value: next.clone(),
                    }),
                    None => {
                        tracing::warn!(target: "fmhost::journal", run_id = %report.run_id, "run {} succeeded without `{}` in its output; the cursor of trigger {trigger} stays where it was", report.run_id, spec.from_output);
                        None
                    }
                }
            }
            _ => None,
        };
        self.end(
            report.status,
            report.error.clone(),
            run_error_kind(report),
            output,
            report.duration_ms,
            cursor,
        )
        .await
    }

    /// Records a run that could not start (no pipeline, input not valid) as failed with
    /// `reason`, dead-lettered. `started` also records it as started first.
    pub async fn reject(
        &self,
        reason: &str,
        kind: &str,
        started: bool,
    ) -> Result<(), JournalError> {
        if started {
            self.announce();
        }
        self.end(
            RunStatus::Failed,
            Some(reason.to_string()),
            Some(kind.to_string()),
            None,
            0,
            None,
        )
        .await
    }

    /// The run's last record, synced; a failure or a timeout goes to the dead-letter queue.
    async fn end(
        &self,
        status: RunStatus,
        error: Option<String>,
        error_kind: Option<String>,
        output: Option<Value>,
        duration_ms: u64,
        cursor: Option<CursorCommit>,
    ) -> Result<(), JournalError> {
        let failed = matches!(status, RunStatus::Failed | RunStatus::TimedOut);
        let dead_letter = failed.then(|| NewDeadLetter {
            kind: if self.start.trigger == "webhook" {
                "webhook"
            } else {
                "run"
            }
            .into(),
            pipeline: self.start.pipeline.clone(),
            reason: error.clone().unwrap_or_default(),
            error_kind: error_kind.clone(),
        });
        self.journal
            .record_durably(Record::RunFinished(RunEnd {
                run_id: self.start.run_id.clone(),
                status,
                error,
                error_kind,
                output,
                duration_ms,
                finished_at: unix_ms(SystemTime::now()),
                replay_of: self.start.replay_of.clone(),
                dead_letter,
                cursor,
                pipeline_hash: self.pipeline_hash.get().cloned(),
            }))
            .await
            .map(drop)
    }
}

/// The kind of the error that failed a run: its first failed required stage's, else
/// `timeout` for a run deadline, else `schema` (the output did not match).
pub fn run_error_kind(report: &RunReport) -> Option<String> {
    match report.status {
        RunStatus::Succeeded | RunStatus::Running => None,
        RunStatus::TimedOut => Some("timeout".into()),
        RunStatus::Cancelled => Some("cancelled".into()),
        RunStatus::Failed => Some(
            report
                .failed_stage
                .as_deref()
                .and_then(|id| report.stage(id))
                .into_iter()
                .chain(
                    report
                        .stages
                        .iter()
                        .filter(|s| s.status == StageStatus::Failed && !s.optional),
                )
                .find_map(|s| s.error.as_ref().map(|e| e.kind.as_str().to_string()))
                .unwrap_or_else(|| "schema".into()),
        ),
    }
}

impl crate::http::AttemptObserver for RunJournal {
    fn attempt(&self, run_id: &str, stage_id: &str, attempt: &Attempt) {
        self.journal.record(Record::Attempt {
            run_id: run_id.to_string(),
            stage_id: stage_id.to_string(),
            attempt: attempt.clone(),
        });
    }
}

impl RunObserver for RunJournal {
    fn run_started(&self, run_id: &str, pipeline: &str, stages: &[StageReport]) {
        let mut start = self.start.clone();
        start.run_id = run_id.to_string();
        start.pipeline = pipeline.to_string();
        self.journal.record(Record::RunStarted(start));
        for (i, s) in stages.iter().enumerate() {
            self.stage(run_id, i as u32, s);
        }
    }

    fn stage_updated(&self, run_id: &str, stage: &StageReport) {
        // A resumed run keeps the rows of the stages it does not run again.
        if stage.reused_from.as_deref() == Some(run_id) {
            return;
        }
        self.stage(run_id, u32::MAX, stage);
    }
}

/// Runs `plan` with `journal` (if any) watching, and commits the run before returning:
/// the report, and whether the journal has all of it.
pub async fn run_journaled(
    engine: &crate::engine::Engine,
    plan: Arc<crate::pipeline::Plan>,
    input: Value,
    mut opts: crate::engine::RunOptions,
    journal: Option<Arc<RunJournal>>,
) -> Result<(RunReport, Result<(), JournalError>), crate::engine::RunError> {
    if let Some(j) = &journal {
        opts.run_id = Some(j.start.run_id.clone());
        opts.observer = Some(j.clone());
        opts.trace = Some(j.start.trace.clone());
        opts.started_at_ms = Some(j.start.started_at);
        opts.trigger = Some(j.start.trigger_value(&engine.secrets()));
    }
    let started = opts.started_at_ms.map_or_else(SystemTime::now, |ms| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
    });
    let spans =
        crate::otel::enabled().then(|| crate::otel::RunSpans::new(opts.observer.take(), started));
    if let Some(s) = &spans {
        opts.observer = Some(s.clone());
    }
    // The document as it runs, so a replay runs it again even after the file changed.
    if let Some(j) = &journal {
        let document = plan.document();
        j.journal.store_document(document);
        let _ = j.pipeline_hash.set(document.hash.clone());
    }
    let report = engine.run(plan, input, opts).await?;
    if let Some(s) = spans {
        s.finish(&report);
    }
    let committed = match &journal {
        Some(j) => j.finish(&report).await,
        None => Ok(()),
    };
    Ok((report, committed))
}
