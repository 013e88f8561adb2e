//! Bindings and helpers for fmhost connector plugins (world `connector`).
//!
//! A connector implements [`Guest`] and calls [`export_connector!`]. Its HTTP goes
//! through [`get_json`]/[`send`], which the host performs: the plugin writes
//! `{{secrets.NAME}}` where a credential goes and never sees the value.

wit_bindgen::generate!({
    world: "connector",
    path: "../../wit",
    pub_export_macro: true,
    export_macro_name: "export_connector",
    default_bindings_module: "fmhost_plugin_sdk",
});

pub use exports::fmhost::plugin::plugin::Guest;
pub use fmhost::plugin::http::{self, HttpError, HttpErrorKind, Request, Response, RetryPolicy};
pub use fmhost::plugin::log::{self, Level};
pub use fmhost::plugin::types::{Descriptor, ErrorKind, PluginError, PluginKind};
use serde_json::Value;

pub fn error(kind: ErrorKind, message: impl Into<String>) -> PluginError {
    let retryable = matches!(
        kind,
        ErrorKind::Upstream | ErrorKind::Timeout | ErrorKind::RateLimited
    );
    PluginError {
        kind,
        message: message.into(),
        retryable,
    }
}

pub fn invalid_config(message: impl Into<String>) -> PluginError {
    error(ErrorKind::InvalidConfig, message)
}

pub fn invalid_input(message: impl Into<String>) -> PluginError {
    error(ErrorKind::InvalidInput, message)
}

/// Parses the stage config handed to `invoke`.
pub fn parse_config(config: &str) -> Result<Value, PluginError> {
    serde_json::from_str(config).map_err(|e| invalid_config(format!("config is not JSON: {e}")))
}

/// A string field of the config, or `default` when absent.
pub fn config_str<'a>(
    config: &'a Value,
    key: &str,
    default: Option<&'a str>,
) -> Result<&'a str, PluginError> {
    match config.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid_config(format!(
            "config.{key}: expected a string, found {other}"
        ))),
        None => default
            .ok_or_else(|| invalid_config(format!("config.{key}: required field is missing"))),
    }
}

pub fn info(message: &str) {
    log::log(Level::Info, message);
}

/// Sends a request through the host.
pub fn send(req: &Request) -> Result<Response, PluginError> {
    http::send(req).map_err(|e| send_error(req, e))
}

/// The plugin error for a failed [`http::send`], naming the call.
pub fn send_error(req: &Request, e: HttpError) -> PluginError {
    let kind = match e.kind {
        HttpErrorKind::Timeout => ErrorKind::Timeout,
        HttpErrorKind::Refused | HttpErrorKind::InvalidRequest => ErrorKind::InvalidConfig,
        _ => ErrorKind::Upstream,
    };
    error(kind, format!("{} {}: {}", req.method, req.url, e.message))
}

/// GETs `url` and parses a 2xx JSON body; other statuses become errors of the right kind.
pub fn get_json(
    url: &str,
    headers: &[(&str, &str)],
    retry: Option<RetryPolicy>,
) -> Result<Value, PluginError> {
    let req = Request {
        method: "GET".into(),
        url: url.into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: None,
        timeout_ms: None,
        idempotency_key: None,
        retry,
    };
    let resp = send(&req)?;
    json_body(&req, &resp)
}

/// Every page of a list, fetched by the host: `paginate` is a JSON block as
/// `http-request` takes it (`{"style": "cursor", "items_path": "data", ...}`). Returns
/// `{"items": [...], "pages": N, "truncated": bool}`.
pub fn get_all(
    url: &str,
    headers: &[(&str, &str)],
    paginate: &Value,
) -> Result<Value, PluginError> {
    let mut headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    headers.push(("x-fmhost-paginate".into(), paginate.to_string()));
    let req = Request {
        method: "GET".into(),
        url: url.into(),
        headers,
        body: None,
        timeout_ms: None,
        idempotency_key: None,
        retry: None,
    };
    let resp = send(&req)?;
    json_body(&req, &resp)
}

/// The JSON body of a 2xx response, or an error naming the call and status.
pub fn json_body(req: &Request, resp: &Response) -> Result<Value, PluginError> {
    let text = String::from_utf8_lossy(&resp.body);
    if !(200..300).contains(&resp.status) {
        let kind = match resp.status {
            401 | 403 => ErrorKind::Unauthorized,
            429 => ErrorKind::RateLimited,
            404 => ErrorKind::InvalidInput,
            _ => ErrorKind::Upstream,
        };
        let snippet: String = text.chars().take(300).collect();
        return Err(error(
            kind,
            format!(
                "{} {}: http {}: {snippet}",
                req.method, req.url, resp.status
            ),
        ));
    }
    serde_json::from_str(&text).map_err(|e| {
        error(
            ErrorKind::Upstream,
            format!("{} {}: response is not JSON: {e}", req.method, req.url),
        )
    })
}

/// Reads a JSON path such as `statistics.open_tickets` that a vendor's documented
/// shape promises, failing loudly (naming the field) when the vendor changed it.
pub fn field<'a>(value: &'a Value, path: &str, vendor: &str) -> Result<&'a Value, PluginError> {
    let mut cur = value;
    for seg in path.split('.') {
        cur = cur.get(seg).ok_or_else(|| {
            invalid_input(format!("{vendor} response has no field `{path}`: the API's shape changed or the connector targets another version"))
        })?;
    }
    Ok(cur)
}
