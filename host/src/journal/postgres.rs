//! The PostgreSQL journal backend (`tokio-postgres`, on a runtime of its own):
//! the same tables as the SQLite journal in PostgreSQL's dialect, for journals that
//! several hosts share. A batch is one transaction; a durable one commits with
//! `synchronous_commit = on` (flushed to the server's WAL before the answer), the others
//! with `synchronous_commit = off` (PostgreSQL's asynchronous commit: a crash of the
//! *server* may lose the last few, a crash of fmhost loses nothing committed), which is
//! what `synchronous=FULL` / `NORMAL` promise on SQLite. [`MIGRATIONS`] mirror SQLite's
//! one for one; the version applied is the highest in `schema_migrations`, and migrating
//! holds an advisory lock so workers starting together migrate once.
//!
//! The backend keeps a single-threaded runtime of its own and blocks on it (the writer is
//! a thread, reads run on the blocking pool), so it is never created or dropped on a
//! tokio worker: [`PgBackend::open`] connects on a thread of its own and a backend
//! dropped inside a runtime hands its runtime to a thread to close. A batch's statements
//! are *pipelined*: every record that is one statement is sent before the first answer is
//! awaited, so a batch costs a few round trips rather than one per row.

mod cluster;
pub use cluster::{Leadership, ServerLock};

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use super::{
    Backend, DEAD_LETTER_SELECT, DeadLetter, Delivery, DlqFilter, JournalError, Record, RunDetail,
    RunFilter, RunSummary, SUMMARY_COLUMNS, StageDetail, json_text, parse_json, parse_value,
    unix_ms,
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
    (
        7,
        "cluster: a run's worker and lease, services' shared rate limits and circuits, plugin versions",
        r#"
ALTER TABLE runs ADD COLUMN worker TEXT;
ALTER TABLE runs ADD COLUMN lease_until BIGINT;
CREATE INDEX runs_by_lease ON runs (lease_until) WHERE status = 'running' AND lease_until IS NOT NULL;
CREATE TABLE quotas (
    service TEXT PRIMARY KEY,
    tat     BIGINT NOT NULL
);
CREATE TABLE breakers (
    service    TEXT PRIMARY KEY,
    open_until BIGINT NOT NULL,
    worker     TEXT NOT NULL
);
CREATE TABLE plugin_blobs (
    sha256 TEXT PRIMARY KEY,
    bytes  BYTEA NOT NULL,
    at     BIGINT NOT NULL
);
CREATE TABLE plugin_events (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name    TEXT NOT NULL,
    action  TEXT NOT NULL,
    sha256  TEXT,
    approve BOOLEAN NOT NULL,
    worker  TEXT NOT NULL,
    at      BIGINT NOT NULL
);
"#,
    ),
];

/// The advisory lock key migrations hold (any constant no other application uses).
const MIGRATION_LOCK: i64 = 0x666d_686f_7374_0001;

type PgError = tokio_postgres::Error;
/// A statement's parameter, owned, so a batch's statements can all be in flight at once.
type Param = Box<dyn ToSql + Sync + Send>;
type Statements = HashMap<&'static str, Statement>;

/// `postgres://user:secret@host/db` as it may be shown: the password masked, in the
/// user part and in a `?password=` parameter (which the client accepts too).
pub fn display_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query_pairs().any(|(k, _)| k == "password") {
                let masked: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(masked);
            }
            u.to_string()
        }
        Err(_) => "postgres://(unparsable URL)".into(),
    }
}

