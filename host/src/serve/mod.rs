//! `fmhost serve`: a long-running host with an HTTP API, webhooks, metrics and
//! hot-swappable plugins.
//!
//! Runs go through the same [`Engine`] as `fmhost run` and are journaled the same way;
//! this module adds the HTTP surface, the plugin slots ([`plugins`]), webhook intake
//! ([`webhooks`], deliveries stored in the journal), recovery at start ([`recover`])
//! and shutdown.

mod alerts;
mod auth;
mod cluster;
pub use cluster::ClusterOptions;
mod conn;
mod console;
mod nats;
pub mod plugins;
pub use auth::{admin_token_from_file, default_token_file};
pub use conn::ConnLimits;
mod recover;
mod triggers;
pub mod webhooks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;

use crate::engine::{Engine, RunOptions, RunReport, RunStatus, new_run_id};
use crate::journal::{
    Delivery, DlqFilter, Journal, OWNER_SERVE, RunFilter, RunJournal, RunStart, run_journaled,
    unix_ms,
};
use crate::pipeline::{Plan, TriggerKind, Webhook};
use crate::plugin::PluginRuntime;
use crate::secrets::Secrets;
use plugins::PluginRegistry;

pub struct ServeOptions {
    pub pipelines: PathBuf,
    pub plugins: Vec<PathBuf>,
    pub listen: String,
    pub secrets: Option<PathBuf>,
    pub state: PathBuf,
    /// How long in-flight runs may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    pub on_interrupted: Interrupted,
    /// The operator's grants to plugins (`--policy`).
    pub policy: Option<PathBuf>,
    /// The API's tokens (`--api-token-file`); else `FMHOST_API_TOKEN`, else the state
    /// directory's `api-tokens`, written at first start.
    pub api_token_file: Option<PathBuf>,
    /// Names besides the listen address that requests may carry in `Host`.
    pub allowed_hosts: Vec<String>,
    /// Serve `/metrics` without a token.
    pub open_metrics: bool,
    /// Largest request bodies, per kind of route.
    pub limits: BodyLimits,
    /// Connections held at once and how long a client may take over its headers.
    pub connections: ConnLimits,
    /// Most API runs in flight (running or waiting for a plugin instance); more get 429.
    pub max_runs: usize,
    /// Journaled runs older than this are removed, at start and every hour.
    pub retain: Option<Duration>,
    /// Work with other servers as one (`--cluster`): docs/scale-out.md.
    pub cluster: Option<ClusterOptions>,
}

/// Request bodies larger than these are answered 413 without being buffered whole.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// A run's input (`POST /v1/pipelines/{name}/runs`) and other API bodies.
    pub input: usize,
    /// A webhook delivery.
    pub webhook: usize,
    /// A plugin upload (`PUT /v1/plugins/{name}`).
    pub upload: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits {
            input: 4 << 20,
            webhook: 1 << 20,
            upload: 64 << 20,
        }
    }
}

/// What a server does at start with runs it was running when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Interrupted {
    /// Run them again from their last completed stages (same run id, same idempotency keys).
    Resume,
    /// Fail them into the dead-letter queue, for `fmhost dlq retry`.
    DeadLetter,
}

/// `$XDG_DATA_HOME/fmhost`, else `~/.local/share/fmhost`, else `./.fmhost`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|d| d.join("fmhost"))
        .unwrap_or_else(|| PathBuf::from(".fmhost"))
}

struct App {
    engine: Engine,
    pipelines: HashMap<String, Arc<Plan>>,
    /// Each pipeline's file, with the plugin directories and secrets file, recorded with its runs.
    reruns: HashMap<String, crate::journal::Rerun>,
    /// Webhook paths: the pipeline, the trigger's name and its settings.
    hooks: HashMap<String, (String, String, Webhook)>,
    /// Every trigger of every served pipeline, with what it is doing.
    triggers: Vec<Arc<triggers::TriggerState>>,
    alerter: alerts::Alerter,
    plugins: Arc<PluginRegistry>,
    journal: Journal,
    tracker: TaskTracker,
    draining: AtomicBool,
    /// Digests of signed deliveries accepted recently, per path: a signed body re-sent
    /// under a new delivery id within the signature's tolerance is the same delivery.
    recent: std::sync::Mutex<Recent>,
    /// Runs started over the API and not finished; beyond `max_runs`, new ones get 429.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    max_runs: usize,
    /// The largest delivery a trigger takes (`--max-webhook-bytes`): a webhook body, a
    /// queue message with its headers.
    max_delivery_bytes: usize,
    /// What changed (a run started or ended, a dead letter, a plugin), for `/v1/events`.
    events: tokio::sync::broadcast::Sender<Value>,
    /// Cancelled at shutdown: ends the event streams so connections can drain.
    closing: tokio_util::sync::CancellationToken,
    /// This server as a worker of a cluster.
    cluster: Option<Arc<cluster::Cluster>>,
}

impl App {
    /// Tells the event streams; nobody listening is fine.
    fn announce(&self, event: Value) {
        let _ = self.events.send(event);
    }
}

