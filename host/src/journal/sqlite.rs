//! The SQLite journal backend (`rusqlite`, SQLite bundled): WAL mode, so readers never
//! block the writer; `synchronous=NORMAL` for ordinary batches (a commit survives a
//! crash of the process) and `FULL` for durable ones (it survives the machine's).
//! The schema is documented in `docs/journal.md`; [`MIGRATIONS`] are applied in order
//! and the version kept in `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

use super::{
    Backend, DEAD_LETTER_SELECT, DeadLetter, Delivery, DlqFilter, JournalError, Record, RunDetail,
    RunFilter, RunSummary, SUMMARY_COLUMNS, StageDetail, json_text, parse_json, parse_value,
    unix_ms,
};
use crate::engine::{StageReport, StageStatus};
use crate::http::Attempt;
use crate::secrets::Stored;

/// Versioned migrations: `(version, name, sql)`. Never edit one that has shipped; add one.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "runs, stages, attempts, deliveries, dead letters",
        r#"
CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at INTEGER NOT NULL
);
CREATE TABLE runs (
    id            TEXT PRIMARY KEY,
    pipeline      TEXT NOT NULL,
    pipeline_file TEXT,
    plugin_dirs   TEXT NOT NULL,
    secrets_file  TEXT,
    status        TEXT NOT NULL,
    trigger       TEXT NOT NULL,
    owner         TEXT NOT NULL,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    input         TEXT NOT NULL,
    output        TEXT,
    error         TEXT,
    error_kind    TEXT,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    duration_ms   INTEGER,
    replay_of     TEXT,
    replay_from   TEXT,
    resumed       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_start ON runs (started_at);
CREATE INDEX runs_by_pipeline ON runs (pipeline, started_at);
CREATE INDEX runs_by_status ON runs (status, started_at);
CREATE INDEX runs_by_replay_of ON runs (replay_of);
CREATE TABLE stages (
    run_id          TEXT NOT NULL,
    stage_id        TEXT NOT NULL,
    position        INTEGER NOT NULL,
    component       TEXT NOT NULL,
    version         TEXT,
    status          TEXT NOT NULL,
    optional        INTEGER NOT NULL,
    started_ms      INTEGER,
    duration_ms     INTEGER,
    attempts        INTEGER NOT NULL,
    error_kind      TEXT,
    error           TEXT,
    skipped_because TEXT,
    reused_from     TEXT,
    output          TEXT,
    PRIMARY KEY (run_id, stage_id)
) WITHOUT ROWID;
CREATE TABLE attempts (
    run_id          TEXT NOT NULL,
    stage_id        TEXT NOT NULL,
    attempt         INTEGER NOT NULL,
    service         TEXT NOT NULL,
    method          TEXT NOT NULL,
    url             TEXT NOT NULL,
    status          INTEGER,
    error_kind      TEXT,
    duration_ms     INTEGER NOT NULL,
    idempotency_key TEXT,
    at              INTEGER NOT NULL
);
CREATE INDEX attempts_by_run ON attempts (run_id, stage_id);
CREATE TABLE deliveries (
    pipeline    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    path        TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    payload     TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    status      TEXT NOT NULL,
    PRIMARY KEY (pipeline, event_id)
);
CREATE INDEX deliveries_by_status ON deliveries (status, received_at);
CREATE INDEX deliveries_by_run ON deliveries (run_id);
CREATE TABLE dead_letters (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL,
    status        TEXT NOT NULL,
    pipeline      TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    first_run_id  TEXT NOT NULL,
    event_id      TEXT,
    reason        TEXT NOT NULL,
    error_kind    TEXT,
    retries       INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    resolved_by   TEXT
);
CREATE INDEX dead_letters_by_run ON dead_letters (run_id, status);
CREATE INDEX dead_letters_by_status ON dead_letters (status, pipeline);
"#,
    ),
    (
        2,
        "trace context of runs and attempts",
        r#"
ALTER TABLE runs ADD COLUMN trace_id TEXT;
ALTER TABLE runs ADD COLUMN trace_span TEXT;
ALTER TABLE runs ADD COLUMN trace_parent TEXT;
ALTER TABLE attempts ADD COLUMN span_id TEXT;
ALTER TABLE attempts ADD COLUMN parent_span_id TEXT;
ALTER TABLE deliveries ADD COLUMN traceparent TEXT;
"#,
    ),
    (
        3,
        "recorded exchanges",
        r#"
ALTER TABLE attempts ADD COLUMN recorded TEXT;
"#,
    ),
    (
        4,
        "pipeline documents, content-addressed",
        r#"
CREATE TABLE pipelines (
    hash       TEXT PRIMARY KEY,
    document   TEXT NOT NULL,
    first_seen INTEGER NOT NULL
) WITHOUT ROWID;
ALTER TABLE runs ADD COLUMN pipeline_hash TEXT;
"#,
    ),
    (
        5,
        "triggers: what fired a run, schedule fires, poll cursors",
        r#"
ALTER TABLE runs ADD COLUMN trigger_info TEXT;
ALTER TABLE deliveries ADD COLUMN trigger_info TEXT;
CREATE INDEX deliveries_by_path ON deliveries (pipeline, path, received_at);
CREATE TABLE fires (
    pipeline     TEXT NOT NULL,
    trigger      TEXT NOT NULL,
    scheduled_at INTEGER NOT NULL,
    last_at      INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    outcome      TEXT NOT NULL,
    reason       TEXT,
    event_id     TEXT,
    at           INTEGER NOT NULL,
    PRIMARY KEY (pipeline, trigger, scheduled_at)
) WITHOUT ROWID;
CREATE TABLE cursors (
    pipeline   TEXT NOT NULL,
    trigger    TEXT NOT NULL,
    value      TEXT NOT NULL,
    run_id     TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (pipeline, trigger)
) WITHOUT ROWID;
"#,
    ),
    (
        6,
        "dead letters found by their delivery (a redelivered queue message)",
        r#"
CREATE INDEX dead_letters_by_event ON dead_letters (pipeline, event_id, status);
"#,
    ),
    (
        7,
        "cluster: a run's worker and lease, services' shared rate limits and circuits, plugin versions",
        r#"
ALTER TABLE runs ADD COLUMN worker TEXT;
ALTER TABLE runs ADD COLUMN lease_until INTEGER;
CREATE INDEX runs_by_lease ON runs (lease_until) WHERE status = 'running' AND lease_until IS NOT NULL;
CREATE TABLE quotas (
    service TEXT PRIMARY KEY,
    tat     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE breakers (
    service    TEXT PRIMARY KEY,
    open_until INTEGER NOT NULL,
    worker     TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE plugin_blobs (
    sha256 TEXT PRIMARY KEY,
    bytes  BLOB NOT NULL,
    at     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE plugin_events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    name    TEXT NOT NULL,
    action  TEXT NOT NULL,
    sha256  TEXT,
    approve BOOLEAN NOT NULL,
    worker  TEXT NOT NULL,
    at      INTEGER NOT NULL
);
"#,
    ),
];

pub struct SqliteBackend {
    conn: Connection,
    path: PathBuf,
    busy: Duration,
}

/// How long to wait for another process's lock: `FMHOST_JOURNAL_BUSY_TIMEOUT`
/// (`500ms`, `10s`), default 5 s.
pub(super) fn busy_timeout() -> Duration {
    std::env::var("FMHOST_JOURNAL_BUSY_TIMEOUT")
        .ok()
        .and_then(|v| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .ok()
                .or_else(|| humantime::parse_duration(&v).ok())
        })
        .unwrap_or(Duration::from_secs(5))
}

