//! The PostgreSQL journal backend (`postgres`, the synchronous client of rust-postgres):
//! the same tables as the SQLite journal in PostgreSQL's dialect, for journals that
//! several hosts share. A batch is one transaction; a durable one commits with
//! `synchronous_commit = on` (flushed to the server's WAL before the answer), the others
//! with `synchronous_commit = off` (PostgreSQL's asynchronous commit: a crash of the
//! *server* may lose the last few, a crash of fmhost loses nothing committed), which is
//! what `synchronous=FULL` / `NORMAL` promise on SQLite. [`MIGRATIONS`] mirror SQLite's
//! one for one; the version applied is the highest in `schema_migrations`, and migrating
//! holds an advisory lock so workers starting together migrate once.
//!
//! The client runs its own small runtime, so it is never created or dropped on a tokio
//! worker: [`PgBackend::open`] connects on a thread of its own and a backend dropped
//! inside a runtime hands its connection to a thread to close.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use postgres::types::ToSql;
use postgres::{Client, NoTls, Statement, Transaction};
use serde_json::Value;

use super::{
    Backend, DeadLetter, Delivery, DlqFilter, JournalError, Record, RunDetail, RunFilter,
    RunSummary, StageDetail, json_text, parse_json, parse_value, unix_ms,
};
use crate::engine::{StageReport, StageStatus};
use crate::http::Attempt;
use crate::secrets::Stored;

/// Versioned migrations, `(version, name, sql)`, the same versions as SQLite's
/// ([`super::sqlite::MIGRATIONS`]). Never edit one that has shipped; add one to both.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "runs, stages, attempts, deliveries, dead letters",
        r#"
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
    pid           BIGINT NOT NULL,
    input         TEXT NOT NULL,
    output        TEXT,
    error         TEXT,
    error_kind    TEXT,
    started_at    BIGINT NOT NULL,
    finished_at   BIGINT,
    duration_ms   BIGINT,
    replay_of     TEXT,
    replay_from   TEXT,
    resumed       BIGINT NOT NULL DEFAULT 0,
    seq           BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX runs_by_start ON runs (started_at);
CREATE INDEX runs_by_pipeline ON runs (pipeline, started_at);
CREATE INDEX runs_by_status ON runs (status, started_at);
CREATE INDEX runs_by_replay_of ON runs (replay_of);
CREATE TABLE stages (
    run_id          TEXT NOT NULL,
    stage_id        TEXT NOT NULL,
    position        BIGINT NOT NULL,
    component       TEXT NOT NULL,
    version         TEXT,
    status          TEXT NOT NULL,
    optional        BOOLEAN NOT NULL,
    started_ms      BIGINT,
    duration_ms     BIGINT,
    attempts        BIGINT NOT NULL,
    error_kind      TEXT,
    error           TEXT,
    skipped_because TEXT,
    reused_from     TEXT,
    output          TEXT,
    PRIMARY KEY (run_id, stage_id)
);
CREATE TABLE attempts (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          TEXT NOT NULL,
    stage_id        TEXT NOT NULL,
    attempt         BIGINT NOT NULL,
    service         TEXT NOT NULL,
    method          TEXT NOT NULL,
    url             TEXT NOT NULL,
    status          BIGINT,
    error_kind      TEXT,
    duration_ms     BIGINT NOT NULL,
    idempotency_key TEXT,
    at              BIGINT NOT NULL
);
CREATE INDEX attempts_by_run ON attempts (run_id, stage_id);
CREATE TABLE deliveries (
    pipeline    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    path        TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    payload     TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    status      TEXT NOT NULL,
    seq         BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (pipeline, event_id)
);
CREATE INDEX deliveries_by_status ON deliveries (status, received_at);
CREATE INDEX deliveries_by_run ON deliveries (run_id);
CREATE TABLE dead_letters (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          TEXT NOT NULL,
    status        TEXT NOT NULL,
    pipeline      TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    first_run_id  TEXT NOT NULL,
    event_id      TEXT,
    reason        TEXT NOT NULL,
    error_kind    TEXT,
    retries       BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
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
        "ALTER TABLE attempts ADD COLUMN recorded TEXT;",
    ),
    (
        4,
        "pipeline documents, content-addressed",
        r#"
CREATE TABLE pipelines (
    hash       TEXT PRIMARY KEY,
    document   TEXT NOT NULL,
    first_seen BIGINT NOT NULL
);
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
    scheduled_at BIGINT NOT NULL,
    last_at      BIGINT NOT NULL,
    count        BIGINT NOT NULL,
    outcome      TEXT NOT NULL,
    reason       TEXT,
    event_id     TEXT,
    at           BIGINT NOT NULL,
    PRIMARY KEY (pipeline, trigger, scheduled_at)
);
CREATE TABLE cursors (
    pipeline   TEXT NOT NULL,
    trigger    TEXT NOT NULL,
    value      TEXT NOT NULL,
    run_id     TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (pipeline, trigger)
);
"#,
    ),
    (
        6,
        "dead letters found by their delivery (a redelivered queue message)",
        "CREATE INDEX dead_letters_by_event ON dead_letters (pipeline, event_id, status);",
    ),
];

