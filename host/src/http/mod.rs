//! All outbound HTTP: the one place that opens sockets to vendors.
//!
//! Built-in stages and plugins hand an [`HttpRequest`] to [`Outbound::send`], which owns
//! the per-attempt timeout, retries ([`retry`]), idempotency and correlation headers, and
//! one structured log line per attempt. It returns a response for any final status; it is
//! the caller's business whether a 404 is an error.

pub mod auth;
pub mod budget;
pub mod cache;
pub mod drift;
pub mod headroom;
mod hosts;
pub mod retry;
pub mod service;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value, json};

use crate::error::{ErrorKind, StageError};
use crate::metrics::Metrics;
use crate::secrets::Secrets;
pub use hosts::HostPattern;
pub use retry::RetryPolicy;
pub use service::{ServicePolicy, Services};

/// Told about every outbound attempt (the run journal, through the engine's run observer).
pub trait AttemptObserver: Send + Sync {
    fn attempt(&self, _run_id: &str, _stage_id: &str, _attempt: &Attempt) {}
}

/// Marks an answer the response cache gave (`hit; age=3`, `revalidated; age=0`,
/// `stale; age=120`); `http-request` turns it into its output's `cache`.
pub const CACHE_HEADER: &str = "x-fmhost-cache";

/// Default per-attempt timeout when neither the request nor the stage sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Responses larger than this are refused rather than buffered.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Redirects followed for one attempt, as reqwest's default policy.
pub const MAX_REDIRECTS: usize = 10;

/// Decides whether a redirect may be followed to a URL: the caller's egress grant.
#[derive(Clone)]
pub struct HopGuard(pub Arc<dyn Fn(&reqwest::Url) -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for HopGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HopGuard")
    }
}

#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: reqwest::Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Sent as `Idempotency-Key` on every attempt; required to retry a mutating method.
    pub idempotency_key: Option<String>,
    /// The service whose policies apply; the URL's `host:port` when absent.
    pub service: Option<String>,
    /// Checks every redirect hop; `None` lets any hop through.
    pub hop_guard: Option<HopGuard>,
    /// Lowercase names of headers that carry a credential. They are dropped when a
    /// redirect leaves the request's origin, as are `Authorization`, `Cookie`,
    /// `Proxy-Authorization` and any header holding a secret value.
    pub credential_headers: Vec<String>,
}

/// Why an exchange stopped without a response to return.
enum Stop {
    TooLarge(usize),
    Redirect(ErrorKind, String),
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_json(&self) -> bool {
        self.header("content-type").is_some_and(|ct| {
            let ct = ct.to_ascii_lowercase();
            ct.contains("/json") || ct.contains("+json")
        })
    }

    /// `{status_code, headers, body}`: the body parsed when the response says it is
    /// JSON, else text. A JSON response that does not parse is a parse error.
    pub fn to_output(&self) -> Result<Value, StageError> {
        let body = if self.body.is_empty() {
            Value::Null
        } else if self.is_json() {
            serde_json::from_slice(&self.body).map_err(|e| {
                StageError::new(
                    ErrorKind::Parse,
                    format!(
                        "response body is not valid JSON ({e}): {}",
                        snippet(&self.body)
                    ),
                )
            })?
        } else {
            Value::String(String::from_utf8_lossy(&self.body).into_owned())
        };
        Ok(self.output_with(body))
    }

    /// Like [`to_output`](Self::to_output) but keeps a malformed JSON body as text, for
    /// evaluating retry conditions.
    fn lenient_output(&self) -> Value {
        self.to_output().unwrap_or_else(|_| {
            self.output_with(Value::String(
                String::from_utf8_lossy(&self.body).into_owned(),
            ))
        })
    }

