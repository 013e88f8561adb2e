//! The one component trait the scheduler knows, and the registry that names components.
//!
//! Built-ins (one file each in this folder) and WASM plugins both implement
//! [`Component`]; the scheduler cannot tell them apart. Adding a built-in is one file
//! plus one line in [`Registry::builtins`].

pub mod check;
pub mod control;
pub mod flow;
mod http_request;
mod logger;
mod nats_publish;
mod operators;
pub mod paginate;
mod schema_validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use serde_json::Value;

pub use check::{Checker, ConfigProblem};
pub use flow::{BlockDecl, BlockRef, Flow, FrameError, FrameOutcome, FrameSpec, Governs, RunBlock};
pub use http_request::default_idempotency_key;

use crate::error::StageError;
use crate::http::{CallContext, Outbound, RetryPolicy};
use crate::secrets::Secrets;

/// What a stage hands its component for one invocation.
pub struct StageContext {
    pub run_id: Arc<str>,
    pub pipeline: Arc<str>,
    pub stage_id: Arc<str>,
    pub outbound: Outbound,
    pub secrets: Arc<Secrets>,
    /// The stage's retry policy for outbound calls (the seed's `retry` block), if it has one.
    pub retry: Option<RetryPolicy>,
    /// Hosts the pipeline author lets this stage's plugin reach.
    pub allowed_hosts: Arc<[String]>,
    /// Secrets the pipeline author grants this stage's plugin.
    pub secret_grants: Arc<[String]>,
    /// Whether the config's `base_url` was written by the pipeline author (its host is granted).
    pub trusted_base_url: bool,
    /// The `base_url` of the declared service the stage names (its origin is granted).
    pub service_base_url: Option<Arc<str>>,
    /// When the stage's own timeout expires.
    pub deadline: Option<Instant>,
    /// Retries made so far, across all outbound calls of this stage.
    pub retries: AtomicU32,
    /// Told about every outbound attempt (the run journal).
    pub observer: Option<Arc<dyn crate::http::AttemptObserver>>,
    /// The stage's span in the run's trace.
    pub trace: Option<crate::trace::SpanRef>,
    /// The run's and the stage's request budgets.
    pub budgets: Arc<[Arc<crate::http::budget::Budget>]>,
    /// Whether the pipeline records its exchanges.
    pub record: bool,
    /// Where this stage got to in the run a replay or resume continues (its error's
    /// checkpoint there).
    pub checkpoint: Option<Arc<Value>>,
}

impl StageContext {
    /// A context for invoking a component outside a pipeline run (tools, tests, benchmarks).
    pub fn standalone(stage_id: &str, outbound: Outbound, secrets: Arc<Secrets>) -> StageContext {
        StageContext {
            run_id: Arc::from("standalone"),
            pipeline: Arc::from("standalone"),
            stage_id: Arc::from(stage_id),
            outbound,
            secrets,
            retry: None,
            allowed_hosts: Arc::from(Vec::new()),
            secret_grants: Arc::from(Vec::new()),
            trusted_base_url: false,
            service_base_url: None,
            deadline: None,
            retries: AtomicU32::new(0),
            observer: None,
            trace: None,
            budgets: Arc::from(Vec::new()),
            record: false,
            checkpoint: None,
        }
    }

    pub fn call_context(&self) -> CallContext<'_> {
        CallContext {
            run_id: &self.run_id,
            stage_id: &self.stage_id,
            secrets: &self.secrets,
            deadline: self.deadline,
            retries: &self.retries,
            observer: self.observer.as_deref(),
            trace: self.trace,
            budgets: &self.budgets,
            record: self.record,
        }
    }
}

/// A unit of work a stage names in `component`.
#[async_trait::async_trait]
pub trait Component: Send + Sync {
    /// The canonical name (`http-request`).
    fn name(&self) -> &str;

    /// A one-line summary for `fmhost plugins list`.
    fn describe(&self) -> String {
        format!("{} (built-in)", self.name())
    }

