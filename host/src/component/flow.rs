//! What a stage returns to the scheduler: an output, and for a control-flow stage, what
//! to schedule next. A controller (conditional, foreach, trycatch, ...) is an ordinary
//! [`Component`](super::Component): it reads its rendered config and answers with a
//! [`Flow`]; the engine carries the directive out without knowing which component gave it.
//!
//! Before any run, [`Component::governs`](super::Component::governs) tells the pipeline
//! compiler which stages a controller governs, so every reference is checked up front.

use serde_json::{Map, Value};

use crate::error::StageError;

/// A stage's result and what the scheduler does next.
pub enum Flow {
    /// An ordinary output.
    Output(Value),
    /// The stages of branches not taken are skipped (reported `skipped`, output `null`).
    Skip { output: Value, stages: Vec<String> },
    /// Variables later stages read as `{{context.NAME}}`.
    Vars {
        output: Value,
        vars: Map<String, Value>,
    },
    /// The run (or the sub-pipeline it is in) ends now, succeeding with `value` as its
    /// output; stages not started are skipped, running ones cancelled.
    Return { output: Value, value: Value },
    /// Runs a block of governed stages once per frame, then hands the outcomes to `then`.
    Run(Box<RunBlock>),
}

/// Which stages a [`RunBlock`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockRef {
    /// The stages listed in the controller's own config field (`loop_stages`, `try_stages`).
    Field(&'static str),
    /// A whole pipeline, by the `pipeline_id` the stage names (resolved when compiled).
    Pipeline(String),
}

/// One run of a block: an iteration of a loop, a try, a sub-pipeline.
#[derive(Debug, Clone, Default)]
pub struct FrameSpec {
    /// Appended to the ids of the stages it runs (`[3]` makes `upsert[3]`), so every
    /// iteration is reported, journaled and keyed apart.
    pub suffix: String,
    /// `{{context.NAME}}` inside the block (the loop's item and index).
    pub vars: Map<String, Value>,
    /// What `{{stages.CONTROLLER.output}}` reads inside the block (FlowMason's
    /// `upstream.<foreach_id>.current_item`, a trycatch's error for its catch stages).
    pub controller_output: Option<Value>,
    /// The input of a sub-pipeline.
    pub input: Option<Value>,
}

/// How one frame ended.
#[derive(Debug, Clone)]
pub struct FrameOutcome {
    /// The frame's position in [`RunBlock::frames`].
    pub index: usize,
    /// The block's result (the last listed stage's output, or a sub-pipeline's output),
    /// or the error of the stage that failed it.
    pub result: Result<Value, FrameError>,
}

#[derive(Debug, Clone)]
pub struct FrameError {
    /// The failing stage as reported (`upsert[3]`).
    pub stage: String,
    pub error: StageError,
}

pub type Then = Box<dyn FnOnce(Vec<FrameOutcome>) -> Result<Flow, StageError> + Send>;

pub struct RunBlock {
    pub block: BlockRef,
    /// The frames, made as they start, so a loop over many items holds only the
    /// frames in flight.
    pub frames: Box<dyn Iterator<Item = FrameSpec> + Send>,
    /// How many frames `frames` yields (for progress).
    pub total: usize,
    /// Frames running at once (1 = in order).
    pub max_parallel: usize,
    /// Stop starting frames after the first failure (frames already running finish).
    pub stop_on_error: bool,
    /// A deadline for all the frames together; a frame still running is failed `timeout`.
    pub timeout: Option<std::time::Duration>,
    /// Called with the outcome of every frame that ran, in frame order.
    pub then: Then,
}

/// What a controller governs, read from its config as written (before any run).
#[derive(Debug, Default, Clone)]
pub struct Governs {
    /// Stages in the same DAG that the controller may skip (conditional, router): the
    /// config field each list came from, and the stage ids.
    pub branches: Vec<(String, Vec<String>)>,
    /// Stages taken out of the DAG and run by the controller as a block.
    pub blocks: Vec<BlockDecl>,
    /// A sub-pipeline it runs: the config field and the `pipeline_id`.
    pub pipeline: Option<(String, String)>,
    /// `{{context.NAME}}` variables it sets for stages downstream (variable_set).
    pub sets_vars: Vec<String>,
    /// Whether it sets variables whose names are only known when it runs.
    pub sets_dynamic_vars: bool,
}

#[derive(Debug, Clone)]
pub struct BlockDecl {
    /// The config field listing the stages (`loop_stages`).
    pub field: &'static str,
    pub stages: Vec<String>,
    /// Run once per item: its stages are reported `ID[i]` and may not be read from
    /// outside the controller. Otherwise (try, catch, finally) the stages run at most
    /// once and stages downstream of the controller may read them.
    pub per_item: bool,
    /// `{{context.NAME}}` variables set inside the block (the item and index names).
    pub vars: Vec<String>,
}

impl Governs {
    pub fn is_empty(&self) -> bool {
        self.branches.is_empty()
            && self.blocks.is_empty()
            && self.pipeline.is_none()
            && self.sets_vars.is_empty()
            && !self.sets_dynamic_vars
    }
}