    fn output_with(&self, body: Value) -> Value {
        let cache = self.header(CACHE_HEADER).map(|v| {
            let (status, age) = v.split_once("; age=").unwrap_or((v, "0"));
            json!({"status": status, "age_seconds": age.parse::<u64>().unwrap_or(0)})
        });
        let mut headers = Map::new();
        for (k, v) in &self.headers {
            match headers.get_mut(k) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(v);
                }
                _ => {
                    headers.insert(k.clone(), Value::String(v.clone()));
                }
            }
        }
        let mut out = json!({"status_code": self.status, "headers": headers, "body": body});
        if let Some(c) = cache {
            out["cache"] = c;
        }
        out
    }
}

/// The first few hundred bytes of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    let text = text.trim();
    if body.len() > 300 {
        format!("{text}...")
    } else {
        text.to_string()
    }
}

impl Outbound {
    /// The service a request belongs to: the one it names, else the declared service
    /// whose `base_url` has its origin, else its `host:port`.
    fn service_for(&self, req: &HttpRequest, secrets: &Secrets) -> Arc<service::Service> {
        if let Some(name) = &req.service {
            return self.services.get(name);
        }
        if let Ok(url) = reqwest::Url::parse(&req.url)
            && let Some(s) = self.services.by_origin(&url, secrets)
        {
            return s;
        }
        self.services.get(&service_of(&req.url))
    }

    /// `url` for a stage that names `service`: a path is taken relative to the
    /// service's `base_url`; an absolute URL is kept.
    pub fn service_url(
        &self,
        service: Option<&str>,
        url: &str,
        secrets: &Secrets,
    ) -> Result<String, StageError> {
        if reqwest::Url::parse(url).is_ok() {
            return Ok(url.to_string());
        }
        let shown = secrets.redact(url);
        let Some(name) = service else {
            return Err(StageError::validation(format!(
                "url {shown:?} is not absolute, and the stage names no service whose base_url it is relative to"
            )));
        };
        let base = match self.services.get(name).base_url(secrets) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                return Err(StageError::validation(format!(
                    "service {name}: base_url: {e}"
                )));
            }
            None => {
                return Err(StageError::validation(format!(
                    "url {shown:?} is not absolute and service {name} declares no base_url"
                )));
            }
        };
        Ok(format!(
            "{}/{}",
            base.trim_end_matches('/'),
            url.trim_start_matches('/')
        ))
    }
}

/// Whether `url` is on the service's own origin (its `base_url`'s).
fn service_owns(service: &service::Service, url: &str, secrets: &Secrets) -> bool {
    let base = service
        .base_url(secrets)
        .and_then(Result::ok)
        .and_then(|b| reqwest::Url::parse(&b).ok());
    match (base, reqwest::Url::parse(url)) {
        (Some(b), Ok(u)) => b.origin() == u.origin(),
        _ => false,
    }
}

/// `req` with a service's credential: a header (dropped if a redirect leaves the
/// origin) or a query parameter.
fn with_auth(req: &HttpRequest, a: &auth::Applied) -> HttpRequest {
    let mut r = req.clone();
    if let Some((name, value)) = &a.header {
        r.headers.push((name.clone(), value.clone()));
        r.credential_headers.push(name.to_ascii_lowercase());
    }
    if let Some((name, value)) = &a.query
        && let Ok(mut url) = reqwest::Url::parse(&r.url)
    {
        url.query_pairs_mut().append_pair(name, value);
        r.url = url.to_string();
    }
    r
}

/// Replaces an echoed token in a response's body and headers.
fn mask_token(resp: &mut HttpResponse, token: &str) {
    if token.len() < 8 {
        return;
    }
    if memchr::memmem::find(&resp.body, token.as_bytes()).is_some() {
        let text = String::from_utf8_lossy(&resp.body).replace(token, "[REDACTED]");
        resp.body = text.into_bytes();
    }
    for (_, v) in resp.headers.iter_mut() {
        if v.contains(token) {
            *v = v.replace(token, "[REDACTED]");
        }
    }
}

