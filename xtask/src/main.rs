//! `cargo xtask <task>`: repository chores, each echoing the commands it runs.
//!
//! - `demo [--connectors]`: start the vendor sandbox and run the customer-360 pipeline.
//! - `test`: build the plugins, then run every test in the workspace.
//! - `plugins`: build every plugin under `plugins/` into `target/plugins/NAME.wasm`,
//!   and the test fixtures under `tests/plugins/` into `target/test-plugins/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root();
    match args.first().map(String::as_str) {
        Some("test") => test(&root, &args[1..]),
        Some("plugins") => plugins(&root),
        Some("demo") => demo(&root, &args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <demo [--connectors] | test [cargo test args] | plugins>");
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", shown(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", shown(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", shown(cmd));
    }
    Ok(())
}

fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    plugins(root)?;
    run(cargo().current_dir(root).args(["test", "--workspace"]).args(extra))
}

/// Builds the nested wasm32-wasip2 workspaces: the plugins and the test fixtures.
fn plugins(root: &Path) -> Result<()> {
    ensure_wasm_target()?;
    build_wasm_workspace(&root.join("plugins"), &root.join("target/plugins"))?;
    build_wasm_workspace(&root.join("tests/plugins"), &root.join("target/test-plugins"))
}

/// Builds one wasm workspace and copies each `cdylib` member to `out/NAME.wasm`.
fn build_wasm_workspace(dir: &Path, out: &Path) -> Result<()> {
    run(cargo().current_dir(dir).args(["build", "--release", "--target", "wasm32-wasip2"]))?;
    std::fs::create_dir_all(out)?;
    // Shared with the host workspace, so plugins are built once per checkout.
    let built = dir.join("target/wasm32-wasip2/release");
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let manifest = entry?.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else { continue };
        if !text.contains("cdylib") {
            continue;
        }
        let name = manifest.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        names.push(name);
    }
    names.sort();
    for name in names {
        let artifact = built.join(format!("{}.wasm", name.replace('-', "_")));
        let dest = out.join(format!("{name}.wasm"));
        std::fs::copy(&artifact, &dest).with_context(|| format!("copy {}", artifact.display()))?;
        eprintln!("built {}", dest.display());
    }
    Ok(())
}

/// Builds what the demo needs, starts the sandbox, runs customer-360 and shows the result.
fn demo(root: &Path, args: &[String]) -> Result<()> {
    let pipeline = match args.first().map(String::as_str) {
        None => "customer-360",
        Some("--connectors") => "customer-360-connectors",
        Some(other) => bail!("unknown demo option {other} (expected --connectors)"),
    };
    plugins(root)?;
    run(cargo().current_dir(root).args(["build", "--quiet", "-p", "fmhost", "-p", "fmhost-sandbox"]))?;
    let bin = root.join("target/debug");

    let mut sandbox = Command::new(bin.join("fmhost-sandbox"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start fmhost-sandbox")?;
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(sandbox.stdout.take().expect("piped")), &mut first)?;
    let url = first.trim().strip_prefix("listening on ").context("sandbox did not say where it listens")?.to_string();
    let result = run_demo(root, &bin, pipeline, &url);
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    result
}

fn run_demo(root: &Path, bin: &Path, pipeline: &str, url: &str) -> Result<()> {
    let dir = root.join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let tokens = [
        ("CONFIG_TOKEN", "sandbox-config-token"),
        ("SALESFORCE_TOKEN", "sandbox-salesforce-token"),
        ("STRIPE_SECRET_KEY", "sk_test_sandbox_51H8"),
        ("INTERCOM_TOKEN", "sandbox-intercom-token"),
        ("INTERNAL_TOKEN", "sandbox-internal-token"),
        ("OPENAI_API_KEY", "sk-sandbox-openai"),
    ];
    let mut secrets: serde_json::Map<String, serde_json::Value> = tokens.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
    for key in ["SALESFORCE_URL", "STRIPE_URL", "INTERCOM_URL"] {
        secrets.insert(key.into(), url.into());
    }
    secrets.insert("OPENAI_BASE_URL".into(), format!("{url}/v1").into());
    std::fs::write(dir.join("secrets.json"), serde_json::to_vec_pretty(&secrets)?)?;
    let input = serde_json::json!({
        "customer_id": "cust_abc123def456gh",
        "include_history": true,
        "enrichment_level": "full",
        "config_api": url,
        "internal_api": url,
    });
    std::fs::write(dir.join("input.json"), serde_json::to_vec_pretty(&input)?)?;
    let report = dir.join("report.json");
    eprintln!("sandbox of Salesforce, Stripe, Intercom, internal, config and LLM APIs at {url}");
    eprintln!("clock pinned to the seed's 2024-01-15T10:30:00Z (FMHOST_NOW) so the output matches its Expected Output\n");
    let mut cmd = Command::new(bin.join("fmhost"));
    cmd.current_dir(root)
        .env("FMHOST_NOW", "2024-01-15T10:30:00Z")
        .args(["run", &format!("pipelines/{pipeline}.pipeline.json")])
        .arg("--input")
        .arg(dir.join("input.json"))
        .arg("--secrets")
        .arg(dir.join("secrets.json"))
        .arg("--report")
        .arg(&report);
    run(&mut cmd)?;
    timeline(&serde_json::from_slice(&std::fs::read(&report)?)?);
    Ok(())
}

/// A per-stage Gantt chart of the run, from its report.
fn timeline(report: &serde_json::Value) {
    let stages = report["stages"].as_array().cloned().unwrap_or_default();
    let end = stages.iter().filter_map(|s| Some(s["started_ms"].as_u64()? + s["duration_ms"].as_u64()?)).max().unwrap_or(1).max(1);
    let width = 48.0;
    eprintln!("\ntimeline ({} ms, run {}):", report["duration_ms"], report["run_id"].as_str().unwrap_or(""));
    let mut sorted = stages.clone();
    sorted.sort_by_key(|s| s["started_ms"].as_u64().unwrap_or(u64::MAX));
    for s in &sorted {
        let (Some(start), Some(dur)) = (s["started_ms"].as_u64(), s["duration_ms"].as_u64()) else { continue };
        let from = (start as f64 / end as f64 * width).round() as usize;
        let len = ((dur as f64 / end as f64 * width).round() as usize).max(1);
        eprintln!(
            "  {:<22} {}{}{} {:>5} ms  {}",
            s["id"].as_str().unwrap_or(""),
            " ".repeat(from),
            "#".repeat(len),
            " ".repeat((width as usize + 1).saturating_sub(from + len)),
            dur,
            s["component"].as_str().unwrap_or("")
        );
    }
    let fetches: Vec<u64> = stages
        .iter()
        .filter(|s| ["fetch-salesforce", "fetch-stripe", "fetch-intercom", "fetch-internal"].contains(&s["id"].as_str().unwrap_or("")))
        .filter_map(|s| s["duration_ms"].as_u64())
        .collect();
    if !fetches.is_empty() {
        eprintln!(
            "\nthe four vendor fetches took {} ms side by side; one after another they would take {} ms",
            fetches.iter().max().unwrap_or(&0),
            fetches.iter().sum::<u64>()
        );
    }
}

fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    match installed {
        Ok(out) if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "wasm32-wasip2") => Ok(()),
        Ok(_) => run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"])),
        Err(_) => {
            eprintln!("rustup not found; assuming the wasm32-wasip2 target is installed");
            Ok(())
        }
    }
}
