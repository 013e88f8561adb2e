//! Which stage outputs a replay or a resumed run takes from the journal.

use std::collections::HashMap;
use std::sync::Arc;

use super::RunDetail;
use crate::engine::{Reuse, StageStatus};
use crate::pipeline::Plan;
use crate::secrets::Secrets;

/// The outputs `plan` can take from `original` instead of running stages again.
///
/// With `from`, every stage that is not `from` or downstream of it is taken from the
/// journal (if it succeeded there; one that did not runs again). Without, every stage
/// that succeeded is taken and the rest run: the run continues where it stopped.
///
/// The journal holds `{{secrets.NAME}}` where outputs held secret values; `secrets`
/// puts the current values back.
pub fn reuse(
    plan: &Plan,
    original: &RunDetail,
    from: Option<&str>,
    secrets: &Secrets,
) -> Result<Reuse, String> {
    let starts = match from {
        None => Vec::new(),
        Some(id) => match plan.stage_index(id) {
            Some(i) => vec![i],
            None => {
                let known: Vec<&str> = plan.stages.iter().map(|s| &*s.id).collect();
                return Err(format!(
                    "--from {id}: pipeline {} has no stage \"{id}\" (stages: {})",
                    plan.name,
                    known.join(", ")
                ));
            }
        },
    };
    Ok(reuse_except(plan, original, &starts, secrets))
}

/// Like [`reuse`], rerunning the stages at `starts` (plan indexes) and everything
/// downstream of them.
pub fn reuse_except(
    plan: &Plan,
    original: &RunDetail,
    starts: &[usize],
    secrets: &Secrets,
) -> Reuse {
    let mut rerun = vec![false; plan.stages.len()];
    let mut stack = starts.to_vec();
    while let Some(i) = stack.pop() {
        if !rerun[i] {
            rerun[i] = true;
            stack.extend(&plan.stages[i].dependents);
        }
    }
    let mut checkpoints = HashMap::new();
    // Every journaled stage that succeeded, including loop iterations (`upsert[3]`) and
    // sub-pipeline stages (`enrich/crm`): they are rerun when the stage they belong to is.
    let mut outputs = HashMap::new();
    for s in &original.stages {
        let Some(i) = plan.stage_index(base_id(&s.report.id)) else {
            continue;
        };
        if rerun[i] {
            continue;
        }
        // An optional stage that failed has a null output; it gets another chance.
        if let Some(out) = s
            .report
            .output
            .as_ref()
            .filter(|_| s.report.status == StageStatus::Succeeded && s.report.error.is_none())
        {
            outputs.insert(
                s.report.id.clone(),
                Arc::new(secrets.restore_raw((**out).clone())),
            );
        }
        if let Some(c) = s.report.error.as_ref().and_then(|e| e.checkpoint.as_ref()) {
            checkpoints.insert(
                s.report.id.clone(),
                Arc::new(secrets.restore_raw((**c).clone())),
            );
        }
    }
    Reuse {
        from_run: original.summary.run_id.clone(),
        outputs,
        checkpoints,
        ..Reuse::default()
    }
}

/// The pipeline stage a reported stage belongs to: `upsert[3]` and `enrich/crm` belong
/// to `upsert` and `enrich`.
pub fn base_id(id: &str) -> &str {
    let end = id.find(['[', '/']).unwrap_or(id.len());
    &id[..end]
}

/// A replay of `original`, ready to run: its input, the outputs it reuses, and its
/// journal entry, linked to the original.
pub struct Replay {
    pub input: serde_json::Value,
    pub reuse: Reuse,
    pub start: super::RunStart,
}

/// Prepares a replay of `original` with `plan` (the pipeline as it is now). A new
/// `input` reruns every stage unless `from` says where to start.
pub fn prepare(
    plan: &Plan,
    original: &RunDetail,
    from: Option<&str>,
    input: Option<serde_json::Value>,
    trigger: &str,
    owner: &str,
    secrets: &Secrets,
) -> Result<Replay, String> {
    let reuse = match (&input, from) {
        (Some(_), None) => Reuse {
            from_run: original.summary.run_id.clone(),
            outputs: HashMap::new(),
            ..Reuse::default()
        },
        _ => reuse(plan, original, from, secrets)?,
    };
    let input = input.unwrap_or_else(|| secrets.restore(&original.input));
    crate::engine::Engine::check_input(plan, &input).map_err(|e| e.to_string())?;
    Ok(Replay {
        start: super::RunStart {
            replay_of: Some(original.summary.run_id.clone()),
            replay_from: from.map(str::to_string),
            trigger_info: original.trigger_info.clone(),
            ..super::RunStart::new(
                crate::engine::new_run_id(),
                &plan.name,
                original.rerun.clone(),
                trigger,
                owner,
                secrets.store(&input),
            )
        },
        input,
        reuse,
    })
}
