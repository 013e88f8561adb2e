//! The FlowMason pipeline format: parsing a `.pipeline.json`, checking it whole, and
//! compiling it into a [`Plan`] the engine can run many times.
//!
//! Checking reports every problem at once, each with where it is; nothing here runs
//! anything or performs IO beyond reading the file it is given.

mod graph;
mod validate;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::component::{Component, Registry};
use crate::schema::Validator;
use crate::template::{Template, ValueTemplate};

pub use validate::compile;

/// One problem in a pipeline, with where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// Where: `stage "fetch-stripe": config.url`, or empty for the whole file.
    pub location: String,
    /// 1-based line and column, for JSON syntax errors.
    pub line_col: Option<(usize, usize)>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(location: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            location: location.into(),
            line_col: None,
            message: message.into(),
        }
    }

    /// The diagnostic as one line, prefixed with the file it is in.
    pub fn render(&self, file: &str) -> String {
        match (self.line_col, self.location.is_empty()) {
            (Some((l, c)), _) => format!("{file}:{l}:{c}: {}", self.message),
            (None, true) => format!("{file}: {}", self.message),
            (None, false) => format!("{file}: {}: {}", self.location, self.message),
        }
    }
}

/// Why a pipeline could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{} problem(s) in {path}", .diagnostics.len())]
    Invalid {
        path: String,
        diagnostics: Vec<Diagnostic>,
    },
}

impl LoadError {
    /// Every problem as a line, prefixed with the file.
    pub fn lines(&self) -> Vec<String> {
        match self {
            LoadError::Io { .. } => vec![self.to_string()],
            LoadError::Invalid { path, diagnostics } => {
                diagnostics.iter().map(|d| d.render(path)).collect()
            }
        }
    }
}

/// Reads and compiles a pipeline file.
pub fn load(path: &Path, registry: &Registry) -> Result<Plan, LoadError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    compile(&text, registry).map_err(|diagnostics| LoadError::Invalid {
        path: shown,
        diagnostics,
    })
}

/// The seed's retry block, on a stage or (as in the seed) inside an `http-request` config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, including the first.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry, in seconds.
    #[serde(default = "default_delay")]
    pub delay_seconds: f64,
    /// Growth of each further delay.
    #[serde(default = "default_multiplier")]
    pub backoff_multiplier: f64,
    /// Cap on a single delay, in seconds.
    #[serde(default)]
    pub max_delay_seconds: Option<f64>,
    /// A template evaluated against the attempt's `output`; when given, it alone decides.
    #[serde(default)]
    pub condition: Option<String>,
}

fn default_attempts() -> u32 {
    3
}
fn default_delay() -> f64 {
    1.0
}
fn default_multiplier() -> f64 {
    2.0
}

/// How a webhook trigger's deliveries are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Signature {
    /// `Stripe-Signature: t=...,v1=...`, HMAC-SHA256 over `t.body`, with a timestamp tolerance.
    Stripe,
    /// `X-Hub-Signature-256: sha256=...`, HMAC-SHA256 over the raw body.
    Github,
}

/// Something that starts runs from outside: `{"type": "webhook", "path": "/hooks/stripe", ...}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Only `webhook` for now.
    #[serde(rename = "type")]
    pub kind: String,
    /// The URL path `fmhost serve` receives deliveries on.
    pub path: String,
    /// The signing secret, normally `{{secrets.NAME}}`.
    pub secret: String,
    pub signature: Signature,
    /// How far a Stripe signature's timestamp may be from now.
    #[serde(default = "default_tolerance")]
    pub tolerance_seconds: u64,
}

fn default_tolerance() -> u64 {
    300
}

/// A stage's retry block with its condition parsed.
#[derive(Debug, Clone)]
pub struct RetryPlan {
    pub spec: RetrySpec,
    pub condition: Option<Template>,
}

/// A checked, compiled pipeline.
pub struct Plan {
    pub name: Arc<str>,
    pub version: Option<String>,
    pub description: Option<String>,
    pub input_schema: Option<Validator>,
    pub output_schema: Option<Validator>,
    pub stages: Vec<PlannedStage>,
    /// The stages whose outputs make the run's output: `output_stage`, else every stage
    /// nothing depends on.
    pub sinks: Vec<usize>,
    /// Policies for the services this pipeline calls, applied when a run starts.
    pub services: Vec<(String, crate::http::ServicePolicy)>,
    /// Webhook triggers, served by `fmhost serve`.
    pub triggers: Vec<Trigger>,
    /// The document as written, for journaling and display.
    pub source: Value,
}

pub struct PlannedStage {
    pub id: Arc<str>,
    /// The name as written in the pipeline.
    pub component_name: String,
    pub component: Arc<dyn Component>,
    pub deps: Vec<usize>,
    pub dependents: Vec<usize>,
    pub config: ValueTemplate,
    pub retry: Option<RetryPlan>,
    pub timeout: Option<Duration>,
    pub optional: bool,
    /// Hosts the pipeline grants this stage's plugin.
    pub allowed_hosts: Arc<[String]>,
    /// Secrets the pipeline grants this stage's plugin: those its config references
    /// and those its `secrets` list names.
    pub secret_grants: Arc<[String]>,
    /// Whether the config's `base_url` comes from the pipeline file, not from data.
    pub trusted_base_url: bool,
}

impl Plan {
    pub fn stage_index(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| &*s.id == id)
    }
}
