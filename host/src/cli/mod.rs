//! The `fmhost` command line. The only place that turns errors into exit codes:
//! 0 success, 1 the run failed (or the journal could not be used), 2 invalid
//! pipeline, input or usage, 130 interrupted.

mod journal;
mod triggers;

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
use crate::plugin::{Plugin, PluginRuntime, WasmComponent};
use crate::secrets::Secrets;

const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "fmhost",
    version,
    about = "Runs declarative API-integration pipelines (FlowMason format)"
)]
struct Cli {
    /// How stderr logs look.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Where the run journal, accepted webhooks and uploaded plugins live
    /// (default: $XDG_DATA_HOME/fmhost or ~/.local/share/fmhost).
    #[arg(long, global = true, value_name = "DIR", env = "FMHOST_STATE")]
    state: Option<PathBuf>,
    /// Keep the run journal in PostgreSQL (`postgres://user:password@host:5432/db`)
    /// instead of SQLite in the state directory; several hosts may share it.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "FMHOST_JOURNAL",
        hide_env_values = true
    )]
    journal: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline; prints its output JSON on stdout.
    Run(RunArgs),
    /// Check a pipeline and report every problem.
    Validate(ValidateArgs),
    /// Draw a pipeline's DAG: Mermaid (default), Graphviz dot, or JSON.
    Graph(GraphArgs),
    /// Run pipeline tests (`*.test.json`) offline, with mocks; exits 1 if one fails.
    Test(TestArgs),
    /// Which secrets a pipeline needs, and which are missing (values are never printed).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// List or inspect WebAssembly plugins, or swap one in a running server.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Serve pipelines over HTTP, with webhooks, metrics and hot-swappable plugins.
    Serve(ServeArgs),
    /// List journaled runs, or show one.
    #[command(subcommand)]
    Runs(journal::RunsCommand),
    /// Re-run a journaled run, from a stage or where it stopped; or many (--pipeline --since).
    Replay(journal::ReplayArgs),
    /// Turn a journaled run into a pipeline test (`DIR/NAME.test.json`) that
    /// `fmhost test DIR` passes offline: its upstream calls become mocks, its output and
    /// stage statuses assertions.
    Record(journal::RecordArgs),
    /// Schedules of served pipelines: next fire times, skipped and missed fires.
    #[command(subcommand)]
    Schedules(triggers::SchedulesCommand),
    /// Poll triggers' cursors: show one, or set it to rewind (replay as a parameter).
    #[command(subcommand)]
    Cursors(triggers::CursorsCommand),
    /// The dead-letter queue: failed runs and unprocessable webhook deliveries.
    #[command(subcommand)]
    Dlq(journal::DlqCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Directory of `.pipeline.json` files.
    #[arg(long, value_name = "DIR")]
    pipelines: PathBuf,
    /// Plugin directories (repeatable); watched: a component written here is swapped in.
    #[arg(long = "plugins", value_name = "DIR")]
    plugins: Vec<PathBuf>,
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Secrets as a JSON object or dotenv file; FMHOST_SECRET_<NAME> variables also work.
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// How long in-flight runs may take to finish after SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    drain_timeout: Duration,
    /// What happens at start to runs a crash or a drain timeout interrupted: resume them
    /// from their last completed stages, or put them in the dead-letter queue.
    #[arg(long, value_enum, default_value = "resume")]
    on_interrupted: crate::serve::Interrupted,
    /// The operator's grants to plugins: hosts and secrets per plugin (docs/security.md).
    #[arg(long, value_name = "FILE", env = "FMHOST_POLICY")]
    policy: Option<PathBuf>,
    /// The API's bearer tokens, one `SCOPE TOKEN` per line (read, run, admin); else
    /// FMHOST_API_TOKEN (admin), else STATE/api-tokens, written at first start.
    #[arg(long, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// A name clients may use in `Host` besides the listen address (repeatable).
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// Serve /metrics without a token.
    #[arg(long)]
    open_metrics: bool,
    /// Largest run input (and other API body) in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    max_input_bytes: usize,
    /// Largest webhook delivery in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    max_webhook_bytes: usize,
    /// Largest plugin upload in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    max_upload_bytes: usize,
    /// Most connections held at once (kept below the file-descriptor limit); at the
    /// limit, the oldest connection that has not sent a whole request is closed.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_connections: usize,
    /// How long a client may take to send a request's headers.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    header_timeout: Duration,
    /// Most API runs in flight, running or waiting for a plugin instance; beyond it,
    /// new runs are answered 429.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_runs: usize,
    /// Remove journaled runs older than this (`30d`), at start and every hour; runs
    /// still running or with an open dead letter are kept.
    #[arg(long, value_name = "AGE", value_parser = parse_duration)]
    retain: Option<Duration>,
    /// Join a cluster of workers sharing work through this NATS JetStream server (or a
    /// `{{secrets.NAME}}` holding its URL); needs a PostgreSQL journal (docs/scale-out.md).
    #[arg(long, value_name = "URL", env = "FMHOST_CLUSTER")]
    cluster: Option<String>,
    /// In a cluster: how long a worker's runs stay its own without a heartbeat; a dead
    /// worker's runs are resumed elsewhere after about this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    lease: Duration,
    /// In a cluster: this worker's name (default: host name and process id).
    #[arg(long, value_name = "NAME")]
    worker_id: Option<String>,
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Every plugin found on the search path, and the built-ins.
    List {
        #[command(flatten)]
        plugins: PluginArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Upload a component to a running `fmhost serve`, which swaps it in.
    Swap {
        name: String,
        file: PathBuf,
        /// The server, e.g. http://127.0.0.1:8080
        #[arg(long, value_name = "URL")]
        server: String,
        /// Approve hosts or a world the new version asks for beyond the current one's.
        #[arg(long)]
        approve: bool,
        /// Start the new version as a canary serving this percentage of new runs; the
        /// current version serves the rest until `plugins promote` or `plugins rollback`.
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..=100))]
        canary: Option<u32>,
        /// Let the canary decide: promoted after --promote-after ok runs, rolled back as
        /// soon as its run error rate exceeds the current version's by more than
        /// --max-error-rate-excess.
        #[arg(long, requires = "canary")]
        auto: bool,
        #[arg(long, value_name = "RUNS", requires = "auto", default_value_t = 20)]
        promote_after: u64,
        #[arg(
            long,
            value_name = "FRACTION",
            requires = "auto",
            default_value_t = 0.0
        )]
        max_error_rate_excess: f64,
        /// The server's token file (default: FMHOST_API_TOKEN, else STATE/api-tokens).
        #[arg(long, value_name = "FILE")]
        api_token_file: Option<PathBuf>,
    },
    /// Make a running `fmhost serve`'s canary of a plugin serve every run.
    Promote {
        name: String,
        #[arg(long, value_name = "URL")]
        server: String,
        /// The server's token file (default: FMHOST_API_TOKEN, else STATE/api-tokens).
        #[arg(long, value_name = "FILE")]
        api_token_file: Option<PathBuf>,
    },
    /// Make a running `fmhost serve` drop a plugin's canary, or, without one, go back to
    /// its previous version.
    Rollback {
        name: String,
        #[arg(long, value_name = "URL")]
        server: String,
        /// The server's token file (default: FMHOST_API_TOKEN, else STATE/api-tokens).
        #[arg(long, value_name = "FILE")]
        api_token_file: Option<PathBuf>,
    },
    /// Shadow-test a candidate version against journaled runs: the candidate re-runs
    /// them answered from their recordings (nothing is sent), and its outputs are
    /// compared with what was recorded. Exits 0 when no run regressed or lacked a
    /// recording, 1 otherwise.
    Test {
        /// The candidate `.wasm` component; it replaces the plugin of the same name.
        candidate: PathBuf,
        /// The pipeline whose runs are replayed.
        #[arg(long, value_name = "NAME")]
        pipeline: String,
        /// Only runs started at or after: an age such as `7d`, RFC 3339, or a date.
        #[arg(long, value_name = "TIME", value_parser = crate::journal::parse_time)]
        since: Option<i64>,
        /// The newest this many runs.
        #[arg(long, value_name = "N", default_value_t = 20)]
        runs: usize,
        /// Run today's pipeline file instead of the document each run ran.
        #[arg(long)]
        current_pipeline: bool,
        /// Print the whole report as JSON.
        #[arg(long)]
        json: bool,
        /// The other plugins; by default those the pipeline's newest run used (its
        /// plugin directories and the state directory's uploads).
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Load one component file and show what it declares.
    Inspect {
        /// A `.wasm` component.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The operator's policy, to show what this plugin would be granted.
        #[arg(long, value_name = "FILE", env = "FMHOST_POLICY")]
        policy: Option<PathBuf>,
    },
}