/// A place among the runs in flight, given back when the run ends.
struct RunPlace(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for RunPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl App {
    /// Admission: a place for one more run, or 429 when the queue is full.
    fn admit(&self) -> Result<RunPlace, Response> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let place = RunPlace(self.in_flight.clone());
        if n >= self.max_runs {
            drop(place);
            let mut r = problem(
                StatusCode::TOO_MANY_REQUESTS,
                "too many runs",
                format!(
                    "{} runs are in flight, the most this server queues (--max-runs); retry later",
                    self.max_runs
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return Err(r);
        }
        Ok(place)
    }
}

/// Starts the server and serves until SIGTERM or Ctrl-C, then drains.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.state)
        .map_err(|e| anyhow::anyhow!("state directory {}: {e}", opts.state.display()))?;
    // One server per state directory: it alone resumes the runs journaled as its own.
    let lock_path = opts.state.join("serve.lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another fmhost serve is using the state directory {} (it holds {})",
            opts.state.display(),
            lock_path.display()
        );
    }
    // The same for a shared PostgreSQL journal, unless the servers are a cluster's
    // workers (whose runs are leased): a second server on it would resume the first
    // one's runs as its own.
    let journal_url = crate::journal::location()?;
    let _journal_lock = match journal_url.as_ref().filter(|_| opts.cluster.is_none()) {
        Some(url) => match crate::journal::postgres::ServerLock::try_take(url)? {
            Some(lock) => Some(lock),
            None => anyhow::bail!(
                "another fmhost serve is using the journal {}",
                crate::journal::postgres::display_url(url)
            ),
        },
        None => None,
    };
    let journal = Journal::open(&opts.state)?;
    let runtime = PluginRuntime::new()?;
    if let Some(path) = &opts.policy {
        runtime.set_policy(crate::plugin::Policy::load(path).map_err(anyhow::Error::msg)?);
    }
    // Versions uploaded over the API are kept here; the newest file of a name serves.
    let upload_dir = opts.state.join("plugins");
    std::fs::create_dir_all(&upload_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", upload_dir.display()))?;
    let mut plugin_dirs = opts.plugins.clone();
    plugin_dirs.push(upload_dir.clone());
    let found = runtime
        .discover_newest(&plugin_dirs)
        .await
        .map_err(|errors| {
            anyhow::anyhow!(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
    let shared_metrics = Arc::new(crate::metrics::Metrics::new());
    let registry = Arc::new(PluginRegistry::new(
        runtime.clone(),
        found,
        Some(upload_dir),
        shared_metrics.clone(),
    ));
    let components = registry.registry();

    let mut pipelines = HashMap::new();
    let mut reruns = HashMap::new();
    let mut hooks = HashMap::new();
    let mut all_triggers = Vec::new();
    let mut problems = Vec::new();
    let mut order: Vec<String> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&opts.pipelines)
        .map_err(|e| anyhow::anyhow!("pipelines directory {}: {e}", opts.pipelines.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for file in files {
        match crate::pipeline::load(&file, &components) {
            Ok(plan) => {
                let name = plan.name.to_string();
                order.push(name.clone());
                for t in &plan.triggers {
                    all_triggers.push(triggers::TriggerState::new(&name, t.clone()));
                    let TriggerKind::Webhook(w) = &t.kind else {
                        continue;
                    };
                    if let Some((other, _, _)) =
                        hooks.insert(w.path.clone(), (name.clone(), t.name.clone(), w.clone()))
                    {
                        problems.push(format!(
                            "{}: trigger path {} is also used by pipeline {other}",
                            file.display(),
                            w.path
                        ));
                    }
                }
                reruns.insert(
                    name.clone(),
                    crate::journal::Rerun::new(Some(&file), &opts.plugins, opts.secrets.as_deref()),
                );
                if pipelines.insert(name.clone(), Arc::new(plan)).is_some() {
                    problems.push(format!(
                        "{}: a second pipeline is named \"{name}\"",
                        file.display()
                    ));
                }
            }
            Err(e) => problems.extend(e.lines()),
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    registry.set_uses(
        pipelines
            .values()
            .flat_map(|plan| {
                plan.stages.iter().map(|st| plugins::StageUse {
                    pipeline: plan.name.to_string(),
                    stage: st.id.to_string(),
                    component: crate::component::canonical_name(&st.component_name),
                    config: plan.source["stages"]
                        .as_array()
                        .and_then(|all| all.iter().find(|s| s["id"] == *st.id))
                        .map(|s| s["config"].clone())
                        .unwrap_or_default(),
                })
            })
            .collect(),
    );

    let mut engine = Engine::new(Secrets::load(opts.secrets.as_deref())?);
    engine.outbound.metrics = shared_metrics;
    let cluster = match &opts.cluster {
        Some(c) => {
            let joined = cluster::Cluster::join(c, &engine.secrets(), journal_url).await?;
            engine.outbound.quota = Some(Arc::new(cluster::JournalQuota(journal.clone())));
            Some(Arc::new(joined))
        }
        None => None,
    };
    engine.fixed_now = std::env::var("FMHOST_NOW").ok().map(Arc::from);
    // One live state per service, owned by its first declaration in file order; a
    // conflicting one is reported now rather than discovered under load.
    for name in &order {
        for (service, policy) in &pipelines[name].services {
            if let Err(why) =
                engine
                    .outbound
                    .services
                    .configure(service, policy, &format!("pipeline {name}"))
            {
                eprintln!("warning: {why}");
            }
        }
    }
    let app = Arc::new(App {
        engine,
        pipelines,
        reruns,
        hooks,
        triggers: all_triggers,
        alerter: alerts::Alerter::default(),
        plugins: registry.clone(),
        journal,
        tracker: TaskTracker::new(),
        draining: AtomicBool::new(false),
        recent: std::sync::Mutex::default(),
        in_flight: Arc::default(),
        max_runs: opts.max_runs,
        max_delivery_bytes: opts.limits.webhook,
        events: tokio::sync::broadcast::channel(256).0,
        closing: tokio_util::sync::CancellationToken::new(),
        cluster,
    });
    // Schema drift keeps comparing with the shapes recorded before this start.
    match app.journal.recorded_answers(5000).await {
        Ok(answers) => {
            let mut learned = 0;
            for (service, method, rec) in answers {
                if rec.truncated
                    || !rec
                        .content_type
                        .as_deref()
                        .is_some_and(|c| c.contains("json"))
                {
                    continue;
                }
                if let Ok(body) = serde_json::from_str::<Value>(&rec.body) {
                    let endpoint = crate::http::drift::endpoint(&method, &rec.url);
                    app.engine.outbound.shapes.learn(&service, &endpoint, &body);
                    learned += 1;
                }
            }
            if learned > 0 {
                tracing::info!(target: "fmhost::serve", learned, "schema drift: learned the shapes of {learned} recorded answer(s) from the journal");
            }
        }
        Err(e) => {
            tracing::warn!(target: "fmhost::serve", "schema drift: cannot read recorded answers from the journal: {e}")
        }
    }
    let event_tx = app.events.clone();
    registry.set_listener(Arc::new(move |event| {
        let _ = event_tx.send(event);
    }));

    // Bound before anything runs, so no plugin can reach this server's own address.
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr()?;
    runtime.add_own_addr(addr);

    // Schedules, polls and file drops start runs from now on; breakers raise alerts.
    let background = match &app.cluster {
        // A cluster's unfinished runs are its leader's to queue again, as their leases
        // run out.
        Some(cluster) => {
            let mut started = triggers::start(&app, triggers::Part::Worker);
            started.extend(cluster::start(&app, cluster));
            started
        }
        None => {
            // Runs and deliveries a crash or a drain timeout left unfinished.
            recover::recover(&app, opts.on_interrupted).await?;
            triggers::start(&app, triggers::Part::All)
        }
    };
    watch_breakers(&app);

    // A rotated secrets file applies from the next stage that starts; no restart.
    let _secrets_watch = match &opts.secrets {
        Some(path) => {
            let engine = app.engine.clone();
            Some(
                crate::secrets::watch_file(path, move |s| engine.set_secrets(s)).map_err(|e| {
                    anyhow::anyhow!("cannot watch the secrets file {}: {e}", path.display())
                })?,
            )
        }
        None => None,
    };
    let _watcher = plugins::watch(registry, opts.plugins.clone())
        .map_err(|e| anyhow::anyhow!("cannot watch the plugin directories: {e}"))?;

    let (tokens, created) = auth::Tokens::load(
        opts.api_token_file.as_deref(),
        std::env::var("FMHOST_API_TOKEN").ok(),
        &opts.state,
    )
    .map_err(anyhow::Error::msg)?;
    let guard = Arc::new(auth::Guard {
        tokens,
        sessions: auth::Sessions::default(),
        listen: addr,
        names: opts
            .allowed_hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect(),
        metrics_need_token: !opts.open_metrics,
    });
    let token_note = format!(
        "API tokens: {}{}",
        guard.tokens.source,
        if created {
            " (created now; keep it private)"
        } else {
            ""
        }
    );
    let limits = opts.limits;
    let router = Router::new()
        .route(
            "/v1/pipelines/{name}/runs",
            post(start_run).layer(DefaultBodyLimit::max(limits.input)),
        )
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/replay", post(replay_run))
        .route("/v1/dlq", get(list_dlq))
        .route("/v1/dlq/{id}", get(get_dlq).delete(drop_dlq))
        .route("/v1/dlq/{id}/retry", post(retry_dlq))
        .route("/v1/plugins", get(list_plugins))
        .route(
            "/v1/plugins/{name}",
            axum::routing::put(put_plugin).layer(DefaultBodyLimit::max(limits.upload)),
        )
        .route("/v1/plugins/{name}/rollback", post(rollback_plugin))
        .route("/v1/plugins/{name}/promote", post(promote_plugin))
        .route(
            "/v1/plugins/{name}/shadow",
            post(shadow_plugin).layer(DefaultBodyLimit::max(limits.upload)),
        )
        .route("/v1/pipelines", get(list_pipelines))
        .route("/v1/pipelines/{name}/graph", get(pipeline_graph))
        .route("/v1/services", get(list_services))
        .route("/v1/triggers", get(list_triggers))
        .route("/v1/cluster", get(cluster_state))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(limits.webhook))
        .with_state(app.clone())
        .merge(console::routes(guard.clone()))
        .layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            auth::guard,
        ));
    // Jupyter's way in: a one-time code in a URL only the operator sees.
    let sign_in = format!(
        "http://{addr}/?code={}",
        guard.sessions.issue_code(auth::Scope::Admin)
    );
    {
        // One write, errors ignored: whoever reads the address may close stdout after it.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(
            format!("listening on http://{addr}\n{token_note}\nconsole: {sign_in}\n").as_bytes(),
        );
        let _ = out.flush();
    }
    tracing::info!(target: "fmhost::serve", %addr, pipelines = app.pipelines.len(), "serving {} pipeline(s) on http://{addr}; {token_note}", app.pipelines.len());

    if let Some(age) = opts.retain {
        let journal = app.journal.clone();
        let closing = app.closing.clone();
        tokio::spawn(async move {
            loop {
                let before = unix_ms(SystemTime::now() - age);
                match journal.prune(before, false, false).await {
                    Ok(p) if p.removed > 0 => {
                        tracing::info!(target: "fmhost::journal", removed = p.removed, kept = p.kept, "retention: removed {} run(s) older than {}", p.removed, humantime::format_duration(age))
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(target: "fmhost::journal", "retention: {e}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    _ = closing.cancelled() => break,
                }
            }
        });
    }
    let app_for_signal = app.clone();
    conn::serve(listener, router, opts.connections, async move {
        shutdown_signal().await;
        app_for_signal.draining.store(true, Ordering::SeqCst);
        app_for_signal.closing.cancel();
        tracing::info!(target: "fmhost::serve", "shutting down: no new requests; waiting for in-flight runs");
    })
    .await;
    app.tracker.close();
    if tokio::time::timeout(opts.drain_timeout, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(target: "fmhost::serve", "drain timeout: {} background run(s) still running; accepted deliveries will resume at next start", app.tracker.len());
        if let Some(cluster) = &app.cluster {
            cluster::release(&app, cluster).await;
        }
    }
    background.into_iter().for_each(|t| t.abort());
    if let Err(e) = app.journal.commit(true).await {
        tracing::error!(target: "fmhost::serve", "journal: {e}");
    }
    tracing::info!(target: "fmhost::serve", "stopped");
    drop(lock);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// An RFC 9457 problem body.
fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail.into()});
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn run_status_code(report: &RunReport) -> StatusCode {
    match report.status {
        RunStatus::Succeeded => StatusCode::OK,
        RunStatus::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        RunStatus::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl App {
    /// A journal entry for a new run of `plan` by this server.
    fn run_start(&self, plan: &Plan, run_id: String, trigger: &str, input: &Value) -> RunStart {
        RunStart::new(
            run_id,
            &plan.name,
            self.rerun(&plan.name),
            trigger,
            OWNER_SERVE,
            self.engine.secrets().store(input),
        )
    }

    /// Where a pipeline's runs can be loaded again from.
    fn rerun(&self, pipeline: &str) -> crate::journal::Rerun {
        self.reruns.get(pipeline).cloned().unwrap_or_default()
    }
}

/// Runs `plan`, journaled; returns once the run is committed.
/// Runs and journals a run; `Err` only when it could not start (its input).
async fn execute(
    app: &App,
    plan: Arc<Plan>,
    input: Value,
    start: RunStart,
    reuse: Option<crate::engine::Reuse>,
) -> Result<RunReport, String> {
    match execute_kept(app, plan, input, start, reuse).await {
        Ok((report, Err(e))) => {
            tracing::error!(target: "fmhost::serve", run_id = %report.run_id, "run finished but is not fully journaled: {e}");
            Ok(report)
        }
        Ok((report, Ok(()))) => Ok(report),
        Err(e) => Err(e),
    }
}

/// [`execute`], also saying whether the run's records were committed.
async fn execute_kept(
    app: &App,
    plan: Arc<Plan>,
    input: Value,
    start: RunStart,
    reuse: Option<crate::engine::Reuse>,
) -> Result<(RunReport, Result<(), crate::journal::JournalError>), String> {
    let (run_id, pipeline) = (start.run_id.clone(), start.pipeline.clone());
    app.announce(
        json!({"type": "run", "run_id": run_id, "pipeline": pipeline, "status": "running"}),
    );
    let watcher = RunJournal::following(app.journal.clone(), start, &app.engine);
    triggers::prepare_run(app, &plan, &watcher);
    let opts = RunOptions {
        reuse: reuse.map(Arc::new),
        ..RunOptions::default()
    };
    let result = run_journaled(&app.engine, plan, input, opts, Some(watcher.clone()))
        .await
        .map_err(|e| e.to_string());
    let status = match &result {
        Ok((report, _)) => report.status.as_str(),
        Err(_) => "failed",
    };
    match &result {
        Ok((report, _)) => after_run(
            app,
            watcher.start(),
            report.status,
            report.error.as_deref(),
            crate::journal::run_error_kind(report).as_deref(),
            report.failed_stage.as_deref(),
        ),
        Err(e) => after_run(
            app,
            watcher.start(),
            RunStatus::Failed,
            Some(e),
            Some("validation"),
            None,
        ),
    }
    app.announce(json!({"type": "run", "run_id": run_id, "pipeline": pipeline, "status": status}));
    result
}

/// The answer for a run the client waited for: its report, or 503 when the journal
/// could not keep it (a 200 must mean the run is on record).
fn kept_answer(
    result: Result<(RunReport, Result<(), crate::journal::JournalError>), String>,
) -> Response {
    match result {
        Ok((report, Ok(()))) => (run_status_code(&report), Json(report)).into_response(),
        Ok((report, Err(e))) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal unavailable",
            format!(
                "run {} ended {} but could not be recorded ({e}); it is not kept",
                report.run_id,
                report.status.as_str()
            ),
        ),
        Err(e) => problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid input", e),
    }
}

/// Records a run's start durably before anything is answered or run: when the journal
/// cannot write, the client gets 503 and nothing was accepted.
async fn announce_durably(app: &App, start: &RunStart) -> Result<(), Response> {
    app.journal
        .record_durably(crate::journal::Record::RunStarted(start.clone()))
        .await
        .map(|_| ())
        .map_err(|e| {
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "journal unavailable",
                format!("the run was not started: {e}"),
            )
        })
}

async fn start_run(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
            "the server is draining and accepts no new runs",
        );
    }
    let Some(plan) = app.pipelines.get(&name).cloned() else {
        let known: Vec<&String> = app.pipelines.keys().collect();
        return problem(
            StatusCode::NOT_FOUND,
            "unknown pipeline",
            format!("no pipeline named \"{name}\" (known: {known:?})"),
        );
    };
    let input: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid input",
                    format!("request body: line {} column {}: {e}", e.line(), e.column()),
                );
            }
        }
    };
    if let Err(e) = Engine::check_input(&plan, &input) {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid input",
            e.to_string(),
        );
    }
    let run_id = new_run_id();
    let mut start = app.run_start(&plan, run_id.clone(), "api", &input);
    start.trace = crate::otel::run_trace(
        &run_id,
        headers.get("traceparent").and_then(|v| v.to_str().ok()),
    );
    let mode = q.get("mode").map(String::as_str);
    if let Some(other) = mode.filter(|m| !matches!(*m, "sync" | "async")) {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid mode",
            format!("mode must be sync or async, not {other:?}"),
        );
    }
    if let (Some(cluster), Some("async")) = (&app.cluster, mode) {
        // Any worker of the cluster runs it; on record (synced) before it is answered.
        start.queued = true;
        if let Err(refused) = announce_durably(&app, &start).await {
            return refused;
        }
        if let Err(e) = cluster.dispatch(&run_id, 0).await {
            tracing::warn!(target: "fmhost::serve", %run_id, "run {run_id} is journaled but not yet queued ({e}); the leader queues it");
        }
        return (StatusCode::ACCEPTED, Json(json!({"run_id": run_id, "status": "running", "href": format!("/v1/runs/{run_id}")}))).into_response();
    }
    let place = match app.admit() {
        Ok(p) => p,
        Err(full) => return full,
    };
    // On record (synced) before it runs or is answered, so it can be looked up at once.
    if let Err(refused) = announce_durably(&app, &start).await {
        return refused;
    }
    match mode {
        None | Some("sync") => {
            // The run is its own task: a client that hangs up does not cut it short.
            let app2 = app.clone();
            let run = app.tracker.spawn(async move {
                let _place = place;
                execute_kept(&app2, plan, input, start, None).await
            });
            match run.await {
                Ok(result) => kept_answer(result),
                Err(e) => problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "run failed",
                    e.to_string(),
                ),
            }
        }
        Some(_) => {
            let app2 = app.clone();
            app.tracker.spawn(async move {
                let _place = place;
                let _ = execute(&app2, plan, input, start, None).await;
            });
            (StatusCode::ACCEPTED, Json(json!({"run_id": run_id, "status": "running", "href": format!("/v1/runs/{run_id}")}))).into_response()
        }
    }
}

