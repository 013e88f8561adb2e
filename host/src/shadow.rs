//! Shadow replay: a candidate version of a plugin re-runs journaled runs, answered from
//! their recordings, and what it produces is compared with what was recorded.
//!
//! For each run, the stages that use the plugin and everything downstream of them run
//! again with the candidate in the plugin's place; every other stage takes its output
//! from the journal. No request leaves the process: each outbound call is answered with
//! the recorded answer to the same method and URL (the last one, when a call was
//! retried), and a call the recording lacks fails and is reported. Secrets are never
//! used: each gets a placeholder, which the recorded URLs (holding references) get too.
//!
//! A run is `identical` (every candidate stage's output and the run's output as
//! recorded), `changed` (the run succeeds with a different output; the differences are
//! listed), `fixed` (it failed as recorded and succeeds now), `regressed` (it succeeded
//! and fails now), `still_failing`, or `unrecorded` (the candidate asked for something the
//! recording lacks). The candidate is safe when no run regressed or lacked a recording.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Value, json};

use crate::component::{Registry, canonical_name};
use crate::engine::{Engine, RunOptions, RunReport, RunStatus, StageStatus};
use crate::http::{HttpResponse, Offline};
use crate::journal::{Journal, RunDetail, RunFilter};
use crate::pipeline::Plan;
use crate::secrets::Secrets;

/// What to shadow.
pub struct Request<'a> {
    pub journal: &'a Journal,
    /// The components, with the candidate registered under the plugin's name.
    pub registry: &'a Registry,
    pub plugin: &'a str,
    pub pipeline: &'a str,
    /// Only runs started at or after this (ms since the epoch).
    pub since_ms: Option<i64>,
    /// The newest this many runs.
    pub runs: usize,
    /// Today's pipeline file instead of the document each run ran.
    pub current_pipeline: bool,
    /// Secrets the operator's policy grants plugins (they get placeholders too).
    pub granted_secrets: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Identical,
    Changed,
    Fixed,
    Regressed,
    StillFailing,
    Unrecorded,
}

/// One run, shadowed.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run_id: String,
    pub verdict: Verdict,
    /// The stages the candidate ran.
    pub stages: Vec<String>,
    /// Where the outputs differ: `{path, recorded, candidate}`, the first few.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<Value>,
    /// Why the shadow run failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests the recording lacks (`GET https://...`) from stages that ran in it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unrecorded: Vec<String>,
    /// Stages that never ran in the recorded run (downstream of a stage that failed
    /// there) and could not run now for want of recorded answers: not judged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub untested: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub plugin: String,
    pub pipeline: String,
    /// Runs looked at that never used the plugin.
    pub skipped: usize,
    pub counts: HashMap<&'static str, usize>,
    pub safe: bool,
    pub runs: Vec<RunResult>,
}

/// Most differences listed per run.
const MAX_DIFFERENCES: usize = 10;

/// Shadows the pipeline's newest journaled runs; `progress` hears (done, total).
pub async fn shadow(
    req: &Request<'_>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Report, String> {
    let summaries = req
        .journal
        .runs(RunFilter {
            pipeline: Some(req.pipeline.to_string()),
            since_ms: req.since_ms,
            limit: req.runs.max(1),
            ..RunFilter::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let plugin = canonical_name(req.plugin);
    let mut results = Vec::new();
    let mut skipped = 0;
    let finished: Vec<_> = summaries
        .iter()
        .filter(|s| matches!(s.status.as_str(), "succeeded" | "failed"))
        .collect();
    let total = finished.len();
    for (done, summary) in finished.into_iter().enumerate() {
        progress(done, total);
        let Some(run) = req
            .journal
            .run(&summary.run_id)
            .await
            .map_err(|e| e.to_string())?
        else {
            continue;
        };
        if !run
            .stages
            .iter()
            .any(|s| canonical_name(&s.report.component) == plugin)
        {
            skipped += 1;
            continue;
        }
        let plan = Arc::new(plan_of(req, &run).await?);
        results.push(one(&plan, &plugin, &run, &req.granted_secrets).await);
    }
    progress(total, total);
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    for name in [
        "identical",
        "changed",
        "fixed",
        "regressed",
        "still_failing",
        "unrecorded",
    ] {
        counts.insert(name, 0);
    }
    for r in &results {
        *counts.entry(verdict_name(r.verdict)).or_default() += 1;
    }
    let safe = counts["regressed"] == 0 && counts["unrecorded"] == 0;
    Ok(Report {
        plugin,
        pipeline: req.pipeline.to_string(),
        skipped,
        counts,
        safe,
        runs: results,
    })
}

pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Identical => "identical",
        Verdict::Changed => "changed",
        Verdict::Fixed => "fixed",
        Verdict::Regressed => "regressed",
        Verdict::StillFailing => "still_failing",
        Verdict::Unrecorded => "unrecorded",
    }
}

