//! What a run produced: per-stage status, timings, attempts and errors, and the output.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::borrow::Cow;

use crate::error::StageError;
use crate::secrets::Secrets;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Not run because an upstream stage failed or the run stopped.
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl StageStatus {
    /// The name in reports and the journal (`succeeded`).
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Running => "running",
            StageStatus::Succeeded => "succeeded",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
        }
    }
}

impl RunStatus {
    /// The name in reports and the journal (`timed-out`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed-out",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    pub id: String,
    pub component: String,
    /// The plugin version that ran, when the component is a plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub status: StageStatus,
    /// Whether a failure of this stage is tolerated (its output is then `null`).
    pub optional: bool,
    /// Milliseconds from the start of the run.
    pub started_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    /// 1 + every retry made by the stage's outbound calls.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StageError>,
    /// Why a skipped stage did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_because: Option<String>,
    /// The run this stage's output was taken from, when it did not run (replay, resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Arc<Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: String,
    pub pipeline: String,
    pub status: RunStatus,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub duration_ms: u64,
    /// The run's output: the single sink's output, or an object keyed by sink id.
    pub output: Option<Value>,
    /// One line saying why the run did not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The stage whose failure failed the run (`upsert[3]`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_stage: Option<String>,
    pub stages: Vec<StageReport>,
    /// The run's trace and span (W3C ids), for following it in a tracing backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::RunTrace>,
}

impl RunReport {
    /// Makes the report fit to leave the process (a command's stdout, a report file, an
    /// API answer, a trace exporter): every secret value, and each encoding of one, masked
    /// in the output, each stage's output, error and checkpoint, and the run's error.
    /// [`crate::engine::Engine::run`] returns reports redacted; the journal, which must
    /// restore what stages produced, stores them as references instead
    /// ([`Secrets::store`]) from what its observer saw while the run went on.
    pub fn redact(&mut self, secrets: &Secrets) {
        if let Some(out) = self.output.as_mut() {
            secrets.redact_value(out);
        }
        if let Some(e) = self.error.as_mut()
            && let Cow::Owned(masked) = secrets.redact(e)
        {
            *e = masked;
        }
        for s in &mut self.stages {
            if let Some(out) = &s.output {
                s.output = Some(secrets.redact_shared(out));
            }
            if let Some(err) = s.error.as_mut() {
                if let Cow::Owned(masked) = secrets.redact(&err.message) {
                    err.message = masked;
                }
                if let Some(c) = err.checkpoint.as_mut() {
                    secrets.redact_value(c);
                }
            }
            if let Some(why) = s.skipped_because.as_mut()
                && let Cow::Owned(masked) = secrets.redact(why)
            {
                *why = masked;
            }
        }
    }

    pub fn stage(&self, id: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.id == id)
    }
}