impl SqliteBackend {
    pub fn open(path: &Path) -> Result<SqliteBackend, JournalError> {
        let busy = busy_timeout();
        let conn = Connection::open(path).map_err(|e| error(path, busy, e))?;
        let mut b = SqliteBackend {
            conn,
            path: path.to_path_buf(),
            busy,
        };
        b.conn.busy_timeout(busy).map_err(|e| b.err(e))?;
        retry_busy(busy, || {
            b.conn
                .execute_batch(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                )
                .map_err(|e| b.err(e))
        })?;
        retry_busy(busy, || b.migrate())?;
        Ok(b)
    }

    /// Opens the journal for writing: fails now, with a clear error, if another process
    /// holds the write lock past the busy timeout, rather than after a run.
    pub fn open_writer(path: &Path) -> Result<SqliteBackend, JournalError> {
        let b = Self::open(path)?;
        retry_busy(b.busy, || {
            b.conn
                .execute_batch("BEGIN IMMEDIATE; COMMIT;")
                .map_err(|e| b.err(e))
        })?;
        Ok(b)
    }

    fn err(&self, e: rusqlite::Error) -> JournalError {
        error(&self.path, self.busy, e)
    }

    fn migrate(&mut self) -> Result<(), JournalError> {
        let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        let found: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if found > known {
            return Err(JournalError::TooNew {
                path: self.path.clone(),
                found,
                known,
            });
        }
        if found == known {
            return Ok(());
        }
        let (path, busy) = (self.path.clone(), self.busy);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| error(&path, busy, e))?;
        // Another process may have migrated while we waited for the lock.
        let found: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| error(&path, busy, e))?;
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            tx.execute_batch(sql).map_err(|e| error(&path, busy, e))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                params![version, name, unix_ms(SystemTime::now())],
            )
            .map_err(|e| error(&path, busy, e))?;
            tx.pragma_update(None, "user_version", version)
                .map_err(|e| error(&path, busy, e))?;
        }
        tx.commit().map_err(|e| error(&path, busy, e))
    }
}