/// The advisory lock key migrations hold (any constant no other application uses).
const MIGRATION_LOCK: i64 = 0x666d_686f_7374_0001;
/// The advisory lock key a server holds for as long as it runs (see [`ServerLock`]).
const SERVER_LOCK: i64 = 0x666d_686f_7374_0002;

/// `postgres://user:secret@host/db` as it may be shown: the password masked.
pub fn display_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "postgres://(unparsable URL)".into(),
    }
}

pub struct PgBackend {
    client: Option<Client>,
    url: String,
    shown: PathBuf,
    statements: HashMap<&'static str, Statement>,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        // The client owns a runtime, which may not be dropped on a runtime's thread.
        if let Some(client) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("fmhost-pg-close".into())
                    .spawn(move || drop(client));
            } else {
                drop(client);
            }
        }
    }
}

fn io(shown: &std::path::Path, e: impl std::fmt::Display) -> JournalError {
    JournalError::Io {
        path: shown.to_path_buf(),
        why: e.to_string(),
    }
}

/// Connects on a thread of its own: the synchronous client may not start its runtime
/// on a tokio worker, which is where `fmhost run` and `serve` open their journal.
fn connect(url: &str, shown: &std::path::Path) -> Result<Client, JournalError> {
    let url = url.to_string();
    let client = std::thread::Builder::new()
        .name("fmhost-pg-connect".into())
        .spawn(move || Client::connect(&url, NoTls))
        .map_err(|e| io(shown, e))?
        .join()
        .map_err(|_| io(shown, "the connecting thread panicked"))?;
    client.map_err(|e| io(shown, format!("cannot connect: {}", error_text(&e))))
}

/// A PostgreSQL error with the server's message and detail when there is one.
fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {}{}",
            db.severity(),
            db.message(),
            db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

impl PgBackend {
    /// Connects and migrates (creating the tables on first use).
    pub fn open(url: &str) -> Result<PgBackend, JournalError> {
        in_own_thread(|| {
            let shown = PathBuf::from(display_url(url));
            let client = connect(url, &shown)?;
            let mut b = PgBackend {
                client: Some(client),
                url: url.to_string(),
                shown,
                statements: HashMap::new(),
            };
            b.migrate()?;
            Ok(b)
        })
    }

    /// The URL as it may be shown (password masked).
    pub fn shown(&self) -> &std::path::Path {
        &self.shown
    }

    fn client(&mut self) -> Result<&mut Client, JournalError> {
        // A connection the server closed (a restart, a failover) is opened again.
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            let old = self.client.take();
            let fresh = connect(&self.url, &self.shown);
            drop(old);
            self.client = Some(fresh?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn err(&self, e: postgres::Error) -> JournalError {
        io(&self.shown, error_text(&e))
    }

    fn migrate(&mut self) -> Result<(), JournalError> {
        let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        let shown = self.shown.clone();
        let e = |e: postgres::Error| io(&shown, error_text(&e));
        let client = self.client()?;
        // Already migrated (every open but the first): no lock, no transaction.
        if let Ok(row) = client.query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        ) {
            let found: i64 = row.get(0);
            if found == known {
                return Ok(());
            }
        }
        let mut tx = client.transaction().map_err(e)?;
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .map_err(e)?;
        // Workers starting together: one migrates, the others wait and find it done.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(e)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    BIGINT PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at BIGINT NOT NULL)",
        )
        .map_err(e)?;
        let found: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .map_err(e)?
            .get(0);
        if found > known {
            return Err(JournalError::TooNew {
                path: shown.clone(),
                found,
                known,
            });
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            tx.batch_execute(sql).map_err(e)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[version, name, &unix_ms(SystemTime::now())],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// A statement prepared once per connection.
    fn prepared(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let client = self.client.as_mut().expect("connected");
        let s = client.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

/// Runs `f` where the synchronous client may block: on a thread of its own when the
/// caller is a tokio worker.
fn in_own_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("fmhost-pg".into())
            .spawn_scoped(s, f)
            .expect("spawn a thread")
            .join()
            .expect("the journal thread does not panic")
    })
}

/// Statements are prepared on the connection before the transaction starts (a
/// transaction borrows the client), keyed by their text.
struct Tx<'a> {
    tx: Transaction<'a>,
    statements: &'a mut HashMap<&'static str, Statement>,
}