/// Names taken from a request path (plugin names, run ids) are checked against a strict
/// pattern before they are used anywhere, the filesystem included.
/// The signed bodies accepted within their signature's tolerance: (path, digest) → the
/// first delivery id and when it stops counting. Expired entries are swept at most once
/// a second, so accepting a delivery costs the same with 100,000 in the window as with one.
#[derive(Default)]
struct Recent {
    seen: HashMap<(String, String), (std::time::Instant, String)>,
    swept: Option<std::time::Instant>,
}

impl Recent {
    /// Signed bodies remembered at most: beyond them, a repeat is found by its event id.
    const MAX: usize = 100_000;

    fn first(&self, key: &(String, String)) -> Option<&str> {
        let (until, first) = self.seen.get(key)?;
        (*until > std::time::Instant::now()).then_some(first.as_str())
    }

    fn insert(&mut self, key: (String, String), window: Duration, event_id: &str) {
        let now = std::time::Instant::now();
        if self
            .swept
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.seen.retain(|_, (until, _)| *until > now);
            self.swept = Some(now);
        }
        if self.seen.len() < Self::MAX {
            self.seen.insert(key, (now + window, event_id.to_string()));
        }
    }
}

fn checked_name(what: &str, name: &str) -> Result<(), Response> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(problem(
            StatusCode::BAD_REQUEST,
            "invalid name",
            format!("{what} {name:?} is not 1 to 128 letters, digits, '-' or '_'"),
        ))
    }
}