/// Runs `f` again while it fails because another connection holds a lock, until `busy`
/// has passed. SQLite's own busy handler covers most waits, but not all: a connection
/// switching a new database to WAL, or recovering a WAL, gets SQLITE_BUSY at once.
pub(super) fn retry_busy<T>(
    busy: Duration,
    mut f: impl FnMut() -> Result<T, JournalError>,
) -> Result<T, JournalError> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match f() {
            Err(JournalError::Locked { .. }) if started.elapsed() < busy => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn error(path: &Path, busy: Duration, e: rusqlite::Error) -> JournalError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => JournalError::Corrupt {
            path: path.to_path_buf(),
            why: e.to_string(),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => JournalError::Locked {
            path: path.to_path_buf(),
            waited_ms: busy.as_millis() as u64,
        },
        _ => JournalError::Io {
            path: path.to_path_buf(),
            why: e.to_string(),
        },
    }
}

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        pipeline: r.get(0)?,
        event_id: r.get(1)?,
        path: r.get(2)?,
        received_at: r.get(3)?,
        payload: Stored::from_storage(parse_value(&r.get::<_, String>(4)?).unwrap_or(Value::Null)),
        run_id: r.get(5)?,
        traceparent: r.get(6)?,
        trigger_info: r
            .get::<_, Option<String>>(7)?
            .and_then(|t| parse_value(&t))
            .map(Stored::from_storage),
    })
}