pub struct PgBackend {
    /// Drives the connection while a call blocks on it.
    rt: Option<tokio::runtime::Runtime>,
    client: Option<Client>,
    url: String,
    shown: PathBuf,
    /// Prepared once per connection, by their text.
    statements: Statements,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.client.take();
        // A runtime may not be dropped on a runtime's thread.
        if let Some(rt) = self.rt.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("fmhost-pg-close".into())
                    .spawn(move || drop(rt));
            } else {
                drop(rt);
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

/// A PostgreSQL error with the server's message and detail when there is one.
fn error_text(e: &PgError) -> String {
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

/// Runs `f` where it may block on a runtime of its own: on a thread of its own when the
/// caller is a tokio worker (where `fmhost run` and `serve` open their journal).
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

fn connect(
    url: &str,
    shown: &std::path::Path,
) -> Result<(tokio::runtime::Runtime, Client), JournalError> {
    in_own_thread(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io(shown, e))?;
        let (client, connection) = rt
            .block_on(tokio_postgres::connect(url, NoTls))
            .map_err(|e| io(shown, format!("cannot connect: {}", error_text(&e))))?;
        rt.spawn(async move {
            let _ = connection.await;
        });
        Ok((rt, client))
    })
}

impl PgBackend {
    /// Connects and migrates (creating the tables on first use).
    pub fn open(url: &str) -> Result<PgBackend, JournalError> {
        let shown = PathBuf::from(display_url(url));
        let (rt, client) = connect(url, &shown)?;
        let mut b = PgBackend {
            rt: Some(rt),
            client: Some(client),
            url: url.to_string(),
            shown,
            statements: HashMap::new(),
        };
        in_own_thread(|| b.migrate())?;
        Ok(b)
    }

    /// The URL as it may be shown (password masked).
    pub fn shown(&self) -> &std::path::Path {
        &self.shown
    }

    /// The runtime, the client and the statement cache; a connection the server closed
    /// (a restart, a failover) is opened again first.
    fn parts(
        &mut self,
    ) -> Result<(&tokio::runtime::Runtime, &Client, &mut Statements), JournalError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            self.client.take();
            let (rt, client) = connect(&self.url, &self.shown)?;
            if let Some(old) = self.rt.replace(rt) {
                drop(old);
            }
            self.client = Some(client);
        }
        Ok((
            self.rt.as_ref().expect("connected"),
            self.client.as_ref().expect("connected"),
            &mut self.statements,
        ))
    }

    fn migrate(&mut self) -> Result<(), JournalError> {
        let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        let shown = self.shown.clone();
        let (rt, client, _) = self.parts()?;
        let found = rt
            .block_on(async {
                // Already migrated (every open but the first): no lock, no transaction.
                if let Ok(row) = client
                    .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                    .await
                    && row.get::<_, i64>(0) == known
                {
                    return Ok(known);
                }
                client
                    .batch_execute("BEGIN; SET LOCAL client_min_messages = warning")
                    .await?;
                let migrated = async {
                    // Workers starting together: one migrates, the others wait and find it done.
                    client
                        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                        .await?;
                    client
                        .batch_execute(
                            "CREATE TABLE IF NOT EXISTS schema_migrations (
                                 version    BIGINT PRIMARY KEY,
                                 name       TEXT NOT NULL,
                                 applied_at BIGINT NOT NULL)",
                        )
                        .await?;
                    let found: i64 = client
                        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                        .await?
                        .get(0);
                    if found > known {
                        return Ok(found);
                    }
                    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
                        client.batch_execute(sql).await?;
                        client
                            .execute(
                                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                                &[version, name, &unix_ms(SystemTime::now())],
                            )
                            .await?;
                    }
                    Ok::<i64, PgError>(found)
                }
                .await;
                finish(client, migrated).await
            })
            .map_err(|e| io(&shown, error_text(&e)))?;
        if found > known {
            return Err(JournalError::TooNew {
                path: shown,
                found,
                known,
            });
        }
        Ok(())
    }
}