impl Tx<'_> {
    fn run(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let stmt = match self.statements.get(sql) {
            Some(s) => s.clone(),
            None => {
                let s = self.tx.prepare(sql)?;
                self.statements.insert(sql, s.clone());
                s
            }
        };
        self.tx.execute(&stmt, params)
    }
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| v as i64)
}

fn apply(tx: &mut Tx<'_>, record: &Record) -> Result<bool, postgres::Error> {
    let now = unix_ms(SystemTime::now());
    let changed = match record {
        Record::RunStarted(s) => tx.run(
            "INSERT INTO runs (id, pipeline, pipeline_file, plugin_dirs, secrets_file, status, trigger, owner,
                 host, pid, input, started_at, replay_of, replay_from, trace_id, trace_span, trace_parent,
                 trigger_info)
             VALUES ($1, $2, $3, $10, $11, 'running', $4, $5, $12, $13, $6, $7, $8, $9, $14, $15, $16, $17)
             ON CONFLICT (id) DO UPDATE SET status = 'running', error = NULL, error_kind = NULL,
                 finished_at = NULL, host = excluded.host, pid = excluded.pid,
                 trace_id = excluded.trace_id, trace_span = excluded.trace_span,
                 trace_parent = excluded.trace_parent",
            &[
                &s.run_id,
                &s.pipeline,
                &s.rerun.pipeline_file,
                &s.trigger,
                &s.owner,
                &json_text(s.input.as_value()),
                &s.started_at,
                &s.replay_of,
                &s.replay_from,
                &json_text(&serde_json::json!(s.rerun.plugin_dirs)),
                &s.rerun.secrets_file,
                &super::hostname(),
                &(std::process::id() as i64),
                &s.trace.trace_id,
                &s.trace.span_id,
                &s.trace.parent_span_id,
                &s.trigger_info.as_ref().map(|t| json_text(t.as_value())),
            ],
        )?,
        Record::Stage {
            run_id,
            position,
            stage: s,
        } => tx.run(
            "INSERT INTO stages (run_id, stage_id, position, component, version, status, optional, started_ms,
                 duration_ms, attempts, error_kind, error, skipped_because, reused_from, output)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (run_id, stage_id) DO UPDATE SET component = excluded.component,
                 version = excluded.version, status = excluded.status, optional = excluded.optional,
                 started_ms = excluded.started_ms, duration_ms = excluded.duration_ms,
                 attempts = excluded.attempts, error_kind = excluded.error_kind, error = excluded.error,
                 skipped_because = excluded.skipped_because, reused_from = excluded.reused_from,
                 output = excluded.output
             WHERE excluded.status != 'pending' OR stages.status IN ('pending', 'running')",
            &[
                run_id,
                &s.id,
                &(*position as i64),
                &s.component,
                &s.version,
                &s.status.as_str(),
                &s.optional,
                &opt_i64(s.started_ms),
                &opt_i64(s.duration_ms),
                &(s.attempts as i64),
                &s.error.as_ref().map(|e| e.kind.as_str()),
                &s.error
                    .as_ref()
                    .map(|e| serde_json::to_string(e).unwrap_or_default()),
                &s.skipped_because,
                &s.reused_from,
                &s.output.as_deref().map(json_text),
            ],
        )?,
        Record::Attempt {
            run_id,
            stage_id,
            attempt: a,
        } => tx.run(
            "INSERT INTO attempts (run_id, stage_id, attempt, service, method, url, status, error_kind,
                 duration_ms, idempotency_key, at, span_id, parent_span_id, recorded)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            &[
                run_id,
                stage_id,
                &(a.attempt as i64),
                &a.service,
                &a.method,
                &a.url,
                &a.status.map(i64::from),
                &a.error_kind,
                &(a.duration_ms as i64),
                &a.idempotency_key,
                &a.at_ms,
                &a.span_id,
                &a.parent_span_id,
                &a.recorded
                    .as_ref()
                    .map(|r| serde_json::to_string(r).unwrap_or_default()),
            ],
        )?,
        Record::RunFinished(end) => run_finished(tx, end, now)?,
        Record::Delivery(d) => tx.run(
            "INSERT INTO deliveries (pipeline, event_id, path, received_at, payload, run_id, status,
                 traceparent, trigger_info)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)
             ON CONFLICT DO NOTHING",
            &[
                &d.pipeline,
                &d.event_id,
                &d.path,
                &d.received_at,
                &json_text(d.payload.as_value()),
                &d.run_id,
                &d.traceparent,
                &d.trigger_info.as_ref().map(|t| json_text(t.as_value())),
            ],
        )?,
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
            let new = tx.run(
                "INSERT INTO fires (pipeline, trigger, scheduled_at, last_at, count, outcome, reason, event_id, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT DO NOTHING",
                &[
                    pipeline,
                    trigger,
                    scheduled_at,
                    last_at,
                    &(*count as i64),
                    outcome,
                    reason,
                    &delivery.as_ref().map(|d| d.event_id.as_str()),
                    &now,
                ],
            )?;
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
        } => tx.run(
            "INSERT INTO cursors (pipeline, trigger, value, run_id, updated_at) VALUES ($1, $2, $3, NULL, $4)
             ON CONFLICT (pipeline, trigger) DO UPDATE SET value = excluded.value, run_id = NULL,
                 updated_at = excluded.updated_at",
            &[pipeline, trigger, &json_text(value), &now],
        )?,
        Record::RunResumed { run_id } => tx.run(
            "UPDATE runs SET resumed = resumed + 1 WHERE id = $1",
            &[run_id],
        )?,
        Record::DropDeadLetter { id } => tx.run(
            "UPDATE dead_letters SET status = 'dropped', updated_at = $2 WHERE id = $1 AND status = 'open'",
            &[id, &now],
        )?,
        Record::Pipeline { hash, document } => tx.run(
            "INSERT INTO pipelines (hash, document, first_seen) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[hash, document, &now],
        )?,
        Record::Forget { run_id } => {
            // Checked again here, in the writer: the run may have been resumed since.
            let removable: bool = tx
                .tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1 AND status != 'running')
                       AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE run_id = $1 AND status = 'open')",
                    &[run_id],
                )?
                .get(0);
            if removable {
                for sql in [
                    "DELETE FROM attempts WHERE run_id = $1",
                    "DELETE FROM stages WHERE run_id = $1",
                    "DELETE FROM deliveries WHERE run_id = $1 AND status = 'done'",
                    "DELETE FROM dead_letters WHERE run_id = $1",
                    "DELETE FROM runs WHERE id = $1",
                ] {
                    tx.run(sql, &[run_id])?;
                }
            }
            u64::from(removable)
        }
    };
    Ok(changed > 0)
}

