//! The FlowMason pipeline format: parsing a `.pipeline.json`, checking it whole, and
//! compiling it into a [`Plan`] the engine can run many times.
//!
//! Checking reports every problem at once, each with where it is; nothing here runs
//! anything or performs IO beyond reading the file it is given.

pub mod control;
mod graph;
pub mod triggers;
mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::component::{Component, Registry};
use crate::schema::Validator;
use crate::template::{Template, ValueTemplate};

pub use control::Block;
pub use triggers::{Alert, AlertOn, Signature, Trigger, TriggerKind, Webhook};
pub use validate::{compile, compile_in};

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

/// The canonical names of every component a pipeline document names, wherever a
/// `component` or `component_type` appears in it, so a one-run command can load only
/// those plugins. `None` when that cannot be known from the document alone: it is not
/// JSON, or it runs a sub-pipeline (whose components are known once that is loaded).
pub fn components_named(text: &str) -> Option<std::collections::BTreeSet<String>> {
    fn walk(v: &Value, names: &mut std::collections::BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if let ("component" | "component_type", Value::String(name)) = (k.as_str(), v) {
                        names.insert(crate::component::canonical_name(name));
                    }
                    walk(v, names);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, names)),
            _ => {}
        }
    }
    let doc: Value = serde_json::from_str(text).ok()?;
    let mut names = std::collections::BTreeSet::new();
    walk(&doc, &mut names);
    (!names.contains("subpipeline")).then_some(names)
}

/// Reads and compiles a pipeline file.
pub fn load(path: &Path, registry: &Registry) -> Result<Plan, LoadError> {
    load_from(path, registry, &[])
}

/// Compiles a pipeline document kept elsewhere (the journal's copy of what a run ran);
/// sub-pipelines are found in `dir`, as they were beside its file.
pub fn load_text(
    text: &str,
    shown: &str,
    dir: Option<&Path>,
    registry: &Registry,
) -> Result<Plan, LoadError> {
    let origin = Origin {
        dir: dir.map(Path::to_path_buf),
        stack: Vec::new(),
    };
    compile_in(text, registry, &origin).map_err(|diagnostics| LoadError::Invalid {
        path: shown.to_string(),
        diagnostics,
    })
}

/// Largest file read while looking for a sub-pipeline by its name.
const MAX_PIPELINE_BYTES: u64 = 16 << 20;

/// Most sub-pipelines nested in one another.
pub const MAX_SUBPIPELINE_DEPTH: usize = 8;

fn load_from(path: &Path, registry: &Registry, stack: &[PathBuf]) -> Result<Plan, LoadError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let mut chain = stack.to_vec();
    chain.push(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
    let origin = Origin {
        dir: path.parent().map(Path::to_path_buf),
        stack: chain,
    };
    compile_in(&text, registry, &origin).map_err(|diagnostics| LoadError::Invalid {
        path: shown,
        diagnostics,
    })
}

/// Where a pipeline came from: its sub-pipelines are resolved beside it, and the chain
/// of files that led to it catches recursion.
#[derive(Debug, Default, Clone)]
pub struct Origin {
    /// The directory of the pipeline file (the current directory when `None`).
    pub dir: Option<PathBuf>,
    /// The files being loaded, outermost first.
    pub stack: Vec<PathBuf>,
}

impl Origin {
    /// Finds sub-pipeline `id`: a path (relative to this pipeline's directory), or a
    /// name: `ID.pipeline.json`, `ID.json`, or the `.json` file whose `name` is `ID`.
    pub fn find(&self, id: &str) -> Option<PathBuf> {
        let dir = self.dir.clone().unwrap_or_else(|| PathBuf::from("."));
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        if id.ends_with(".json") || id.contains('/') {
            let p = dir.join(id);
            return p.is_file().then_some(p);
        }
        for name in [format!("{id}.pipeline.json"), format!("{id}.json")] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        // Looking for a name reads pipeline files; one past any pipeline's size is not one.
        files.into_iter().find(|p| {
            p.metadata().is_ok_and(|m| m.len() <= MAX_PIPELINE_BYTES)
                && std::fs::read(p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|v| v.get("name").and_then(Value::as_str) == Some(id))
        })
    }