/// Commits the transaction `result` ran in, or rolls it back if it failed.
async fn finish<T>(client: &Client, result: Result<T, PgError>) -> Result<T, PgError> {
    match result {
        Ok(v) => {
            client.batch_execute("COMMIT").await?;
            Ok(v)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn prepared(
    client: &Client,
    statements: &mut Statements,
    sql: &'static str,
) -> Result<Statement, PgError> {
    if let Some(s) = statements.get(sql) {
        return Ok(s.clone());
    }
    let s = client.prepare(sql).await?;
    statements.insert(sql, s.clone());
    Ok(s)
}

/// Sends every statement before awaiting the first answer (tokio-postgres pipelines
/// requests in flight together; the server runs them in order). Rows changed, each.
async fn pipelined(
    client: &Client,
    statements: &mut Statements,
    group: &[(&'static str, Vec<Param>)],
) -> Result<Vec<u64>, PgError> {
    let mut prepared_group = Vec::with_capacity(group.len());
    for (sql, _) in group {
        prepared_group.push(prepared(client, statements, sql).await?);
    }
    futures::future::try_join_all(group.iter().zip(&prepared_group).map(|((_, params), st)| {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
        async move { client.execute(st, &refs).await }
    }))
    .await
}

async fn exec(
    client: &Client,
    statements: &mut Statements,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, PgError> {
    let st = prepared(client, statements, sql).await?;
    client.execute(&st, params).await
}

fn p<T: ToSql + Sync + Send + 'static>(v: T) -> Param {
    Box::new(v)
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| v as i64)
}

/// The one statement a record is, if it is one (most are; a run's end, a fire and a
/// removal decide as they go).
fn single(record: &Record, now: i64) -> Option<(&'static str, Vec<Param>)> {
    Some(match record {
        Record::RunStarted(s) => (
            "INSERT INTO runs (id, pipeline, pipeline_file, plugin_dirs, secrets_file, status, trigger, owner,
                 host, pid, input, started_at, replay_of, replay_from, trace_id, trace_span, trace_parent,
                 trigger_info, worker, lease_until)
             VALUES ($1, $2, $3, $10, $11, 'running', $4, $5, $12, $13, $6, $7, $8, $9, $14, $15, $16, $17,
                 $18, $19)
             ON CONFLICT (id) DO UPDATE SET status = 'running', error = NULL, error_kind = NULL,
                 finished_at = NULL, host = excluded.host, pid = excluded.pid,
                 trace_id = excluded.trace_id, trace_span = excluded.trace_span,
                 trace_parent = excluded.trace_parent, worker = excluded.worker,
                 lease_until = excluded.lease_until",
            vec![
                p(s.run_id.clone()),
                p(s.pipeline.clone()),
                p(s.rerun.pipeline_file.clone()),
                p(s.trigger.clone()),
                p(s.owner.clone()),
                p(json_text(s.input.as_value())),
                p(s.started_at),
                p(s.replay_of.clone()),
                p(s.replay_from.clone()),
                p(json_text(&serde_json::json!(s.rerun.plugin_dirs))),
                p(s.rerun.secrets_file.clone()),
                p(super::hostname()),
                p(std::process::id() as i64),
                p(s.trace.trace_id.clone()),
                p(s.trace.span_id.clone()),
                p(s.trace.parent_span_id.clone()),
                p(s.trigger_info.as_ref().map(|t| json_text(t.as_value()))),
                p(super::lease_of(s, now).0),
                p(super::lease_of(s, now).1),
            ],
        ),
        Record::RenewLeases { worker, until } => (
            "UPDATE runs SET lease_until = $2 WHERE worker = $1 AND status = 'running'",
            vec![p(worker.clone()), p(*until)],
        ),
        Record::Stage {
            run_id,
            position,
            stage: s,
        } => (
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
            vec![
                p(run_id.clone()),
                p(s.id.clone()),
                p(*position as i64),
                p(s.component.clone()),
                p(s.version.clone()),
                p(s.status.as_str()),
                p(s.optional),
                p(opt_i64(s.started_ms)),
                p(opt_i64(s.duration_ms)),
                p(s.attempts as i64),
                p(s.error.as_ref().map(|e| e.kind.as_str().to_string())),
                p(s.error
                    .as_ref()
                    .map(|e| serde_json::to_string(e).unwrap_or_default())),
                p(s.skipped_because.clone()),
                p(s.reused_from.clone()),
                p(s.output.as_deref().map(json_text)),
            ],
        ),
        Record::Attempt {
            run_id,
            stage_id,
            attempt: a,
        } => (
            "INSERT INTO attempts (run_id, stage_id, attempt, service, method, url, status, error_kind,
                 duration_ms, idempotency_key, at, span_id, parent_span_id, recorded)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            vec![
                p(run_id.clone()),
                p(stage_id.clone()),
                p(a.attempt as i64),
                p(a.service.clone()),
                p(a.method.clone()),
                p(a.url.clone()),
                p(a.status.map(i64::from)),
                p(a.error_kind.clone()),
                p(a.duration_ms as i64),
                p(a.idempotency_key.clone()),
                p(a.at_ms),
                p(a.span_id.clone()),
                p(a.parent_span_id.clone()),
                p(a.recorded
                    .as_ref()
                    .map(|r| serde_json::to_string(r).unwrap_or_default())),
            ],
        ),
        Record::Delivery(d) => (
            "INSERT INTO deliveries (pipeline, event_id, path, received_at, payload, run_id, status,
                 traceparent, trigger_info)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)
             ON CONFLICT DO NOTHING",
            vec![
                p(d.pipeline.clone()),
                p(d.event_id.clone()),
                p(d.path.clone()),
                p(d.received_at),
                p(json_text(d.payload.as_value())),
                p(d.run_id.clone()),
                p(d.traceparent.clone()),
                p(d.trigger_info.as_ref().map(|t| json_text(t.as_value()))),
            ],
        ),
        Record::SetCursor {
            pipeline,
            trigger,
            value,
        } => (
            "INSERT INTO cursors (pipeline, trigger, value, run_id, updated_at) VALUES ($1, $2, $3, NULL, $4)
             ON CONFLICT (pipeline, trigger) DO UPDATE SET value = excluded.value, run_id = NULL,
                 updated_at = excluded.updated_at",
            vec![
                p(pipeline.clone()),
                p(trigger.clone()),
                p(json_text(value)),
                p(now),
            ],
        ),
        Record::RunResumed { run_id } => (
            "UPDATE runs SET resumed = resumed + 1 WHERE id = $1",
            vec![p(run_id.clone())],
        ),
        Record::DropDeadLetter { id } => (
            "UPDATE dead_letters SET status = 'dropped', updated_at = $2 WHERE id = $1 AND status = 'open'",
            vec![p(*id), p(now)],
        ),
        Record::Pipeline { hash, document } => (
            "INSERT INTO pipelines (hash, document, first_seen) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            vec![p(hash.clone()), p(document.clone()), p(now)],
        ),
        Record::RunFinished(_) | Record::Fire { .. } | Record::Forget { .. } => return None,
    })
}