/// A run's end: the same statements as SQLite's, in the same order (see `sqlite::apply`).
fn run_finished(tx: &mut Tx<'_>, end: &super::RunEnd, now: i64) -> Result<u64, postgres::Error> {
    let n = tx.run(
        "UPDATE runs SET status = $2, error = $3, error_kind = $4, output = $5, duration_ms = $6,
             finished_at = $7, pipeline_hash = COALESCE($8, pipeline_hash) WHERE id = $1",
        &[
            &end.run_id,
            &end.status.as_str(),
            &end.error,
            &end.error_kind,
            &end.output.as_ref().map(json_text),
            &(end.duration_ms as i64),
            &end.finished_at,
            &end.pipeline_hash,
        ],
    )?;
    tx.run(
        "UPDATE deliveries SET status = 'done' WHERE run_id = $1 AND status != 'done'",
        &[&end.run_id],
    )?;
    if let Some(c) = &end.cursor {
        // Compare-and-set: a cursor an operator set while the run went on stays.
        tx.run(
            "INSERT INTO cursors (pipeline, trigger, value, run_id, updated_at) VALUES ($1, $2, $3, $4, $6)
             ON CONFLICT (pipeline, trigger) DO UPDATE SET value = excluded.value,
                 run_id = excluded.run_id, updated_at = excluded.updated_at
             WHERE cursors.value = $5",
            &[
                &c.pipeline,
                &c.trigger,
                &json_text(&c.value),
                &end.run_id,
                &json_text(&c.expected),
                &now,
            ],
        )?;
    }
    let stopped = crate::error::StageError::new(
        crate::error::ErrorKind::Cancelled,
        "interrupted: the host stopped while this stage ran",
    );
    tx.run(
        "UPDATE stages SET
             status = CASE status WHEN 'running' THEN 'failed' ELSE 'skipped' END,
             error_kind = CASE status WHEN 'running' THEN 'cancelled' ELSE error_kind END,
             error = CASE status WHEN 'running' THEN $2 ELSE error END,
             skipped_because = CASE status WHEN 'pending' THEN 'the run was interrupted' ELSE skipped_because END
         WHERE run_id = $1 AND status IN ('running', 'pending')",
        &[
            &end.run_id,
            &serde_json::to_string(&stopped).unwrap_or_default(),
        ],
    )?;
    if end.status == crate::engine::RunStatus::Succeeded {
        for failed in [end.replay_of.as_ref(), Some(&end.run_id)]
            .into_iter()
            .flatten()
        {
            tx.run(
                "UPDATE dead_letters SET status = 'resolved', resolved_by = $2, updated_at = $3
                 WHERE run_id = $1 AND status = 'open'",
                &[failed, &end.run_id, &now],
            )?;
        }
    }
    if let Some(dl) = &end.dead_letter {
        let moved = match &end.replay_of {
            Some(original) => tx.run(
                "UPDATE dead_letters SET run_id = $2, retries = retries + 1, reason = $3,
                     error_kind = $4, updated_at = $5
                 WHERE run_id = $1 AND status = 'open'",
                &[original, &end.run_id, &dl.reason, &dl.error_kind, &now],
            )?,
            None => 0,
        };
        let moved = match moved {
            0 => tx.run(
                "UPDATE dead_letters SET retries = retries + 1, reason = $2, error_kind = $3, updated_at = $4
                 WHERE run_id = $1 AND status = 'open'",
                &[&end.run_id, &dl.reason, &dl.error_kind, &now],
            )?,
            n => n,
        };
        if moved == 0 {
            tx.run(
                "INSERT INTO dead_letters (kind, status, pipeline, run_id, first_run_id, event_id, reason,
                     error_kind, created_at, updated_at)
                 VALUES ($1, 'open', $2, $3, $3,
                     (SELECT event_id FROM deliveries WHERE run_id = $3 ORDER BY seq LIMIT 1),
                     $4, $5, $6, $6)",
                &[
                    &dl.kind,
                    &dl.pipeline,
                    &end.run_id,
                    &dl.reason,
                    &dl.error_kind,
                    &now,
                ],
            )?;
        }
    }
    Ok(n)
}