/// Who is calling, for headers, logs, budgets and redaction.
pub struct CallContext<'a> {
    pub run_id: &'a str,
    pub stage_id: &'a str,
    pub secrets: &'a Secrets,
    /// The stage's deadline: no attempt or backoff may run past it.
    pub deadline: Option<Instant>,
    /// Incremented for every retry, so the stage report can count attempts.
    pub retries: &'a AtomicU32,
    /// Told about every attempt (the run journal).
    pub observer: Option<&'a dyn AttemptObserver>,
    /// The span the attempts are children of; each attempt sends its own in `traceparent`.
    pub trace: Option<crate::trace::SpanRef>,
    /// The run's and the stage's request budgets: each attempt takes one from each.
    pub budgets: &'a [Arc<budget::Budget>],
    /// Whether each exchange is recorded (the pipeline's `"record": true`).
    pub record: bool,
}

/// One outbound attempt, as the run journal records it. Secrets are already redacted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    pub service: String,
    pub method: String,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    pub duration_ms: u64,
    /// The `Idempotency-Key` sent, so a resumed run can be checked to reuse it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Unix milliseconds when the attempt ended.
    pub at_ms: i64,
    /// The exchange itself, when the pipeline or service records (`"record": true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<Recorded>,
    /// The attempt's span and its parent (hex), as sent upstream in `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
}

/// A recorded exchange: the request's URL with secrets as `{{secrets.NAME}}`, and the
/// response, secrets masked, its body cut at [`MAX_RECORDED_BYTES`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The body as text (lossy for bytes that are not UTF-8).
    pub body: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// How a successful JSON answer departs from the shape learned for its endpoint
    /// (`custom_attributes.health_score: missing`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
}

/// Longest response body kept by a recording.
pub const MAX_RECORDED_BYTES: usize = 256 << 10;

fn record_exchange(ctx: &CallContext<'_>, req: &HttpRequest, resp: &HttpResponse) -> Recorded {
    let cut = resp.body.len().min(MAX_RECORDED_BYTES);
    let mut body = resp.body[..cut].to_vec();
    ctx.secrets.redact_bytes(&mut body);
    Recorded {
        url: ctx.secrets.reference_text(&req.url).into_owned(),
        content_type: resp.header("content-type").map(str::to_string),
        body: String::from_utf8_lossy(&body).into_owned(),
        truncated: cut < resp.body.len(),
        drift: Vec::new(),
    }
}

/// The outbound HTTP machinery, shared by every stage of every run in this process.
#[derive(Clone)]
pub struct Outbound {
    client: reqwest::Client,
    /// Per-service rate limits, bulkheads and breakers, shared by all runs.
    pub services: Arc<Services>,
    pub metrics: Arc<Metrics>,
    /// Answers kept for services that declare `cache`.
    pub cache: Arc<cache::ResponseCache>,
    /// Answers every attempt instead of the network (`fmhost test`): nothing is sent.
    pub offline: Option<Arc<dyn Offline>>,
    /// The rate limits every worker of a cluster shares, when this process is one.
    pub quota: Option<Arc<dyn service::SharedQuota>>,
    /// The shapes of recorded answers, per service endpoint, for schema drift.
    pub shapes: Arc<drift::Shapes>,
    /// Every change of a circuit breaker's state, to whoever listens (`serve`'s alerts).
    pub breaker_events: tokio::sync::broadcast::Sender<BreakerEvent>,
}

/// A circuit breaker changed state on an attempt of this run and stage.
#[derive(Debug, Clone)]
pub struct BreakerEvent {
    pub service: String,
    pub state: service::BreakerState,
    pub run_id: String,
    pub stage_id: String,
}

/// What answers requests when nothing may be sent (a pipeline test's `mocks.http`).
pub trait Offline: Send + Sync {
    /// The answer to one attempt by stage `stage`, or `None`: nothing answers it, and
    /// the attempt fails.
    fn answer(
        &self,
        stage: &str,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
    ) -> Option<HttpResponse>;
}

impl Default for Outbound {
    fn default() -> Self {
        Self::new()
    }
}

struct Failure {
    error: StageError,
    retry_after: Option<Duration>,
    transient: bool,
}