    /// Loads sub-pipeline `id`, or says why it cannot be run.
    pub fn resolve(&self, id: &str, registry: &Registry) -> Result<Arc<Plan>, String> {
        let Some(path) = self.find(id) else {
            let dir = self.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            return Err(format!(
                "sub-pipeline \"{id}\" not found (looked for {id}.pipeline.json, {id}.json and a pipeline named {id} in {})",
                dir.display()
            ));
        };
        let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if let Some(at) = self.stack.iter().position(|p| *p == canonical) {
            let names: Vec<String> = self.stack[at..]
                .iter()
                .chain(std::iter::once(&canonical))
                .map(|p| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            return Err(format!(
                "sub-pipelines call each other in a cycle: {}",
                names.join(" -> ")
            ));
        }
        if self.stack.len() >= MAX_SUBPIPELINE_DEPTH {
            return Err(format!(
                "sub-pipeline \"{id}\" is nested deeper than {MAX_SUBPIPELINE_DEPTH} levels"
            ));
        }
        load_from(&path, registry, &self.stack)
            .map(Arc::new)
            .map_err(|e| {
                format!(
                    "sub-pipeline \"{id}\" ({}): {}",
                    path.display(),
                    e.lines().join("; ")
                )
            })
    }
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
    /// of the pipeline's own DAG that nothing depends on.
    pub sinks: Vec<usize>,
    /// Block 0 is the pipeline's own DAG; the others are run by their controllers
    /// (a foreach body, a trycatch's try, catch and finally stages).
    pub blocks: Vec<Block>,
    /// Stage index by id.
    pub index: HashMap<Arc<str>, usize>,
    /// Policies for the services this pipeline calls, applied when a run starts.
    pub services: Vec<(String, crate::http::ServicePolicy)>,
    /// What starts runs from outside, served by `fmhost serve`.
    pub triggers: Vec<Trigger>,
    /// Whom to tell when a run fails, a breaker opens, a file or a fire is missing.
    pub alerts: Vec<Alert>,
    /// The whole run's request budget.
    pub budget: Option<crate::http::budget::BudgetSpec>,
    /// Record every outbound exchange in the journal (`fmhost record`).
    pub record: bool,
    /// The document as written, for journaling and display.
    pub source: Value,
    /// `source` as journaled, made on first use.
    pub document: std::sync::OnceLock<Arc<Document>>,
}

/// A pipeline document as the journal keeps it: its text and that text's SHA-256.
pub struct Document {
    pub hash: String,
    pub text: String,
}

impl Plan {
    /// The document as the journal keeps it, serialised and hashed once per plan.
    pub fn document(&self) -> &Arc<Document> {
        self.document.get_or_init(|| {
            let text = serde_json::to_string(&self.source).unwrap_or_default();
            Arc::new(Document {
                hash: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())),
                text,
            })
        })
    }
}

pub struct PlannedStage {
    pub id: Arc<str>,
    /// The name as written in the pipeline.
    pub component_name: String,
    pub component: Arc<dyn Component>,
    /// Every stage it depends on (its `upstream` and what its templates may read).
    pub deps: Vec<usize>,
    pub dependents: Vec<usize>,
    /// The block it runs in.
    pub block: usize,
    /// The dependencies the scheduler waits for: in its block, a controller standing for
    /// the stages it governs.
    pub wait_on: Vec<usize>,
    /// The stages of its block that wait for it.
    pub wakes: Vec<usize>,
    /// The blocks it controls, by the config field that lists them.
    pub blocks: Vec<(&'static str, usize)>,
    /// The sub-pipeline it runs.
    pub subplan: Option<Arc<Plan>>,
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
    /// The `base_url` (as written) of the declared service the stage names: its origin
    /// is granted to the stage's plugin.
    pub service_base_url: Option<Arc<str>>,
    /// The stage's own request budget.
    pub budget: Option<crate::http::budget::BudgetSpec>,
}

impl Plan {
    pub fn stage_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}