fn journal_problem(e: crate::journal::JournalError) -> Response {
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "journal unavailable",
        e.to_string(),
    )
}

async fn get_run(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if let Err(r) = checked_name("run id", &id) {
        return r;
    }
    // Whatever this server has queued for the run is visible once committed.
    let read = async {
        app.journal.commit(false).await?;
        app.journal.run(&id).await
    };
    match read.await {
        Ok(Some(run)) => Json(run).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "unknown run",
            format!("no run {id} in the journal"),
        ),
        Err(e) => journal_problem(e),
    }
}

/// `GET /v1/runs?pipeline=&status=&since=&until=&limit=`
async fn list_runs(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let time = |k: &str| {
        q.get(k)
            .map(|t| crate::journal::parse_time(t).map_err(|e| format!("{k}: {e}")))
            .transpose()
    };
    let (since_ms, until_ms) = match (time("since"), time("until")) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => {
            return problem(StatusCode::BAD_REQUEST, "invalid query", e);
        }
    };
    let filter = RunFilter {
        pipeline: q.get("pipeline").cloned(),
        status: q.get("status").cloned(),
        since_ms,
        until_ms,
        limit: q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(1000),
        ..RunFilter::default()
    };
    match app.journal.runs(filter).await {
        Ok(runs) => Json(runs).into_response(),
        Err(e) => journal_problem(e),
    }
}