    /// Checks a stage's config before any run, where templates may stand for any value.
    /// Paths in the problems are relative to `config`.
    fn check_config(&self, _config: &Value) -> Vec<ConfigProblem> {
        Vec::new()
    }

    /// The version that runs, for reports (`1.0.0`); built-ins have none.
    fn version(&self) -> Option<String> {
        None
    }

    /// What a run should hold on to for its whole duration. A hot-swappable plugin
    /// returns its current version here, so a run started before a swap finishes on
    /// the version it started with; everything else returns `None` (itself).
    fn pin(&self) -> Option<Arc<dyn Component>> {
        None
    }

    /// Whether the rendered config may hold secret values. Untrusted plugins get
    /// `{{secrets.NAME}}` left in place; the host substitutes it when they ask for a call.
    fn sees_secrets(&self) -> bool {
        true
    }

    /// For a control-flow component: the stages it governs and the variables it sets,
    /// read from its config as written, so the pipeline is checked before any run; with
    /// problems found in the fields that name stages (relative to `config`).
    fn governs(&self, _config: &Value) -> (Governs, Vec<ConfigProblem>) {
        (Governs::default(), Vec::new())
    }

    /// Config fields that hold an expression the component evaluates itself, per item
    /// or value (a filter's `condition` over `item`): kept as written, not rendered.
    fn raw_fields(&self) -> &'static [&'static str] {
        &[]
    }

    /// Runs once per stage execution. `upstream` is the output of the single
    /// dependency, an object keyed by dependency id when there are several, or the
    /// pipeline input when there are none. A control-flow component implements
    /// [`run`](Self::run) instead and keeps this default.
    async fn invoke(
        &self,
        _ctx: &StageContext,
        _config: Value,
        _upstream: Arc<Value>,
    ) -> Result<Value, StageError> {
        Err(StageError::internal(format!(
            "{} is a control-flow component: the engine runs it through run()",
            self.name()
        )))
    }

    /// The directive a stage gave, from the output it gave it with, for a stage whose
    /// output a replay or a resumed run takes from the journal: a conditional skips the
    /// same branches again, a variable_set sets the same variables.
    /// Only the directive counts: the engine already holds the output.
    fn replay(&self, _output: &Value) -> Flow {
        Flow::Output(Value::Null)
    }

    /// What the scheduler calls: the output, and for a control-flow component what to
    /// schedule next. Ordinary components (every plugin) just [`invoke`](Self::invoke).
    async fn run(
        &self,
        ctx: &StageContext,
        config: Value,
        upstream: Arc<Value>,
    ) -> Result<Flow, StageError> {
        self.invoke(ctx, config, upstream).await.map(Flow::Output)
    }
}

/// Components by canonical name. `json_transform` and `json-transform` are one name.
#[derive(Clone, Default)]
pub struct Registry {
    components: BTreeMap<String, Arc<dyn Component>>,
}

/// The canonical form of a component name: lowercase, with `-` for `_`.
pub fn canonical_name(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('_', "-")
}

impl Registry {
    /// The built-in components.
    pub fn builtins() -> Registry {
        let mut r = Registry::default();
        r.register(Arc::new(http_request::HttpRequest));
        r.register(Arc::new(schema_validate::SchemaValidate));
        r.register(Arc::new(logger::Logger));
        r.register(Arc::new(nats_publish::NatsPublish::default()));
        r.register(Arc::new(control::Conditional));
        r.register(Arc::new(control::Router));
        r.register(Arc::new(control::Foreach));
        r.register(Arc::new(control::TryCatch));
        r.register(Arc::new(control::Subpipeline));
        r.register(Arc::new(control::Return));
        r.register(Arc::new(operators::Filter));
        r.register(Arc::new(operators::VariableSet));
        r.register(Arc::new(operators::Loop));
        r
    }

    /// Adds or replaces a component under its canonical name.
    pub fn register(&mut self, component: Arc<dyn Component>) {
        self.components
            .insert(canonical_name(component.name()), component);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Component>> {
        self.components.get(&canonical_name(name))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.components.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Component>> {
        self.components.values()
    }
}