#[derive(Args)]
struct PluginArgs {
    /// Directory of plugin components (repeatable); searched before FMHOST_PLUGIN_PATH,
    /// then ./target/plugins.
    #[arg(long = "plugins", value_name = "DIR")]
    plugins: Vec<PathBuf>,
    /// The operator's grants to plugins: hosts and secrets per plugin (docs/security.md).
    #[arg(long, value_name = "FILE", env = "FMHOST_POLICY")]
    policy: Option<PathBuf>,
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
    /// Print a per-service table of calls, errors by kind, latency and breaker state.
    #[arg(long)]
    metrics: bool,
    /// Do not record the run in the journal.
    #[arg(long)]
    no_journal: bool,
    #[command(flatten)]
    plugins: PluginArgs,
}

#[derive(Args)]
struct ValidateArgs {
    /// The `.pipeline.json` files; with several, services they declare differently are
    /// reported too (a service has one policy per process).
    #[arg(required = true, num_args = 1..)]
    pipeline: Vec<PathBuf>,
    #[command(flatten)]
    plugins: PluginArgs,
}

#[derive(Args)]
struct GraphArgs {
    /// The `.pipeline.json` file.
    pipeline: PathBuf,
    #[command(flatten)]
    plugins: PluginArgs,
    #[arg(long, value_enum, default_value = "mermaid")]
    format: GraphFormat,
}