/// Replays a journaled run with this server's plugins, synchronously: the pipeline as
/// the run ran it (the journal keeps each document), or the one served today.
async fn replay(
    app: &Arc<App>,
    run_id: &str,
    from: Option<&str>,
    input: Option<Value>,
    trigger: &str,
    current_pipeline: bool,
) -> Result<RunReport, Response> {
    let original = match app.journal.run(run_id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "unknown run",
                format!("no run {run_id} in the journal"),
            ));
        }
        Err(e) => return Err(journal_problem(e)),
    };
    let kept = if current_pipeline {
        None
    } else {
        app.journal
            .pipeline_document(run_id)
            .await
            .map_err(journal_problem)?
    };
    let plan = match kept {
        Some(document) => {
            let dir = original
                .rerun
                .pipeline_file
                .as_deref()
                .and_then(|f| std::path::Path::new(f).parent());
            let shown = format!("the pipeline run {run_id} ran");
            let plan = crate::pipeline::load_text(&document, &shown, dir, &app.plugins.registry())
                .map_err(|e| {
                    problem(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "cannot replay",
                        format!("{e}; replay with ?current_pipeline=true to run today's"),
                    )
                })?;
            Arc::new(plan)
        }
        None => match app.pipelines.get(&original.summary.pipeline).cloned() {
            Some(plan) => plan,
            None => {
                return Err(problem(
                    StatusCode::CONFLICT,
                    "unknown pipeline",
                    format!(
                        "run {run_id} is of pipeline \"{}\", which this server does not serve",
                        original.summary.pipeline
                    ),
                ));
            }
        },
    };
    let prepared = crate::journal::replay::prepare(
        &plan,
        &original,
        from,
        input,
        trigger,
        OWNER_SERVE,
        &app.engine.secrets(),
    )
    .map_err(|e| problem(StatusCode::UNPROCESSABLE_ENTITY, "cannot replay", e))?;
    let mut start = prepared.start;
    start.rerun = app.rerun(&plan.name);
    announce_durably(app, &start).await?;
    match execute_kept(app, plan, prepared.input, start, Some(prepared.reuse)).await {
        Ok((report, Ok(()))) => Ok(report),
        other => Err(kept_answer(other)),
    }
}

/// `POST /v1/runs/{id}/replay?from=STAGE`, with an optional new input as the body.
async fn replay_run(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Err(r) = checked_name("run id", &id) {
        return r;
    }
    let input = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid input",
                    format!("request body: line {} column {}: {e}", e.line(), e.column()),
                );
            }
        }
    };
    match replay(
        &app,
        &id,
        q.get("from").map(String::as_str),
        input,
        "replay",
        q.get("current_pipeline")
            .is_some_and(|v| v == "true" || v == "1"),
    )
    .await
    {
        Ok(report) => (run_status_code(&report), Json(report)).into_response(),
        Err(resp) => resp,
    }
}

/// `GET /v1/dlq?pipeline=&status=open|resolved|dropped|all`
async fn list_dlq(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let status = match q.get("status").map(String::as_str) {
        None => Some("open".to_string()),
        Some("all") => None,
        Some(s) => Some(s.to_string()),
    };
    let filter = DlqFilter {
        pipeline: q.get("pipeline").cloned(),
        status,
        event_id: q.get("event_id").cloned(),
        limit: q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0),
    };
    match app.journal.dead_letters(filter).await {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => journal_problem(e),
    }
}

async fn dead_letter(app: &App, id: i64) -> Result<crate::journal::DeadLetter, Response> {
    match app.journal.dead_letter(id).await {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(problem(
            StatusCode::NOT_FOUND,
            "unknown dead letter",
            format!("no dead letter {id}"),
        )),
        Err(e) => Err(journal_problem(e)),
    }
}

async fn get_dlq(State(app): State<Arc<App>>, Path(id): Path<i64>) -> Response {
    match dead_letter(&app, id).await {
        Ok(e) => Json(e).into_response(),
        Err(resp) => resp,
    }
}

/// Retries an open entry by replaying its run; answers with the entry and the run.
async fn retry_dlq(State(app): State<Arc<App>>, Path(id): Path<i64>) -> Response {
    let entry = match dead_letter(&app, id).await {
        Ok(e) if e.status == "open" => e,
        Ok(e) => {
            return problem(
                StatusCode::CONFLICT,
                "not open",
                format!("dead letter {id} is {}", e.status),
            );
        }
        Err(resp) => return resp,
    };
    let report = match replay(&app, &entry.run_id, None, None, "dlq-retry", false).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let entry = match dead_letter(&app, id).await {
        Ok(e) => e,
        Err(resp) => return resp,
    };
    (
        run_status_code(&report),
        Json(json!({"dead_letter": entry, "run": report})),
    )
        .into_response()
}

async fn drop_dlq(State(app): State<Arc<App>>, Path(id): Path<i64>) -> Response {
    match app.journal.drop_dead_letter(id).await {
        Ok(true) => match dead_letter(&app, id).await {
            Ok(e) => {
                app.announce(json!({"type": "dlq", "id": id, "status": e.status}));
                Json(e).into_response()
            }
            Err(resp) => resp,
        },
        Ok(false) => problem(
            StatusCode::NOT_FOUND,
            "no open dead letter",
            format!("no open dead letter {id}"),
        ),
        Err(e) => journal_problem(e),
    }
}

async fn list_plugins(State(app): State<Arc<App>>) -> Response {
    Json(app.plugins.list()).into_response()
}

#[derive(serde::Deserialize)]
struct SwapQuery {
    /// The operator approves, in this call, hosts or a world the current version lacks.
    #[serde(default)]
    approve: bool,
    /// Start the upload as a canary serving this percentage of new runs.
    canary: Option<u32>,
    /// Let the canary promote or roll back itself.
    #[serde(default)]
    auto: bool,
    /// With `auto`: ok canary runs before promotion (default 20).
    promote_after: Option<u64>,
    /// With `auto`: how far the canary's run error rate may exceed the current
    /// version's before it is rolled back, as a fraction (default 0).
    max_error_rate_excess: Option<f64>,
}