/// A batch, in order: runs of single-statement records go out pipelined.
async fn apply_all(
    client: &Client,
    statements: &mut Statements,
    batch: &[Record],
) -> Result<Vec<bool>, PgError> {
    let now = unix_ms(SystemTime::now());
    let mut changed = Vec::with_capacity(batch.len());
    let mut i = 0;
    while i < batch.len() {
        let group: Vec<_> = batch[i..].iter().map_while(|r| single(r, now)).collect();
        if !group.is_empty() {
            i += group.len();
            changed.extend(
                pipelined(client, statements, &group)
                    .await?
                    .into_iter()
                    .map(|n| n > 0),
            );
            continue;
        }
        changed.push(compound(client, statements, &batch[i], now).await? > 0);
        i += 1;
    }
    Ok(changed)
}

/// The records that are more than one statement: the same statements as SQLite's, in
/// the same order (see `sqlite::apply`).
async fn compound(
    client: &Client,
    statements: &mut Statements,
    record: &Record,
    now: i64,
) -> Result<u64, PgError> {
    match record {
        Record::RunFinished(end) => run_finished(client, statements, end, now).await,
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
            let new = exec(
                client,
                statements,
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
            )
            .await?;
            if new > 0
                && let Some(d) = delivery
                && let Some(one) = single(&Record::Delivery((**d).clone()), now)
            {
                pipelined(client, statements, &[one]).await?;
            }
            Ok(new)
        }
        Record::Forget { run_id } => {
            // Checked again here, in the writer: the run may have been resumed since.
            let removable: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1 AND status != 'running')
                       AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE run_id = $1 AND status = 'open')",
                    &[run_id],
                )
                .await?
                .get(0);
            if removable {
                let group: Vec<_> = [
                    "DELETE FROM attempts WHERE run_id = $1",
                    "DELETE FROM stages WHERE run_id = $1",
                    "DELETE FROM deliveries WHERE run_id = $1 AND status = 'done'",
                    "DELETE FROM dead_letters WHERE run_id = $1",
                    "DELETE FROM runs WHERE id = $1",
                ]
                .into_iter()
                .map(|sql| (sql, vec![p(run_id.clone())]))
                .collect();
                pipelined(client, statements, &group).await?;
            }
            Ok(u64::from(removable))
        }
        other => match single(other, now) {
            Some(one) => Ok(pipelined(client, statements, &[one]).await?[0]),
            None => Ok(0),
        },
    }
}

