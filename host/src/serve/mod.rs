//! `fmhost serve`: a long-running host with an HTTP API, webhooks, metrics and
//! hot-swappable plugins.
//!
//! Runs go through the same [`Engine`] as `fmhost run`; this module adds the HTTP
//! surface, the plugin slots ([`plugins`]), webhook intake ([`webhooks`]) and shutdown.

pub mod plugins;
pub mod runs;
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
use crate::pipeline::{Plan, Trigger};
use crate::plugin::PluginRuntime;
use crate::secrets::Secrets;
use plugins::PluginRegistry;
use runs::RunStore;
use webhooks::{Accepted, Delivery, Inbox};

pub struct ServeOptions {
    pub pipelines: PathBuf,
    pub plugins: Vec<PathBuf>,
    pub listen: String,
    pub secrets: Option<PathBuf>,
    pub state: PathBuf,
    /// How long in-flight runs may take to finish after SIGTERM.
    pub drain_timeout: Duration,
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
    hooks: HashMap<String, (String, Trigger)>,
    plugins: Arc<PluginRegistry>,
    runs: Arc<RunStore>,
    inbox: Inbox,
    tracker: TaskTracker,
    draining: AtomicBool,
}

/// Starts the server and serves until SIGTERM or Ctrl-C, then drains.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let runtime = PluginRuntime::new()?;
    let found = runtime
        .discover_newest(&opts.plugins)
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
    let registry = Arc::new(PluginRegistry::new(
        runtime.clone(),
        found,
        Some(opts.state.join("plugins")),
    ));
    let components = registry.registry();

    let mut pipelines = HashMap::new();
    let mut hooks = HashMap::new();
    let mut problems = Vec::new();
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
                for t in &plan.triggers {
                    if let Some((other, _)) =
                        hooks.insert(t.path.clone(), (name.clone(), t.clone()))
                    {
                        problems.push(format!(
                            "{}: trigger path {} is also used by pipeline {other}",
                            file.display(),
                            t.path
                        ));
                    }
                }
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

    let mut engine = Engine::new(Secrets::load(opts.secrets.as_deref())?);
    engine.fixed_now = std::env::var("FMHOST_NOW").ok().map(Arc::from);
    let app = Arc::new(App {
        engine,
        pipelines,
        hooks,
        plugins: registry.clone(),
        runs: Arc::new(RunStore::default()),
        inbox: Inbox::new(opts.state.join("inbox"))?,
        tracker: TaskTracker::new(),
        draining: AtomicBool::new(false),
    });

    // Deliveries accepted before a crash or shutdown but never processed.
    for d in app.inbox.pending() {
        tracing::info!(target: "fmhost::serve", event_id = %d.event_id, pipeline = %d.pipeline, "resuming accepted delivery {} for {}", d.event_id, d.pipeline);
        let app2 = app.clone();
        app.tracker
            .spawn(async move { process_delivery(app2, d, new_run_id()).await });
    }

    let _watcher = plugins::watch(registry, opts.plugins.clone())
        .map_err(|e| anyhow::anyhow!("cannot watch the plugin directories: {e}"))?;

    let router = Router::new()
        .route("/v1/pipelines/{name}/runs", post(start_run))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/plugins", get(list_plugins))
        .route("/v1/plugins/{name}", axum::routing::put(put_plugin))
        .route("/v1/plugins/{name}/rollback", post(rollback_plugin))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(256 << 20))
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    tracing::info!(target: "fmhost::serve", %addr, pipelines = app.pipelines.len(), "serving {} pipeline(s) on http://{addr}", app.pipelines.len());

    let app_for_signal = app.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            app_for_signal.draining.store(true, Ordering::SeqCst);
            tracing::info!(target: "fmhost::serve", "shutting down: no new requests; waiting for in-flight runs");
        })
        .await?;
    app.tracker.close();
    if tokio::time::timeout(opts.drain_timeout, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(target: "fmhost::serve", "drain timeout: {} background run(s) still running; accepted deliveries will resume at next start", app.tracker.len());
    }
    tracing::info!(target: "fmhost::serve", "stopped");
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