impl SwapQuery {
    fn canary(&self) -> Result<Option<plugins::CanarySpec>, (&'static str, String)> {
        let Some(percent) = self.canary else {
            if self.auto || self.promote_after.is_some() || self.max_error_rate_excess.is_some() {
                return Err((
                    "not a canary",
                    "auto, promote_after and max_error_rate_excess go with canary=PERCENT"
                        .to_string(),
                ));
            }
            return Ok(None);
        };
        let defaults = plugins::AutoRule::default();
        let excess = self
            .max_error_rate_excess
            .unwrap_or(defaults.max_error_rate_excess);
        if !(0.0..=1.0).contains(&excess) {
            return Err((
                "bad max_error_rate_excess",
                format!("max_error_rate_excess is a fraction from 0 to 1, not {excess}"),
            ));
        }
        if self.promote_after == Some(0) {
            return Err((
                "bad promote_after",
                "promote_after is at least 1 run".to_string(),
            ));
        }
        Ok(Some(plugins::CanarySpec {
            percent,
            auto: (self.auto
                || self.promote_after.is_some()
                || self.max_error_rate_excess.is_some())
            .then_some(plugins::AutoRule {
                promote_after: self.promote_after.unwrap_or(defaults.promote_after),
                max_error_rate_excess: excess,
            }),
        }))
    }
}

async fn put_plugin(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<SwapQuery>,
    body: Bytes,
) -> Response {
    if let Err(r) = checked_name("plugin name", &name) {
        return r;
    }
    if body.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "empty upload",
            "the request body must be a WebAssembly component",
        );
    }
    let canary = match q.canary() {
        Ok(c) => c,
        Err((title, detail)) => return problem(StatusCode::BAD_REQUEST, title, detail),
    };
    match app
        .plugins
        .swap(&name, &body, &format!("upload:{name}"), q.approve, canary)
        .await
    {
        Ok((old, new)) => {
            match canary {
                None => {
                    if let Some(cluster) = &app.cluster {
                        cluster
                            .announce_plugin(&app, &name, "swap", Some(body.to_vec()), q.approve)
                            .await;
                    }
                    app.announce(json!({"type": "plugin", "name": name, "version": new.version}));
                    Json(json!({"name": name, "previous_version": old, "version": new.version, "sha256": new.hash})).into_response()
                }
                Some(spec) => {
                    app.announce(json!({"type": "plugin", "name": name, "version": old, "canary": "started"}));
                    Json(json!({"name": name, "version": old, "canary": {"version": new.version, "sha256": new.hash, "percent": spec.percent, "auto": spec.auto}})).into_response()
                }
            }
        }
        Err(plugins::SwapError::Unknown(n)) => problem(
            StatusCode::NOT_FOUND,
            "unknown plugin",
            format!("no plugin named \"{n}\"; the current version keeps serving"),
        ),
        Err(e @ plugins::SwapError::NeedsApproval(_)) => problem(
            StatusCode::CONFLICT,
            "approval needed",
            format!("{e}; the current version keeps serving"),
        ),
        Err(e) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "plugin refused",
            format!("{e}; the current version keeps serving"),
        ),
    }
}

async fn rollback_plugin(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    if let Err(r) = checked_name("plugin name", &name) {
        return r;
    }
    // Ending a canary changes only this worker: a canary is a share of its own runs.
    let had_canary = app
        .plugins
        .list()
        .iter()
        .any(|p| p["name"] == name.as_str() && !p["canary"].is_null());
    match app.plugins.rollback(&name) {
        Ok((from, to)) => {
            if let Some(cluster) = app.cluster.as_ref().filter(|_| !had_canary) {
                cluster
                    .announce_plugin(&app, &name, "rollback", None, false)
                    .await;
            }
            app.announce(json!({"type": "plugin", "name": name, "version": to}));
            Json(json!({"name": name, "previous_version": from, "version": to})).into_response()
        }
        Err(e @ plugins::SwapError::Unknown(_)) => {
            problem(StatusCode::NOT_FOUND, "unknown plugin", e.to_string())
        }
        Err(e) => problem(StatusCode::CONFLICT, "nothing to roll back", e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct ShadowQuery {
    pipeline: String,
    #[serde(default = "default_shadow_runs")]
    runs: usize,
    /// An age (`7d`), RFC 3339 or a date.
    since: Option<String>,
    #[serde(default)]
    current_pipeline: bool,
}

fn default_shadow_runs() -> usize {
    20
}

/// Most runs one shadow request replays.
const MAX_SHADOW_RUNS: usize = 1000;

/// `POST /v1/plugins/{name}/shadow?pipeline=NAME[&runs=N][&since=7d]`, the candidate
/// component as the body: `fmhost plugins test` on this server's journal.
async fn shadow_plugin(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<ShadowQuery>,
    body: Bytes,
) -> Response {
    if let Err(r) = checked_name("plugin name", &name) {
        return r;
    }
    if body.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "empty upload",
            "the request body must be the candidate WebAssembly component",
        );
    }
    if q.runs == 0 || q.runs > MAX_SHADOW_RUNS {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad runs",
            format!("runs is from 1 to {MAX_SHADOW_RUNS}, not {}", q.runs),
        );
    }
    let since_ms = match q.since.as_deref().map(crate::journal::parse_time) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return problem(StatusCode::BAD_REQUEST, "bad since", e),
    };
    let (registry, candidate) = match app.plugins.with_candidate(&name, &body).await {
        Ok(r) => r,
        Err(e @ plugins::SwapError::Unknown(_)) => {
            return problem(StatusCode::NOT_FOUND, "unknown plugin", e.to_string());
        }
        Err(e) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "plugin refused",
                e.to_string(),
            );
        }
    };
    let request = crate::shadow::Request {
        journal: &app.journal,
        registry: &registry,
        plugin: &name,
        pipeline: &q.pipeline,
        since_ms,
        runs: q.runs,
        current_pipeline: q.current_pipeline,
        granted_secrets: app.plugins.granted_secrets(),
    };
    match crate::shadow::shadow(&request, &|_, _| {}).await {
        Ok(report) => {
            let mut v = serde_json::to_value(&report).unwrap_or_default();
            v["candidate"] = json!({"version": candidate.version, "sha256": candidate.hash});
            Json(v).into_response()
        }
        Err(e) => problem(StatusCode::UNPROCESSABLE_ENTITY, "cannot shadow", e),
    }
}