/// A run's end. The statements that do not depend on each other go out together; the
/// dead letter, which depends on what the updates found, follows.
async fn run_finished(
    client: &Client,
    statements: &mut Statements,
    end: &super::RunEnd,
    now: i64,
) -> Result<u64, PgError> {
    let stopped = crate::error::StageError::new(
        crate::error::ErrorKind::Cancelled,
        "interrupted: the host stopped while this stage ran",
    );
    let mut group: Vec<(&'static str, Vec<Param>)> = vec![
        (
            "UPDATE runs SET status = $2, error = $3, error_kind = $4, output = $5, duration_ms = $6,
                 finished_at = $7, pipeline_hash = COALESCE($8, pipeline_hash) WHERE id = $1",
            vec![
                p(end.run_id.clone()),
                p(end.status.as_str()),
                p(end.error.clone()),
                p(end.error_kind.clone()),
                p(end.output.as_ref().map(json_text)),
                p(end.duration_ms as i64),
                p(end.finished_at),
                p(end.pipeline_hash.clone()),
            ],
        ),
        (
            "UPDATE deliveries SET status = 'done' WHERE run_id = $1 AND status != 'done'",
            vec![p(end.run_id.clone())],
        ),
        // A run finished without its stages (dead-lettered after an interruption):
        // none of them is left looking as if it were still running.
        (
            "UPDATE stages SET
                 status = CASE status WHEN 'running' THEN 'failed' ELSE 'skipped' END,
                 error_kind = CASE status WHEN 'running' THEN 'cancelled' ELSE error_kind END,
                 error = CASE status WHEN 'running' THEN $2 ELSE error END,
                 skipped_because = CASE status WHEN 'pending' THEN 'the run was interrupted' ELSE skipped_because END
             WHERE run_id = $1 AND status IN ('running', 'pending')",
            vec![
                p(end.run_id.clone()),
                p(serde_json::to_string(&stopped).unwrap_or_default()),
            ],
        ),
    ];
    if let Some(c) = &end.cursor {
        // Compare-and-set: a cursor an operator set while the run went on stays.
        group.push((
            "INSERT INTO cursors (pipeline, trigger, value, run_id, updated_at) VALUES ($1, $2, $3, $4, $6)
             ON CONFLICT (pipeline, trigger) DO UPDATE SET value = excluded.value,
                 run_id = excluded.run_id, updated_at = excluded.updated_at
             WHERE cursors.value = $5",
            vec![
                p(c.pipeline.clone()),
                p(c.trigger.clone()),
                p(json_text(&c.value)),
                p(end.run_id.clone()),
                p(json_text(&c.expected)),
                p(now),
            ],
        ));
    }
    if end.status == crate::engine::RunStatus::Succeeded {
        // The failure it replays, or its own when it ran again in place, is dealt with.
        for failed in [end.replay_of.as_ref(), Some(&end.run_id)]
            .into_iter()
            .flatten()
        {
            group.push((
                "UPDATE dead_letters SET status = 'resolved', resolved_by = $2, updated_at = $3
                 WHERE run_id = $1 AND status = 'open'",
                vec![p(failed.clone()), p(end.run_id.clone()), p(now)],
            ));
        }
    }
    let n = pipelined(client, statements, &group).await?[0];
    if let Some(dl) = &end.dead_letter {
        let moved = match &end.replay_of {
            Some(original) => {
                exec(
                    client,
                    statements,
                    "UPDATE dead_letters SET run_id = $2, retries = retries + 1, reason = $3,
                         error_kind = $4, updated_at = $5
                     WHERE run_id = $1 AND status = 'open'",
                    &[original, &end.run_id, &dl.reason, &dl.error_kind, &now],
                )
                .await?
            }
            None => 0,
        };
        // A run that failed again in place keeps its one entry, counted.
        let moved = match moved {
            0 => {
                exec(
                    client,
                    statements,
                    "UPDATE dead_letters SET retries = retries + 1, reason = $2, error_kind = $3, updated_at = $4
                     WHERE run_id = $1 AND status = 'open'",
                    &[&end.run_id, &dl.reason, &dl.error_kind, &now],
                )
                .await?
            }
            n => n,
        };
        if moved == 0 {
            exec(
                client,
                statements,
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
            )
            .await?;
        }
    }
    Ok(n)
}