#[derive(Args)]
struct TestArgs {
    /// Test files, or directories searched for `*.test.json` (default: the current one).
    paths: Vec<PathBuf>,
    /// Also write the results as JUnit XML, for CI systems.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    #[command(flatten)]
    plugins: PluginArgs,
}

#[derive(clap::Subcommand)]
enum SecretsCommand {
    /// Lists every secret the pipeline reads (stages, services, triggers), where, and
    /// whether it is set; exits 1 when one is missing.
    Check {
        /// The `.pipeline.json` file.
        pipeline: PathBuf,
        /// Secrets as a JSON object or dotenv file; FMHOST_SECRET_<NAME> variables also count.
        #[arg(long, value_name = "FILE")]
        secrets: Option<PathBuf>,
        #[command(flatten)]
        plugins: PluginArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    /// A Mermaid `flowchart`, one edge per dependency.
    Mermaid,
    /// Graphviz dot.
    Dot,
    /// The graph as JSON: nodes, edges, blocks.
    Json,
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
    if matches!(cli.command, Command::Test(_)) {
        logging::init_with(cli.log_format, "warn,fmhost::progress=off,fmhost::http=off");
    } else {
        logging::init(cli.log_format);
    }
    if !matches!(cli.command, Command::Serve(_)) {
        // `fmhost runs list | head` should end quietly, not panic on a closed stdout.
        #[cfg(unix)]
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let state = cli
        .state
        .clone()
        .unwrap_or_else(crate::serve::default_state_dir);
    if let Some(url) = cli.journal.as_deref().filter(|u| !u.trim().is_empty()) {
        crate::journal::set_location(url);
    }
    // Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set; a misconfiguration costs the traces, not the runs.
    match crate::otel::init() {
        Ok(Some(endpoint)) => {
            tracing::info!(target: "fmhost::otel", "exporting traces to {endpoint}")
        }
        Ok(None) => {}
        Err(e) => eprintln!("warning: traces are not exported: {e}"),
    }
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args, &state).await,
            Command::Validate(args) => validate(args).await,
            Command::Graph(args) => graph(args).await,
            Command::Secrets(cmd) => secrets_cmd(cmd).await,
            Command::Test(args) => test_cmd(args).await,
            Command::Plugins(cmd) => plugins(cmd, &state).await,
            Command::Serve(args) => serve(args, state).await,
            Command::Runs(cmd) => journal::runs(&state, cmd).await,
            Command::Replay(args) => journal::replay_cmd(&state, args).await,
            Command::Record(args) => journal::record_cmd(&state, args).await,
            Command::Dlq(cmd) => journal::dlq(&state, cmd).await,
            Command::Schedules(cmd) => triggers::schedules(&state, cmd).await,
            Command::Cursors(cmd) => triggers::cursors(&state, cmd).await,
        }
    });
    crate::otel::shutdown();
    ExitCode::from(code)
}

/// The built-ins plus every plugin found on the search path.
async fn registry(args: &PluginArgs) -> Result<Registry, String> {
    registry_of(args, None).await
}