/// The pipeline as `run` ran it.
async fn plan_of(req: &Request<'_>, run: &RunDetail) -> Result<Plan, String> {
    let id = &run.summary.run_id;
    let file = run.rerun.pipeline_file.as_deref().map(std::path::Path::new);
    let kept = if req.current_pipeline {
        None
    } else {
        req.journal
            .pipeline_document(id)
            .await
            .map_err(|e| e.to_string())?
    };
    let document = match kept {
        Some(d) => d,
        None => {
            let f =
                file.ok_or_else(|| format!("run {id} kept neither its pipeline nor its file"))?;
            std::fs::read_to_string(f).map_err(|e| format!("run {id}: {}: {e}", f.display()))?
        }
    };
    crate::pipeline::load_text(
        &document,
        &format!("the pipeline run {id} ran"),
        file.and_then(|f| f.parent()),
        req.registry,
    )
    .map_err(|e| {
        if req.current_pipeline {
            e.to_string()
        } else {
            format!("{e}; shadow with the current pipeline to use today's")
        }
    })
}

/// Answers from one run's recorded exchanges.
struct Recording {
    answers: HashMap<(String, String), HttpResponse>,
    /// (stage, `METHOD URL`) of what nothing answered.
    unanswered: Mutex<Vec<(String, String)>>,
}

impl Offline for Recording {
    fn answer(
        &self,
        stage: &str,
        method: &str,
        url: &str,
        _body: Option<&[u8]>,
    ) -> Option<HttpResponse> {
        let found = self
            .answers
            .get(&(method.to_ascii_uppercase(), url.to_string()));
        if found.is_none() {
            let call = (stage.to_string(), format!("{method} {url}"));
            let mut u = self.unanswered.lock().expect("recording lock");
            if !u.contains(&call) {
                u.push(call);
            }
        }
        found.cloned()
    }
}

/// Placeholders for every secret the pipeline, its stages' grants, the operator's
/// policy or the recording names.
fn placeholders(plan: &Plan, run: &RunDetail, granted: &[String]) -> Secrets {
    let mut names: Vec<String> = crate::secrets::uses_in_pipeline(&plan.source)
        .keys()
        .cloned()
        .collect();
    names.extend(granted.iter().cloned());
    for st in &plan.stages {
        names.extend(st.secret_grants.iter().cloned());
    }
    let urls: Vec<&str> = run
        .stages
        .iter()
        .flat_map(|st| &st.calls)
        .filter_map(|a| a.recorded.as_ref().map(|r| r.url.as_str()))
        .collect();
    for url in &urls {
        names.extend(
            crate::secrets::names_read(url)
                .into_iter()
                .map(str::to_string),
        );
    }
    names.sort();
    names.dedup();
    Secrets::from_pairs(names.into_iter().map(|n| {
        let v = crate::testing::placeholder(&n, &urls);
        (n, v)
    }))
}

async fn one(plan: &Arc<Plan>, plugin: &str, run: &RunDetail, granted: &[String]) -> RunResult {
    let run_id = run.summary.run_id.clone();
    let secrets = placeholders(plan, run, granted);
    let mut answers = HashMap::new();
    for st in &run.stages {
        for a in &st.calls {
            if let Some(r) = &a.recorded {
                let url = secrets.expand(&r.url).unwrap_or_else(|_| r.url.clone());
                let mut headers = Vec::new();
                if let Some(ct) = &r.content_type {
                    headers.push(("content-type".to_string(), ct.clone()));
                }
                answers.insert(
                    (a.method.to_ascii_uppercase(), url),
                    HttpResponse {
                        status: a.status.unwrap_or(200),
                        headers,
                        body: r.body.clone().into_bytes(),
                    },
                );
            }
        }
    }
    let recording = Arc::new(Recording {
        answers,
        unanswered: Mutex::new(Vec::new()),
    });
    let starts: Vec<usize> = plan
        .stages
        .iter()
        .enumerate()
        .filter(|(_, s)| canonical_name(&s.component_name) == plugin)
        .map(|(i, s)| match plan.blocks[s.block].controller {
            // A stage in a loop body or a branch runs again through its controller.
            Some(c) if plan.blocks[s.block].per_item => c,
            _ => i,
        })
        .collect();
    let reuse = crate::journal::replay::reuse_except(plan, run, &starts, &secrets);
    let mut engine = Engine::new(secrets);
    engine.outbound.offline = Some(recording.clone());
    engine.fixed_now = std::env::var("FMHOST_NOW").ok().map(Arc::from);
    // `now()` as the recorded run began (a stage that read it seconds later differs).
    let now = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(run.summary.started_at_ms.max(0) as u64);
    let opts = RunOptions {
        reuse: Some(Arc::new(reuse)),
        now: Some(Arc::from(
            humantime::format_rfc3339_seconds(now).to_string(),
        )),
        trigger: run
            .trigger_info
            .as_ref()
            .map(|t| engine.secrets().restore(t)),
        ..RunOptions::default()
    };
    let stages: Vec<String> = Vec::new();
    let input = engine.secrets().restore(&run.input);
    let report = match engine.run(plan.clone(), input, opts).await {
        Ok(r) => r,
        Err(e) => {
            return RunResult {
                run_id,
                verdict: Verdict::Regressed,
                stages,
                differences: Vec::new(),
                error: Some(format!("the shadow run did not start: {e}")),
                unrecorded: Vec::new(),
                untested: Vec::new(),
            };
        }
    };
    let unrecorded = recording.unanswered.lock().expect("recording lock").clone();
    judge(run, plugin, &report, &engine.secrets(), unrecorded)
}