impl Outbound {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!("fmhost/", env!("CARGO_PKG_VERSION")))
            // Redirects are followed in `attempt`, where every hop is an egress decision.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .expect("the TLS backend initialises");
        Outbound {
            client,
            services: Arc::default(),
            metrics: Arc::default(),
            cache: Arc::default(),
            offline: None,
            quota: None,
            shapes: Arc::default(),
            breaker_events: tokio::sync::broadcast::channel(64).0,
        }
    }

    /// Sends `req`, retrying per `policy`, and returns the final response whatever its
    /// status; from the service's cache when it declares one and may answer.
    pub async fn send(
        &self,
        ctx: &CallContext<'_>,
        req: &HttpRequest,
        policy: &RetryPolicy,
    ) -> Result<HttpResponse, StageError> {
        let service = self.service_for(req, ctx.secrets);
        let safe = matches!(req.method, reqwest::Method::GET | reqwest::Method::HEAD);
        let Some(cp) = service.cache().filter(|_| safe).cloned() else {
            return self.send_uncached(ctx, req, policy, service).await;
        };
        let key = cache::key(&service.name, req);
        let cached = self
            .cache
            .get(&key, req)
            .map(|c| (c.response, c.age, c.max_age));
        let shown = || ctx.secrets.redact(&req.url).into_owned();
        let mark = |resp: HttpResponse, how: cache::Served, age: Duration| {
            let mut resp = resp;
            resp.headers.retain(|(k, _)| k != CACHE_HEADER);
            resp.headers.push((
                CACHE_HEADER.into(),
                format!("{}; age={}", how.as_str(), age.as_secs()),
            ));
            resp
        };
        if let Some((resp, age, max_age)) = &cached
            && age.as_secs_f64() < cp.ttl_seconds
            && max_age.is_none_or(|m| *age < m)
        {
            tracing::info!(target: "fmhost::http", run_id = ctx.run_id, stage = ctx.stage_id, service = %service.name, cache = "hit", "{} {} -> {} from the cache (age {} s)", req.method, shown(), resp.status, age.as_secs());
            return Ok(mark(resp.clone(), cache::Served::Hit, *age));
        }
        let asked;
        let this = match &cached {
            Some((resp, _, _)) => {
                let mut r = req.clone();
                r.headers.extend(cache::conditional(resp));
                asked = r;
                &asked
            }
            None => req,
        };
        let result = self.send_uncached(ctx, this, policy, service.clone()).await;
        match (result, cached) {
            (Ok(resp), Some((old, _, _))) if resp.status == 304 => {
                self.cache.touch(&key);
                Ok(mark(old, cache::Served::Revalidated, Duration::ZERO))
            }
            (Ok(resp), _) if resp.is_success() => {
                self.cache.put(key, req, &resp);
                Ok(resp)
            }
            (result, Some((old, age, _)))
                if age.as_secs_f64() < cp.ttl_seconds + cp.stale_if_error_seconds
                    && match &result {
                        Ok(r) => r.status >= 500 || r.status == 429,
                        Err(_) => true,
                    } =>
            {
                let why = match &result {
                    Ok(r) => format!("http {}", r.status),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(target: "fmhost::http", run_id = ctx.run_id, stage = ctx.stage_id, service = %service.name, cache = "stale", "{} {}: answered from the cache (stale, age {} s) after: {why}", req.method, shown(), age.as_secs());
                Ok(mark(old, cache::Served::Stale, age))
            }
            (result, _) => result,
        }
    }

    /// [`send`](Self::send) without the cache.
    async fn send_uncached(
        &self,
        ctx: &CallContext<'_>,
        req: &HttpRequest,
        policy: &RetryPolicy,
        service: Arc<service::Service>,
    ) -> Result<HttpResponse, StageError> {
        let mutating = is_mutating(&req.method);
        // Retrying a write without an idempotency key risks doing it twice.
        let may_retry = !mutating || req.idempotency_key.is_some();
        let service_name = service.name.clone();
        // A service's credentials go to its own origin only.
        let bound = service.auth.is_some() && service_owns(&service, &req.url, ctx.secrets);
        let shown_url = ctx.secrets.redact(&req.url).into_owned();
        let mut attempt = 1u32;
        // The generation of an OAuth2 token the service refused with 401 (renewed once).
        let mut refused_token: Option<u64> = None;
        loop {
            for b in ctx.budgets {
                b.take()
                    .map_err(|e| with_attempts(e, attempt.saturating_sub(1)))?;
            }
            let applied = match (&service.auth, bound) {
                (Some(creds), true) => Some(
                    creds
                        .apply(&service_name, &self.client, ctx.secrets, refused_token)
                        .await
                        .map_err(|e| with_attempts(e, attempt))?,
                ),
                _ => None,
            }
            // A stage that set the credential's header itself keeps its own.
            .filter(|a| {
                !a.header.as_ref().is_some_and(|(name, _)| {
                    req.headers
                        .iter()
                        .any(|(k, _)| k.eq_ignore_ascii_case(name))
                })
            });
            let authed;
            let this: &HttpRequest = match &applied {
                Some(a) => {
                    authed = with_auth(req, a);
                    &authed
                }
                None => req,
            };
            let started = Instant::now();
            let span = ctx.trace.map(|parent| parent.fresh_child());
            let mut result = self
                .guarded_attempt(ctx, this, attempt, &service, span)
                .await;
            // A token the host fetched is no configured secret: mask it if echoed.
            if let (Ok(resp), Some(token)) = (
                &mut result,
                applied.as_ref().and_then(|a| a.token.as_deref()),
            ) {
                mask_token(resp, token);
            }
            let elapsed = started.elapsed();
            let duration_ms = elapsed.as_millis() as u64;
            let (status, output, failure) = match &result {
                // Only a retry condition reads `output`; do not parse every body twice.
                Ok(resp) if policy.condition.is_some() => {
                    (Some(resp.status), resp.lenient_output(), http_failure(resp))
                }
                Ok(resp) => (Some(resp.status), Value::Null, http_failure(resp)),
                Err(f) => (
                    None,
                    json!({"status_code": null, "error": f.error.kind.as_str()}),
                    None,
                ),
            };
            let kind = result
                .as_ref()
                .err()
                .map(|f| f.error.kind)
                .or(failure.as_ref().map(|f| f.error.kind));
            self.metrics.record_call(&service_name, kind, elapsed);
            tracing::info!(
                target: "fmhost::http",
                run_id = ctx.run_id,
                stage = ctx.stage_id,
                service = %service_name,
                method = %req.method,
                url = %shown_url,
                status = status.map(i64::from).unwrap_or(-1),
                attempt,
                duration_ms,
                error_kind = kind.map(ErrorKind::as_str).unwrap_or(""),
                "{} {} -> {} in {} ms",
                req.method,
                shown_url,
                status.map(|s| s.to_string()).unwrap_or_else(|| kind.map(|k| k.as_str().to_string()).unwrap_or_default()),
                duration_ms,
            );
            if let Some(o) = ctx.observer {
                let attempt = Attempt {
                    attempt,
                    service: service_name.clone(),
                    method: req.method.to_string(),
                    url: shown_url.clone(),
                    status,
                    error_kind: kind.map(|k| k.as_str().to_string()),
                    duration_ms,
                    idempotency_key: req
                        .idempotency_key
                        .as_deref()
                        .map(|k| ctx.secrets.redact(k).into_owned()),
                    at_ms: crate::time::unix_ms(SystemTime::now()),
                    recorded: match &result {
                        Ok(resp) if ctx.record || service.records() => {
                            let mut r = record_exchange(ctx, req, resp);
                            if resp.is_success()
                                && resp.is_json()
                                && let Ok(body) = serde_json::from_slice::<Value>(&resp.body)
                            {
                                let endpoint = drift::endpoint(req.method.as_str(), &req.url);
                                r.drift = self.shapes.observe(&service_name, &endpoint, &body);
                                if !r.drift.is_empty() {
                                    self.metrics.record_drift(&service_name, r.drift.len());
                                    tracing::warn!(target: "fmhost::http", run_id = ctx.run_id, stage = ctx.stage_id, service = %service_name, "schema drift: service {service_name} {endpoint}: {}", r.drift.join("; "));
                                }
                            }
                            Some(r)
                        }
                        _ => None,
                    },
                    span_id: span.map(|s| hex::encode(s.span_id)),
                    parent_span_id: ctx.trace.map(|p| hex::encode(p.span_id)),
                };
                o.attempt(ctx.run_id, ctx.stage_id, &attempt);
            }
            // An OAuth2 token refused with 401: fetch a new one, once, and try again now.
            if status == Some(401)
                && refused_token.is_none()
                && let Some(generation) = applied.as_ref().and_then(|a| a.generation)
            {
                refused_token = Some(generation);
                attempt += 1;
                continue;
            }
            if kind == Some(ErrorKind::CircuitOpen) {
                // Failing fast is the point: no retry until the breaker lets probes through.
                return Err(with_attempts(
                    result
                        .err()
                        .map(|f| f.error)
                        .unwrap_or_else(|| StageError::internal("circuit open")),
                    attempt,
                ));
            }
            let transient = result.as_ref().err().is_some_and(|f| f.transient);
            let retry = attempt < policy.max_attempts
                && may_retry
                && policy
                    .should_retry(status, transient, &output)
                    .map_err(|e| StageError::template(format!("retry.condition: {e}")))?;
            if !retry {
                return match result {
                    Ok(resp) => Ok(resp),
                    Err(f) => Err(with_attempts(f.error, attempt)),
                };
            }
            let retry_after = match &result {
                Ok(resp) => resp
                    .header("retry-after")
                    .and_then(|v| retry::parse_retry_after(v, SystemTime::now())),
                Err(f) => f.retry_after,
            };
            let delay = policy.delay(attempt, retry_after);
            if ctx.deadline.is_some_and(|d| Instant::now() + delay >= d) {
                // The stage's budget cannot fit another attempt: report the last outcome now.
                return match result {
                    Ok(resp) => Ok(resp),
                    Err(f) => Err(with_attempts(f.error, attempt)),
                };
            }
            tokio::time::sleep(delay).await;
            ctx.retries.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
        }
    }

    /// One attempt under the service's policies: breaker, then rate limit, then bulkhead.
    async fn guarded_attempt(
        &self,
        ctx: &CallContext<'_>,
        req: &HttpRequest,
        attempt: u32,
        service: &service::Service,
        span: Option<crate::trace::SpanRef>,
    ) -> Result<HttpResponse, Failure> {
        let ticket = match service.breaker.as_ref().map(|b| b.acquire()) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(remaining)) => {
                let mut error = StageError::new(
                    ErrorKind::CircuitOpen,
                    format!(
                        "{} {}: circuit for service {} is open (retry in {} ms); nothing was sent",
                        req.method,
                        ctx.secrets.redact(&req.url),
                        service.name,
                        remaining.as_millis()
                    ),
                );
                error.status = None;
                return Err(Failure {
                    error,
                    retry_after: None,
                    transient: false,
                });
            }
        };
        let breaker = service.breaker.as_ref();
        // Waiting for a token or a bulkhead place counts against the stage's deadline.
        let wait = async {
            service.throttle(self.quota.as_deref()).await;
            service.enter().await
        };
        let permit = match ctx.deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), wait).await {
                Ok(p) => p,
                Err(_) => {
                    if let (Some(b), Some(t)) = (breaker, ticket) {
                        b.abandon(t);
                    }
                    return Err(Failure {
                        error: StageError::new(
                            ErrorKind::Timeout,
                            format!(
                                "{} {}: deadline passed while waiting for service {}'s rate limit or concurrency limit",
                                req.method,
                                ctx.secrets.redact(&req.url),
                                service.name
                            ),
                        ),
                        retry_after: None,
                        transient: false,
                    });
                }
            },
            None => wait.await,
        };
        let result = match &self.offline {
            None => self.attempt(ctx, req, attempt, span).await,
            Some(o) => o
                .answer(
                    ctx.stage_id,
                    req.method.as_str(),
                    &req.url,
                    req.body.as_deref(),
                )
                .ok_or_else(|| Failure {
                    error: StageError::new(
                        ErrorKind::Connect,
                        format!(
                            "nothing answers {} {} offline (no mock or recording; nothing is sent)",
                            req.method,
                            ctx.secrets.redact(&req.url)
                        ),
                    ),
                    retry_after: None,
                    transient: false,
                }),
        };
        drop(permit);
        if let Ok(resp) = &result
            && let Some(h) = headroom::parse(&resp.headers, SystemTime::now())
        {
            service.headroom.record(h);
            self.metrics
                .set_headroom(&service.name, h.remaining, h.limit);
        }
        if let (Some(b), Some(t)) = (breaker, ticket) {
            let failed = match &result {
                Ok(resp) => resp.status >= 500,
                Err(f) => matches!(f.error.kind, ErrorKind::Timeout | ErrorKind::Connect),
            };
            if let Some(state) = b.record(t, failed) {
                self.metrics.set_breaker(&service.name, state);
                tracing::warn!(target: "fmhost::http", service = %service.name, state = state.as_str(), "circuit for service {} is now {}", service.name, state.as_str());
                // Nobody listening is fine.
                let _ = self.breaker_events.send(BreakerEvent {
                    service: service.name.to_string(),
                    state,
                    run_id: ctx.run_id.to_string(),
                    stage_id: ctx.stage_id.to_string(),
                });
            }
        }
        result
    }

    async fn attempt(
        &self,
        ctx: &CallContext<'_>,
        req: &HttpRequest,
        attempt: u32,
        span: Option<crate::trace::SpanRef>,
    ) -> Result<HttpResponse, Failure> {
        let shown = || ctx.secrets.redact(&req.url).into_owned();
        let invalid = |message: String| Failure {
            error: StageError::validation(message),
            retry_after: None,
            transient: false,
        };
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &req.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("invalid header name {name:?}")))?;
            let value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                invalid(format!(
                    "header {name}: value is not valid in an HTTP header"
                ))
            })?;
            headers.append(name, value);
        }
        headers.insert(
            "x-correlation-id",
            reqwest::header::HeaderValue::from_str(ctx.run_id)
                .map_err(|_| invalid("run id is not a valid header value".into()))?,
        );
        if let Some(span) = span
            && let Ok(v) = reqwest::header::HeaderValue::from_str(&span.header())
        {
            headers.insert("traceparent", v);
        }
        if let Some(key) = &req.idempotency_key {
            headers.insert(
                "idempotency-key",
                reqwest::header::HeaderValue::from_str(key)
                    .map_err(|_| invalid("idempotency key is not a valid header value".into()))?,
            );
        }
        let start =
            reqwest::Url::parse(&req.url).map_err(|e| invalid(format!("url {}: {e}", shown())))?;
        let mut timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if let Some(deadline) = ctx.deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        let exchange = async {
            let origin = start.origin();
            let (mut url, mut method, mut body) =
                (start.clone(), req.method.clone(), req.body.clone());
            let mut hops = 0;
            let mut resp = loop {
                let mut builder = self
                    .client
                    .request(method.clone(), url.clone())
                    .headers(headers.clone());
                if let Some(body) = &body {
                    builder = builder.body(body.clone());
                }
                let resp = builder.send().await?;
                let status = resp.status().as_u16();
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok());
                let Some(location) =
                    location.filter(|_| matches!(status, 301 | 302 | 303 | 307 | 308))
                else {
                    break resp;
                };
                if hops == MAX_REDIRECTS {
                    return Ok(Err(Stop::Redirect(
                        ErrorKind::Connect,
                        format!("more than {MAX_REDIRECTS} redirects"),
                    )));
                }
                hops += 1;
                let next = match url.join(location) {
                    Ok(n) if matches!(n.scheme(), "http" | "https") => n,
                    _ => {
                        return Ok(Err(Stop::Redirect(
                            ErrorKind::Parse,
                            format!(
                                "redirect to an invalid location {:?}",
                                ctx.secrets.redact(location)
                            ),
                        )));
                    }
                };
                if let Some(guard) = &req.hop_guard
                    && let Err(why) = (guard.0)(&next)
                {
                    return Ok(Err(Stop::Redirect(
                        ErrorKind::Sandbox,
                        format!(
                            "redirect to {} refused: {why}",
                            ctx.secrets.redact(next.as_str())
                        ),
                    )));
                }
                if next.origin() != origin {
                    let credential: Vec<reqwest::header::HeaderName> = headers
                        .iter()
                        .filter(|(k, v)| {
                            matches!(
                                k.as_str(),
                                "authorization" | "proxy-authorization" | "cookie"
                            ) || req.credential_headers.iter().any(|c| c == k.as_str())
                                || v.to_str().is_ok_and(|v| ctx.secrets.occurs(v))
                        })
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in credential {
                        headers.remove(k);
                    }
                }
                if status == 303 && method != reqwest::Method::HEAD
                    || matches!(status, 301 | 302) && method == reqwest::Method::POST
                {
                    method = reqwest::Method::GET;
                    body = None;
                    headers.remove(reqwest::header::CONTENT_TYPE);
                    headers.remove(reqwest::header::CONTENT_LENGTH);
                }
                url = next;
            };
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY_BYTES {
                    return Ok(Err(Stop::TooLarge(body.len())));
                }
            }
            Ok::<_, reqwest::Error>(Ok(HttpResponse {
                status,
                headers,
                body,
            }))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(Failure {
                error: StageError::new(
                    ErrorKind::Timeout,
                    format!(
                        "{} {} timed out after {} ms (attempt {attempt})",
                        req.method,
                        shown(),
                        timeout.as_millis()
                    ),
                ),
                retry_after: None,
                transient: true,
            }),
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(Stop::Redirect(kind, message)))) => Err(Failure {
                error: StageError::new(kind, format!("{} {}: {message}", req.method, shown())),
                retry_after: None,
                transient: false,
            }),
            Ok(Ok(Err(Stop::TooLarge(len)))) => Err(Failure {
                error: StageError::new(
                    ErrorKind::Parse,
                    format!(
                        "{} {}: response body exceeds {MAX_BODY_BYTES} bytes (read {len})",
                        req.method,
                        shown()
                    ),
                ),
                retry_after: None,
                transient: false,
            }),
            Ok(Err(e)) => {
                let kind = if e.is_timeout() {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Connect
                };
                let message = ctx
                    .secrets
                    .redact(&format!("{} {}: {}", req.method, shown(), error_chain(&e)))
                    .into_owned();
                Err(Failure {
                    error: StageError::new(kind, message),
                    retry_after: None,
                    transient: true,
                })
            }
        }
    }
}

