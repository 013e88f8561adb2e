//! `fmhost runs`, `fmhost replay` and `fmhost dlq`: the journal from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::{
    EXIT_FAILED, EXIT_INVALID, PluginArgs, cancel_on_ctrl_c, engine, load_plan, read_input_file,
    registry,
};
use crate::engine::{RunOptions, RunReport, RunStatus};
use crate::journal::{
    DlqFilter, Journal, OWNER_CLI, RunDetail, RunFilter, RunJournal, parse_time, replay,
    run_journaled,
};

const STATUSES: [&str; 5] = ["running", "succeeded", "failed", "cancelled", "timed-out"];

#[derive(Subcommand)]
pub enum RunsCommand {
    /// Journaled runs, newest first.
    List {
        #[arg(long, value_name = "NAME")]
        pipeline: Option<String>,
        #[arg(long, value_parser = STATUSES)]
        status: Option<String>,
        /// Started at or after: RFC 3339, a date, or an age such as `3d`.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<i64>,
        /// Started before.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<i64>,
        /// At most this many (newest first); 0 for all.
        #[arg(long, default_value = "1000")]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One run: its stages, timings, attempts, error kinds and outputs.
    Show {
        run: String,
        #[arg(long)]
        json: bool,
        /// Print a Mermaid Gantt chart of its stages and attempts instead.
        #[arg(long, conflicts_with = "json")]
        timeline: bool,
    },
    /// Removes runs older than an age, with their stages and attempts; runs still
    /// running or with an open dead letter are kept.
    Prune {
        /// An age such as `30d` or `12h`, or a date: runs that started before it go.
        #[arg(long, value_name = "AGE", value_parser = parse_time)]
        older_than: i64,
        /// Keep runs that did not succeed.
        #[arg(long)]
        keep_failed: bool,
        /// Only say what would go.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
pub struct RecordArgs {
    /// The journaled run (`fmhost runs list`).
    run: String,
    /// Where to write `NAME.test.json` and a copy of the pipeline.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
pub struct ReplayArgs {
    /// The run to replay (`fmhost runs list`).
    #[arg(
        required_unless_present_any = ["pipeline", "since"],
        conflicts_with_all = ["pipeline", "since", "until"]
    )]
    run: Option<String>,
    /// Run this stage and everything downstream of it again; the other stages' outputs
    /// come from the journal. Without it, stages that succeeded are reused and the rest run.
    #[arg(long, value_name = "STAGE")]
    from: Option<String>,
    /// New input (a JSON file, or `-` for stdin); reruns every stage unless --from says otherwise.
    #[arg(long, value_name = "FILE", requires = "run")]
    input: Option<String>,
    /// Replay every matching run of this pipeline (with --since; without it, of every pipeline).
    #[arg(long, value_name = "NAME", requires = "since")]
    pipeline: Option<String>,
    /// Replay every matching run started at or after TIME (RFC 3339, a date, or an age such as `3d`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<i64>,
    /// ... and before TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<i64>,
    /// Which runs to replay with --pipeline.
    #[arg(long, value_parser = STATUSES, default_value = "failed")]
    status: String,
    /// Secrets file (default: the one the run used); FMHOST_SECRET_<NAME> variables also work.
    /// Plugins come from the directories the run used unless --plugins is given.
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Deadline for each run.
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Option<Duration>,
    /// Run the pipeline file as it is today, not the document the run ran (which the
    /// journal keeps).
    #[arg(long)]
    current_pipeline: bool,
    #[command(flatten)]
    plugins: PluginArgs,
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Dead-lettered runs and deliveries, newest first (open ones unless --all).
    List {
        #[arg(long, value_name = "NAME")]
        pipeline: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// One entry, with the input it needs to be retried.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Retry entries: replay their runs with the current pipeline and plugins.
    Retry {
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Secrets file (default: the one the run used).
        #[arg(long, value_name = "FILE")]
        secrets: Option<PathBuf>,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Drop entries: they are kept, marked dropped, and no longer listed as open.
    Drop {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

pub(super) async fn open(state: &Path, write: bool) -> Result<Journal, u8> {
    let journal = if write {
        Journal::open(state)
    } else {
        Journal::open_for_reading(state)
    };
    let journal = journal.map_err(|e| {
        eprintln!("error: {e}");
        EXIT_FAILED
    })?;
    super::sweep(&journal).await;
    Ok(journal)
}

pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn one_line(v: &Value, max: usize) -> String {
    let text = v.to_string();
    if text.len() <= max {
        return text;
    }
    let cut = (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!(
        "{}... ({} bytes; --json shows all)",
        &text[..cut],
        text.len()
    )
}

pub async fn runs(state: &Path, cmd: RunsCommand) -> u8 {
    let journal = match open(state, false).await {
        Ok(j) => j,
        Err(code) => return code,
    };
    match cmd {
        RunsCommand::Prune {
            older_than,
            keep_failed,
            dry_run,
        } => match journal.prune(older_than, keep_failed, dry_run).await {
            Ok(p) => {
                println!(
                    "{} {} run(s) that started before {}; kept {} (running, with an open dead letter{})",
                    if dry_run { "would remove" } else { "removed" },
                    p.removed,
                    crate::time::rfc3339(older_than),
                    p.kept,
                    if keep_failed {
                        ", or not succeeded"
                    } else {
                        ""
                    }
                );
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_FAILED
            }
        },
        RunsCommand::List {
            pipeline,
            status,
            since,
            until,
            limit,
            json,
        } => {
            let filter = RunFilter {
                pipeline,
                status,
                since_ms: since,
                until_ms: until,
                limit,
                ..RunFilter::default()
            };
            let runs = match journal.runs(filter).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_FAILED;
                }
            };
            if json {
                print_json(&runs);
                return 0;
            }
            println!(
                "{:<30} {:<22} {:<10} {:<21} {:>9}  ERROR",
                "RUN", "PIPELINE", "STATUS", "STARTED", "DURATION"
            );
            for r in &runs {
                let error = match (&r.error_kind, &r.error) {
                    (Some(k), Some(e)) => format!("[{k}] {e}"),
                    (None, Some(e)) => e.clone(),
                    _ => String::new(),
                };
                println!(
                    "{:<30} {:<22} {:<10} {:<21} {:>9}  {}",
                    r.run_id,
                    r.pipeline,
                    r.status,
                    r.started_at,
                    r.duration_ms.map(|d| format!("{d} ms")).unwrap_or_default(),
                    error
                );
            }
            0
        }
        RunsCommand::Show {
            run,
            json,
            timeline,
        } => match journal.run(&run).await {
            Ok(Some(detail)) => {
                if timeline {
                    print!("{}", crate::draw::gantt(&detail));
                } else if json {
                    print_json(&detail);
                } else {
                    show_run(&detail);
                }
                0
            }
            Ok(None) => {
                eprintln!(
                    "error: no run {run} in the journal {}",
                    journal.path().display()
                );
                EXIT_FAILED
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_FAILED
            }
        },
    }
}

/// What a control-flow stage decided, in a few words: the branch or route it took, the
/// iterations it ran, the error it caught.
fn control_summary(component: &str, out: &serde_json::Value) -> Option<String> {
    let text = |k: &str| out.get(k).map(|v| crate::template::to_text(v).into_owned());
    match crate::component::canonical_name(component).as_str() {
        "conditional" => Some(format!("took the {} branch", text("branch_taken")?)),
        "router" => Some(format!("took route {}", text("route_taken")?)),
        "foreach" => Some(format!(
            "iterations: {} of {} run, {} failed, {} filtered out",
            text("processed_items")?,
            text("total_items").unwrap_or_default(),
            text("failed_count").unwrap_or_else(|| "0".into()),
            text("skipped_items").unwrap_or_else(|| "0".into()),
        )),
        "trycatch" if out.get("status")?.as_str()? == "caught" => Some(format!(
            "caught [{}] from stage {}: {}",
            text("error_type")?,
            text("error_stage").unwrap_or_default(),
            text("error_message").unwrap_or_default()
        )),
        "subpipeline" => Some(format!(
            "sub-pipeline {}: {}",
            text("pipeline_id")?,
            text("status")?
        )),
        "return" if out.get("should_return")?.as_bool()? => {
            Some("returned: the run ended here".into())
        }
        _ => None,
    }
}

fn show_run(d: &RunDetail) {
    let s = &d.summary;
    println!(
        "run {}  pipeline {}  {}  (trigger {})",
        s.run_id, s.pipeline, s.status, s.trigger
    );
    println!(
        "started {}{}{}",
        s.started_at,
        s.duration_ms
            .map(|ms| format!(", took {ms} ms"))
            .unwrap_or_default(),
        if d.resumed > 0 {
            format!(", resumed {} time(s) after a restart", d.resumed)
        } else {
            String::new()
        }
    );
    if let Some(t) = &d.trace {
        println!(
            "trace {}  span {}{}",
            t.trace_id,
            t.span_id,
            t.parent_span_id
                .as_ref()
                .map(|p| format!("  (joined the caller's span {p})"))
                .unwrap_or_default()
        );
    }
    if let Some(of) = &s.replay_of {
        println!(
            "replay of {of}{}",
            d.replay_from
                .as_ref()
                .map(|f| format!(" from stage {f}"))
                .unwrap_or_default()
        );
    }
    if !d.replayed_by.is_empty() {
        println!("replayed by {}", d.replayed_by.join(", "));
    }
    if let Some(e) = &s.error {
        println!(
            "error: {}{e}",
            s.error_kind
                .as_ref()
                .map(|k| format!("[{k}] "))
                .unwrap_or_default()
        );
    }
    if let Some(id) = d.dead_letter {
        println!("dead letter {id} (open): fmhost dlq retry {id}");
    }
    for st in &d.stages {
        for a in &st.calls {
            if let Some(r) = a.recorded.as_ref().filter(|r| !r.drift.is_empty()) {
                println!(
                    "schema drift: stage {} {} {} (service {}): {}",
                    st.report.id,
                    a.method,
                    a.url,
                    a.service,
                    r.drift.join("; ")
                );
            }
        }
    }
    println!("input: {}", one_line(d.input.as_value(), 300));
    println!();
    println!(
        "{:<24} {:<10} {:>8} {:>8} {:>9}  COMPONENT",
        "STAGE", "STATUS", "ATTEMPTS", "START", "DURATION"
    );
    for st in &d.stages {
        let r = &st.report;
        let status = r.status.as_str();
        println!(
            "{:<24} {:<10} {:>8} {:>8} {:>9}  {}{}",
            r.id,
            status,
            r.attempts,
            r.started_ms.map(|m| format!("{m} ms")).unwrap_or_default(),
            r.duration_ms.map(|m| format!("{m} ms")).unwrap_or_default(),
            r.component,
            r.version
                .as_ref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default()
        );
        for c in &st.calls {
            println!(
                "    {} {} -> {} in {} ms (attempt {}{}{})",
                c.method,
                c.url,
                c.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "no response".into()),
                c.duration_ms,
                c.attempt,
                c.error_kind
                    .as_ref()
                    .map(|k| format!(", {k}"))
                    .unwrap_or_default(),
                c.idempotency_key
                    .as_ref()
                    .map(|k| format!(", idempotency key {k}"))
                    .unwrap_or_default()
            );
        }
        if let Some(from) = &r.reused_from {
            println!("    output reused from run {from}");
        }
        if let Some(e) = &r.error {
            println!("    error: [{}] {}", e.kind.as_str(), e.message);
        }
        if let Some(why) = &r.skipped_because {
            println!("    skipped: {why}");
        }
        if let Some(line) = r
            .output
            .as_deref()
            .and_then(|o| control_summary(&r.component, o))
        {
            println!("    {line}");
        }
        if let Some(out) = &r.output {
            println!("    output: {}", one_line(out, 300));
        }
    }
    if let Some(out) = &d.output {
        println!();
        println!("output: {}", one_line(out, 2000));
    }
}

/// What a replay runs with, when it should not be what the original run used.
struct Using<'a> {
    secrets: Option<&'a Path>,
    plugins: &'a PluginArgs,
    timeout: Option<Duration>,
    /// Today's pipeline file instead of the document the run ran.
    current_pipeline: bool,
}

/// Replays `original` and returns its report; errors are printed.
async fn replay_one(
    journal: &Journal,
    original: &RunDetail,
    from: Option<&str>,
    input: Option<Value>,
    trigger: &str,
    using: &Using<'_>,
) -> Result<RunReport, u8> {
    let Using {
        secrets,
        plugins,
        timeout,
        current_pipeline,
    } = *using;
    // Unless told otherwise, the plugin directories and secrets file the run used.
    let recorded = &original.rerun;
    let plugins = if plugins.plugins.is_empty() {
        PluginArgs {
            plugins: recorded.plugin_dirs.iter().map(PathBuf::from).collect(),
            policy: plugins.policy.clone(),
        }
    } else {
        PluginArgs {
            plugins: plugins.plugins.clone(),
            policy: plugins.policy.clone(),
        }
    };
    let secrets = secrets
        .map(Path::to_path_buf)
        .or_else(|| recorded.secrets_file.as_ref().map(PathBuf::from));
    let registry = registry(&plugins).await.map_err(|e| {
        eprintln!("error: {e}");
        EXIT_INVALID
    })?;
    // The document the run ran, as the journal kept it, unless today's file is asked for.
    let kept = if current_pipeline {
        None
    } else {
        journal
            .pipeline_document(&original.summary.run_id)
            .await
            .map_err(|e| {
                eprintln!("error: {e}");
                EXIT_FAILED
            })?
    };
    let plan = match kept {
        Some(document) => {
            let dir = recorded
                .pipeline_file
                .as_deref()
                .and_then(|f| Path::new(f).parent());
            let shown = format!("the pipeline run {} ran", original.summary.run_id);
            crate::pipeline::load_text(&document, &shown, dir, &registry).map_err(|e| {
                for line in e.lines() {
                    eprintln!("error: {line}");
                }
                EXIT_INVALID
            })?
        }
        None => {
            let Some(file) = recorded.pipeline_file.as_deref() else {
                eprintln!(
                    "error: run {} has no pipeline file in the journal",
                    original.summary.run_id
                );
                return Err(EXIT_INVALID);
            };
            if !Path::new(file).exists() {
                eprintln!(
                    "error: run {}'s pipeline file {file} is gone; restore it to replay the run",
                    original.summary.run_id
                );
                return Err(EXIT_INVALID);
            }
            load_plan(Path::new(file), &registry)?
        }
    };
    let plan = Arc::new(plan);
    let engine = engine(secrets.as_deref())?;
    let prepared = replay::prepare(
        &plan,
        original,
        from,
        input,
        trigger,
        OWNER_CLI,
        &engine.secrets(),
    )
    .map_err(|e| {
        eprintln!("error: replay of {}: {e}", original.summary.run_id);
        EXIT_INVALID
    })?;
    tracing::info!(target: "fmhost::progress", run_id = %prepared.start.run_id, replay_of = %original.summary.run_id, reused = prepared.reuse.outputs.len(), "replaying run {} as {} ({} stage output(s) from the journal)", original.summary.run_id, prepared.start.run_id, prepared.reuse.outputs.len());
    let watcher = RunJournal::following(journal.clone(), prepared.start, &engine);
    let opts = RunOptions {
        timeout,
        reuse: Some(Arc::new(prepared.reuse)),
        ..RunOptions::default()
    };
    cancel_on_ctrl_c(&opts);
    match run_journaled(&engine, plan, prepared.input, opts, Some(watcher)).await {
        Ok((report, committed)) => {
            if let Err(e) = committed {
                eprintln!("error: {e}");
            }
            Ok(report)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(EXIT_INVALID)
        }
    }
}

async fn load_run(journal: &Journal, id: &str) -> Result<RunDetail, u8> {
    match journal.run(id).await {
        Ok(Some(d)) => Ok(d),
        Ok(None) => {
            eprintln!(
                "error: no run {id} in the journal {}",
                journal.path().display()
            );
            Err(EXIT_INVALID)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(EXIT_FAILED)
        }
    }
}

pub async fn replay_cmd(state: &Path, args: ReplayArgs) -> u8 {
    let journal = match open(state, true).await {
        Ok(j) => j,
        Err(code) => return code,
    };
    if let Some(id) = &args.run {
        let original = match load_run(&journal, id).await {
            Ok(d) => d,
            Err(code) => return code,
        };
        let input = match args.input.as_deref().map(read_input_file).transpose() {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_INVALID;
            }
        };
        return match replay_one(
            &journal,
            &original,
            args.from.as_deref(),
            input,
            "replay",
            &Using {
                secrets: args.secrets.as_deref(),
                plugins: &args.plugins,
                timeout: args.timeout,
                current_pipeline: args.current_pipeline,
            },
        )
        .await
        {
            Ok(report) => super::report_outcome(report, None, None),
            Err(code) => code,
        };
    }
    // Many: the ends of replay chains (a run already replayed is represented by its replay).
    let filter = RunFilter {
        pipeline: args.pipeline.clone(),
        status: Some(args.status.clone()),
        since_ms: args.since,
        until_ms: args.until,
        not_replayed: true,
        ..RunFilter::default()
    };
    let mut runs = match journal.runs(filter).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    runs.reverse(); // oldest first, as they happened
    eprintln!(
        "replaying {} {} run(s) of {}",
        runs.len(),
        args.status,
        args.pipeline.as_deref().unwrap_or("every pipeline")
    );
    println!("{:<30} {:<30} {:<10} ERROR", "RUN", "REPLAY", "STATUS");
    let mut all_ok = true;
    for r in runs {
        let original = match load_run(&journal, &r.run_id).await {
            Ok(d) => d,
            Err(code) => return code,
        };
        match replay_one(
            &journal,
            &original,
            args.from.as_deref(),
            None,
            "replay",
            &Using {
                secrets: args.secrets.as_deref(),
                plugins: &args.plugins,
                timeout: args.timeout,
                current_pipeline: args.current_pipeline,
            },
        )
        .await
        {
            Ok(report) => {
                all_ok &= report.status == RunStatus::Succeeded;
                println!(
                    "{:<30} {:<30} {:<10} {}",
                    r.run_id,
                    report.run_id,
                    report.status.as_str(),
                    report.error.unwrap_or_default()
                );
                if report.status == RunStatus::Cancelled {
                    return super::EXIT_INTERRUPTED;
                }
            }
            Err(code) => return code,
        }
    }
    if all_ok { 0 } else { EXIT_FAILED }
}

pub async fn dlq(state: &Path, cmd: DlqCommand) -> u8 {
    let write = matches!(cmd, DlqCommand::Retry { .. } | DlqCommand::Drop { .. });
    let journal = match open(state, write).await {
        Ok(j) => j,
        Err(code) => return code,
    };
    match cmd {
        DlqCommand::List {
            pipeline,
            all,
            json,
        } => {
            let filter = DlqFilter {
                pipeline,
                status: (!all).then(|| "open".to_string()),
                limit: 0,
                ..DlqFilter::default()
            };
            let entries = match journal.dead_letters(filter).await {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_FAILED;
                }
            };
            if json {
                print_json(&entries);
                return 0;
            }
            println!(
                "{:>4} {:<22} {:<8} {:<9} {:>7} {:<14} {:<30} REASON",
                "ID", "PIPELINE", "KIND", "STATUS", "RETRIES", "ERROR KIND", "RUN"
            );
            for e in &entries {
                println!(
                    "{:>4} {:<22} {:<8} {:<9} {:>7} {:<14} {:<30} {}",
                    e.id,
                    e.pipeline,
                    e.kind,
                    e.status,
                    e.retries,
                    e.error_kind.as_deref().unwrap_or("-"),
                    e.run_id,
                    e.reason
                );
            }
            0
        }
        DlqCommand::Show { id, json } => match journal.dead_letter(id).await {
            Ok(Some(e)) => {
                if json {
                    print_json(&e);
                } else {
                    println!("dead letter {}  ({}, {})", e.id, e.kind, e.status);
                    println!("pipeline:       {}", e.pipeline);
                    println!("reason:         {}", e.reason);
                    println!("error kind:     {}", e.error_kind.as_deref().unwrap_or("-"));
                    println!("correlation id: {}", e.correlation_id);
                    println!("run:            {} (first: {})", e.run_id, e.first_run_id);
                    if let Some(ev) = &e.event_id {
                        println!("event:          {ev}");
                    }
                    println!("retries:        {}", e.retries);
                    println!(
                        "created:        {}  updated: {}",
                        e.created_at, e.updated_at
                    );
                    if let Some(by) = &e.resolved_by {
                        println!("resolved by:    {by}");
                    }
                    println!("input:          {}", one_line(e.input.as_value(), 2000));
                }
                0
            }
            Ok(None) => {
                eprintln!("error: no dead letter {id}");
                EXIT_INVALID
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_FAILED
            }
        },
        DlqCommand::Retry {
            ids,
            secrets,
            plugins,
        } => {
            let mut code = 0;
            for id in ids {
                let entry = match journal.dead_letter(id).await {
                    Ok(Some(e)) if e.status == "open" => e,
                    Ok(Some(e)) => {
                        eprintln!("error: dead letter {id} is {}, not open", e.status);
                        code = EXIT_INVALID;
                        continue;
                    }
                    Ok(None) => {
                        eprintln!("error: no dead letter {id}");
                        code = EXIT_INVALID;
                        continue;
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return EXIT_FAILED;
                    }
                };
                let original = match load_run(&journal, &entry.run_id).await {
                    Ok(d) => d,
                    Err(c) => return c,
                };
                match replay_one(
                    &journal,
                    &original,
                    None,
                    None,
                    "dlq-retry",
                    &Using {
                        secrets: secrets.as_deref(),
                        plugins: &plugins,
                        timeout: None,
                        current_pipeline: false,
                    },
                )
                .await
                {
                    Ok(report) => {
                        let ok = report.status == RunStatus::Succeeded;
                        println!(
                            "dead letter {id}: run {} {}{}",
                            report.run_id,
                            report.status.as_str(),
                            if ok {
                                " (resolved)".to_string()
                            } else {
                                format!(
                                    "; still open: {}",
                                    report.error.as_deref().unwrap_or_default()
                                )
                            }
                        );
                        if !ok && code == 0 {
                            code = EXIT_FAILED;
                        }
                    }
                    Err(c) => code = c,
                }
            }
            code
        }
        DlqCommand::Drop { ids } => {
            let mut code = 0;
            for id in ids {
                match journal.drop_dead_letter(id).await {
                    Ok(true) => println!("dead letter {id}: dropped"),
                    Ok(false) => {
                        eprintln!("error: no open dead letter {id}");
                        code = EXIT_INVALID;
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return EXIT_FAILED;
                    }
                }
            }
            code
        }
    }
}

/// `fmhost record RUN --out DIR`.
pub async fn record_cmd(state: &Path, args: RecordArgs) -> u8 {
    let journal = match open(state, false).await {
        Ok(j) => j,
        Err(code) => return code,
    };
    let run = match journal.run(&args.run).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!(
                "error: no run {} in the journal {}",
                args.run,
                journal.path().display()
            );
            return EXIT_FAILED;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    // The pipeline as the run ran it, else its file as it is now.
    let document = match journal.pipeline_document(&args.run).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    match write_recording(&run, document, &args.out) {
        Ok((path, notes)) => {
            for n in notes {
                eprintln!("note: {n}");
            }
            println!("{}", path.display());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    }
}

/// Writes the test file and the pipeline beside it; returns the test file and notes.
fn write_recording(
    run: &RunDetail,
    document: Option<String>,
    out: &Path,
) -> Result<(PathBuf, Vec<String>), String> {
    use serde_json::{Map, Value, json};
    let name = &run.summary.pipeline;
    let (doc_text, file) = match document {
        Some(d) => (d, format!("the pipeline run {} ran", run.summary.run_id)),
        None => {
            let file =
                run.rerun.pipeline_file.clone().ok_or_else(|| {
                    format!("run {} has no pipeline on record", run.summary.run_id)
                })?;
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("pipeline {file}: {e}"))?;
            (text, file)
        }
    };
    let doc: Value =
        serde_json::from_str(&doc_text).map_err(|e| format!("pipeline {file}: {e}"))?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    // The name comes from a pipeline file: as a file name it keeps to a safe alphabet.
    let stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = stem.trim_start_matches('.');
    let stem = if stem.is_empty() { "pipeline" } else { stem };
    let pipeline_name = format!("{stem}.pipeline.json");
    std::fs::write(out.join(&pipeline_name), &doc_text)
        .map_err(|e| format!("{}: {e}", out.display()))?;

    let mut notes = Vec::new();
    let mut http: Vec<(String, String, Value)> = Vec::new();
    let mut stage_mocks = Map::new();
    let mut unrecorded = 0;
    for st in &run.stages {
        let mut missing = false;
        for a in &st.calls {
            match &a.recorded {
                Some(r) => {
                    let body = match r.content_type.as_deref() {
                        Some(ct) if ct.contains("json") => {
                            serde_json::from_str(&r.body).unwrap_or(Value::String(r.body.clone()))
                        }
                        _ if r.body.is_empty() => Value::Null,
                        _ => Value::String(r.body.clone()),
                    };
                    let mut headers = Map::new();
                    if let Some(ct) = &r.content_type {
                        headers.insert("content-type".into(), json!(ct));
                    }
                    let mock = json!({"method": a.method, "url": r.url, "status": a.status.unwrap_or(200),
                                      "headers": headers, "body": body});
                    // The last answer to a request stands (a retried call's success).
                    http.retain(|(m, u, _)| !(m == &a.method && u == &r.url));
                    http.push((a.method.clone(), r.url.clone(), mock));
                }
                None => missing = true,
            }
        }
        if missing {
            unrecorded += 1;
            // Not recorded: the stage's own output stands in for its calls.
            if st.report.status.as_str() == "succeeded"
                && let Some(o) = &st.report.output
                && !st.report.id.contains(['[', '/'])
            {
                stage_mocks.insert(st.report.id.clone(), json!({"output": o.as_ref()}));
            }
        }
    }
    if unrecorded > 0 {
        notes.push(format!(
            "{unrecorded} stage(s) made calls that were not recorded (give the pipeline \"record\": true); their outputs are mocked instead"
        ));
    }
    // Secrets stay references: placeholders here, and the recorded URLs name them.
    let mut secrets = Map::new();
    let urls: Vec<&str> = http.iter().map(|(_, u, _)| u.as_str()).collect();
    for secret in crate::secrets::uses_in_pipeline(&doc).keys() {
        secrets.insert(
            secret.clone(),
            json!(crate::testing::placeholder(secret, &urls)),
        );
    }
    // The input as the run had it, with the placeholders where it held secret values.
    let input = crate::secrets::Secrets::from_pairs(
        secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())),
    )
    .restore(&run.input);
    let mut mocks = stage_mocks;
    if !http.is_empty() {
        mocks.insert(
            "http".into(),
            Value::Array(http.into_iter().map(|(_, _, m)| m).collect()),
        );
    }
    let mut assertions = vec![json!({"path": "status", "equals": run.summary.status})];
    for st in run
        .stages
        .iter()
        .filter(|s| !s.report.id.contains(['[', '/']))
    {
        assertions.push(json!({"path": format!("stages.{}.status", st.report.id), "equals": st.report.status.as_str()}));
    }
    if let Some(o) = &run.output
        && !o.is_null()
    {
        assertions.push(json!({"path": "output", "deepEquals": o}));
    }
    let test = json!({
        "name": name,
        "pipeline": pipeline_name,
        "description": format!("recorded from run {} ({}) by fmhost record", run.summary.run_id, run.summary.started_at),
        "tests": [{"name": format!("replays run {}", run.summary.run_id), "input": input,
                   "secrets": secrets, "mocks": mocks, "assertions": assertions}]
    });
    let path = out.join(format!("{stem}.test.json"));
    let text = serde_json::to_string_pretty(&test).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, notes))
}