const SUMMARY_COLUMNS: &str = "id, pipeline, status, trigger, started_at, duration_ms, error, error_kind, replay_of, trace_id";

fn summary(r: &postgres::Row) -> RunSummary {
    let started: i64 = r.get(4);
    RunSummary {
        run_id: r.get(0),
        pipeline: r.get(1),
        status: r.get(2),
        trigger: r.get(3),
        started_at: super::rfc3339(started),
        started_at_ms: started,
        duration_ms: r.get::<_, Option<i64>>(5).map(|d| d.max(0) as u64),
        error: r.get(6),
        error_kind: r.get(7),
        replay_of: r.get(8),
        trace_id: r.get(9),
    }
}

const DELIVERY_COLUMNS: &str =
    "pipeline, event_id, path, received_at, payload, run_id, traceparent, trigger_info";

fn delivery_row(r: &postgres::Row) -> Delivery {
    Delivery {
        pipeline: r.get(0),
        event_id: r.get(1),
        path: r.get(2),
        received_at: r.get(3),
        payload: Stored::from_storage(parse_value(r.get(4)).unwrap_or(Value::Null)),
        run_id: r.get(5),
        traceparent: r.get(6),
        trigger_info: r
            .get::<_, Option<&str>>(7)
            .and_then(parse_value)
            .map(Stored::from_storage),
    }
}

const DEAD_LETTER_SELECT: &str =
    "SELECT d.id, d.kind, d.status, d.pipeline, d.run_id, d.first_run_id, d.event_id,
    d.reason, d.error_kind, d.retries, d.created_at, d.updated_at, d.resolved_by, r.input
    FROM dead_letters d LEFT JOIN runs r ON r.id = d.run_id";

