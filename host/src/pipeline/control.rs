//! The control-flow structure of a pipeline: which stages each controller governs,
//! the blocks they run, and what each stage may depend on and read. Built from what
//! the components say they govern ([`Component::governs`]), so nothing here knows a
//! component by name.
//!
//! Blocks: block 0 is the pipeline's own DAG. A `foreach` body or a trycatch's
//! try/catch/finally list is another block, taken out of its parent's DAG and run by
//! the engine when its controller says so. A branch of a conditional or router stays
//! in its parent's DAG; the controller only skips it.

use std::collections::HashMap;
use std::sync::Arc;

use super::Diagnostic;
use crate::component::{Component, Governs};

pub struct Block {
    /// The stages in it, in pipeline order.
    pub stages: Vec<usize>,
    /// The controller that runs it (`None` for block 0).
    pub controller: Option<usize>,
    /// The config field that lists it (`loop_stages`).
    pub field: &'static str,
    /// The stage whose output is the block's result: the last one listed.
    pub result: Option<usize>,
    /// Runs once per item; its stages are invisible outside it.
    pub per_item: bool,
    /// `{{context.NAME}}` variables the controller sets inside it.
    pub vars: Vec<String>,
}

/// What one stage of a [`Structure`] is.
pub struct StageShape {
    pub block: usize,
    /// Dependencies the scheduler waits for, all in the stage's block: a dependency
    /// inside a controller's block is waited for through the controller.
    pub wait_on: Vec<usize>,
    /// Blocks this stage controls, by config field.
    pub blocks: Vec<(&'static str, usize)>,
    /// A sub-pipeline it runs: config field and pipeline id.
    pub pipeline: Option<(String, String)>,
    pub governs: Governs,
}

pub struct Structure {
    pub blocks: Vec<Block>,
    pub stages: Vec<StageShape>,
}

impl Structure {
    /// Blocks from `b` up to block 0.
    pub fn ancestry(&self, mut b: usize) -> Vec<usize> {
        let mut out = vec![b];
        // Bounded: controllers that govern each other (a cycle, reported) would loop.
        while let Some(c) = self.blocks[b].controller {
            b = self.stages[c].block;
            if out.contains(&b) {
                break;
            }
            out.push(b);
        }
        out
    }