fn apply(tx: &rusqlite::Transaction<'_>, record: &Record) -> rusqlite::Result<bool> {
    let now = unix_ms(SystemTime::now());
    let changed = match record {
        Record::RunStarted(s) => tx
            .prepare_cached(
                "INSERT INTO runs (id, pipeline, pipeline_file, plugin_dirs, secrets_file, status, trigger, owner,
                     host, pid, input, started_at, replay_of, replay_from, trace_id, trace_span, trace_parent,
                     trigger_info)
                 VALUES (?1, ?2, ?3, ?10, ?11, 'running', ?4, ?5, ?12, ?13, ?6, ?7, ?8, ?9, ?14, ?15, ?16, ?17)
                 ON CONFLICT (id) DO UPDATE SET status = 'running', error = NULL, error_kind = NULL,
                     finished_at = NULL, host = excluded.host, pid = excluded.pid,
                     trace_id = excluded.trace_id, trace_span = excluded.trace_span,
                     trace_parent = excluded.trace_parent",
            )?
            .execute(params![
                s.run_id,
                s.pipeline,
                s.rerun.pipeline_file,
                s.trigger,
                s.owner,
                json_text(s.input.as_value()),
                s.started_at,
                s.replay_of,
                s.replay_from,
                json_text(&serde_json::json!(s.rerun.plugin_dirs)),
                s.rerun.secrets_file,
                super::hostname(),
                std::process::id(),
                s.trace.trace_id,
                s.trace.span_id,
                s.trace.parent_span_id,
                s.trigger_info.as_ref().map(|t| json_text(t.as_value())),
            ])?,
        Record::Stage {
            run_id,
            position,
            stage: s,
        } => tx
            .prepare_cached(
                "INSERT INTO stages (run_id, stage_id, position, component, version, status, optional, started_ms,
                     duration_ms, attempts, error_kind, error, skipped_because, reused_from, output)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (run_id, stage_id) DO UPDATE SET component = excluded.component,
                     version = excluded.version, status = excluded.status, optional = excluded.optional,
                     started_ms = excluded.started_ms, duration_ms = excluded.duration_ms,
                     attempts = excluded.attempts, error_kind = excluded.error_kind, error = excluded.error,
                     skipped_because = excluded.skipped_because, reused_from = excluded.reused_from,
                     output = excluded.output
                 WHERE excluded.status != 'pending' OR stages.status IN ('pending', 'running')",
            )?
            .execute(params![
                run_id,
                s.id,
                position,
                s.component,
                s.version,
                s.status.as_str(),
                s.optional,
                s.started_ms,
                s.duration_ms,
                s.attempts,
                s.error.as_ref().map(|e| e.kind.as_str()),
                s.error
                    .as_ref()
                    .map(|e| serde_json::to_string(e).unwrap_or_default()),
                s.skipped_because,
                s.reused_from,
                s.output.as_deref().map(json_text),
            ])?,
        Record::Attempt {
            run_id,
            stage_id,
            attempt: a,
        } => tx
            .prepare_cached(
                "INSERT INTO attempts (run_id, stage_id, attempt, service, method, url, status, error_kind,
                     duration_ms, idempotency_key, at, span_id, parent_span_id, recorded)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                run_id,
                stage_id,
                a.attempt,
                a.service,
                a.method,
                a.url,
                a.status,
                a.error_kind,
                a.duration_ms,
                a.idempotency_key,
                a.at_ms,
                a.span_id,
                a.parent_span_id,
                a.recorded
                    .as_ref()
                    .map(|r| serde_json::to_string(r).unwrap_or_default())
            ])?,
        Record::RunFinished(end) => {
            let n = tx
                .prepare_cached(
                    "UPDATE runs SET status = ?2, error = ?3, error_kind = ?4, output = ?5, duration_ms = ?6,
                         finished_at = ?7, pipeline_hash = COALESCE(?8, pipeline_hash) WHERE id = ?1",
                )?
                .execute(params![
                    end.run_id,
                    end.status.as_str(),
                    end.error,
                    end.error_kind,
                    end.output.as_ref().map(json_text),
                    end.duration_ms,
                    end.finished_at,
                    end.pipeline_hash
                ])?;
            tx.prepare_cached("UPDATE deliveries SET status = 'done' WHERE run_id = ?1")?
                .execute(params![end.run_id])?;
            if let Some(c) = &end.cursor {
                // Compare-and-set: a cursor an operator set while the run went on stays.
                tx.prepare_cached(
                    "INSERT INTO cursors (pipeline, trigger, value, run_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?6)
                     ON CONFLICT (pipeline, trigger) DO UPDATE SET value = excluded.value,
                         run_id = excluded.run_id, updated_at = excluded.updated_at
                     WHERE cursors.value = ?5",
                )?
                .execute(params![
                    c.pipeline,
                    c.trigger,
                    json_text(&c.value),
                    end.run_id,
                    json_text(&c.expected),
                    now
                ])?;
            }
            // A run finished without its stages (dead-lettered after an interruption):
            // none of them is left looking as if it were still running.
            let stopped = crate::error::StageError::new(
                crate::error::ErrorKind::Cancelled,
                "interrupted: the host stopped while this stage ran",
            );
            tx.prepare_cached(
                "UPDATE stages SET
                     status = CASE status WHEN 'running' THEN 'failed' ELSE 'skipped' END,
                     error_kind = CASE status WHEN 'running' THEN 'cancelled' ELSE error_kind END,
                     error = CASE status WHEN 'running' THEN ?2 ELSE error END,
                     skipped_because = CASE status WHEN 'pending' THEN 'the run was interrupted' ELSE skipped_because END
                 WHERE run_id = ?1 AND status IN ('running', 'pending')",
            )?
            .execute(params![end.run_id, serde_json::to_string(&stopped).unwrap_or_default()])?;
            if end.status == crate::engine::RunStatus::Succeeded {
                // The failure it replays, or its own when it ran again in place (a
                // queue message delivered again), is dealt with.
                for failed in [end.replay_of.as_ref(), Some(&end.run_id)].into_iter().flatten() {
                    tx.prepare_cached(
                        "UPDATE dead_letters SET status = 'resolved', resolved_by = ?2, updated_at = ?3
                         WHERE run_id = ?1 AND status = 'open'",
                    )?
                    .execute(params![failed, end.run_id, now])?;
                }
            }
            if let Some(dl) = &end.dead_letter {
                let moved = match &end.replay_of {
                    Some(original) => tx
                        .prepare_cached(
                            "UPDATE dead_letters SET run_id = ?2, retries = retries + 1, reason = ?3,
                                 error_kind = ?4, updated_at = ?5
                             WHERE run_id = ?1 AND status = 'open'",
                        )?
                        .execute(params![original, end.run_id, dl.reason, dl.error_kind, now])?,
                    None => 0,
                };
                // A run that failed again in place keeps its one entry, counted.
                let moved = match moved {
                    0 => tx
                        .prepare_cached(
                            "UPDATE dead_letters SET retries = retries + 1, reason = ?2, error_kind = ?3,
                                 updated_at = ?4
                             WHERE run_id = ?1 AND status = 'open'",
                        )?
                        .execute(params![end.run_id, dl.reason, dl.error_kind, now])?,
                    n => n,
                };
                if moved == 0 {
                    tx.prepare_cached(
                        "INSERT INTO dead_letters (kind, status, pipeline, run_id, first_run_id, event_id, reason,
                             error_kind, created_at, updated_at)
                         VALUES (?1, 'open', ?2, ?3, ?3, (SELECT event_id FROM deliveries WHERE run_id = ?3),
                             ?4, ?5, ?6, ?6)",
                    )?
                    .execute(params![
                        dl.kind,
                        dl.pipeline,
                        end.run_id,
                        dl.reason,
                        dl.error_kind,
                        now
                    ])?;
                }
            }
            n
        }
        Record::Delivery(d) => tx
            .prepare_cached(
                "INSERT OR IGNORE INTO deliveries (pipeline, event_id, path, received_at, payload, run_id, status,
                     traceparent, trigger_info)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8)",
            )?
            .execute(params![
                d.pipeline,
                d.event_id,
                d.path,
                d.received_at,
                json_text(d.payload.as_value()),
                d.run_id,
                d.traceparent,
                d.trigger_info.as_ref().map(|t| json_text(t.as_value())),
            ])?,
        Record::Fire {
            pipeline,
            trigger,
            scheduled_at,
            count,
            last_at,
            outcome,
            reason,
            delivery,
        } => {
            let new = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO fires (pipeline, trigger, scheduled_at, last_at, count, outcome, reason,
                         event_id, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    pipeline,
                    trigger,
                    scheduled_at,
                    last_at,
                    count,
                    outcome,
                    reason,
                    delivery.as_ref().map(|d| &d.event_id),
                    now
                ])?;
            if new > 0
                && let Some(d) = delivery
            {
                apply(tx, &Record::Delivery((**d).clone()))?;
            }
            new
        }
        Record::SetCursor {
            pipeline,
            trigger,
            value,
        } => tx
            .prepare_cached(
                "INSERT INTO cursors (pipeline, trigger, value, run_id, updated_at) VALUES (?1, ?2, ?3, NULL, ?4)
                 ON CONFLICT (pipeline, trigger) DO UPDATE SET value = excluded.value, run_id = NULL,
                     updated_at = excluded.updated_at",
            )?
            .execute(params![pipeline, trigger, json_text(value), now])?,
        Record::RunResumed { run_id } => tx
            .prepare_cached("UPDATE runs SET resumed = resumed + 1 WHERE id = ?1")?
            .execute(params![run_id])?,
        Record::DropDeadLetter { id } => tx
            .prepare_cached(
                "UPDATE dead_letters SET status = 'dropped', updated_at = ?2 WHERE id = ?1 AND status = 'open'",
            )?
            .execute(params![id, now])?,
        Record::Pipeline { hash, document } => tx
            .prepare_cached(
                "INSERT OR IGNORE INTO pipelines (hash, document, first_seen) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![hash, document, now])?,
        Record::RenewLeases { worker, until } => tx
            .prepare_cached(
                "UPDATE runs SET lease_until = ?2 WHERE worker = ?1 AND status = 'running'",
            )?
            .execute(params![worker, until])?,
        Record::Forget { run_id } => {
            // Checked again here, in the writer: the run may have been resumed since.
            let removable: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND status != 'running')
                       AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE run_id = ?1 AND status = 'open')",
                )?
                .query_row(params![run_id], |r| r.get(0))?;
            if removable {
                for sql in [
                    "DELETE FROM attempts WHERE run_id = ?1",
                    "DELETE FROM stages WHERE run_id = ?1",
                    "DELETE FROM deliveries WHERE run_id = ?1 AND status = 'done'",
                    "DELETE FROM dead_letters WHERE run_id = ?1",
                    "DELETE FROM runs WHERE id = ?1",
                ] {
                    tx.prepare_cached(sql)?.execute(params![run_id])?;
                }
            }
            usize::from(removable)
        }
    };
    Ok(changed > 0)
}

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunSummary> {
    Ok(RunSummary {
        run_id: r.get(0)?,
        pipeline: r.get(1)?,
        status: r.get(2)?,
        trigger: r.get(3)?,
        started_at: super::rfc3339(r.get(4)?),
        started_at_ms: r.get(4)?,
        duration_ms: r.get(5)?,
        error: r.get(6)?,
        error_kind: r.get(7)?,
        replay_of: r.get(8)?,
        trace_id: r.get(9)?,
    })
}

