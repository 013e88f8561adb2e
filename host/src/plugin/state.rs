//! Per-invocation store state: a locked-down WASI context, resource limits, and the
//! host side of the `http` and `log` imports.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, HttpError, HttpErrorKind, Level, Request, Response};
use super::egress::{self, Grant};
use crate::error::ErrorKind;
use crate::http::{HttpRequest, Outbound, RetryPolicy};
use crate::secrets::Secrets;

/// What a connector's stage grants it: whom it may call and with which policy.
pub struct HttpGrant {
    pub outbound: Outbound,
    pub grant: Arc<Grant>,
    /// The stage's `retry` block, which wins over what the plugin asks for.
    pub stage_retry: Option<RetryPolicy>,
    pub deadline: Option<Instant>,
    pub observer: Option<Arc<dyn crate::http::AttemptObserver>>,
    pub budgets: Arc<[Arc<crate::http::budget::Budget>]>,
    pub record: bool,
}

pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: Limits,
    /// The plugin's stderr (panic messages), shown when it traps.
    pub stderr: Capture,
    /// Wall-clock deadline for the plugin's code; checked at every epoch tick.
    pub cpu_deadline: Instant,
    /// Bytes of log messages this invocation sent; beyond [`MAX_LOG_BYTES`] they are dropped.
    log_bytes: usize,
    pub plugin: Arc<str>,
    pub run_id: Arc<str>,
    pub stage_id: Arc<str>,
    pub trace: Option<crate::trace::SpanRef>,
    pub secrets: Arc<Secrets>,
    pub http: Option<HttpGrant>,
    pub retries: AtomicU32,
    calls: u32,
    /// The kind of the last failed or non-2xx call, to classify an `upstream` plugin error.
    pub last_call_error: Option<ErrorKind>,
    /// The last request the host refused, so the stage fails as `sandbox` saying why.
    pub refusal: Option<(ErrorKind, String)>,
}

/// What a plugin may write to stderr per invocation before the rest is dropped.
pub const MAX_STDERR_BYTES: usize = 16 * 1024;
/// What a plugin may send to the log import per invocation before the rest is dropped.
pub const MAX_LOG_BYTES: usize = 256 * 1024;

/// A plugin's stdout or stderr: keeps the first `limit` bytes, counts and drops the
/// rest, and never fails a write (a full pipe must not become a trap).
#[derive(Clone)]
pub struct Capture {
    limit: usize,
    inner: Arc<Mutex<(Vec<u8>, usize)>>,
}

impl Capture {
    pub fn new(limit: usize) -> Capture {
        Capture {
            limit,
            inner: Arc::default(),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.limit.saturating_sub(g.0.len());
        let kept = room.min(bytes.len());
        g.0.extend_from_slice(&bytes[..kept]);
        g.1 += bytes.len() - kept;
    }

    /// What was kept, with a note of what was dropped.
    pub fn text(&self) -> String {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from_utf8_lossy(&g.0).into_owned();
        if g.1 > 0 {
            out.push_str(&format!(" [{} more bytes dropped]", g.1));
        }
        out
    }
}

impl wasmtime_wasi::p2::OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Capture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// What one invocation is for. A fresh instance is made before it is known which
/// stage will use it; these are set just before its call.
pub struct Call {
    pub run_id: Arc<str>,
    pub stage_id: Arc<str>,
    /// The stage's span in the run's trace.
    pub trace: Option<crate::trace::SpanRef>,
    pub secrets: Arc<Secrets>,
    pub http: Option<HttpGrant>,
    /// Wall-clock deadline for the plugin's code; checked at every epoch tick.
    pub cpu_deadline: Instant,
}

impl PluginState {
    /// The state of a fresh instance of `plugin`, bound to no call: no secrets, no
    /// HTTP grant, and as long to instantiate as `describe()` gets.
    pub fn new(plugin: Arc<str>, memory_limit: usize) -> Self {
        let stderr = Capture::new(MAX_STDERR_BYTES);
        // Nothing beyond the world: no preopens, no environment, no arguments, no
        // network (sockets are linked for toolchains that import them, but every
        // address is refused). Clocks and randomness are harmless.
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .stdout(Capture::new(0))
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
            cpu_deadline: Instant::now() + super::DESCRIBE_DEADLINE,
            log_bytes: 0,
            plugin,
            run_id: Arc::from(""),
            stage_id: Arc::from(""),
            trace: None,
            secrets: Arc::default(),
            http: None,
            retries: AtomicU32::new(0),
            calls: 0,
            last_call_error: None,
            refusal: None,
        }
    }