fn dead_letter(r: &postgres::Row) -> DeadLetter {
    let run_id: String = r.get(4);
    DeadLetter {
        id: r.get(0),
        kind: r.get(1),
        status: r.get(2),
        pipeline: r.get(3),
        correlation_id: run_id.clone(),
        run_id,
        first_run_id: r.get(5),
        event_id: r.get(6),
        reason: r.get(7),
        error_kind: r.get(8),
        retries: r.get::<_, i64>(9).max(0) as u32,
        created_at: super::rfc3339(r.get(10)),
        updated_at: super::rfc3339(r.get(11)),
        resolved_by: r.get(12),
        input: Stored::from_storage(parse_json(r.get(13)).unwrap_or(Value::Null)),
    }
}

impl PgBackend {
    fn read_run(&mut self, id: &str) -> Result<Option<RunDetail>, postgres::Error> {
        let run = self.prepared(
            "SELECT id, pipeline, status, trigger, started_at, duration_ms, error, error_kind, replay_of, trace_id,
                 owner, pipeline_file, replay_from, resumed, finished_at, input, output,
                 plugin_dirs, secrets_file, trace_span, trace_parent, trigger_info
             FROM runs WHERE id = $1",
        )?;
        let attempts = self.prepared(
            "SELECT stage_id, attempt, service, method, url, status, error_kind, duration_ms, idempotency_key, at,
                 span_id, parent_span_id, recorded
             FROM attempts WHERE run_id = $1 ORDER BY seq",
        )?;
        let stages = self.prepared(
            "SELECT stage_id, component, version, status, optional, started_ms, duration_ms, attempts, error,
                 skipped_because, reused_from, output
             FROM stages WHERE run_id = $1
             ORDER BY position, started_ms NULLS FIRST, stage_id COLLATE \"C\"",
        )?;
        let replays =
            self.prepared("SELECT id FROM runs WHERE replay_of = $1 ORDER BY started_at, seq")?;
        let open = self.prepared(
            "SELECT id FROM dead_letters WHERE run_id = $1 AND status = 'open' ORDER BY id LIMIT 1",
        )?;
        let client = self.client.as_mut().expect("connected");
        let Some(r) = client.query_opt(&run, &[&id])? else {
            return Ok(None);
        };
        let mut calls: HashMap<String, Vec<Attempt>> = HashMap::new();
        for a in client.query(&attempts, &[&id])? {
            calls.entry(a.get(0)).or_default().push(Attempt {
                attempt: a.get::<_, i64>(1) as u32,
                service: a.get(2),
                method: a.get(3),
                url: a.get(4),
                status: a.get::<_, Option<i64>>(5).map(|s| s as u16),
                error_kind: a.get(6),
                duration_ms: a.get::<_, i64>(7).max(0) as u64,
                idempotency_key: a.get(8),
                at_ms: a.get(9),
                span_id: a.get(10),
                parent_span_id: a.get(11),
                recorded: a
                    .get::<_, Option<&str>>(12)
                    .and_then(|t| serde_json::from_str(t).ok()),
            });
        }
        let stages = client
            .query(&stages, &[&id])?
            .iter()
            .map(|s| {
                let report = StageReport {
                    id: s.get(0),
                    component: s.get(1),
                    version: s.get(2),
                    status: serde_json::from_value(Value::String(s.get(3)))
                        .unwrap_or(StageStatus::Pending),
                    optional: s.get(4),
                    started_ms: s.get::<_, Option<i64>>(5).map(|v| v.max(0) as u64),
                    duration_ms: s.get::<_, Option<i64>>(6).map(|v| v.max(0) as u64),
                    attempts: s.get::<_, i64>(7) as u32,
                    error: s
                        .get::<_, Option<&str>>(8)
                        .and_then(|t| serde_json::from_str(t).ok()),
                    skipped_because: s.get(9),
                    reused_from: s.get(10),
                    output: parse_json(s.get(11)).map(std::sync::Arc::new),
                };
                StageDetail {
                    calls: calls.remove(&report.id).unwrap_or_default(),
                    report,
                }
            })
            .collect();
        let replayed_by = client
            .query(&replays, &[&id])?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let dead_letter = client.query_opt(&open, &[&id])?.map(|r| r.get(0));
        let summary = summary(&r);
        let trace = summary
            .trace_id
            .clone()
            .zip(r.get::<_, Option<String>>(19))
            .map(|(trace_id, span_id)| crate::trace::RunTrace {
                trace_id,
                span_id,
                parent_span_id: r.get(20),
            });
        Ok(Some(RunDetail {
            summary,
            owner: r.get(10),
            rerun: super::Rerun {
                pipeline_file: r.get(11),
                plugin_dirs: serde_json::from_str(r.get(17)).unwrap_or_default(),
                secrets_file: r.get(18),
            },
            replay_from: r.get(12),
            replayed_by,
            resumed: r.get::<_, i64>(13).max(0) as u32,
            finished_at: r.get::<_, Option<i64>>(14).map(super::rfc3339),
            input: Stored::from_storage(parse_value(r.get(15)).unwrap_or(Value::Null)),
            output: parse_json(r.get(16)),
            dead_letter,
            trace,
            trigger_info: r
                .get::<_, Option<&str>>(21)
                .and_then(parse_value)
                .map(Stored::from_storage),
            stages,
        }))
    }

