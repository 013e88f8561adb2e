//! `nats-publish`: publishes one message to a NATS JetStream stream and waits for the
//! stream's acknowledgement, so a pipeline can emit events durably.
//!
//! The message carries `Nats-Msg-Id` (by default derived from run and stage, stable
//! across retries and a resumed run), so the stream's duplicate window drops a second
//! publish of the same event. Output `{stream, seq, duplicate, subject, msg_id}`.

use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Checker, Component, ConfigProblem, StageContext, default_idempotency_key};
use crate::error::{ErrorKind, StageError};

#[derive(Default)]
pub struct NatsPublish {
    clients: crate::nats::Clients,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `nats://host:port`, or `{{secrets.NAME}}` holding it.
    url: String,
    #[serde(default)]
    token: Option<String>,
    subject: String,
    /// The message, as JSON; the stage's upstream output by default.
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    headers: Map<String, Value>,
    /// `Nats-Msg-Id`; derived from run and stage by default.
    #[serde(default)]
    msg_id: Option<String>,
    /// Milliseconds to wait for the stream's acknowledgement (10 s by default).
    #[serde(default)]
    timeout: Option<u64>,
}

const FIELDS: &[&str] = &[
    "url", "token", "subject", "payload", "headers", "msg_id", "timeout",
];

#[async_trait::async_trait]
impl Component for NatsPublish {
    fn name(&self) -> &str {
        "nats-publish"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(FIELDS)
            .required("url")
            .required("subject")
            .string("url")
            .string("token")
            .string("subject")
            .object("headers")
            .string("msg_id")
            .integer("timeout", 1);
        if let Some(Value::String(s)) = config.get("subject")
            && !s.contains("{{")
            && let Some(why) = crate::nats::publish_subject_problem(s)
        {
            c.problem(".subject", why);
        }
        if let Some(Value::Object(headers)) = config.get("headers") {
            for name in headers.keys().filter(|k| !k.contains("{{")) {
                if let Err(e) = async_nats::HeaderName::from_str(name) {
                    c.problem(&format!(".headers.{name}"), e.to_string());
                }
            }
        }
        c.finish()
    }

    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        upstream: std::sync::Arc<Value>,
    ) -> Result<Value, StageError> {
        let config: Config = serde_path_to_error::deserialize(config)
            .map_err(|e| StageError::validation(format!("config.{}: {}", e.path(), e.inner())))?;
        let payload = match &config.payload {
            Some(p) => serde_json::to_vec(p),
            None => serde_json::to_vec(&*upstream),
        }
        .map_err(|e| StageError::internal(e.to_string()))?;
        let msg_id = config
            .msg_id
            .clone()
            .unwrap_or_else(|| default_idempotency_key(&ctx.run_id, &ctx.stage_id));
        // Rendered from data, the subject and header names are checked again here.
        if let Some(why) = crate::nats::publish_subject_problem(&config.subject) {
            return Err(StageError::validation(format!("config.subject: {why}")));
        }
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in &config.headers {
            let name = async_nats::HeaderName::from_str(k)
                .map_err(|e| StageError::validation(format!("config.headers.{k}: {e}")))?;
            headers.insert(name, crate::template::to_text(v).as_ref());
        }
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        headers.insert("X-Correlation-Id", ctx.run_id.as_ref());

        let mut wait = Duration::from_millis(config.timeout.unwrap_or(10_000));
        if let Some(deadline) = ctx.deadline {
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        let redact = |s: String| ctx.secrets.redact(&s).into_owned();
        let publish = async {
            let client = self
                .clients
                .get(&ctx.secrets, &config.url, config.token.as_deref())
                .await
                .map_err(|why| StageError::new(ErrorKind::Connect, why))?;
            let js = async_nats::jetstream::new(client);
            let ack = js
                .publish_with_headers(config.subject.clone(), headers, payload.into())
                .await
                .map_err(|e| publish_error(&config.subject, e))?
                .await
                .map_err(|e| publish_error(&config.subject, e))?;
            Ok::<_, StageError>(ack)
        };
        let ack = match tokio::time::timeout(wait, publish).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(mut e)) => {
                e.message = redact(e.message);
                return Err(e);
            }
            Err(_) => {
                return Err(StageError::new(
                    ErrorKind::Timeout,
                    format!(
                        "no acknowledgement for the message to {} within {} ms",
                        config.subject,
                        wait.as_millis()
                    ),
                ));
            }
        };
        Ok(json!({
            "stream": ack.stream,
            "seq": ack.sequence,
            "duplicate": ack.duplicate,
            "subject": config.subject,
            "msg_id": msg_id,
        }))
    }
}

fn publish_error(subject: &str, e: async_nats::jetstream::context::PublishError) -> StageError {
    use async_nats::jetstream::context::PublishErrorKind as K;
    let kind = match e.kind() {
        K::StreamNotFound => {
            return StageError::validation(format!(
                "no JetStream stream takes subject {subject} (create one whose subjects match it)"
            ));
        }
        K::TimedOut => ErrorKind::Timeout,
        K::MaxPayloadExceeded => ErrorKind::Validation,
        _ => ErrorKind::Connect,
    };
    StageError::new(kind, format!("publishing to {subject}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_header_name_or_subject_is_a_problem_not_a_panic() {
        let problems = NatsPublish::default().check_config(&json!({
            "url": "nats://127.0.0.1:4222", "subject": "a.*",
            "headers": {"X-Ok": "1", "bad:name": "2"}
        }));
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, [".subject", ".headers.bad:name"], "{problems:?}");
        assert!(crate::nats::publish_subject_problem("orders.created").is_none());
        assert!(crate::nats::publish_subject_problem("orders. created").is_some());
    }
}