/// Compares a shadow run with its recording; `secrets` are the placeholders, turned
/// back into references as the journal holds them.
fn judge(
    run: &RunDetail,
    plugin: &str,
    report: &RunReport,
    secrets: &Secrets,
    unanswered: Vec<(String, String)>,
) -> RunResult {
    let recorded_ok = run.summary.status == "succeeded";
    let shadow_ok = report.status == RunStatus::Succeeded;
    let ran_before = |id: &str| {
        run.stage(id).is_some_and(|s| {
            matches!(
                s.report.status,
                StageStatus::Succeeded | StageStatus::Failed
            )
        })
    };
    let (mut unrecorded, mut untested) = (Vec::new(), Vec::new());
    for (stage, call) in unanswered {
        if ran_before(&stage) {
            unrecorded.push(call);
        } else if !untested.contains(&stage) {
            untested.push(stage);
        }
    }
    let ran: Vec<&crate::engine::StageReport> = report
        .stages
        .iter()
        .filter(|s| canonical_name(&s.component) == plugin && s.reused_from.is_none())
        .collect();
    let succeeded = |s: &crate::engine::StageReport| s.status == StageStatus::Succeeded;
    let candidate_ok = !ran.is_empty() && ran.iter().all(|s| succeeded(s));
    let candidate_ok_before = ran.iter().all(|s| {
        run.stage(&s.id)
            .is_some_and(|r| r.report.status == StageStatus::Succeeded)
    });
    // The recording as the shadow run's report shows it: the journal's references to
    // (placeholder) secrets restored, then masked as every report leaving a run is.
    let as_reported = |stored: &Value| {
        let mut v = secrets.restore_raw(stored.clone());
        secrets.redact_value(&mut v);
        v
    };
    let mut differences = Vec::new();
    for s in &ran {
        let before = run
            .stage(&s.id)
            .filter(|r| r.report.status == StageStatus::Succeeded)
            .and_then(|r| r.report.output.clone());
        if let (Some(before), Some(after)) = (before, &s.output) {
            diff(
                &format!("stages.{}", s.id),
                &as_reported(&before),
                after,
                &mut differences,
            );
        }
    }
    if recorded_ok && shadow_ok {
        diff(
            "output",
            &as_reported(run.output.as_ref().unwrap_or(&Value::Null)),
            report.output.as_ref().unwrap_or(&Value::Null),
            &mut differences,
        );
    }
    let verdict = if !unrecorded.is_empty() {
        Verdict::Unrecorded
    } else {
        match (recorded_ok, shadow_ok) {
            (true, true) if differences.is_empty() => Verdict::Identical,
            (true, true) => Verdict::Changed,
            (true, false) => Verdict::Regressed,
            // A run that failed: fixed when the candidate's stages now succeed where one
            // failed (what follows them may have had no recording to run on), or the
            // whole run now succeeds.
            (false, _) if candidate_ok && (!candidate_ok_before || shadow_ok) => Verdict::Fixed,
            (false, _) => Verdict::StillFailing,
        }
    };
    differences.truncate(MAX_DIFFERENCES);
    RunResult {
        run_id: run.summary.run_id.clone(),
        verdict,
        stages: ran.iter().map(|s| s.id.clone()).collect(),
        differences,
        error: (!shadow_ok).then(|| report.error.clone().unwrap_or_default()),
        unrecorded,
        untested,
    }
}

/// Appends where `b` departs from `a`, one entry per changed leaf, added or missing field.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<Value>) {
    if out.len() > MAX_DIFFERENCES {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let p = format!("{path}.{k}");
                match y.get(k) {
                    Some(vb) => diff(&p, va, vb, out),
                    None => out.push(
                        json!({"path": p, "recorded": va, "candidate": null, "change": "missing"}),
                    ),
                }
            }
            for (k, vb) in y {
                if !x.contains_key(k) {
                    out.push(json!({"path": format!("{path}.{k}"), "recorded": null, "candidate": vb, "change": "added"}));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a == b => {}
        _ => out.push(json!({"path": path, "recorded": a, "candidate": b, "change": "changed"})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_each_changed_leaf() {
        let mut out = Vec::new();
        diff(
            "output",
            &json!({"a": 1, "b": {"c": [1, 2]}, "gone": true}),
            &json!({"a": 1, "b": {"c": [1, 3]}, "new": "x"}),
            &mut out,
        );
        let paths: Vec<&str> = out.iter().map(|d| d["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["output.b.c[1]", "output.gone", "output.new"]);
        assert_eq!(out[0]["recorded"], 2);
        assert_eq!(out[0]["candidate"], 3);
    }
}