    /// Runs a read with the connection checked (and opened again if it was lost).
    fn reading<T>(
        &mut self,
        f: impl FnOnce(&mut PgBackend) -> Result<T, postgres::Error>,
    ) -> Result<T, JournalError> {
        self.client()?;
        f(self).map_err(|e| self.err(e))
    }
}

impl Backend for PgBackend {
    fn write(&mut self, batch: &[Record], durable: bool) -> Result<Vec<bool>, JournalError> {
        self.client()?;
        let shown = self.shown.clone();
        let client = self.client.as_mut().expect("connected above");
        let mut attempt = || -> Result<Vec<bool>, postgres::Error> {
            let mut tx = client.transaction()?;
            if !durable {
                tx.batch_execute("SET LOCAL synchronous_commit = off")?;
            }
            let mut tx = Tx {
                tx,
                statements: &mut self.statements,
            };
            let changed = if batch.is_empty() {
                // Nothing to write, but a durable request still flushes what earlier
                // asynchronous commits left: a transaction with an id commits through WAL.
                tx.tx.execute("SELECT txid_current()", &[])?;
                Vec::new()
            } else {
                batch
                    .iter()
                    .map(|r| apply(&mut tx, r))
                    .collect::<Result<Vec<bool>, postgres::Error>>()?
            };
            tx.tx.commit()?;
            Ok(changed)
        };
        attempt().map_err(|e| io(&shown, error_text(&e)))
    }