fn dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        kind: r.get(1)?,
        status: r.get(2)?,
        pipeline: r.get(3)?,
        run_id: r.get(4)?,
        correlation_id: r.get(4)?,
        first_run_id: r.get(5)?,
        event_id: r.get(6)?,
        reason: r.get(7)?,
        error_kind: r.get(8)?,
        retries: r.get(9)?,
        created_at: super::rfc3339(r.get(10)?),
        updated_at: super::rfc3339(r.get(11)?),
        resolved_by: r.get(12)?,
        input: Stored::from_storage(parse_json(r.get(13)?).unwrap_or(Value::Null)),
    })
}

impl SqliteBackend {
    fn read_run(&mut self, id: &str) -> rusqlite::Result<Option<RunDetail>> {
        let conn = &self.conn;
        let Some((
            summary,
            owner,
            file,
            replay_from,
            resumed,
            finished,
            input,
            output,
            plugin_dirs,
            secrets_file,
            trace_span,
            trace_parent,
            trigger_info,
        )) = conn
            .query_row(
                &format!(
                    "SELECT {SUMMARY_COLUMNS}, owner, pipeline_file, replay_from, resumed, finished_at, input, output,
                         plugin_dirs, secrets_file, trace_span, trace_parent, trigger_info
                     FROM runs WHERE id = ?1"
                ),
                params![id],
                |r| {
                    Ok((
                        summary(r)?,
                        r.get::<_, String>(10)?,
                        r.get::<_, Option<String>>(11)?,
                        r.get::<_, Option<String>>(12)?,
                        r.get::<_, u32>(13)?,
                        r.get::<_, Option<i64>>(14)?,
                        r.get::<_, String>(15)?,
                        r.get::<_, Option<String>>(16)?,
                        r.get::<_, String>(17)?,
                        r.get::<_, Option<String>>(18)?,
                        r.get::<_, Option<String>>(19)?,
                        r.get::<_, Option<String>>(20)?,
                        r.get::<_, Option<String>>(21)?,
                    ))
                },
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut calls: std::collections::HashMap<String, Vec<Attempt>> = Default::default();
        let mut stmt = conn.prepare_cached(
            "SELECT stage_id, attempt, service, method, url, status, error_kind, duration_ms, idempotency_key, at,
                 span_id, parent_span_id, recorded
             FROM attempts WHERE run_id = ?1 ORDER BY rowid",
        )?;
        let rows = stmt.query_map(params![id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Attempt {
                    attempt: r.get(1)?,
                    service: r.get(2)?,
                    method: r.get(3)?,
                    url: r.get(4)?,
                    status: r.get(5)?,
                    error_kind: r.get(6)?,
                    duration_ms: r.get(7)?,
                    idempotency_key: r.get(8)?,
                    at_ms: r.get(9)?,
                    span_id: r.get(10)?,
                    parent_span_id: r.get(11)?,
                    recorded: r
                        .get::<_, Option<String>>(12)?
                        .and_then(|t| serde_json::from_str(&t).ok()),
                },
            ))
        })?;
        for row in rows {
            let (stage, a) = row?;
            calls.entry(stage).or_default().push(a);
        }
        let mut stmt = conn.prepare_cached(
            "SELECT stage_id, component, version, status, optional, started_ms, duration_ms, attempts, error,
                 skipped_because, reused_from, output
             FROM stages WHERE run_id = ?1 ORDER BY position, started_ms, stage_id",
        )?;
        let stages = stmt
            .query_map(params![id], |r| {
                let status: String = r.get(3)?;
                Ok(StageReport {
                    id: r.get(0)?,
                    component: r.get(1)?,
                    version: r.get(2)?,
                    status: serde_json::from_value(Value::String(status))
                        .unwrap_or(StageStatus::Pending),
                    optional: r.get(4)?,
                    started_ms: r.get(5)?,
                    duration_ms: r.get(6)?,
                    attempts: r.get(7)?,
                    error: r
                        .get::<_, Option<String>>(8)?
                        .and_then(|t| serde_json::from_str(&t).ok()),
                    skipped_because: r.get(9)?,
                    reused_from: r.get(10)?,
                    output: parse_json(r.get(11)?).map(std::sync::Arc::new),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(|report| StageDetail {
                calls: calls.remove(&report.id).unwrap_or_default(),
                report,
            })
            .collect();
        let replayed_by = conn
            .prepare_cached("SELECT id FROM runs WHERE replay_of = ?1 ORDER BY started_at")?
            .query_map(params![id], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        let dead_letter = conn
            .query_row(
                "SELECT id FROM dead_letters WHERE run_id = ?1 AND status = 'open'",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let trace = summary
            .trace_id
            .clone()
            .zip(trace_span)
            .map(|(trace_id, span_id)| crate::trace::RunTrace {
                trace_id,
                span_id,
                parent_span_id: trace_parent,
            });
        Ok(Some(RunDetail {
            summary,
            owner,
            rerun: super::Rerun {
                pipeline_file: file,
                plugin_dirs: serde_json::from_str(&plugin_dirs).unwrap_or_default(),
                secrets_file,
            },
            replay_from,
            replayed_by,
            resumed,
            finished_at: finished.map(super::rfc3339),
            input: Stored::from_storage(parse_value(&input).unwrap_or(Value::Null)),
            trigger_info: trigger_info
                .and_then(|t| parse_value(&t))
                .map(Stored::from_storage),
            output: parse_json(output),
            dead_letter,
            trace,
            stages,
        }))
    }
}

impl Backend for SqliteBackend {
    fn write(&mut self, batch: &[Record], durable: bool) -> Result<Vec<bool>, JournalError> {
        let (path, busy) = (self.path.clone(), self.busy);
        let e = |e| error(&path, busy, e);
        if batch.is_empty() {
            // Nothing to commit; a durable request still syncs what earlier batches wrote
            // (a checkpoint syncs the WAL first).
            if durable {
                self.conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .map_err(e)?;
            }
            return Ok(Vec::new());
        }
        if durable {
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .map_err(e)?;
        }
        let conn = &mut self.conn;
        let result = retry_busy(busy, || {
            let mut attempt = || -> rusqlite::Result<Vec<bool>> {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let changed = batch
                    .iter()
                    .map(|r| apply(&tx, r))
                    .collect::<rusqlite::Result<Vec<bool>>>()?;
                tx.commit()?;
                Ok(changed)
            };
            attempt().map_err(e)
        });
        if durable {
            let _ = self.conn.pragma_update(None, "synchronous", "NORMAL");
        }
        result
    }

    fn runs(&mut self, f: &RunFilter) -> Result<Vec<RunSummary>, JournalError> {
        let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM runs WHERE 1 = 1");
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        let mut add = |clause: &str, v: Box<dyn rusqlite::ToSql>| {
            args.push(v);
            sql.push_str(&format!(" AND {clause} ?{}", args.len()));
        };
        if let Some(p) = &f.pipeline {
            add("pipeline =", Box::new(p.clone()));
        }
        if let Some(s) = &f.status {
            add("status =", Box::new(s.clone()));
        }
        if let Some(t) = f.since_ms {
            add("started_at >=", Box::new(t));
        }
        if let Some(t) = f.until_ms {
            add("started_at <", Box::new(t));
        }
        if let Some(o) = &f.owner {
            add("owner =", Box::new(o.clone()));
        }
        if f.abandoned {
            let host = super::hostname();
            add("host =", Box::new(host));
        }
        if f.not_replayed {
            sql.push_str(
                " AND NOT EXISTS (SELECT 1 FROM runs later WHERE later.replay_of = runs.id)",
            );
        }
        sql.push_str(&format!(
            " ORDER BY started_at DESC, rowid DESC LIMIT {}",
            if f.limit == 0 { -1 } else { f.limit as i64 }
        ));
        if f.abandoned {
            sql = sql.replacen(SUMMARY_COLUMNS, &format!("{SUMMARY_COLUMNS}, pid"), 1);
        }
        let abandoned = f.abandoned;
        let run = || -> rusqlite::Result<Vec<RunSummary>> {
            let mut stmt = self.conn.prepare(&sql)?;
            let params: Vec<&dyn rusqlite::ToSql> = args.iter().map(|b| &**b).collect();
            let rows = stmt.query_map(params.as_slice(), |r| {
                let pid: Option<u32> = if abandoned { r.get(10)? } else { None };
                Ok((summary(r)?, pid))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (s, pid) = row?;
                if pid.is_none_or(|p| !super::alive(p)) {
                    out.push(s);
                }
            }
            Ok(out)
        };
        run().map_err(|e| self.err(e))
    }

    fn run(&mut self, id: &str) -> Result<Option<RunDetail>, JournalError> {
        self.read_run(id).map_err(|e| self.err(e))
    }

    fn pipeline_document(&mut self, run_id: &str) -> Result<Option<String>, JournalError> {
        self.conn
            .query_row(
                "SELECT p.document FROM runs r JOIN pipelines p ON p.hash = r.pipeline_hash WHERE r.id = ?1",
                params![run_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn recorded_answers(
        &mut self,
        limit: usize,
    ) -> Result<Vec<(String, String, crate::http::Recorded)>, JournalError> {
        let read = || -> rusqlite::Result<Vec<(String, String, crate::http::Recorded)>> {
            let mut stmt = self.conn.prepare_cached(
                "SELECT service, method, recorded FROM attempts
                 WHERE recorded IS NOT NULL AND status BETWEEN 200 AND 299
                 ORDER BY rowid DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (service, method, text) = row?;
                if let Ok(rec) = serde_json::from_str(&text) {
                    out.push((service, method, rec));
                }
            }
            out.reverse();
            Ok(out)
        };
        read().map_err(|e| self.err(e))
    }

    fn pending_deliveries(&mut self) -> Result<Vec<Delivery>, JournalError> {
        let read = || -> rusqlite::Result<Vec<Delivery>> {
            let mut stmt = self.conn.prepare(
                "SELECT pipeline, event_id, path, received_at, payload, run_id, traceparent, trigger_info
                 FROM deliveries WHERE status = 'pending' ORDER BY received_at, rowid",
            )?;
            stmt.query_map([], delivery_row)?.collect()
        };
        read().map_err(|e| self.err(e))
    }

    fn delivery(
        &mut self,
        pipeline: &str,
        event_id: &str,
    ) -> Result<Option<(Delivery, bool)>, JournalError> {
        self.conn
            .query_row(
                "SELECT pipeline, event_id, path, received_at, payload, run_id, traceparent, trigger_info, status
                 FROM deliveries WHERE pipeline = ?1 AND event_id = ?2",
                params![pipeline, event_id],
                |r| Ok((delivery_row(r)?, r.get::<_, String>(8)? == "done")),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn trigger_record(
        &mut self,
        pipeline: &str,
        trigger: &str,
    ) -> Result<super::TriggerRecord, JournalError> {
        let read = || -> rusqlite::Result<super::TriggerRecord> {
            let (last_fire_ms, skipped, missed) = self.conn.query_row(
                "SELECT MAX(last_at),
                     COALESCE(SUM(CASE outcome WHEN 'skipped' THEN count ELSE 0 END), 0),
                     COALESCE(SUM(CASE outcome WHEN 'missed' THEN count ELSE 0 END), 0)
                 FROM fires WHERE pipeline = ?1 AND trigger = ?2",
                params![pipeline, trigger],
                |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )?;
            let cursor = self
                .conn
                .query_row(
                    "SELECT value, updated_at FROM cursors WHERE pipeline = ?1 AND trigger = ?2",
                    params![pipeline, trigger],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()?;
            let last = self
                .conn
                .query_row(
                    "SELECT event_id, received_at, run_id FROM deliveries WHERE pipeline = ?1 AND path = ?2
                     ORDER BY received_at DESC, rowid DESC LIMIT 1",
                    params![pipeline, trigger],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            Ok(super::TriggerRecord {
                last_fire_ms,
                skipped: skipped as u64,
                missed: missed as u64,
                cursor_updated_ms: cursor.as_ref().map(|c| c.1),
                cursor: cursor.and_then(|(v, _)| parse_value(&v)),
                last,
            })
        };
        read().map_err(|e| self.err(e))
    }

    fn dead_letters(&mut self, f: &DlqFilter) -> Result<Vec<DeadLetter>, JournalError> {
        let read = || -> rusqlite::Result<Vec<DeadLetter>> {
            let mut stmt = self.conn.prepare(&format!(
                "{DEAD_LETTER_SELECT} WHERE (?1 IS NULL OR d.pipeline = ?1) AND (?2 IS NULL OR d.status = ?2)
                     AND (?4 IS NULL OR d.event_id = ?4)
                 ORDER BY d.id DESC LIMIT ?3"
            ))?;
            stmt.query_map(
                params![
                    f.pipeline,
                    f.status,
                    if f.limit == 0 { -1 } else { f.limit as i64 },
                    f.event_id
                ],
                dead_letter,
            )?
            .collect()
        };
        read().map_err(|e| self.err(e))
    }

    fn dead_letter(&mut self, id: i64) -> Result<Option<DeadLetter>, JournalError> {
        self.conn
            .query_row(
                &format!("{DEAD_LETTER_SELECT} WHERE d.id = ?1"),
                params![id],
                dead_letter,
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_a_newer_schema() {
        let dir = std::env::temp_dir().join(format!("fmhost-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.db");
        let b = SqliteBackend::open_writer(&path).unwrap();
        let applied: i64 = b
            .conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(applied, MIGRATIONS.len() as i64);
        drop(b);
        // Opening again applies nothing new.
        let b = SqliteBackend::open(&path).unwrap();
        b.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(b);
        match SqliteBackend::open(&path) {
            Err(JournalError::TooNew { found: 99, .. }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
