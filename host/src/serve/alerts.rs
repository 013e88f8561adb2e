//! Alerts (a pipeline's `"alerts"`): a Slack-compatible message to a webhook when a run
//! fails or is dead-lettered, a circuit opens, a file does not arrive in time or a
//! schedule's fires are missed. Each goes out through the host's outbound machinery as
//! service `alerts` (retried with an idempotency key, rate-limited when a pipeline
//! declares that service, logged per attempt like any call), at most one per condition
//! per cool-down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::pipeline::{AlertOn, Plan};

/// What happened, for the pipelines whose alerts listen for it.
pub struct Event {
    pub on: AlertOn,
    /// What the cool-down is per, beside pipeline and condition: a stage, a service, a trigger.
    pub subject: String,
    /// One line for people (Slack's `text`).
    pub text: String,
    /// `run_id`, `stage`, `error_kind`, `correlation_id`, `service`, `trigger`, as known.
    pub fields: Value,
}

#[derive(Default)]
pub struct Alerter {
    /// When each (pipeline, alert, subject) last sent.
    sent: Mutex<HashMap<(String, usize, String), Instant>>,
}

impl Alerter {
    /// Sends `event` to every alert of `plan` that listens for it, unless one was sent
    /// for the same condition within its cool-down. Returns at once; sending is a task.
    pub fn raise(&self, engine: &Engine, plan: &Plan, event: &Event) {
        for (i, alert) in plan.alerts.iter().enumerate() {
            if alert.on != event.on {
                continue;
            }
            let key = (plan.name.to_string(), i, event.subject.clone());
            let metrics = engine.outbound.metrics.clone();
            {
                let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
                if sent
                    .get(&key)
                    .is_some_and(|at| at.elapsed() < alert.cooldown)
                {
                    metrics.record_alert(&plan.name, event.on.as_str(), "suppressed");
                    tracing::debug!(target: "fmhost::alerts", pipeline = %plan.name, on = event.on.as_str(), "alert {} for {} suppressed (cool-down)", event.on.as_str(), event.subject);
                    continue;
                }
                sent.insert(key, Instant::now());
            }
            let mut fields = event.fields.clone();
            fields["on"] = json!(event.on.as_str());
            fields["pipeline"] = json!(&*plan.name);
            let body = json!({
                "text": format!("fmhost {}: {}", plan.name, event.text),
                "fmhost": fields,
            });
            let (engine, webhook, pipeline, on) = (
                engine.clone(),
                alert.webhook.clone(),
                plan.name.to_string(),
                event.on,
            );
            tokio::spawn(async move {
                let outcome = match send(&engine, &webhook, &body).await {
                    Ok(status) => {
                        tracing::info!(target: "fmhost::alerts", pipeline = %pipeline, on = on.as_str(), status, "alert {} sent", on.as_str());
                        "sent"
                    }
                    Err(why) => {
                        tracing::error!(target: "fmhost::alerts", pipeline = %pipeline, on = on.as_str(), "alert {} not delivered: {why}", on.as_str());
                        "failed"
                    }
                };
                engine
                    .outbound
                    .metrics
                    .record_alert(&pipeline, on.as_str(), outcome);
            });
        }
    }
}

/// Posts `body` to the alert's webhook (a URL or `{{secrets.NAME}}`).
async fn send(engine: &Engine, webhook: &str, body: &Value) -> Result<u16, String> {
    let secrets = engine.secrets();
    let url = secrets.resolve(webhook, "the alert's webhook")?;
    let id = format!("alert_{:016x}", rand::random::<u64>());
    let retries = std::sync::atomic::AtomicU32::new(0);
    let ctx = crate::http::CallContext {
        run_id: &id,
        stage_id: "alert",
        secrets: &secrets,
        deadline: Some(Instant::now() + std::time::Duration::from_secs(60)),
        retries: &retries,
        observer: None,
        trace: None,
        budgets: &[],
        record: false,
    };
    let req = crate::http::HttpRequest {
        method: reqwest::Method::POST,
        url,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Some(body.to_string().into_bytes()),
        timeout: Some(std::time::Duration::from_secs(10)),
        idempotency_key: Some(id.clone()),
        // Its own service, never a vendor's that shares the webhook's origin: an open
        // breaker must not hold back the alert that reports it. A pipeline may declare
        // a service named `alerts` to rate-limit them.
        service: Some("alerts".into()),
        hop_guard: None,
        credential_headers: Vec::new(),
    };
    let policy = crate::http::RetryPolicy {
        max_attempts: 4,
        ..crate::http::RetryPolicy::no_retry()
    };
    match engine.outbound.send(&ctx, &req, &policy).await {
        Ok(resp) if resp.is_success() => Ok(resp.status),
        Ok(resp) => Err(format!("the webhook answered {}", resp.status)),
        Err(e) => Err(e.to_string()),
    }
}