/// The built-ins plus the plugins of the search path named in `wanted` (canonical
/// names), or all of them.
async fn registry_of(
    args: &PluginArgs,
    wanted: Option<&std::collections::BTreeSet<String>>,
) -> Result<Registry, String> {
    let mut registry = Registry::builtins();
    for p in discover_of(args, wanted).await? {
        if registry.get(&p.name).is_some() {
            return Err(format!(
                "plugin {}: \"{}\" is the name of a built-in component",
                p.path.display(),
                p.name
            ));
        }
        registry.register(Arc::new(WasmComponent::new(p)));
    }
    Ok(registry)
}

/// A plugin runtime sized for one command, with the operator's policy if given.
fn cli_runtime(policy: Option<&Path>) -> Result<Arc<PluginRuntime>, String> {
    let runtime = PluginRuntime::with_instances(crate::plugin::CLI_INSTANCES)
        .map_err(|e| format!("cannot start the plugin runtime: {e}"))?;
    if let Some(path) = policy {
        runtime.set_policy(crate::plugin::Policy::load(path)?);
    }
    Ok(runtime)
}

async fn discover(args: &PluginArgs) -> Result<Vec<Arc<Plugin>>, String> {
    discover_of(args, None).await
}

/// The plugins of the search path named in `wanted` (canonical names), or all of them;
/// every file is checked against the others either way.
async fn discover_of(
    args: &PluginArgs,
    wanted: Option<&std::collections::BTreeSet<String>>,
) -> Result<Vec<Arc<Plugin>>, String> {
    let runtime = cli_runtime(args.policy.as_deref())?;
    let found = match wanted {
        None => runtime.discover(&args.plugins).await,
        Some(names) => {
            let wanted = |name: &str| names.contains(&crate::component::canonical_name(name));
            runtime.discover_wanted(&args.plugins, &wanted).await
        }
    };
    found.map_err(|e| plugin_errors(&e))
}

/// Every problem of a plugin search, one `error:` line each.
fn plugin_errors(errors: &[crate::plugin::PluginError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\nerror: ")
}

fn plugin_json(p: &Plugin) -> Value {
    serde_json::json!({
        "name": p.name,
        "version": p.version,
        "world": p.kind,
        "description": p.description,
        "config_schema": p.config_schema,
        "allowed_hosts": p.allowed_hosts,
        "file": p.path.display().to_string(),
        "sha256": p.hash,
    })
}

async fn serve(args: ServeArgs, state: PathBuf) -> u8 {
    let opts = crate::serve::ServeOptions {
        pipelines: args.pipelines,
        plugins: args.plugins,
        listen: args.listen,
        secrets: args.secrets,
        state,
        drain_timeout: args.drain_timeout,
        on_interrupted: args.on_interrupted,
        policy: args.policy,
        api_token_file: args.api_token_file,
        allowed_hosts: args.allowed_hosts,
        open_metrics: args.open_metrics,
        limits: crate::serve::BodyLimits {
            input: args.max_input_bytes,
            webhook: args.max_webhook_bytes,
            upload: args.max_upload_bytes,
        },
        connections: crate::serve::ConnLimits {
            max: args.max_connections,
            header_timeout: args.header_timeout,
        },
        max_runs: args.max_runs,
        retain: args.retain,
        cluster: args.cluster.map(|url| crate::serve::ClusterOptions {
            url,
            lease: args.lease,
            worker_id: args.worker_id,
        }),
    };
    match crate::serve::serve(opts).await {
        Ok(()) => 0,
        Err(e) => {
            for line in format!("{e:#}").lines() {
                eprintln!("error: {line}");
            }
            EXIT_INVALID
        }
    }
}

/// Sends a request to a running server and prints its JSON answer.
/// The admin token for `--server` commands: `FMHOST_API_TOKEN`, else the admin line of
/// `--api-token-file`, else of the state directory's `api-tokens` (what `serve` wrote).
fn api_token(file: Option<&Path>, state: &Path) -> Option<String> {
    std::env::var("FMHOST_API_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| {
            let default = crate::serve::default_token_file(state);
            crate::serve::admin_token_from_file(file.unwrap_or(&default))
        })
}

async fn remote(
    method: reqwest::Method,
    url: String,
    body: Option<Vec<u8>>,
    token: Option<String>,
) -> u8 {
    let mut req = reqwest::Client::new().request(method, &url);
    if let Some(t) = token {
        req = req.bearer_auth(t.trim());
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/wasm").body(b);
    }
    match req.send().await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let text = resp.text().await.unwrap_or_default();
            if ok {
                println!("{text}");
                0
            } else {
                let detail = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["detail"].as_str().map(str::to_string))
                    .unwrap_or(text);
                eprintln!("error: {url}: {detail}");
                EXIT_FAILED
            }
        }
        Err(e) => {
            eprintln!("error: {url}: {e}");
            EXIT_FAILED
        }
    }
}