async fn execute(
    app: &App,
    plan: Arc<Plan>,
    input: Value,
    run_id: String,
) -> Result<RunReport, String> {
    let observer: Arc<dyn crate::engine::RunObserver> = app.runs.clone();
    let opts = RunOptions {
        run_id: Some(run_id),
        observer: Some(observer),
        ..RunOptions::default()
    };
    match app.engine.run(plan, input, opts).await {
        Ok(report) => {
            app.runs.finish(&report);
            Ok(report)
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn start_run(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
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
    match q.get("mode").map(String::as_str) {
        None | Some("sync") => match execute(&app, plan, input, run_id).await {
            Ok(report) => (run_status_code(&report), Json(report)).into_response(),
            Err(e) => problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid input", e),
        },
        Some("async") => {
            let app2 = app.clone();
            let id = run_id.clone();
            app.tracker.spawn(async move {
                let _ = execute(&app2, plan, input, id).await;
            });
            (StatusCode::ACCEPTED, Json(json!({"run_id": run_id, "status": "running", "href": format!("/v1/runs/{run_id}")}))).into_response()
        }
        Some(other) => problem(
            StatusCode::BAD_REQUEST,
            "invalid mode",
            format!("mode must be sync or async, not {other:?}"),
        ),
    }
}

async fn get_run(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.runs.get(&id) {
        Some(run) => Json(run).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "unknown run",
            format!("no run {id} on this server"),
        ),
    }
}

async fn list_plugins(State(app): State<Arc<App>>) -> Response {
    Json(app.plugins.list()).into_response()
}

async fn put_plugin(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if body.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "empty upload",
            "the request body must be a WebAssembly component",
        );
    }
    match app.plugins.swap(&name, &body, &format!("upload:{name}")).await {
        Ok((old, new)) => Json(json!({"name": name, "previous_version": old, "version": new.version, "sha256": new.hash})).into_response(),
        Err(plugins::SwapError::Unknown(n)) => problem(StatusCode::NOT_FOUND, "unknown plugin", format!("no plugin named \"{n}\"; the current version keeps serving")),
        Err(e) => problem(StatusCode::UNPROCESSABLE_ENTITY, "plugin refused", format!("{e}; the current version keeps serving")),
    }
}

async fn rollback_plugin(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.plugins.rollback(&name) {
        Ok((from, to)) => {
            Json(json!({"name": name, "previous_version": from, "version": to})).into_response()
        }
        Err(e @ plugins::SwapError::Unknown(_)) => {
            problem(StatusCode::NOT_FOUND, "unknown plugin", e.to_string())
        }
        Err(e) => problem(StatusCode::CONFLICT, "nothing to roll back", e.to_string()),
    }
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
    let Some((pipeline, trigger)) = app.hooks.get(uri.path()).cloned() else {
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
    let secret = match crate::plugin::substitute_secrets(&trigger.secret, &app.engine.secrets) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) | Err(_) => {
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
    let delivery = Delivery {
        event_id: event_id.clone(),
        pipeline: pipeline.clone(),
        path: trigger.path.clone(),
        received_at: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        payload,
    };
    match app.inbox.accept(&delivery) {
        Ok(Accepted::Duplicate) => {
            Json(json!({"event_id": event_id, "duplicate": true})).into_response()
        }
        Ok(Accepted::New) => {
            let run_id = new_run_id();
            let app2 = app.clone();
            let id = run_id.clone();
            app.tracker
                .spawn(async move { process_delivery(app2, delivery, id).await });
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

async fn process_delivery(app: Arc<App>, d: Delivery, run_id: String) {
    let Some(plan) = app.pipelines.get(&d.pipeline).cloned() else {
        tracing::error!(target: "fmhost::serve", event_id = %d.event_id, "pipeline {} is gone; delivery left in the inbox", d.pipeline);
        return;
    };
    let outcome = match execute(&app, plan, d.payload.clone(), run_id.clone()).await {
        Ok(report) => {
            json!({"run_id": report.run_id, "status": report.status, "error": report.error})
        }
        Err(e) => json!({"run_id": run_id, "status": "rejected", "error": e}),
    };
    if let Err(e) = app.inbox.done(&d.pipeline, &d.event_id, &outcome) {
        tracing::error!(target: "fmhost::serve", event_id = %d.event_id, "cannot mark delivery done (it will run again at restart): {e}");
    }
}
