//! `generator`: one chat completion from an OpenAI-compatible API, through host http.
//!
//! The base URL comes from `config.base_url`, else secret `OPENAI_BASE_URL`, else the
//! public endpoint; the key from secret `OPENAI_API_KEY`. The host substitutes both,
//! so this plugin never holds them. Output: the assistant's message parsed as JSON
//! when it is a JSON object (also inside a ```json fence), else `{"text": ...}`.

use fmhost_plugin_sdk::{
    Descriptor, Guest, HttpErrorKind, PluginError, PluginKind, Request, RetryPolicy,
    export_connector, invalid_config, json_body, parse_config,
};
use serde_json::{Value, json};

struct Generator;

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["prompt"],
  "properties": {
    "model": {"type": "string"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "system_prompt": {"type": "string"},
    "prompt": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "base_url": {"type": "string", "description": "OpenAI-compatible API base, e.g. http://127.0.0.1:11434/v1"}
  },
  "additionalProperties": false
}"#;

impl Guest for Generator {
    fn describe() -> Descriptor {
        Descriptor {
            name: "generator".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Connector,
            description: "Chat completion from an OpenAI-compatible API".into(),
            config_schema: SCHEMA.into(),
            allowed_hosts: vec!["api.openai.com".into()],
        }
    }

    fn invoke(config: String, _input: String) -> Result<String, PluginError> {
        let config = parse_config(&config)?;
        let prompt = config
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_config("config.prompt: required"))?;
        // The operator's secret OPENAI_BASE_URL, else the public endpoint; the host says
        // which secrets are set (it substitutes them; the plugin never sees a value).
        let mut base = match config.get("base_url").and_then(Value::as_str) {
            Some(b) => b.to_string(),
            None => "{{secrets.OPENAI_BASE_URL}}".to_string(),
        };
        let mut messages = Vec::new();
        if let Some(system) = config.get("system_prompt").and_then(Value::as_str) {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        let mut body = json!({
            "model": config.get("model").and_then(Value::as_str).unwrap_or("gpt-4o-mini"),
            "messages": messages,
        });
        for key in ["temperature", "max_tokens"] {
            if let Some(v) = config.get(key) {
                body[key] = v.clone();
            }
        }
        let mut auth = true;
        let (req, resp) = loop {
            let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
            if auth {
                headers.push((
                    "authorization".into(),
                    "Bearer {{secrets.OPENAI_API_KEY}}".into(),
                ));
            }
            let req = Request {
                method: "POST".into(),
                url: format!("{}/chat/completions", base.trim_end_matches('/')),
                headers,
                body: Some(body.to_string().into_bytes()),
                timeout_ms: Some(120_000),
                idempotency_key: None,
                retry: Some(RetryPolicy {
                    max_attempts: 3,
                    initial_delay_ms: 1000,
                    backoff_multiplier: 2.0,
                }),
            };
            match fmhost_plugin_sdk::http::send(&req) {
                Ok(resp) => break (req, resp),
                Err(e)
                    if e.kind == HttpErrorKind::InvalidRequest
                        && e.message.contains("OPENAI_BASE_URL is not set") =>
                {
                    base = "https://api.openai.com/v1".into();
                }
                // A local model server may need no key at all.
                Err(e)
                    if auth
                        && e.kind == HttpErrorKind::InvalidRequest
                        && e.message.contains("OPENAI_API_KEY is not set") =>
                {
                    auth = false;
                }
                Err(e) => return Err(fmhost_plugin_sdk::send_error(&req, e)),
            }
        };
        let answer = json_body(&req, &resp)?;
        let content = answer
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                fmhost_plugin_sdk::invalid_input(
                    "chat completion has no choices[0].message.content",
                )
            })?;
        Ok(parse_answer(content).to_string())
    }
}

/// A JSON object as-is (also inside a ```json fence); anything else as `{"text": ...}`.
fn parse_answer(content: &str) -> Value {
    let trimmed = content.trim();
    let inner = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|s| s.trim_end().strip_suffix("```"))
        .unwrap_or(trimmed)
        .trim();
    match serde_json::from_str::<Value>(inner) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"text": content}),
    }
}

export_connector!(Generator);