fn summary(r: &tokio_postgres::Row) -> RunSummary {
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

fn delivery_row(r: &tokio_postgres::Row) -> Delivery {
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

fn dead_letter(r: &tokio_postgres::Row) -> DeadLetter {
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

fn attempt_row(a: &tokio_postgres::Row) -> Attempt {
    Attempt {
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
    }
}

fn stage_row(s: &tokio_postgres::Row) -> StageReport {
    StageReport {
        id: s.get(0),
        component: s.get(1),
        version: s.get(2),
        status: serde_json::from_value(Value::String(s.get(3))).unwrap_or(StageStatus::Pending),
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
    }
}

/// One run with its stages, attempts, replays and open dead letter: five queries in
/// flight together.
async fn read_run(
    client: &Client,
    statements: &mut Statements,
    id: &str,
) -> Result<Option<RunDetail>, PgError> {
    let run = prepared(
        client,
        statements,
        "SELECT id, pipeline, status, trigger, started_at, duration_ms, error, error_kind, replay_of, trace_id,
             owner, pipeline_file, replay_from, resumed, finished_at, input, output,
             plugin_dirs, secrets_file, trace_span, trace_parent, trigger_info
         FROM runs WHERE id = $1",
    )
    .await?;
    let attempts = prepared(
        client,
        statements,
        "SELECT stage_id, attempt, service, method, url, status, error_kind, duration_ms, idempotency_key, at,
             span_id, parent_span_id, recorded
         FROM attempts WHERE run_id = $1 ORDER BY seq",
    )
    .await?;
    let stages = prepared(
        client,
        statements,
        "SELECT stage_id, component, version, status, optional, started_ms, duration_ms, attempts, error,
             skipped_because, reused_from, output
         FROM stages WHERE run_id = $1
         ORDER BY position, started_ms NULLS FIRST, stage_id COLLATE \"C\"",
    )
    .await?;
    let replays = prepared(
        client,
        statements,
        "SELECT id FROM runs WHERE replay_of = $1 ORDER BY started_at, seq",
    )
    .await?;
    let open = prepared(
        client,
        statements,
        "SELECT id FROM dead_letters WHERE run_id = $1 AND status = 'open' ORDER BY id LIMIT 1",
    )
    .await?;
    let by_id: &[&(dyn ToSql + Sync)] = &[&id];
    let (r, attempts, stages, replays, open) = tokio::try_join!(
        client.query_opt(&run, by_id),
        client.query(&attempts, by_id),
        client.query(&stages, by_id),
        client.query(&replays, by_id),
        client.query_opt(&open, by_id),
    )?;
    let Some(r) = r else {
        return Ok(None);
    };
    let mut calls: HashMap<String, Vec<Attempt>> = HashMap::new();
    for a in &attempts {
        calls.entry(a.get(0)).or_default().push(attempt_row(a));
    }
    let stages = stages
        .iter()
        .map(|s| {
            let report = stage_row(s);
            StageDetail {
                calls: calls.remove(&report.id).unwrap_or_default(),
                report,
            }
        })
        .collect();
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
        replayed_by: replays.iter().map(|r| r.get(0)).collect(),
        resumed: r.get::<_, i64>(13).max(0) as u32,
        finished_at: r.get::<_, Option<i64>>(14).map(super::rfc3339),
        input: Stored::from_storage(parse_value(r.get(15)).unwrap_or(Value::Null)),
        output: parse_json(r.get(16)),
        dead_letter: open.map(|r| r.get(0)),
        trace,
        trigger_info: r
            .get::<_, Option<&str>>(21)
            .and_then(parse_value)
            .map(Stored::from_storage),
        stages,
    }))
}