    fn runs(&mut self, f: &RunFilter) -> Result<Vec<RunSummary>, JournalError> {
        let mut sql = format!("SELECT {SUMMARY_COLUMNS}, pid FROM runs WHERE true");
        let mut args: Vec<Box<dyn ToSql + Sync>> = Vec::new();
        let mut add = |clause: &str, v: Box<dyn ToSql + Sync>| {
            args.push(v);
            sql.push_str(&format!(" AND {clause} ${}", args.len()));
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
            add("host =", Box::new(super::hostname()));
        }
        if f.not_replayed {
            sql.push_str(
                " AND NOT EXISTS (SELECT 1 FROM runs later WHERE later.replay_of = runs.id)",
            );
        }
        sql.push_str(" ORDER BY started_at DESC, seq DESC");
        if f.limit > 0 {
            sql.push_str(&format!(" LIMIT {}", f.limit));
        }
        let abandoned = f.abandoned;
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| &**a).collect();
            Ok(client
                .query(sql.as_str(), &params)?
                .iter()
                .filter(|r| !abandoned || !super::alive(r.get::<_, i64>(10) as u32))
                .map(summary)
                .collect())
        })
    }

    fn run(&mut self, id: &str) -> Result<Option<RunDetail>, JournalError> {
        self.reading(|b| b.read_run(id))
    }

    fn pending_deliveries(&mut self) -> Result<Vec<Delivery>, JournalError> {
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            Ok(client
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE status = 'pending' ORDER BY received_at, seq"
                    ),
                    &[],
                )?
                .iter()
                .map(delivery_row)
                .collect())
        })
    }

    fn delivery(
        &mut self,
        pipeline: &str,
        event_id: &str,
    ) -> Result<Option<(Delivery, bool)>, JournalError> {
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            Ok(client
                .query_opt(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS}, status FROM deliveries WHERE pipeline = $1 AND event_id = $2"
                    ),
                    &[&pipeline, &event_id],
                )?
                .map(|r| (delivery_row(&r), r.get::<_, &str>(8) == "done")))
        })
    }

    fn trigger_record(
        &mut self,
        pipeline: &str,
        trigger: &str,
    ) -> Result<super::TriggerRecord, JournalError> {
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            let fires = client.query_one(
                "SELECT MAX(last_at),
                     COALESCE(SUM(CASE outcome WHEN 'skipped' THEN count ELSE 0 END), 0)::BIGINT,
                     COALESCE(SUM(CASE outcome WHEN 'missed' THEN count ELSE 0 END), 0)::BIGINT
                 FROM fires WHERE pipeline = $1 AND trigger = $2",
                &[&pipeline, &trigger],
            )?;
            let cursor = client.query_opt(
                "SELECT value, updated_at FROM cursors WHERE pipeline = $1 AND trigger = $2",
                &[&pipeline, &trigger],
            )?;
            let last = client.query_opt(
                "SELECT event_id, received_at, run_id FROM deliveries WHERE pipeline = $1 AND path = $2
                 ORDER BY received_at DESC, seq DESC LIMIT 1",
                &[&pipeline, &trigger],
            )?;
            Ok(super::TriggerRecord {
                last_fire_ms: fires.get(0),
                skipped: fires.get::<_, i64>(1).max(0) as u64,
                missed: fires.get::<_, i64>(2).max(0) as u64,
                cursor_updated_ms: cursor.as_ref().map(|c| c.get(1)),
                cursor: cursor.as_ref().and_then(|c| parse_value(c.get(0))),
                last: last.map(|r| (r.get(0), r.get(1), r.get(2))),
            })
        })
    }

    fn dead_letters(&mut self, f: &DlqFilter) -> Result<Vec<DeadLetter>, JournalError> {
        let limit = (f.limit > 0).then_some(f.limit as i64);
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            Ok(client
                .query(
                    &format!(
                        "{DEAD_LETTER_SELECT} WHERE ($1::TEXT IS NULL OR d.pipeline = $1)
                             AND ($2::TEXT IS NULL OR d.status = $2) AND ($4::TEXT IS NULL OR d.event_id = $4)
                         ORDER BY d.id DESC LIMIT $3"
                    ),
                    &[&f.pipeline, &f.status, &limit, &f.event_id],
                )?
                .iter()
                .map(dead_letter)
                .collect())
        })
    }

    fn dead_letter(&mut self, id: i64) -> Result<Option<DeadLetter>, JournalError> {
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            Ok(client
                .query_opt(&format!("{DEAD_LETTER_SELECT} WHERE d.id = $1"), &[&id])?
                .map(|r| dead_letter(&r)))
        })
    }

    fn pipeline_document(&mut self, run_id: &str) -> Result<Option<String>, JournalError> {
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            Ok(client
                .query_opt(
                    "SELECT p.document FROM runs r JOIN pipelines p ON p.hash = r.pipeline_hash WHERE r.id = $1",
                    &[&run_id],
                )?
                .map(|r| r.get(0)))
        })
    }

    fn recorded_answers(
        &mut self,
        limit: usize,
    ) -> Result<Vec<(String, String, crate::http::Recorded)>, JournalError> {
        self.reading(|b| {
            let client = b.client.as_mut().expect("connected");
            let mut out: Vec<_> = client
                .query(
                    "SELECT service, method, recorded FROM attempts
                     WHERE recorded IS NOT NULL AND status BETWEEN 200 AND 299
                     ORDER BY seq DESC LIMIT $1",
                    &[&(limit as i64)],
                )?
                .iter()
                .filter_map(|r| {
                    let rec = serde_json::from_str(r.get::<_, &str>(2)).ok()?;
                    Some((r.get(0), r.get(1), rec))
                })
                .collect();
            out.reverse();
            Ok(out)
        })
    }
}

/// A server's claim on a shared journal: one `fmhost serve` per PostgreSQL journal
/// until workers lease their runs (issue 28's cluster mode), as `serve.lock` is for a
/// state directory. Held (a session advisory lock) for as long as this value lives.
pub struct ServerLock {
    _backend: PgBackend,
}

impl ServerLock {
    /// `Ok(None)` when another server holds the journal.
    pub fn try_take(url: &str) -> Result<Option<ServerLock>, JournalError> {
        let mut backend = PgBackend::open(url)?;
        let shown = backend.shown.clone();
        let taken = in_own_thread(|| -> Result<bool, JournalError> {
            let client = backend.client()?;
            let row = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&SERVER_LOCK])
                .map_err(|e| io(&shown, error_text(&e)))?;
            Ok(row.get(0))
        })?;
        Ok(taken.then_some(ServerLock { _backend: backend }))
    }
}
