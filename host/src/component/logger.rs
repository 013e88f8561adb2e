//! `logger`: emits `config.message` as a structured event at `config.level`, and passes
//! its upstream output through, so a logger at the end does not swallow the result.

use serde_json::Value;

use super::{Checker, Component, ConfigProblem, StageContext};
use crate::error::StageError;

pub struct Logger;

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "warning", "error"];

#[async_trait::async_trait]
impl Component for Logger {
    fn name(&self) -> &str {
        "logger"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&["level", "message", "fields"])
            .required("message")
            .one_of("level", LEVELS)
            .object("fields");
        c.finish()
    }

    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        upstream: std::sync::Arc<Value>,
    ) -> Result<Value, StageError> {
        let level = config
            .get("level")
            .and_then(Value::as_str)
            .unwrap_or("info")
            .to_ascii_lowercase();
        let message = match config.get("message") {
            Some(m) => crate::template::to_text(m).into_owned(),
            None => {
                return Err(StageError::validation(
                    "config.message: required field is missing",
                ));
            }
        };
        let message = ctx.secrets.redact(&message);
        let fields = config.get("fields").map(|f| {
            let mut f = f.clone();
            ctx.secrets.redact_value(&mut f);
            f.to_string()
        });
        let fields = fields.as_deref().unwrap_or("");
        let (run_id, stage) = (&*ctx.run_id, &*ctx.stage_id);
        match level.as_str() {
            "trace" => {
                tracing::trace!(target: "fmhost::logger", run_id, stage, fields, "{message}")
            }
            "debug" => {
                tracing::debug!(target: "fmhost::logger", run_id, stage, fields, "{message}")
            }
            "warn" | "warning" => {
                tracing::warn!(target: "fmhost::logger", run_id, stage, fields, "{message}")
            }
            "error" => {
                tracing::error!(target: "fmhost::logger", run_id, stage, fields, "{message}")
            }
            _ => tracing::info!(target: "fmhost::logger", run_id, stage, fields, "{message}"),
        }
        Ok(std::sync::Arc::unwrap_or_clone(upstream))
    }
}