/// `fmhost plugins test CANDIDATE --pipeline NAME`.
pub struct ShadowArgs {
    pub candidate: PathBuf,
    pub pipeline: String,
    pub since: Option<i64>,
    pub runs: usize,
    pub current_pipeline: bool,
    pub json: bool,
    pub plugins: Vec<PathBuf>,
    pub policy: Option<PathBuf>,
}

/// Shadow-tests a candidate plugin against the journaled runs of a pipeline.
pub async fn plugins_test(state: &Path, args: ShadowArgs) -> u8 {
    use crate::plugin::WasmComponent;
    let journal = match open(state, false).await {
        Ok(j) => j,
        Err(code) => return code,
    };
    let runtime = match super::cli_runtime(args.policy.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    // Unless told otherwise, the plugins the pipeline's newest run used: its plugin
    // directories and the server's uploads (the newest file of a name wins).
    let (dirs, newest_wins) = if args.plugins.is_empty() {
        let newest = journal
            .runs(RunFilter {
                pipeline: Some(args.pipeline.clone()),
                limit: 1,
                ..RunFilter::default()
            })
            .await
            .ok()
            .and_then(|r| r.into_iter().next());
        let mut dirs = Vec::new();
        if let Some(summary) = newest
            && let Ok(Some(run)) = journal.run(&summary.run_id).await
        {
            dirs.extend(run.rerun.plugin_dirs.iter().map(PathBuf::from));
        }
        let uploads = state.join("plugins");
        if uploads.is_dir() {
            dirs.push(uploads);
        }
        let found = !dirs.is_empty();
        (dirs, found)
    } else {
        (args.plugins.clone(), false)
    };
    let discovered = if newest_wins {
        runtime.discover_newest(&dirs).await
    } else {
        runtime.discover(&dirs).await
    };
    let mut registry = crate::component::Registry::builtins();
    match discovered {
        Ok(found) => {
            for p in found {
                registry.register(Arc::new(WasmComponent::new(p)));
            }
        }
        Err(errors) => {
            for e in errors {
                eprintln!("error: {e}");
            }
            return EXIT_INVALID;
        }
    }
    let candidate = match runtime.load_file(&args.candidate).await {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    if crate::component::Registry::builtins()
        .get(&candidate.name)
        .is_some()
    {
        eprintln!(
            "error: {}: \"{}\" is the name of a built-in component",
            args.candidate.display(),
            candidate.name
        );
        return EXIT_INVALID;
    }
    let (name, version) = (candidate.name.clone(), candidate.version.clone());
    registry.register(Arc::new(WasmComponent::new(candidate.clone())));
    eprintln!(
        "shadow-testing {name} {version} ({}) against the newest {} run(s) of {}; nothing is sent upstream",
        &candidate.hash[..12],
        args.runs,
        args.pipeline
    );
    let request = crate::shadow::Request {
        journal: &journal,
        registry: &registry,
        plugin: &name,
        pipeline: &args.pipeline,
        since_ms: args.since,
        runs: args.runs,
        current_pipeline: args.current_pipeline,
        granted_secrets: runtime.policy().granted_secrets(),
    };
    // One progress line per run; the shadow runs' own stage-by-stage logs stay quiet.
    let quiet = tracing::subscriber::NoSubscriber::default();
    let report = match tracing::instrument::WithSubscriber::with_subscriber(
        crate::shadow::shadow(&request, &|done, total| {
            if done < total {
                eprintln!("shadow run {}/{total}", done + 1);
            }
        }),
        quiet,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    if args.json {
        print_json(&report);
    } else {
        print_shadow(&report);
    }
    if report.runs.is_empty() {
        eprintln!(
            "error: no journaled run of {} used {name}{}: nothing was tested",
            args.pipeline,
            if args.since.is_some() {
                " in that period"
            } else {
                ""
            }
        );
        return EXIT_FAILED;
    }
    if report.safe { 0 } else { EXIT_FAILED }
}

fn print_shadow(report: &crate::shadow::Report) {
    for r in &report.runs {
        let mut detail = String::new();
        if let Some(d) = r.differences.first() {
            detail = format!(
                "{}: {} -> {}",
                d["path"].as_str().unwrap_or(""),
                one_line(&d["recorded"], 40),
                one_line(&d["candidate"], 40)
            );
            if r.differences.len() > 1 {
                detail.push_str(&format!(" (+{} more)", r.differences.len() - 1));
            }
        } else if !r.unrecorded.is_empty() {
            detail = format!("not recorded: {}", r.unrecorded.join(", "));
        } else if r.verdict == crate::shadow::Verdict::Fixed {
            detail = format!("{} succeed(s) now", r.stages.join(", "));
            if !r.untested.is_empty() {
                detail.push_str(&format!(
                    "; not judged: {} (never ran in the recording)",
                    r.untested.join(", ")
                ));
            }
        } else if let Some(e) = &r.error {
            detail = e.clone();
        }
        println!(
            "{:<30} {:<13} {}",
            r.run_id,
            crate::shadow::verdict_name(r.verdict),
            detail
        );
    }
    let c = &report.counts;
    println!(
        "{} identical, {} changed, {} fixed, {} regressed, {} still failing, {} unrecorded ({} run(s) did not use {}): {}",
        c["identical"],
        c["changed"],
        c["fixed"],
        c["regressed"],
        c["still_failing"],
        c["unrecorded"],
        report.skipped,
        report.plugin,
        if report.safe { "safe" } else { "NOT safe" }
    );
    if c["unrecorded"] > 0 {
        eprintln!(
            "note: runs made without \"record\": true on the pipeline (or its services) have no answers to replay"
        );
    }
}