async fn plugins(cmd: PluginsCommand, state: &Path) -> u8 {
    match cmd {
        PluginsCommand::Swap {
            name,
            file,
            server,
            approve,
            canary,
            auto,
            promote_after,
            max_error_rate_excess,
            api_token_file,
        } => match std::fs::read(&file) {
            Ok(bytes) => {
                let mut query = Vec::new();
                if approve {
                    query.push("approve=true".to_string());
                }
                if let Some(p) = canary {
                    query.push(format!("canary={p}"));
                }
                if auto {
                    query.push(format!(
                        "auto=true&promote_after={promote_after}&max_error_rate_excess={max_error_rate_excess}"
                    ));
                }
                remote(
                    reqwest::Method::PUT,
                    format!(
                        "{}/v1/plugins/{name}{}{}",
                        server.trim_end_matches('/'),
                        if query.is_empty() { "" } else { "?" },
                        query.join("&")
                    ),
                    Some(bytes),
                    api_token(api_token_file.as_deref(), state),
                )
                .await
            }
            Err(e) => {
                eprintln!("error: {}: {e}", file.display());
                EXIT_INVALID
            }
        },
        PluginsCommand::Test {
            candidate,
            pipeline,
            since,
            runs,
            current_pipeline,
            json,
            plugins,
        } => {
            journal::plugins_test(
                state,
                journal::ShadowArgs {
                    candidate,
                    pipeline,
                    since,
                    runs,
                    current_pipeline,
                    json,
                    plugins: plugins.plugins,
                    policy: plugins.policy,
                },
            )
            .await
        }
        PluginsCommand::Promote {
            name,
            server,
            api_token_file,
        } => {
            remote(
                reqwest::Method::POST,
                format!("{}/v1/plugins/{name}/promote", server.trim_end_matches('/')),
                None,
                api_token(api_token_file.as_deref(), state),
            )
            .await
        }
        PluginsCommand::Rollback {
            name,
            server,
            api_token_file,
        } => {
            remote(
                reqwest::Method::POST,
                format!(
                    "{}/v1/plugins/{name}/rollback",
                    server.trim_end_matches('/')
                ),
                None,
                api_token(api_token_file.as_deref(), state),
            )
            .await
        }
        PluginsCommand::List { plugins, json } => {
            let found = match discover(&plugins).await {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_INVALID;
                }
            };
            if json {
                let list: Vec<Value> = found.iter().map(|p| plugin_json(p)).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return 0;
            }
            println!(
                "{:<18} {:<9} {:<10} {:<34} FILE",
                "NAME", "VERSION", "WORLD", "ALLOWED HOSTS"
            );
            for b in Registry::builtins().iter() {
                println!(
                    "{:<18} {:<9} {:<10} {:<34} (built-in)",
                    b.name(),
                    env!("CARGO_PKG_VERSION"),
                    "built-in",
                    "-"
                );
            }
            for p in &found {
                let hosts = if p.allowed_hosts.is_empty() {
                    "-".to_string()
                } else {
                    p.allowed_hosts.join(",")
                };
                println!(
                    "{:<18} {:<9} {:<10} {:<34} {}",
                    p.name,
                    p.version,
                    format!("{:?}", p.kind).to_lowercase(),
                    hosts,
                    p.path.display()
                );
            }
            0
        }
        PluginsCommand::Inspect { file, json, policy } => {
            let policy = match policy.as_deref().map(crate::plugin::Policy::load) {
                None => crate::plugin::Policy::builtin(),
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return EXIT_INVALID;
                }
            };
            let runtime = match PluginRuntime::with_instances(1) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the plugin runtime: {e}");
                    return EXIT_FAILED;
                }
            };
            match runtime.load_file(&file).await {
                Ok(p) => {
                    let grant = policy.plugins.get(&p.name).cloned().unwrap_or_default();
                    let mut v = plugin_json(&p);
                    v["operator_grant"] = serde_json::json!(grant);
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    } else {
                        println!("name:           {}", p.name);
                        println!("version:        {}", p.version);
                        println!("world:          {}", format!("{:?}", p.kind).to_lowercase());
                        println!("description:    {}", p.description);
                        let list = |l: &[String]| {
                            if l.is_empty() {
                                "none".to_string()
                            } else {
                                l.join(", ")
                            }
                        };
                        println!(
                            "asks for hosts: {} (a request: a stage's allowed_hosts or the operator's policy grants them)",
                            list(&p.allowed_hosts)
                        );
                        println!(
                            "policy grants:  hosts {}; secrets {}",
                            list(&grant.hosts),
                            list(&grant.secrets)
                        );
                        println!("sha256:         {}", p.hash);
                        println!(
                            "config schema:  {}",
                            p.config_schema
                                .as_ref()
                                .map(|s| serde_json::to_string_pretty(s).unwrap_or_default())
                                .unwrap_or_else(|| "none".into())
                        );
                    }
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_INVALID
                }
            }
        }
    }
}

