//! What a starting server does with work its previous life left unfinished: runs that
//! were running when it crashed (or outlived the drain timeout), and accepted webhook
//! deliveries whose run never started. None is dropped silently.

use std::sync::Arc;

use super::{App, Interrupted, execute, process_delivery};
use crate::journal::{OWNER_SERVE, RunFilter, RunJournal, replay};

/// How many times a run is resumed after the server stopped during it.
const MAX_RESUMES: u32 = 1;

/// What running a journaled run again in place takes (a resume, under its own run id,
/// so with its own idempotency keys): its input, and the outputs of the stages that
/// succeeded, kept.
pub(super) fn again(
    app: &App,
    plan: &crate::pipeline::Plan,
    run: &crate::journal::RunDetail,
) -> Result<(serde_json::Value, crate::engine::Reuse), String> {
    let secrets = app.engine.secrets();
    let reuse = replay::reuse(plan, run, None, &secrets)?;
    Ok((secrets.restore(&run.input), reuse))
}

pub(super) async fn recover(app: &Arc<App>, policy: Interrupted) -> anyhow::Result<()> {
    let interrupted = app
        .journal
        .runs(RunFilter {
            status: Some("running".into()),
            owner: Some(OWNER_SERVE.into()),
            ..RunFilter::default()
        })
        .await?;
    let mut handled = std::collections::HashSet::new();
    for summary in interrupted {
        let Some(run) = app.journal.run(&summary.run_id).await? else {
            continue;
        };
        handled.insert(run.summary.run_id.clone());
        let start = run.restart(OWNER_SERVE);
        let plan = app.pipelines.get(&run.summary.pipeline).cloned();
        // A run that was already resumed once and is found running again most likely
        // took the process down with it; resuming it blindly could do so at every start.
        let crash_loop = run.resumed >= MAX_RESUMES;
        match (policy, plan) {
            (Interrupted::Resume, Some(plan)) if !crash_loop => {
                let (input, reuse) = again(app, &plan, &run).map_err(anyhow::Error::msg)?;
                tracing::info!(target: "fmhost::serve", run_id = %start.run_id, reused = reuse.outputs.len(), "resuming interrupted run {} of {} ({} completed stage(s) kept)", start.run_id, plan.name, reuse.outputs.len());
                app.journal.record(crate::journal::Record::RunResumed {
                    run_id: start.run_id.clone(),
                });
                let app2 = app.clone();
                // A schedule or poll sees its resumed run as running.
                let guard = app.trigger_guard(&start);
                app.tracker.spawn(async move {
                    let _guard = guard;
                    let _ = execute(&app2, plan, input, start, Some(reuse)).await;
                });
            }
            (policy, plan) => {
                let why = if plan.is_none() {
                    format!(
                        "interrupted by a restart, and pipeline \"{}\" is no longer served",
                        start.pipeline
                    )
                } else if crash_loop && policy == Interrupted::Resume {
                    format!(
                        "the server stopped while running it again after {} resume(s); not resumed, in case it is what stops the server (fmhost dlq retry runs it again)",
                        run.resumed
                    )
                } else {
                    "interrupted by a restart (--on-interrupted dead-letter)".to_string()
                };
                tracing::warn!(target: "fmhost::serve", run_id = %start.run_id, "run {} dead-lettered: {why}", start.run_id);
                RunJournal::following(app.journal.clone(), start.clone(), &app.engine)
                    .reject(&why, "interrupted", false)
                    .await?;
                super::after_run(
                    app,
                    &start,
                    crate::engine::RunStatus::Failed,
                    Some(&why),
                    Some("interrupted"),
                    None,
                );
            }
        }
    }
    // Accepted, but the server stopped before their run was journaled as started.
    for d in app.journal.pending_deliveries().await? {
        if handled.contains(&d.run_id) || app.journal.run(&d.run_id).await?.is_some() {
            continue;
        }
        let payload = app.engine.secrets().restore(&d.payload);
        tracing::info!(target: "fmhost::serve", event_id = %d.event_id, pipeline = %d.pipeline, "processing accepted delivery {} for {}", d.event_id, d.pipeline);
        let app2 = app.clone();
        let guard = app.trigger_guard(&super::delivery_start(app, &d));
        app.tracker.spawn(async move {
            let _guard = guard;
            process_delivery(app2, d, payload).await
        });
    }
    Ok(())
}