impl PgBackend {
    /// Blocks on `f` with the connection (opened again if it was lost).
    fn call<T>(
        &mut self,
        f: impl AsyncFnOnce(&Client, &mut Statements) -> Result<T, PgError>,
    ) -> Result<T, JournalError> {
        let shown = self.shown.clone();
        let (rt, client, statements) = self.parts()?;
        rt.block_on(f(client, statements))
            .map_err(|e| io(&shown, error_text(&e)))
    }
}

impl Backend for PgBackend {
    fn write(&mut self, batch: &[Record], durable: bool) -> Result<Vec<bool>, JournalError> {
        self.call(async |client, statements| {
            client
                .batch_execute(if durable {
                    "BEGIN"
                } else {
                    "BEGIN; SET LOCAL synchronous_commit = off"
                })
                .await?;
            let changed = if batch.is_empty() {
                // Nothing to write, but a durable request still flushes what earlier
                // asynchronous commits left: a transaction with an id commits through WAL.
                client
                    .execute("SELECT txid_current()", &[])
                    .await
                    .map(|_| Vec::new())
            } else {
                apply_all(client, statements, batch).await
            };
            finish(client, changed).await
        })
    }

    fn runs(&mut self, f: &RunFilter) -> Result<Vec<RunSummary>, JournalError> {
        let mut sql = format!("SELECT {SUMMARY_COLUMNS}, pid FROM runs WHERE true");
        let mut args: Vec<Param> = Vec::new();
        let mut add = |clause: &str, v: Param| {
            args.push(v);
            sql.push_str(&format!(" AND {clause} ${}", args.len()));
        };
        if let Some(v) = &f.pipeline {
            add("pipeline =", p(v.clone()));
        }
        if let Some(v) = &f.status {
            add("status =", p(v.clone()));
        }
        if let Some(t) = f.since_ms {
            add("started_at >=", p(t));
        }
        if let Some(t) = f.until_ms {
            add("started_at <", p(t));
        }
        if let Some(o) = &f.owner {
            add("owner =", p(o.clone()));
        }
        if f.abandoned {
            add("host =", p(super::hostname()));
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
        self.call(async |client, _| {
            let params: Vec<&(dyn ToSql + Sync)> =
                args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect();
            Ok(client
                .query(sql.as_str(), &params)
                .await?
                .iter()
                .filter(|r| !abandoned || !super::alive(r.get::<_, i64>(10) as u32))
                .map(summary)
                .collect())
        })
    }

    fn run(&mut self, id: &str) -> Result<Option<RunDetail>, JournalError> {
        self.call(async |client, statements| read_run(client, statements, id).await)
    }

    fn pending_deliveries(&mut self) -> Result<Vec<Delivery>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE status = 'pending' ORDER BY received_at, seq"
                    ),
                    &[],
                )
                .await?
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
        self.call(async |client, _| {
            Ok(client
                .query_opt(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS}, status FROM deliveries WHERE pipeline = $1 AND event_id = $2"
                    ),
                    &[&pipeline, &event_id],
                )
                .await?
                .map(|r| (delivery_row(&r), r.get::<_, &str>(8) == "done")))
        })
    }

    fn trigger_record(
        &mut self,
        pipeline: &str,
        trigger: &str,
    ) -> Result<super::TriggerRecord, JournalError> {
        self.call(async |client, _| {
            let keys: &[&(dyn ToSql + Sync)] = &[&pipeline, &trigger];
            let (fires, cursor, last) = tokio::try_join!(
                client.query_one(
                    "SELECT MAX(last_at),
                         COALESCE(SUM(CASE outcome WHEN 'skipped' THEN count ELSE 0 END), 0)::BIGINT,
                         COALESCE(SUM(CASE outcome WHEN 'missed' THEN count ELSE 0 END), 0)::BIGINT
                     FROM fires WHERE pipeline = $1 AND trigger = $2",
                    keys,
                ),
                client.query_opt(
                    "SELECT value, updated_at FROM cursors WHERE pipeline = $1 AND trigger = $2",
                    keys,
                ),
                client.query_opt(
                    "SELECT event_id, received_at, run_id FROM deliveries WHERE pipeline = $1 AND path = $2
                     ORDER BY received_at DESC, seq DESC LIMIT 1",
                    keys,
                ),
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
        self.call(async |client, _| {
            Ok(client
                .query(
                    &format!(
                        "{DEAD_LETTER_SELECT} WHERE ($1::TEXT IS NULL OR d.pipeline = $1)
                             AND ($2::TEXT IS NULL OR d.status = $2) AND ($4::TEXT IS NULL OR d.event_id = $4)
                         ORDER BY d.id DESC LIMIT $3"
                    ),
                    &[&f.pipeline, &f.status, &limit, &f.event_id],
                )
                .await?
                .iter()
                .map(dead_letter)
                .collect())
        })
    }

    fn dead_letter(&mut self, id: i64) -> Result<Option<DeadLetter>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query_opt(&format!("{DEAD_LETTER_SELECT} WHERE d.id = $1"), &[&id])
                .await?
                .map(|r| dead_letter(&r)))
        })
    }

    fn pipeline_document(&mut self, run_id: &str) -> Result<Option<String>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query_opt(
                    "SELECT p.document FROM runs r JOIN pipelines p ON p.hash = r.pipeline_hash WHERE r.id = $1",
                    &[&run_id],
                )
                .await?
                .map(|r| r.get(0)))
        })
    }

    fn cluster(&mut self) -> Result<&mut dyn super::ClusterBackend, JournalError> {
        Ok(self)
    }

    fn recorded_answers(
        &mut self,
        limit: usize,
    ) -> Result<Vec<(String, String, crate::http::Recorded)>, JournalError> {
        self.call(async |client, _| {
            let mut out: Vec<_> = client
                .query(
                    "SELECT service, method, recorded FROM attempts
                     WHERE recorded IS NOT NULL AND status BETWEEN 200 AND 299
                     ORDER BY seq DESC LIMIT $1",
                    &[&(limit as i64)],
                )
                .await?
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_shown_url_holds_no_password() {
        for url in [
            "postgres://fmhost:hunter2@db:5432/j",
            "postgres://fmhost@db/j?sslmode=disable&password=hunter2",
        ] {
            let shown = super::display_url(url);
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("db"), "{shown}");
        }
    }
}