/// Compiles the pipeline at `path` with a registry of the built-ins and only the
/// plugins it names; a pipeline with a problem is compiled again with every plugin
/// known, so its diagnostics (suggested names) are those of the whole search path.
async fn registry_and_plan(
    args: &PluginArgs,
    path: &Path,
) -> Result<(Registry, pipeline::Plan), u8> {
    let failed = |e: String| {
        eprintln!("error: {e}");
        EXIT_INVALID
    };
    let named = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| pipeline::components_named(&text));
    if let Some(names) = named {
        let registry = registry_of(args, Some(&names)).await.map_err(failed)?;
        if let Ok(plan) = pipeline::load(path, &registry) {
            return Ok((registry, plan));
        }
    }
    let registry = registry(args).await.map_err(failed)?;
    let plan = load_plan(path, &registry)?;
    Ok((registry, plan))
}

fn load_plan(path: &Path, registry: &Registry) -> Result<pipeline::Plan, u8> {
    pipeline::load(path, registry).map_err(|e| {
        for line in e.lines() {
            eprintln!("error: {line}");
        }
        if let pipeline::LoadError::Invalid { diagnostics, .. } = &e {
            eprintln!(
                "{} problem{} found",
                diagnostics.len(),
                if diagnostics.len() == 1 { "" } else { "s" }
            );
        }
        EXIT_INVALID
    })
}

async fn validate(args: ValidateArgs) -> u8 {
    let registry = match registry(&args.plugins).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let mut code = 0;
    let services = crate::http::Services::default();
    for file in &args.pipeline {
        match load_plan(file, &registry) {
            Ok(plan) => {
                let mut conflicts = 0;
                for (name, policy) in &plan.services {
                    if let Err(why) =
                        services.configure(name, policy, &format!("{}", file.display()))
                    {
                        eprintln!("error: {}: services.{name}: {why}", file.display());
                        conflicts += 1;
                    }
                }
                if conflicts == 0 {
                    eprintln!("{}: ok ({} stages)", file.display(), plan.stages.len());
                } else {
                    code = EXIT_INVALID;
                }
            }
            Err(c) => code = c,
        }
    }
    code
}

async fn graph(args: GraphArgs) -> u8 {
    let plan = match registry_and_plan(&args.plugins, &args.pipeline).await {
        Ok((_, plan)) => plan,
        Err(code) => return code,
    };
    let dag = crate::draw::dag(&plan);
    match args.format {
        GraphFormat::Mermaid => print!("{}", crate::draw::mermaid(&dag)),
        GraphFormat::Dot => print!("{}", crate::draw::dot(&dag)),
        GraphFormat::Json => journal::print_json(&dag),
    }
    0
}

async fn test_cmd(args: TestArgs) -> u8 {
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths.clone()
    };
    let files = match crate::testing::find(&paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    if files.is_empty() {
        eprintln!("error: no *.test.json under {paths:?}");
        return EXIT_INVALID;
    }
    let registry = match registry(&args.plugins).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let mut all = Vec::new();
    for file in &files {
        for o in crate::testing::run_file(file, &registry).await {
            let mark = if o.passed() { "PASS" } else { "FAIL" };
            println!(
                "{mark}  {} › {}  ({} ms)",
                o.suite,
                o.name,
                o.duration.as_millis()
            );
            for f in &o.failures {
                println!("      {f}");
            }
            all.push(o);
        }
    }
    let failed = all.iter().filter(|o| !o.passed()).count();
    println!("{} passed, {failed} failed", all.len() - failed);
    if let Some(path) = &args.junit
        && let Err(e) = std::fs::write(path, crate::testing::junit(&all))
    {
        eprintln!("error: --junit {}: {e}", path.display());
        return EXIT_FAILED;
    }
    if failed > 0 { EXIT_FAILED } else { 0 }
}

