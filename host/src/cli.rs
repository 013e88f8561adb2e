//! The `fmhost` command line. The only place that turns errors into exit codes:
//! 0 success, 1 the run failed, 2 invalid pipeline, input or usage, 130 interrupted.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::component::Registry;
use crate::engine::{Engine, RunOptions, RunStatus};
use crate::logging::{self, LogFormat};
use crate::pipeline;
use crate::secrets::Secrets;

const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(name = "fmhost", version, about = "Runs declarative API-integration pipelines (FlowMason format)")]
struct Cli {
    /// How stderr logs look.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline; prints its output JSON on stdout.
    Run(RunArgs),
    /// Check a pipeline and report every problem.
    Validate(ValidateArgs),
}

#[derive(Args)]
struct PluginArgs {
    /// Directory of plugin components (repeatable); searched before FMHOST_PLUGIN_PATH.
    #[arg(long = "plugins", value_name = "DIR")]
    plugins: Vec<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// The `.pipeline.json` file.
    pipeline: PathBuf,
    /// Input JSON file, or `-` for stdin.
    #[arg(long, value_name = "FILE", conflicts_with = "input_json")]
    input: Option<String>,
    /// Input JSON given inline.
    #[arg(long, value_name = "JSON")]
    input_json: Option<String>,
    /// Secrets as a JSON object or dotenv file; FMHOST_SECRET_<NAME> variables also work.
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Deadline for the whole run, e.g. `30s` or `1500ms`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Also write the full run report (stages, timings, attempts, errors) as JSON.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[command(flatten)]
    plugins: PluginArgs,
}

#[derive(Args)]
struct ValidateArgs {
    /// The `.pipeline.json` file.
    pipeline: PathBuf,
    #[command(flatten)]
    plugins: PluginArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Entry point for the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_INVALID } else { 0 });
        }
    };
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Validate(args) => validate(args),
        }
    });
    ExitCode::from(code)
}

fn registry(_plugins: &PluginArgs) -> Result<Registry, String> {
    Ok(Registry::builtins())
}

fn load_plan(path: &Path, registry: &Registry) -> Result<pipeline::Plan, u8> {
    pipeline::load(path, registry).map_err(|e| {
        for line in e.lines() {
            eprintln!("error: {line}");
        }
        if let pipeline::LoadError::Invalid { diagnostics, .. } = &e {
            eprintln!("{} problem{} found", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" });
        }
        EXIT_INVALID
    })
}

fn validate(args: ValidateArgs) -> u8 {
    let registry = match registry(&args.plugins) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    match load_plan(&args.pipeline, &registry) {
        Ok(plan) => {
            eprintln!("{}: ok ({} stages)", args.pipeline.display(), plan.stages.len());
            0
        }
        Err(code) => code,
    }
}

fn read_input(args: &RunArgs) -> Result<Value, String> {
    let (text, origin) = match (&args.input, &args.input_json) {
        (_, Some(inline)) => (inline.clone(), "--input-json".to_string()),
        (Some(dash), None) if dash == "-" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| format!("stdin: {e}"))?;
            (s, "stdin".to_string())
        }
        (Some(file), None) => (std::fs::read_to_string(file).map_err(|e| format!("input {file}: {e}"))?, format!("input {file}")),
        (None, None) => return Ok(Value::Object(Default::default())),
    };
    serde_json::from_str(&text).map_err(|e| format!("{origin}:{}:{}: invalid JSON: {e}", e.line(), e.column()))
}

async fn run(args: RunArgs) -> u8 {
    let registry = match registry(&args.plugins) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let plan = match load_plan(&args.pipeline, &registry) {
        Ok(p) => Arc::new(p),
        Err(code) => return code,
    };
    let input = match read_input(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    if let Err(e) = Engine::check_input(&plan, &input) {
        eprintln!("error: {e}");
        return EXIT_INVALID;
    }
    let secrets = match Secrets::load(args.secrets.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let mut engine = Engine::new(secrets);
    engine.fixed_now = std::env::var("FMHOST_NOW").ok().map(Arc::from);
    let opts = RunOptions { timeout: args.timeout, ..RunOptions::default() };
    let cancel = opts.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!(target: "fmhost::progress", "interrupted: cancelling the run");
            cancel.cancel();
        }
    });
    let report = match engine.run(plan, input, opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    if let Some(path) = &args.report {
        let written = serde_json::to_vec_pretty(&report).map_err(|e| e.to_string()).and_then(|bytes| std::fs::write(path, bytes).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("error: report {}: {e}", path.display());
        }
    }
    match report.status {
        RunStatus::Succeeded => {
            let output = report.output.unwrap_or(Value::Null);
            println!("{}", serde_json::to_string_pretty(&output).unwrap_or_default());
            0
        }
        RunStatus::Cancelled => EXIT_INTERRUPTED,
        _ => EXIT_FAILED,
    }
}