fn with_attempts(mut e: StageError, attempts: u32) -> StageError {
    if attempts > 1 {
        e.message = format!("{} (after {attempts} attempts)", e.message);
    }
    e
}

/// The error a non-2xx response stands for, with its kind.
pub fn http_failure_of(resp: &HttpResponse) -> Option<StageError> {
    http_failure(resp).map(|f| f.error)
}

fn http_failure(resp: &HttpResponse) -> Option<Failure> {
    if resp.is_success() {
        return None;
    }
    let kind = match resp.status {
        429 => ErrorKind::RateLimited,
        500..=599 => ErrorKind::Http5xx,
        _ => ErrorKind::Http4xx,
    };
    let mut error = StageError::new(
        kind,
        format!("http {}: {}", resp.status, snippet(&resp.body)),
    );
    error.status = Some(resp.status);
    Some(Failure {
        error,
        retry_after: None,
        transient: false,
    })
}

/// Whether a method changes state upstream, so retrying it needs an idempotency key.
pub fn is_mutating(method: &reqwest::Method) -> bool {
    !matches!(
        *method,
        reqwest::Method::GET | reqwest::Method::HEAD | reqwest::Method::OPTIONS
    )
}

/// `host:port` of a URL, the default service name.
pub fn service_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => "unknown".into(),
        },
        Err(_) => "unknown".into(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
