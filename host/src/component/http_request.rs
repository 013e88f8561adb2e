//! `http-request`: one HTTP call through the host's outbound machinery.
//!
//! Output `{status_code, headers, body}`, with `body` parsed when the response is JSON.
//! A non-2xx final response fails the stage.

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use std::sync::Arc;

use super::{Checker, Component, ConfigProblem, StageContext};
use crate::error::StageError;
use crate::http::{self, http_failure_of};

pub struct HttpRequest;

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Absolute URL, or a path relative to the `base_url` of the `service` it names;
    /// `{{...}}` templates are rendered before this is read.
    url: String,
    /// HTTP method, GET by default.
    #[serde(default)]
    method: Option<String>,
    /// Request headers; non-string values are sent as their JSON text.
    #[serde(default)]
    headers: Map<String, Value>,
    /// Query parameters; an array value repeats the key (`expand[]=a&expand[]=b`).
    #[serde(default)]
    query_params: Map<String, Value>,
    /// JSON request body.
    #[serde(default)]
    body: Option<Value>,
    /// Per-attempt timeout in milliseconds.
    #[serde(default)]
    timeout: Option<u64>,
    /// `Idempotency-Key` for mutating methods; defaults to one derived from run and stage.
    #[serde(default)]
    idempotency_key: Option<String>,
    /// Service name for per-service policies; defaults to the URL's host:port.
    #[serde(default)]
    service: Option<String>,
    /// Follow every page of a list; the output is then `{items, pages, truncated}`.
    #[serde(default)]
    paginate: Option<super::paginate::Paginate>,
}

const FIELDS: &[&str] = &[
    "url",
    "method",
    "headers",
    "query_params",
    "body",
    "timeout",
    "idempotency_key",
    "service",
    "paginate",
];

#[async_trait::async_trait]
impl Component for HttpRequest {
    fn name(&self) -> &str {
        "http-request"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(FIELDS)
            .required("url")
            .string("url")
            .one_of("method", METHODS)
            .object("headers")
            .object("query_params")
            .integer("timeout", 1)
            .string("idempotency_key")
            .string("service")
            .object("paginate");
        if let Some(p) = config.get("paginate").filter(|p| p.is_object()) {
            match serde_path_to_error::deserialize::<_, super::paginate::Paginate>(p) {
                Ok(p) => {
                    for (field, message) in p.problems() {
                        c.problem(&format!(".paginate.{field}"), message);
                    }
                }
                Err(e) => {
                    // Templates are checked when rendered; here only the shape counts.
                    if !e.inner().to_string().contains("invalid type") {
                        c.problem(&format!(".paginate.{}", e.path()), e.inner().to_string());
                    }
                }
            }
        }
        c.finish()
    }

    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        _upstream: std::sync::Arc<Value>,
    ) -> Result<Value, StageError> {
        let config: Config = serde_path_to_error::deserialize(config)
            .map_err(|e| StageError::validation(format!("config.{}: {}", e.path(), e.inner())))?;
        let method = config
            .method
            .as_deref()
            .unwrap_or("GET")
            .to_ascii_uppercase();
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| {
            StageError::validation(format!("config.method: invalid method {method:?}"))
        })?;
        let full =
            ctx.outbound
                .service_url(config.service.as_deref(), &config.url, &ctx.secrets)?;
        let mut url = reqwest::Url::parse(&full).map_err(|e| {
            StageError::validation(format!(
                "config.url: {e}: {}",
                ctx.secrets.redact(&config.url)
            ))
        })?;
        if !config.query_params.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in &config.query_params {
                match value {
                    Value::Array(items) => items.iter().for_each(|v| {
                        pairs.append_pair(key, &crate::template::to_text(v));
                    }),
                    Value::Null => {}
                    v => {
                        pairs.append_pair(key, &crate::template::to_text(v));
                    }
                }
            }
        }
        let mut headers: Vec<(String, String)> = config
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), crate::template::to_text(v).into_owned()))
            .collect();
        let body = match &config.body {
            None => None,
            Some(body) => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                Some(serde_json::to_vec(body).map_err(|e| StageError::internal(e.to_string()))?)
            }
        };
        let mutating = crate::http::is_mutating(&method);
        let idempotency_key = match config.idempotency_key {
            Some(key) => Some(key),
            None if mutating => Some(default_idempotency_key(&ctx.run_id, &ctx.stage_id)),
            None => None,
        };
        let paginate = config.paginate.clone();
        let request = http::HttpRequest {
            method: method.clone(),
            url: url.to_string(),
            headers,
            body,
            timeout: config.timeout.map(std::time::Duration::from_millis),
            idempotency_key,
            service: config.service,
            hop_guard: redirect_guard(url.as_str(), &ctx.allowed_hosts),
            credential_headers: Vec::new(),
        };
        match paginate {
            None => fetch(ctx, &request).await,
            Some(p) => {
                super::paginate::collect(&p, url, ctx.checkpoint.as_deref(), |page| {
                    let mut r = request.clone();
                    r.url = page.to_string();
                    async move { fetch(ctx, &r).await }
                })
                .await
            }
        }
    }
}

/// One request through the outbound machinery; a non-2xx final answer is the error.
async fn fetch(ctx: &StageContext, request: &http::HttpRequest) -> Result<Value, StageError> {
    let response = ctx
        .outbound
        .send(
            &ctx.call_context(),
            request,
            &ctx.retry.clone().unwrap_or_default(),
        )
        .await?;
    if let Some(mut error) = http_failure_of(&response) {
        error.message = format!(
            "{} {}: {}",
            request.method,
            ctx.secrets.redact(request.url.as_str()),
            ctx.secrets.redact(&error.message)
        );
        return Err(error);
    }
    response.to_output()
}

/// With `allowed_hosts` on the stage, a redirect may only go to them or stay on the
/// request's own origin; without, any hop is followed (credentials never leave the origin).
fn redirect_guard(url: &str, allowed: &Arc<[String]>) -> Option<http::HopGuard> {
    if allowed.is_empty() {
        return None;
    }
    let origin = reqwest::Url::parse(url).ok()?.origin();
    let patterns: Vec<crate::http::HostPattern> = allowed
        .iter()
        .filter_map(|h| crate::http::HostPattern::parse(h))
        .collect();
    Some(http::HopGuard(Arc::new(move |next: &reqwest::Url| {
        let (host, port) = (
            next.host_str().unwrap_or_default(),
            next.port_or_known_default(),
        );
        if next.origin() == origin || patterns.iter().any(|p| p.matches(host, port)) {
            Ok(())
        } else {
            Err(format!("host {host} is not in the stage's allowed_hosts"))
        }
    })))
}

/// Stable across retries and resumptions of the same stage in the same run.
pub fn default_idempotency_key(run_id: &str, stage_id: &str) -> String {
    let digest = Sha256::digest(format!("{run_id}\0{stage_id}").as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}