    /// Why `reader` may not use `target` (depend on it or read its output), if it may not:
    /// a stage inside a per-item block is only visible within that block.
    pub fn hidden(&self, reader: usize, target: usize, ids: &[String]) -> Option<String> {
        let mine = self.ancestry(self.stages[reader].block);
        for b in self.ancestry(self.stages[target].block) {
            if mine.contains(&b) {
                return None;
            }
            if self.blocks[b].per_item {
                let c = self.blocks[b]
                    .controller
                    .expect("a per-item block has a controller");
                return Some(format!(
                    "stage \"{}\" runs once per item inside \"{}\" ({}); read the loop's output (`stages.{}.output.results`) and depend on \"{}\" instead",
                    ids[target], ids[c], self.blocks[b].field, ids[c], ids[c]
                ));
            }
        }
        None
    }
}

/// Builds the structure and reports every misuse: unknown ids, a stage governed twice,
/// governed stages that do not depend on their controller, and edges that cross into a
/// loop body.
#[allow(clippy::too_many_arguments)]
pub fn analyse(
    ids: &[String],
    locs: &[String],
    components: &[Option<Arc<dyn Component>>],
    configs: &[serde_json::Value],
    deps: &[Vec<usize>],
    upstream: &[Vec<bool>],
    index: &HashMap<&str, usize>,
    diags: &mut Vec<Diagnostic>,
) -> Structure {
    let n = ids.len();
    let mut blocks = vec![Block {
        stages: Vec::new(),
        controller: None,
        field: "stages",
        result: None,
        per_item: false,
        vars: Vec::new(),
    }];
    let mut shapes: Vec<StageShape> = (0..n)
        .map(|_| StageShape {
            block: 0,
            wait_on: Vec::new(),
            blocks: Vec::new(),
            pipeline: None,
            governs: Governs::default(),
        })
        .collect();
    // The blocks that list each stage, and each block's stages as listed.
    let mut claims: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut listed: Vec<Vec<usize>> = vec![Vec::new()];
    let mut in_branch: Vec<Option<(usize, String)>> = vec![None; n];
    let lookup = |c: usize, field: &str, id: &str, diags: &mut Vec<Diagnostic>| -> Option<usize> {
        match index.get(id) {
            Some(&s) if s == c => {
                diags.push(Diagnostic::new(
                    format!("{}: config.{field}", locs[c]),
                    "a controller cannot govern itself",
                ));
                None
            }
            Some(&s) => Some(s),
            None => {
                diags.push(Diagnostic::new(
                    format!("{}: config.{field}", locs[c]),
                    format!(
                        "unknown stage \"{id}\"{}",
                        super::validate::suggest(id, index.keys().copied())
                    ),
                ));
                None
            }
        }
    };
    for c in 0..n {
        let Some(component) = &components[c] else {
            continue;
        };
        let (governs, problems) = component.governs(&configs[c]);
        for p in problems {
            diags.push(Diagnostic::new(
                format!("{}: config{}", locs[c], p.path),
                p.message,
            ));
        }
        let mut governed = Vec::new();
        for (field, list) in &governs.branches {
            for id in list {
                let Some(s) = lookup(c, field, id, diags) else {
                    continue;
                };
                match &in_branch[s] {
                    Some((other, _)) if *other == c => {}
                    Some((other, f)) => diags.push(Diagnostic::new(
                        format!("{}: config.{field}", locs[c]),
                        format!(
                            "stage \"{id}\" is already governed by \"{}\" ({f}); a stage has one controller",
                            ids[*other]
                        ),
                    )),
                    None => in_branch[s] = Some((c, field.clone())),
                }
                governed.push((field.clone(), s));
            }
        }
        for decl in &governs.blocks {
            let b = blocks.len();
            let mut stages = Vec::new();
            for id in &decl.stages {
                let Some(s) = lookup(c, decl.field, id, diags) else {
                    continue;
                };
                if !claims[s].contains(&b) {
                    claims[s].push(b);
                }
                stages.push(s);
                governed.push((decl.field.to_string(), s));
            }
            listed.push(stages);
            blocks.push(Block {
                stages: Vec::new(),
                controller: Some(c),
                field: decl.field,
                result: None,
                per_item: decl.per_item,
                vars: decl.vars.clone(),
            });
            shapes[c].blocks.push((decl.field, b));
        }
        // A governed stage must come after its controller, or it could start before
        // the controller has decided.
        for (field, s) in governed {
            if !upstream[s][c] {
                diags.push(Diagnostic::new(
                    format!("{}: depends_on", locs[s]),
                    format!(
                        "stage \"{}\" is governed by \"{}\" ({field}) but does not depend on it; add \"{}\" to its depends_on",
                        ids[s], ids[c], ids[c]
                    ),
                ));
            }
        }
        shapes[c].pipeline = governs.pipeline.clone();
        shapes[c].governs = governs;
    }
    // A stage listed by several blocks belongs to the innermost: a trycatch inside a
    // loop body may list stages the loop lists too.
    let controllers: Vec<Option<usize>> = blocks.iter().map(|b| b.controller).collect();
    let nested_in = |mut b: usize, outer: usize| -> bool {
        for _ in 0..controllers.len() {
            let Some(c) = controllers[b] else {
                return false;
            };
            if claims[c].contains(&outer) {
                return true;
            }
            match claims[c].first() {
                Some(&up) => b = up,
                None => return false,
            }
        }
        false
    };
    for s in 0..n {
        let cl = &claims[s];
        if cl.is_empty() {
            blocks[0].stages.push(s);
            continue;
        }
        let pick = cl
            .iter()
            .copied()
            .find(|&b| cl.iter().all(|&o| o == b || nested_in(b, o)));
        match pick {
            Some(b) => {
                shapes[s].block = b;
                blocks[b].stages.push(s);
            }
            None => {
                let who: Vec<String> = cl
                    .iter()
                    .map(|&b| {
                        let c = blocks[b]
                            .controller
                            .expect("a listed block has a controller");
                        format!("\"{}\"'s {}", ids[c], blocks[b].field)
                    })
                    .collect();
                diags.push(Diagnostic::new(
                    locs[s].clone(),
                    format!(
                        "stage \"{}\" is listed in {}; a stage belongs to one block",
                        ids[s],
                        who.join(" and ")
                    ),
                ));
                shapes[s].block = cl[0];
                blocks[cl[0]].stages.push(s);
            }
        }
    }
    // Each nesting level is a frame nested in its parent's future: bounded, so no
    // pipeline can overflow the stack of the task that polls them.
    for b in 1..blocks.len() {
        let mut depth = 0;
        let mut x = b;
        while let Some(c) = controllers[x] {
            depth += 1;
            x = shapes[c].block;
            if depth > MAX_NESTING || x == b {
                break;
            }
        }
        // Controllers that govern each other are a dependency cycle, reported as one.
        if x == b {
            continue;
        }
        if depth > MAX_NESTING {
            let c = controllers[b].expect("a listed block has a controller");
            diags.push(Diagnostic::new(
                format!("{}: config.{}", locs[c], blocks[b].field),
                format!("controllers are nested more than {MAX_NESTING} deep"),
            ));
            break;
        }
    }
    // A branch is skipped in the frame its controller runs in, so it must be there too.
    for s in 0..n {
        if let Some((c, field)) = &in_branch[s]
            && shapes[s].block != shapes[*c].block
        {
            diags.push(Diagnostic::new(
                    locs[s].clone(),
                    format!(
                        "stage \"{}\" is in \"{}\"'s {field} but runs in another block (a loop body or a try); a branch must run where its controller does",
                        ids[s], ids[*c]
                    ),
                ));
        }
    }
    // A block's result is its last listed stage, or the controller in the block that
    // runs that stage.
    for b in 1..blocks.len() {
        blocks[b].result = listed[b].last().and_then(|&last| {
            let mut s = last;
            for _ in 0..n {
                if shapes[s].block == b {
                    return Some(s);
                }
                s = blocks[shapes[s].block].controller?;
            }
            None
        });
    }
    let mut structure = Structure {
        blocks,
        stages: shapes,
    };

    // Edges: each dependency is in the stage's block, satisfied before the block runs,
    // or inside a block of a controller in the stage's block (then waited for through it).
    for s in 0..n {
        let b = structure.stages[s].block;
        let mut wait_on = Vec::new();
        for &d in &deps[s] {
            let db = structure.stages[d].block;
            if db == b {
                wait_on.push(d);
                continue;
            }
            let mine = structure.ancestry(b);
            if mine.contains(&db) {
                // Outside the block: it must be done before the block starts.
                let c = structure.blocks[b].controller.expect("not block 0");
                if d != c && !upstream[c][d] {
                    diags.push(Diagnostic::new(
                        format!("{}: depends_on", locs[s]),
                        format!(
                            "\"{}\" is outside \"{}\"'s {} and not upstream of \"{}\"; make \"{}\" depend on it",
                            ids[d], ids[c], structure.blocks[b].field, ids[c], ids[c]
                        ),
                    ));
                }
                continue;
            }
            if let Some(why) = structure.hidden(s, d, ids) {
                diags.push(Diagnostic::new(format!("{}: depends_on", locs[s]), why));
                continue;
            }
            // Inside a controller's block: wait for the controller in our block.
            let theirs = structure.ancestry(db);
            let via = theirs.iter().find_map(|&x| {
                structure.blocks[x]
                    .controller
                    .filter(|&c| structure.stages[c].block == b)
            });
            match via {
                Some(c) if c != s => {
                    if !wait_on.contains(&c) {
                        wait_on.push(c);
                    }
                }
                Some(_) => diags.push(Diagnostic::new(
                    format!("{}: depends_on", locs[s]),
                    format!("a controller cannot depend on \"{}\", a stage it governs", ids[d]),
                )),
                None => diags.push(Diagnostic::new(
                    format!("{}: depends_on", locs[s]),
                    format!(
                        "\"{}\" is inside another controller's block and can only be used within it",
                        ids[d]
                    ),
                )),
            }
        }
        wait_on.sort_unstable();
        wait_on.dedup();
        structure.stages[s].wait_on = wait_on;
    }
    structure
}

/// Which `{{context.NAME}}` names stage `s` may read: those its enclosing blocks set,
/// those variable_set stages upstream of it set, and the run's own.
pub fn context_allows(structure: &Structure, upstream: &[Vec<bool>], s: usize, name: &str) -> bool {
    if CONTEXT_BUILTINS.contains(&name) {
        return true;
    }
    for b in structure.ancestry(structure.stages[s].block) {
        if structure.blocks[b].vars.iter().any(|v| v == name) {
            return true;
        }
    }
    structure.stages.iter().enumerate().any(|(v, shape)| {
        upstream[s][v]
            && (shape.governs.sets_dynamic_vars
                || shape.governs.sets_vars.iter().any(|n| n == name))
    })
}

/// Controllers (loops, trycatches) nested in one another, at most.
pub const MAX_NESTING: usize = 32;

/// `{{context.NAME}}` names every stage can read.
pub const CONTEXT_BUILTINS: &[&str] = &["run_id", "pipeline_id", "pipeline", "stage_id"];