/// `POST /v1/plugins/{name}/promote`: the canary serves every run.
async fn promote_plugin(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    if let Err(r) = checked_name("plugin name", &name) {
        return r;
    }
    match app.plugins.promote(&name) {
        Ok((from, to)) => {
            // The promoted canary becomes every worker's version.
            if let Some(cluster) = &app.cluster {
                let file = app
                    .plugins
                    .list()
                    .into_iter()
                    .find(|p| p["name"] == name.as_str())
                    .and_then(|p| p["file"].as_str().map(PathBuf::from));
                match file.map(std::fs::read) {
                    Some(Ok(bytes)) => {
                        cluster
                            .announce_plugin(&app, &name, "swap", Some(bytes), true)
                            .await
                    }
                    _ => {
                        tracing::error!(target: "fmhost::serve", plugin = %name, "plugin {name}: promoted here, but its component cannot be read to send to the other workers")
                    }
                }
            }
            Json(json!({"name": name, "previous_version": from, "version": to})).into_response()
        }
        Err(e @ plugins::SwapError::Unknown(_)) => {
            problem(StatusCode::NOT_FOUND, "unknown plugin", e.to_string())
        }
        Err(e) => problem(StatusCode::CONFLICT, "no canary", e.to_string()),
    }
}

/// `GET /v1/pipelines`: what this server serves.
async fn list_pipelines(State(app): State<Arc<App>>) -> Response {
    let mut list: Vec<Value> = app
        .pipelines
        .values()
        .map(|p| {
            json!({
                "name": &*p.name,
                "version": p.version,
                "description": p.description,
                "stages": p.stages.len(),
                "triggers": p.triggers.iter().map(|t| match &t.kind {
                    TriggerKind::Webhook(w) => w.path.clone(),
                    _ => format!("{}:{}", t.type_name(), t.name),
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(list).into_response()
}

/// `GET /v1/pipelines/{name}/graph`: the DAG the console draws (as `fmhost graph --format json`).
async fn pipeline_graph(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.pipelines.get(&name) {
        Some(plan) => Json(crate::draw::dag(plan)).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "unknown pipeline",
            format!("no pipeline named \"{name}\""),
        ),
    }
}

/// `GET /v1/services`: each service's calls since start: success rate, latency, errors
/// by kind, breaker state.
async fn list_services(State(app): State<Arc<App>>) -> Response {
    let list: Vec<Value> = app
        .engine
        .outbound
        .metrics
        .snapshot()
        .into_iter()
        .map(|(name, s)| {
            let calls = s.calls();
            json!({
                "service": name,
                "calls": calls,
                "success": s.success,
                "success_rate": if calls == 0 { Value::Null } else { json!(s.success as f64 / calls as f64) },
                "p50_ms": s.percentile_ms(0.5),
                "p99_ms": s.percentile_ms(0.99),
                "errors": s.errors,
                "breaker": s.breaker.as_str(),
                "rate_limit": s.headroom.map(|(remaining, limit)| json!({"remaining": remaining, "limit": limit})),
            })
        })
        .collect();
    Json(list).into_response()
}

/// `GET /v1/triggers`: the webhook paths and the pipelines they start.
async fn list_triggers(State(app): State<Arc<App>>) -> Response {
    let mut list = Vec::with_capacity(app.triggers.len());
    for t in &app.triggers {
        list.push(t.describe(&app).await);
    }
    list.sort_by(|a, b| {
        (a["pipeline"].as_str(), a["name"].as_str())
            .cmp(&(b["pipeline"].as_str(), b["name"].as_str()))
    });
    Json(list).into_response()
}

/// `GET /v1/events`: server-sent events, one per change, until the server shuts down.
async fn events(State(app): State<Arc<App>>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    let rx = tokio_stream_of(app.events.subscribe());
    let closing = app.closing.clone();
    let stream = rx
        .map(|v| Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string())))
        .take_until(async move { closing.cancelled().await });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A broadcast receiver as a stream; a listener that falls behind skips what it missed.
fn tokio_stream_of(
    rx: tokio::sync::broadcast::Receiver<Value>,
) -> impl futures::Stream<Item = Value> {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((v, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.engine.outbound.metrics.encode(),
    )
        .into_response()
}

/// This worker's place in its cluster; 404 for a server on its own.
async fn cluster_state(State(app): State<Arc<App>>) -> Response {
    match &app.cluster {
        Some(c) => Json(c.describe()).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "not in a cluster",
            "this server runs on its own (fmhost serve --cluster joins one)",
        ),
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        problem(StatusCode::SERVICE_UNAVAILABLE, "draining", "shutting down")
    } else {
        "ready".into_response()
    }
}

async fn fallback(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((pipeline, trigger_name, trigger)) = app.hooks.get(uri.path()).cloned() else {
        return problem(
            StatusCode::NOT_FOUND,
            "not found",
            format!("no route for {method} {}", uri.path()),
        );
    };
    if method != Method::POST {
        return problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "webhooks take POST",
        );
    }
    if app.draining.load(Ordering::SeqCst) {
        // The sender will retry; nothing was accepted.
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
            "retry later",
        );
    }
    let secret = match crate::secrets::whole_secret(&trigger.secret) {
        Some(name) => app.engine.secrets().get(name).map(str::to_string),
        None if !trigger.secret.contains("{{") => Some(trigger.secret.clone()),
        None => None,
    };
    let secret = match secret {
        Some(s) if !s.is_empty() => s,
        _ => {
            tracing::error!(target: "fmhost::serve", path = %trigger.path, "webhook secret for {} is not set; refusing deliveries", trigger.path);
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "webhook misconfigured",
                "the signing secret is not set on this server",
            );
        }
    };
    if let Err(why) = webhooks::verify(&trigger, &secret, &headers, &body, SystemTime::now()) {
        tracing::warn!(target: "fmhost::serve", path = %trigger.path, "rejected webhook delivery: {why}");
        return problem(
            StatusCode::UNAUTHORIZED,
            "invalid signature",
            why.to_string(),
        );
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid payload",
                format!("body is not JSON: {e}"),
            );
        }
    };
    let event_id = webhooks::event_id(&trigger, &headers, &payload, &body);
    let digest = crate::plugin::content_hash(&body);
    let window = Duration::from_secs(trigger.tolerance_seconds);
    let key = (trigger.path.clone(), digest);
    let first = app
        .recent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .first(&key)
        .map(str::to_string);
    if let Some(first) = first
        && first != event_id
    {
        tracing::info!(target: "fmhost::serve", path = %trigger.path, "delivery {event_id} repeats the signed body of {first}; not run again");
        return Json(json!({"event_id": first, "duplicate": true})).into_response();
    }
    let received_at = unix_ms(SystemTime::now());
    let info = json!({
        "type": "webhook",
        "name": trigger_name,
        "id": event_id,
        "fired_at": crate::journal::rfc3339(received_at),
        "path": trigger.path,
    });
    let delivery = Delivery {
        pipeline: pipeline.clone(),
        event_id: event_id.clone(),
        path: trigger.path.clone(),
        received_at,
        trigger_info: Some(app.engine.secrets().store(&info)),
        payload: app.engine.secrets().store(&payload),
        run_id: new_run_id(),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::trace::SpanRef::parse(v).is_some())
            .map(str::to_string),
    };
    // Acknowledged only once it is in the journal, synced to disk (secret values as references).
    match app.journal.accept_delivery(delivery.clone()).await {
        Ok(false) => Json(json!({"event_id": event_id, "duplicate": true})).into_response(),
        Ok(true) => {
            {
                app.recent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, window, &event_id);
            }
            let run_id = delivery.run_id.clone();
            if let Some(cluster) = &app.cluster {
                // Any worker runs it; the journal has it, whatever becomes of the queue.
                if let Err(e) = cluster.enqueue(&app, delivery_start(&app, &delivery)).await {
                    tracing::error!(target: "fmhost::serve", "delivery {event_id} is accepted but its run is not yet journaled ({e}); the leader queues it");
                }
            } else {
                // Its run can be looked up as soon as the sender has the run id.
                RunJournal::following(
                    app.journal.clone(),
                    delivery_start(&app, &delivery),
                    &app.engine,
                )
                .announce();
                let app2 = app.clone();
                app.tracker
                    .spawn(async move { process_delivery(app2, delivery, payload).await });
            }
            (
                StatusCode::ACCEPTED,
                Json(json!({"event_id": event_id, "run_id": run_id})),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(target: "fmhost::serve", "cannot persist webhook delivery {event_id}: {e}");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot persist",
                "the delivery could not be stored durably; retry later",
            )
        }
    }
}