async fn secrets_cmd(cmd: SecretsCommand) -> u8 {
    let SecretsCommand::Check {
        pipeline,
        secrets,
        plugins,
        json,
    } = cmd;
    let plan = match registry_and_plan(&plugins, &pipeline).await {
        Ok((_, plan)) => plan,
        Err(code) => return code,
    };
    let loaded = match Secrets::load(secrets.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let from_file = match &secrets {
        Some(f) => Secrets::load_file_only(f).unwrap_or_default(),
        None => Secrets::default(),
    };
    // name -> places that read it
    let needs = crate::secrets::uses_in_pipeline(&plan.source);
    // What the operator's policy lets the pipeline's plugins use: optional, the plugin
    // decides whether it needs them.
    let policy = match &plugins.policy {
        Some(p) => match crate::plugin::Policy::load(p) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_INVALID;
            }
        },
        None => crate::plugin::Policy::builtin(),
    };
    let mut optional: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for st in &plan.stages {
        let name = crate::component::canonical_name(&st.component_name);
        if let Some(grant) = policy.plugins.get(&name) {
            for s in &grant.secrets {
                let places = optional.entry(s.clone()).or_default();
                let at = format!("policy: plugin {name} (stage {})", st.id);
                if !places.contains(&at) {
                    places.push(at);
                }
            }
        }
    }
    let mut rows: Vec<Value> = Vec::new();
    for (name, places, required) in needs.iter().map(|(n, p)| (n, p, true)).chain(
        optional
            .iter()
            .filter(|(n, _)| !needs.contains_key(*n))
            .map(|(n, p)| (n, p, false)),
    ) {
        let from = if from_file.get(name).is_some() {
            "file"
        } else if loaded.get(name).is_some() {
            "environment"
        } else if required {
            "missing"
        } else {
            "unset"
        };
        let status = match from {
            "missing" => "missing",
            "unset" => "optional",
            _ => "set",
        };
        rows.push(
            serde_json::json!({"name": name, "status": status, "source": from,
                                      "required": required, "used_at": places}),
        );
    }
    let missing = rows.iter().filter(|r| r["status"] == "missing").count();
    if json {
        journal::print_json(&rows);
    } else {
        let width = rows
            .iter()
            .filter_map(|r| r["name"].as_str())
            .map(str::len)
            .max()
            .unwrap_or(6)
            .max(6);
        println!("{:<width$}  {:<19}  USED AT", "SECRET", "STATUS");
        for r in &rows {
            let status = match r["source"].as_str() {
                Some("file") => "set (secrets file)".to_string(),
                Some("environment") => "set (environment)".to_string(),
                Some("unset") => "not set (optional)".to_string(),
                _ => "MISSING".to_string(),
            };
            let places: Vec<&str> = r["used_at"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "{:<width$}  {:<19}  {}",
                r["name"].as_str().unwrap_or_default(),
                status,
                places.join(", ")
            );
        }
        eprintln!(
            "{}: {} secret(s) needed, {} missing",
            pipeline.display(),
            rows.len(),
            missing
        );
    }
    if missing > 0 { EXIT_FAILED } else { 0 }
}

/// Reads an input JSON file, or stdin for `-`.
fn read_input_file(file: &str) -> Result<Value, String> {
    let (text, origin) = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        (s, "stdin".to_string())
    } else {
        (
            std::fs::read_to_string(file).map_err(|e| format!("input {file}: {e}"))?,
            format!("input {file}"),
        )
    };
    serde_json::from_str(&text)
        .map_err(|e| format!("{origin}:{}:{}: invalid JSON: {e}", e.line(), e.column()))
}

fn read_input(args: &RunArgs) -> Result<Value, String> {
    match (&args.input, &args.input_json) {
        (_, Some(inline)) => serde_json::from_str(inline).map_err(|e| {
            format!(
                "--input-json:{}:{}: invalid JSON: {e}",
                e.line(),
                e.column()
            )
        }),
        (Some(file), None) => read_input_file(file),
        (None, None) => Ok(Value::Object(Default::default())),
    }
}

