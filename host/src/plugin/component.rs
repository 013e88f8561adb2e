//! A WASM plugin as a [`Component`]: config checked against the plugin's schema, a
//! fresh sandboxed instance per invocation, traps and limits turned into stage errors.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::bindings::PluginErrorKind;
use super::instance::Outcome;
use super::state::{Call, HttpGrant};
use super::{DEFAULT_DEADLINE, Grant, Plugin, StageGrants, World, chain};
use crate::component::check::contains_template;
use crate::component::{Component, ConfigProblem, StageContext};
use crate::error::{ErrorKind, StageError};

/// The scheduler's view of a plugin. Holds the version it was resolved to; a registry
/// that hot-swaps hands out new `WasmComponent`s, so runs in flight keep theirs.
pub struct WasmComponent {
    pub plugin: Arc<Plugin>,
}

impl WasmComponent {
    pub fn new(plugin: Arc<Plugin>) -> Self {
        WasmComponent { plugin }
    }
}

impl Plugin {
    /// Checks a stage's config against the plugin's schema before any run.
    pub fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        // Templates may stand for anything, so only a config without any is checked now;
        // every config is checked again, rendered, before each invocation.
        match (&self.validator, contains_template(config)) {
            (Some(v), false) => crate::schema::violations(v, config)
                .into_iter()
                .map(|m| ConfigProblem {
                    path: String::new(),
                    message: m,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[async_trait::async_trait]
impl Component for WasmComponent {
    fn name(&self) -> &str {
        &self.plugin.name
    }

    fn describe(&self) -> String {
        format!(
            "{} {} ({:?} plugin, {})",
            self.plugin.name,
            self.plugin.version,
            self.plugin.kind,
            self.plugin.path.display()
        )
    }

    fn version(&self) -> Option<String> {
        Some(self.plugin.version.clone())
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        self.plugin.check_config(config)
    }

    fn sees_secrets(&self) -> bool {
        false
    }

    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        upstream: Arc<Value>,
    ) -> Result<Value, StageError> {
        let p = &self.plugin;
        if let Some(v) = &p.validator {
            let violations = crate::schema::violations(v, &config);
            if !violations.is_empty() {
                return Err(StageError::validation(format!(
                    "config does not match plugin {}'s schema: {}",
                    p.name,
                    violations.join("; ")
                )));
            }
        }
        let runtime = &p.runtime;
        let grant = (p.kind == World::Connector).then(|| HttpGrant {
            budgets: ctx.budgets.clone(),
            record: ctx.record,
            outbound: ctx.outbound.clone(),
            grant: Arc::new(Grant::new(
                &p.name,
                &p.allowed_hosts,
                &StageGrants {
                    allowed_hosts: &ctx.allowed_hosts,
                    secrets: &ctx.secret_grants,
                    base_url: config
                        .get("base_url")
                        .and_then(Value::as_str)
                        .filter(|_| ctx.trusted_base_url),
                    service_base_url: ctx.service_base_url.as_deref(),
                },
                &ctx.secrets,
                &runtime.policy(),
                &runtime.own_addrs(),
            )),
            stage_retry: ctx.retry.clone(),
            deadline: ctx.deadline,
            observer: ctx.observer.clone(),
        });
        // What the stage hands over may hold a secret an upstream echoed (data, never a
        // reference): masked, so a plugin sees no secret value by any path. Its config
        // was masked where data was substituted into it (`template`, `keep_secrets`);
        // what the pipeline's author wrote there literally is handed over as written.
        let config_text = serde_json::to_string(&config).unwrap_or_default();
        let input_text = ctx.secrets.masked_json(&upstream);
        drop(config);
        let deadline = ctx
            .deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or(DEFAULT_DEADLINE);
        let call = Call {
            run_id: ctx.run_id.clone(),
            stage_id: ctx.stage_id.clone(),
            trace: ctx.trace,
            secrets: ctx.secrets.clone(),
            http: grant,
            // Early by a tenth of the time, up to 5 epoch ticks, so guest code still
            // running at the stage's deadline is stopped by the sandbox (whose ticks a
            // loaded machine delays) and the error names the plugin.
            cpu_deadline: std::time::Instant::now()
                + deadline
                    .saturating_sub((deadline / 10).clamp(super::EPOCH_TICK, super::EPOCH_TICK * 5))
                    .max(super::EPOCH_TICK),
        };
        let outcome = p
            .maker
            .invoke(&p.spares, call, config_text, input_text)
            .await
            .map_err(|why| {
                StageError::new(ErrorKind::Sandbox, format!("plugin {}: {why}", p.name))
            })?;
        ctx.retries.fetch_add(outcome.retries, Ordering::Relaxed);
        if let Some((kind, why)) = &outcome.refusal {
            // A plugin that tried what it was not granted, or spent its budget, fails,
            // whatever it returns.
            return Err(StageError::new(
                *kind,
                format!(
                    "plugin {} in stage {}: refused: {why}",
                    p.name, ctx.stage_id
                ),
            ));
        }
        match &outcome.result {
            Ok(Ok(out)) => serde_json::from_str(out).map_err(|e| {
                StageError::internal(format!("plugin {} returned invalid JSON: {e}", p.name))
            }),
            Ok(Err(e)) => {
                let kind = match e.kind {
                    PluginErrorKind::InvalidConfig | PluginErrorKind::InvalidInput => {
                        ErrorKind::Validation
                    }
                    PluginErrorKind::Upstream => {
                        outcome.last_call_error.unwrap_or(ErrorKind::Http5xx)
                    }
                    PluginErrorKind::Timeout => ErrorKind::Timeout,
                    PluginErrorKind::RateLimited => ErrorKind::RateLimited,
                    PluginErrorKind::Unauthorized => ErrorKind::Http4xx,
                    PluginErrorKind::Internal => ErrorKind::Internal,
                };
                Err(StageError::new(
                    kind,
                    format!("plugin {}: {}", p.name, e.message),
                ))
            }
            Err(trap) => Err(sandbox_error(&p.name, trap, &outcome, deadline)),
        }
    }
}

fn sandbox_error(
    plugin: &str,
    trap: &wasmtime::Error,
    outcome: &Outcome,
    deadline: Duration,
) -> StageError {
    let stderr = &outcome.stderr;
    let detail = if stderr.is_empty() {
        String::new()
    } else {
        format!(
            " (stderr: {})",
            stderr.lines().take(5).collect::<Vec<_>>().join(" | ")
        )
    };
    let what = if let Some(bytes) = outcome.memory_exceeded {
        format!(
            "exceeded its memory limit of {} MiB (asked for {} MiB)",
            outcome.memory_limit >> 20,
            bytes >> 20
        )
    } else if matches!(
        trap.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::Interrupt)
    ) {
        format!(
            "was stopped at its CPU deadline of {}",
            humantime::format_duration(Duration::from_millis(deadline.as_millis() as u64))
        )
    } else {
        format!("trapped: {}", chain(trap))
    };
    StageError::new(
        ErrorKind::Sandbox,
        format!("plugin {plugin} {what}{detail}"),
    )
}
