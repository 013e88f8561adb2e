//! Per-invocation store state: a locked-down WASI context, resource limits, and the
//! host side of the `http` and `log` imports.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, HttpError, HttpErrorKind, Level, Request, Response};
use super::egress::{self, Egress};
use crate::error::ErrorKind;
use crate::http::{HttpRequest, Outbound, RetryPolicy};
use crate::secrets::Secrets;

/// What a connector's stage grants it: whom it may call and with which policy.
pub struct HttpGrant {
    pub outbound: Outbound,
    pub egress: Egress,
    /// The stage's `retry` block, which wins over what the plugin asks for.
    pub stage_retry: Option<RetryPolicy>,
    pub deadline: Option<Instant>,
    pub observer: Option<Arc<dyn crate::engine::RunObserver>>,
}

pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: Limits,
    /// The plugin's stderr (panic messages), shown when it traps.
    pub stderr: MemoryOutputPipe,
    pub plugin: Arc<str>,
    pub run_id: Arc<str>,
    pub stage_id: Arc<str>,
    pub secrets: Arc<Secrets>,
    pub http: Option<HttpGrant>,
    pub retries: AtomicU32,
    calls: u32,
    /// The kind of the last failed or non-2xx call, to classify an `upstream` plugin error.
    pub last_call_error: Option<ErrorKind>,
}

impl PluginState {
    pub fn new(
        plugin: Arc<str>,
        run_id: Arc<str>,
        stage_id: Arc<str>,
        secrets: Arc<Secrets>,
        memory_limit: usize,
        http: Option<HttpGrant>,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(8 * 1024);
        // Nothing beyond the world: no preopens, no environment, no arguments, no
        // network (sockets are linked for toolchains that import them, but every
        // address is refused). Clocks and randomness are harmless.
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        PluginState {
            wasi,
            table: ResourceTable::new(),
            limits: Limits {
                memory: memory_limit,
                exceeded: None,
            },
            stderr,
            plugin,
            run_id,
            stage_id,
            secrets,
            http,
            retries: AtomicU32::new(0),
            calls: 0,
            last_call_error: None,
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Memory cap per plugin instance; remembers a refused growth so the trap that
/// usually follows (an allocation failure aborts) can be explained.
pub struct Limits {
    pub memory: usize,
    pub exceeded: Option<usize>,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.exceeded = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl bindings::fmhost::plugin::types::Host for PluginState {}

impl bindings::fmhost::plugin::log::Host for PluginState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let message = self.secrets.redact(&message);
        let (plugin, run_id, stage) = (&*self.plugin, &*self.run_id, &*self.stage_id);
        match level {
            Level::Trace => {
                tracing::trace!(target: "fmhost::plugin", plugin, run_id, stage, "{plugin}: {message}")
            }
            Level::Debug => {
                tracing::debug!(target: "fmhost::plugin", plugin, run_id, stage, "{plugin}: {message}")
            }
            Level::Info => {
                tracing::info!(target: "fmhost::plugin", plugin, run_id, stage, "{plugin}: {message}")
            }
            Level::Warn => {
                tracing::warn!(target: "fmhost::plugin", plugin, run_id, stage, "{plugin}: {message}")
            }
            Level::Error => {
                tracing::error!(target: "fmhost::plugin", plugin, run_id, stage, "{plugin}: {message}")
            }
        }
        Ok(())
    }
}

fn http_error(kind: HttpErrorKind, message: impl Into<String>) -> HttpError {
    HttpError {
        kind,
        message: message.into(),
    }
}

impl bindings::fmhost::plugin::http::Host for PluginState {
    async fn send(&mut self, req: Request) -> wasmtime::Result<Result<Response, HttpError>> {
        Ok(self.send_checked(req).await)
    }
}

impl PluginState {
    async fn send_checked(&mut self, req: Request) -> Result<Response, HttpError> {
        let Some(grant) = &self.http else {
            return Err(http_error(
                HttpErrorKind::Refused,
                "this plugin was not granted http",
            ));
        };
        self.calls += 1;
        let refused = |m: String| http_error(HttpErrorKind::Refused, m);
        let url = egress::substitute(&req.url, &self.secrets)
            .map_err(|e| refused(format!("url: {e}")))?;
        let parsed = reqwest::Url::parse(&url).map_err(|e| {
            http_error(
                HttpErrorKind::InvalidRequest,
                format!("url {}: {e}", self.secrets.redact(&url)),
            )
        })?;
        if let Err(why) = grant.egress.check(&req.url, &parsed, &self.secrets) {
            tracing::warn!(target: "fmhost::plugin", plugin = &*self.plugin, run_id = &*self.run_id, stage = &*self.stage_id, "{}: refused egress: {why}", self.plugin);
            return Err(refused(why));
        }
        let mut headers = Vec::with_capacity(req.headers.len());
        for (name, value) in &req.headers {
            let value = egress::substitute(value, &self.secrets)
                .map_err(|e| refused(format!("header {name}: {e}")))?;
            headers.push((name.clone(), value));
        }
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                http_error(
                    HttpErrorKind::InvalidRequest,
                    format!("invalid method {:?}", req.method),
                )
            })?;
        let mutating = crate::http::is_mutating(&method);
        let idempotency_key = req.idempotency_key.clone().or_else(|| {
            mutating.then(|| {
                crate::component::default_idempotency_key(
                    &self.run_id,
                    &format!("{}#{}", self.stage_id, self.calls),
                )
            })
        });
        let policy = grant
            .stage_retry
            .clone()
            .unwrap_or_else(|| match &req.retry {
                Some(r) => RetryPolicy {
                    max_attempts: r.max_attempts.clamp(1, 10),
                    base_delay: std::time::Duration::from_millis(u64::from(r.initial_delay_ms)),
                    multiplier: f64::from(r.backoff_multiplier).max(1.0),
                    ..RetryPolicy::no_retry()
                },
                None => RetryPolicy::no_retry(),
            });
        let request = HttpRequest {
            method,
            url,
            headers,
            body: req.body,
            timeout: req
                .timeout_ms
                .map(|ms| std::time::Duration::from_millis(u64::from(ms))),
            idempotency_key,
            service: None,
        };
        let ctx = crate::http::CallContext {
            run_id: &self.run_id,
            stage_id: &self.stage_id,
            secrets: &self.secrets,
            deadline: grant.deadline,
            retries: &self.retries,
            observer: grant.observer.as_deref(),
        };
        match grant.outbound.send(&ctx, &request, &policy).await {
            Ok(resp) => {
                self.last_call_error = crate::http::http_failure_of(&resp).map(|e| e.kind);
                Ok(Response {
                    status: resp.status,
                    headers: resp.headers,
                    body: resp.body,
                })
            }
            Err(e) => {
                self.last_call_error = Some(e.kind);
                let kind = match e.kind {
                    ErrorKind::Timeout => HttpErrorKind::Timeout,
                    ErrorKind::CircuitOpen => HttpErrorKind::CircuitOpen,
                    ErrorKind::Parse => HttpErrorKind::Response,
                    ErrorKind::Validation => HttpErrorKind::InvalidRequest,
                    _ => HttpErrorKind::Connect,
                };
                Err(http_error(kind, e.message))
            }
        }
    }
}