/// An engine with the secrets from `file` (and FMHOST_SECRET_*), and FMHOST_NOW.
fn engine(secrets: Option<&Path>) -> Result<Engine, u8> {
    let secrets = Secrets::load(secrets).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_INVALID
    })?;
    let mut engine = Engine::new(secrets);
    engine.fixed_now = std::env::var("FMHOST_NOW").ok().map(Arc::from);
    Ok(engine)
}

/// Fails and dead-letters runs whose `fmhost run` process died; best effort, never fatal.
async fn sweep(journal: &crate::journal::Journal) {
    if let Err(e) = journal.sweep_abandoned(crate::journal::OWNER_CLI).await {
        tracing::warn!(target: "fmhost::journal", "could not check for interrupted runs: {e}");
    }
}

/// Ctrl-C cancels the run: running stages stop, the rest are skipped, exit 130.
fn cancel_on_ctrl_c(opts: &RunOptions) {
    let cancel = opts.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!(target: "fmhost::progress", "interrupted: cancelling the run");
            cancel.cancel();
        }
    });
}

/// Prints a finished run's output (stdout) and writes its report; the exit code.
fn report_outcome(
    report: crate::engine::RunReport,
    report_file: Option<&Path>,
    metrics: Option<&Engine>,
) -> u8 {
    if let Some(engine) = metrics {
        eprint!("\n{}", engine.outbound.metrics.table());
    }
    if let Some(path) = report_file {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|bytes| std::fs::write(path, bytes).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("error: report {}: {e}", path.display());
        }
    }
    match report.status {
        RunStatus::Succeeded => {
            let output = report.output.unwrap_or(Value::Null);
            println!(
                "{}",
                serde_json::to_string_pretty(&output).unwrap_or_default()
            );
            0
        }
        RunStatus::Cancelled => EXIT_INTERRUPTED,
        _ => EXIT_FAILED,
    }
}

async fn run(args: RunArgs, state: &Path) -> u8 {
    let (registry, plan) = match registry_and_plan(&args.plugins, &args.pipeline).await {
        Ok((r, p)) => (r, Arc::new(p)),
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
    let engine = match engine(args.secrets.as_deref()) {
        Ok(e) => e,
        Err(code) => return code,
    };
    // A long run picks up a rotated secrets file from its next stage.
    let _secrets_watch = args.secrets.as_deref().and_then(|path| {
        let live = engine.clone();
        crate::secrets::watch_file(path, move |s| live.set_secrets(s)).ok()
    });
    // Open the journal before running anything: a run that cannot be journaled does not start.
    let watcher = if args.no_journal {
        None
    } else {
        match crate::journal::Journal::open(state) {
            Ok(journal) => {
                sweep(&journal).await;
                let start = crate::journal::RunStart::new(
                    crate::engine::new_run_id(),
                    &plan.name,
                    crate::journal::Rerun::new(
                        Some(&args.pipeline),
                        &args.plugins.plugins,
                        args.secrets.as_deref(),
                    ),
                    "cli",
                    crate::journal::OWNER_CLI,
                    engine.secrets().store(&input),
                );
                // On record before the first stage can reach a vendor: a run killed
                // after that is found (and dead-lettered) by the next command.
                journal.record(crate::journal::Record::RunStarted(start.clone()));
                if let Err(e) = journal.commit(false).await {
                    eprintln!("error: {e}");
                    return EXIT_FAILED;
                }
                Some(crate::journal::RunJournal::following(
                    journal, start, &engine,
                ))
            }
            Err(e) => {
                eprintln!("error: {e}");
                eprintln!("(--no-journal runs without one)");
                return EXIT_FAILED;
            }
        }
    };
    let opts = RunOptions {
        timeout: args.timeout,
        ..RunOptions::default()
    };
    cancel_on_ctrl_c(&opts);
    let (report, committed) =
        match crate::journal::run_journaled(&engine, plan, input, opts, watcher).await {
            Ok(done) => done,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_INVALID;
            }
        };
    let code = report_outcome(
        report,
        args.report.as_deref(),
        args.metrics.then_some(&engine),
    );
    // The process ends here: tearing the plugins' compiled code and instance pool
    // down (unmapping it piece by piece) would only delay the exit by milliseconds.
    std::mem::forget(registry);
    match committed {
        // The run happened (its output is printed) but it cannot be found or replayed.
        Err(e) if code == 0 => {
            eprintln!("error: the run finished but is not fully journaled: {e}");
            EXIT_FAILED
        }
        Err(e) => {
            eprintln!("error: the run is not fully journaled: {e}");
            code
        }
        Ok(()) => code,
    }
}