/// The journal entry of the run that processes a delivery.
fn delivery_start(app: &App, d: &Delivery) -> RunStart {
    let trigger = d
        .trigger_info
        .as_ref()
        .and_then(|t| t.as_value()["type"].as_str())
        .unwrap_or("webhook");
    RunStart {
        trace: crate::otel::run_trace(&d.run_id, d.traceparent.as_deref()),
        trigger_info: d.trigger_info.clone(),
        ..RunStart::new(
            d.run_id.clone(),
            &d.pipeline,
            app.rerun(&d.pipeline),
            trigger,
            OWNER_SERVE,
            d.payload.clone(),
        )
    }
}

/// What follows every run the server journals, whatever started it: a file trigger's
/// file is settled, and a failure raises the pipeline's `run_failed` and
/// `dead_lettered` alerts.
fn after_run(
    app: &App,
    start: &RunStart,
    status: RunStatus,
    error: Option<&str>,
    error_kind: Option<&str>,
    stage: Option<&str>,
) {
    triggers::finish_run(start, status == RunStatus::Succeeded);
    if !matches!(status, RunStatus::Failed | RunStatus::TimedOut) {
        return;
    }
    let Some(plan) = app.pipelines.get(&start.pipeline) else {
        return;
    };
    let fields = json!({
        "run_id": start.run_id,
        "stage": stage,
        "error_kind": error_kind,
        "error": error.map(|e| app.engine.secrets().redact(e).into_owned()),
        "correlation_id": start.run_id,
        "trigger": start.trigger,
    });
    let at = stage.map(|s| format!(" at stage {s}")).unwrap_or_default();
    let kind = error_kind.map(|k| format!(" ({k})")).unwrap_or_default();
    for (on, what) in [
        (crate::pipeline::AlertOn::RunFailed, "failed"),
        (crate::pipeline::AlertOn::DeadLettered, "was dead-lettered"),
    ] {
        app.alerter.raise(
            &app.engine,
            plan,
            &alerts::Event {
                on,
                subject: stage.unwrap_or("").to_string(),
                text: format!("run {} {what}{at}{kind}", start.run_id),
                fields: fields.clone(),
            },
        );
    }
}

/// Tells the alerts of every pipeline that declares a service when its circuit opens.
fn watch_breakers(app: &Arc<App>) {
    if !app.pipelines.values().any(|p| {
        p.alerts
            .iter()
            .any(|a| a.on == crate::pipeline::AlertOn::BreakerOpen)
    }) {
        return;
    }
    let mut rx = app.engine.outbound.breaker_events.subscribe();
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = app.closing.cancelled() => return,
            };
            let event = match event {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            if event.state != crate::http::service::BreakerState::Open
                || event.run_id.starts_with("alert_")
            {
                continue;
            }
            for plan in app.pipelines.values() {
                if !plan.services.iter().any(|(name, _)| *name == event.service) {
                    continue;
                }
                app.alerter.raise(
                    &app.engine,
                    plan,
                    &alerts::Event {
                        on: crate::pipeline::AlertOn::BreakerOpen,
                        subject: event.service.clone(),
                        text: format!(
                            "the circuit for service {} opened (run {}, stage {})",
                            event.service, event.run_id, event.stage_id
                        ),
                        fields: json!({
                            "service": event.service,
                            "run_id": event.run_id,
                            "stage": event.stage_id,
                            "error_kind": "circuit_open",
                            "correlation_id": event.run_id,
                        }),
                    },
                );
            }
        }
    });
}

/// Runs an accepted delivery with its `payload` (restored from its stored form); one that cannot run (its pipeline is gone, its payload
/// does not match the input schema) is dead-lettered with the reason.
async fn process_delivery(app: Arc<App>, d: Delivery, payload: Value) {
    let plan = app.pipelines.get(&d.pipeline).cloned();
    let problem = match &plan {
        None => Some(format!("pipeline \"{}\" is not served here", d.pipeline)),
        Some(plan) => Engine::check_input(plan, &payload)
            .err()
            .map(|e| e.to_string()),
    };
    match (plan, problem) {
        (Some(plan), None) => {
            let start = delivery_start(&app, &d);
            let _ = execute(&app, plan, payload, start, None).await;
        }
        (_, why) => {
            let why = why.unwrap_or_default();
            let kind = if why.contains("input schema") {
                "validation"
            } else {
                "config"
            };
            reject_delivery(&app, &d, &why, kind).await;
        }
    }
}

/// Fails an accepted delivery that cannot run (its pipeline is gone, its payload does
/// not fit, its file cannot be parsed): journaled as a failed run and dead-lettered
/// with the reason, then handled as every run's end is.
async fn reject_delivery(app: &App, d: &Delivery, why: &str, kind: &str) {
    tracing::error!(target: "fmhost::serve", event_id = %d.event_id, run_id = %d.run_id, "delivery {} for {} cannot run, dead-lettered: {why}", d.event_id, d.pipeline);
    let start = delivery_start(app, d);
    let watcher = RunJournal::following(app.journal.clone(), start, &app.engine);
    if let Err(e) = watcher.reject(why, kind, true).await {
        tracing::error!(target: "fmhost::serve", event_id = %d.event_id, "journal: {e}");
    }
    after_run(
        app,
        watcher.start(),
        RunStatus::Failed,
        Some(why),
        Some(kind),
        None,
    );
}