    /// Binds the instance to the invocation it is about to serve.
    pub fn bind(&mut self, call: Call) {
        self.run_id = call.run_id;
        self.stage_id = call.stage_id;
        self.trace = call.trace;
        self.secrets = call.secrets;
        self.http = call.http;
        self.cpu_deadline = call.cpu_deadline;
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
        let before = self.log_bytes;
        self.log_bytes = self.log_bytes.saturating_add(message.len());
        if self.log_bytes > MAX_LOG_BYTES {
            if before <= MAX_LOG_BYTES {
                tracing::warn!(target: "fmhost::plugin", plugin = &*self.plugin, run_id = &*self.run_id, stage = &*self.stage_id,
                    "{}: logged more than {} KiB in one invocation; further log messages are dropped", self.plugin, MAX_LOG_BYTES >> 10);
            }
            return Ok(());
        }
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
    async fn send_checked(&mut self, mut req: Request) -> Result<Response, HttpError> {
        let Some(grant) = &self.http else {
            return Err(http_error(
                HttpErrorKind::Refused,
                "this plugin was not granted http",
            ));
        };
        self.calls += 1;
        let paginate = take_paginate(&mut req.headers)
            .map_err(|why| http_error(HttpErrorKind::InvalidRequest, why))?;
        let prepared = match egress::prepare(&grant.grant, &req.url, &req.headers, &self.secrets) {
            Ok(p) => p,
            Err((refused, why)) => {
                // Whatever the plugin wrote may hold a substituted value; the message never does.
                let why = self.secrets.redact(&why).into_owned();
                if refused {
                    tracing::warn!(target: "fmhost::plugin", plugin = &*self.plugin, run_id = &*self.run_id, stage = &*self.stage_id,
                        "plugin {} in stage {}: refused: {why}", self.plugin, self.stage_id);
                    self.refusal = Some((ErrorKind::Sandbox, why.clone()));
                    return Err(http_error(HttpErrorKind::Refused, why));
                }
                return Err(http_error(HttpErrorKind::InvalidRequest, why));
            }
        };
        let guard = grant.grant.clone();
        let hop_guard =
            crate::http::HopGuard(Arc::new(move |next: &reqwest::Url| guard.may_reach(next)));
        let (url, headers) = (prepared.url, prepared.headers);
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
            hop_guard: Some(hop_guard),
            credential_headers: prepared.credential_headers,
        };
        let ctx = crate::http::CallContext {
            run_id: &self.run_id,
            stage_id: &self.stage_id,
            secrets: &self.secrets,
            deadline: grant.deadline,
            retries: &self.retries,
            observer: grant.observer.as_deref(),
            trace: self.trace.as_ref().map(crate::trace::plugin_span),
            budgets: &grant.budgets,
            record: grant.record,
        };
        if let Some(p) = paginate {
            let result = paginated(&grant.outbound, &ctx, &request, &policy, &p).await;
            return match result {
                Ok(all) => {
                    self.last_call_error = None;
                    let mut body = serde_json::to_vec(&all).unwrap_or_default();
                    self.secrets.redact_bytes(&mut body);
                    Ok(Response {
                        status: 200,
                        headers: vec![("content-type".into(), "application/json".into())],
                        body,
                    })
                }
                Err(e) => Err(self.failed(e)),
            };
        }
        match grant.outbound.send(&ctx, &request, &policy).await {
            Ok(resp) => {
                self.last_call_error = crate::http::http_failure_of(&resp).map(|e| e.kind);
                // An upstream that echoes a credential must not hand it to the plugin.
                let mut body = resp.body;
                self.secrets.redact_bytes(&mut body);
                let headers = resp
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, self.secrets.redact(&v).into_owned()))
                    .collect();
                Ok(Response {
                    status: resp.status,
                    headers,
                    body,
                })
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The plugin's view of a call that failed.
    fn failed(&mut self, e: crate::error::StageError) -> HttpError {
        self.last_call_error = Some(e.kind);
        if matches!(e.kind, ErrorKind::Sandbox | ErrorKind::Budget) {
            self.refusal = Some((e.kind, self.secrets.redact(&e.message).into_owned()));
        }
        let kind = match e.kind {
            ErrorKind::Timeout => HttpErrorKind::Timeout,
            ErrorKind::CircuitOpen => HttpErrorKind::CircuitOpen,
            ErrorKind::Parse => HttpErrorKind::Response,
            ErrorKind::Validation => HttpErrorKind::InvalidRequest,
            ErrorKind::Sandbox | ErrorKind::Budget => HttpErrorKind::Refused,
            // A page that answered non-2xx, or a paging path that does not fit.
            ErrorKind::Http4xx | ErrorKind::Http5xx | ErrorKind::RateLimited => {
                HttpErrorKind::Response
            }
            _ => HttpErrorKind::Connect,
        };
        http_error(kind, self.secrets.redact(&e.message).into_owned())
    }
}

/// The request header with which a connector asks the host to page a list for it:
/// a JSON `paginate` block as `http-request` takes it. The host removes it before sending.
pub const PAGINATE_HEADER: &str = "x-fmhost-paginate";

/// Longest `x-fmhost-paginate` value a plugin may send.
const MAX_PAGINATE_HEADER: usize = 4096;

fn take_paginate(
    headers: &mut Vec<(String, String)>,
) -> Result<Option<crate::component::paginate::Paginate>, String> {
    use crate::component::paginate::{MAX_PLUGIN_PAGES, Paginate};
    let mut values = Vec::new();
    headers.retain(|(k, v)| {
        let ours = k.eq_ignore_ascii_case(PAGINATE_HEADER);
        if ours {
            values.push(v.clone());
        }
        !ours
    });
    let value = match values.as_slice() {
        [] => return Ok(None),
        [one] => one,
        _ => return Err(format!("header {PAGINATE_HEADER} is given more than once")),
    };
    if value.len() > MAX_PAGINATE_HEADER {
        return Err(format!(
            "header {PAGINATE_HEADER} is longer than {MAX_PAGINATE_HEADER} bytes"
        ));
    }
    let p: Paginate =
        serde_json::from_str(value).map_err(|e| format!("header {PAGINATE_HEADER}: {e}"))?;
    if let Some((field, why)) = p.problems().into_iter().next() {
        return Err(format!("header {PAGINATE_HEADER}: {field}: {why}"));
    }
    if p.max_pages.is_some_and(|m| m > MAX_PLUGIN_PAGES) {
        return Err(format!(
            "header {PAGINATE_HEADER}: max_pages: at most {MAX_PLUGIN_PAGES}"
        ));
    }
    Ok(Some(p))
}

/// Every page of a list, each page one call through the outbound machinery (with its
/// retries, and an attempt in the journal); `collect` keeps every page on the first
/// one's origin, where the call's credentials are bound.
async fn paginated(
    outbound: &Outbound,
    ctx: &crate::http::CallContext<'_>,
    request: &HttpRequest,
    policy: &RetryPolicy,
    p: &crate::component::paginate::Paginate,
) -> Result<serde_json::Value, crate::error::StageError> {
    use crate::error::StageError;
    let first = reqwest::Url::parse(&request.url).map_err(|e| {
        StageError::new(
            ErrorKind::Validation,
            format!("invalid URL {}: {e}", ctx.secrets.redact(&request.url)),
        )
    })?;
    crate::component::paginate::collect(p, first, None, |page| {
        let mut r = request.clone();
        r.url = page.to_string();
        async move {
            let resp = outbound.send(ctx, &r, policy).await?;
            if let Some(mut e) = crate::http::http_failure_of(&resp) {
                e.message = format!(
                    "{} {}: {}",
                    r.method,
                    ctx.secrets.redact(&r.url),
                    ctx.secrets.redact(&e.message)
                );
                return Err(e);
            }
            resp.to_output()
        }
    })
    .await
}
