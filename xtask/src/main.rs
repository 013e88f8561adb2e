//! `cargo xtask <task>`: repository chores, each echoing the commands it runs.
//!
//! - `demo [--connectors]`: start the vendor sandbox and run the customer-360 pipeline.
//! - `test`: build the plugins, then run every test in the workspace.
//! - `bench [--quick]`: run the benchmarks and write benchmarks/RESULTS.md.
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
        Some("fuzz") => fuzz(&root, &args[1..]),
        Some("bench") => bench(
            &root,
            args.iter().any(|a| a == "--quick"),
            args.iter().any(|a| a == "--table-only"),
        ),
        _ => {
            eprintln!(
                "usage: cargo xtask <demo [--connectors] | test [cargo test args] | plugins | bench [--quick] [--table-only] | fuzz [--minutes N]>"
            );
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", shown(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", shown(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", shown(cmd));
    }
    Ok(())
}

fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The suite, on the SQLite journal; then, with `FMHOST_TEST_POSTGRES` (a PostgreSQL
/// server's URL, which `.ci/run` starts), the tests that journal runs again with their
/// journal in PostgreSQL (each test in a database of its own), and the cluster tests,
/// which need it.
fn test(root: &Path, extra: &[String]) -> Result<()> {
    plugins(root)?;
    run(cargo()
        .current_dir(root)
        .env_remove("FMHOST_TEST_POSTGRES")
        .args(["test", "--workspace"])
        .args(extra))?;
    let postgres = std::env::var("FMHOST_TEST_POSTGRES").unwrap_or_default();
    if postgres.is_empty() || !extra.is_empty() {
        return Ok(());
    }
    eprintln!("the journal tests again, with the journal in PostgreSQL ({postgres})");
    run(cargo().current_dir(root).args([
        "test",
        "-p",
        "fmhost",
        "--test",
        "all",
        "--",
        "journal::",
        "serve::",
        "control::",
        "triggers::",
        "change::",
        "secrecy::",
        "queue::",
        "observe::",
        "cluster::",
    ]))
}

/// Runs the generated-input tests (parser, validator, renderer, and the secrets property
/// over every replay path of the real binary and server) for `--minutes N`
/// (default 5), round after round with fresh seeds, printing a line per round.
fn fuzz(root: &Path, args: &[String]) -> Result<()> {
    let minutes: u64 = match args {
        [] => 5,
        [flag, n] if flag == "--minutes" => n
            .parse()
            .map_err(|_| anyhow::anyhow!("--minutes takes a whole number"))?,
        _ => anyhow::bail!("usage: cargo xtask fuzz [--minutes N]"),
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(minutes * 60);
    let cases = 2000;
    let mut round = 0u64;
    while std::time::Instant::now() < until {
        round += 1;
        let left = until
            .saturating_duration_since(std::time::Instant::now())
            .as_secs();
        eprintln!("fuzz round {round}: {cases} cases per property ({left} s left)");
        let seed = (round * 7919 + std::process::id() as u64).to_string();
        run(cargo()
            .current_dir(root)
            .env("PROPTEST_CASES", cases.to_string())
            .env("PROPTEST_RNG_SEED", &seed)
            .args([
                "test",
                "--quiet",
                "-p",
                "fmhost",
                "--lib",
                "template::proptests",
            ]))?;
        // Secrets never leak from data: the real binary and server, every replay path.
        run(cargo()
            .current_dir(root)
            .env("PROPTEST_CASES", cases.to_string())
            .env("PROPTEST_RNG_SEED", &seed)
            .args([
                "test",
                "--quiet",
                "-p",
                "fmhost",
                "--test",
                "all",
                "secrecy::data_that_looks_like_a_secret_reference",
            ]))?;
    }
    eprintln!(
        "fuzz: {round} round(s), {} cases per property, no failure",
        round * cases
    );
    Ok(())
}

/// Builds the nested wasm32-wasip2 workspaces: the plugins and the test fixtures.
fn plugins(root: &Path) -> Result<()> {
    ensure_wasm_target()?;
    build_wasm_workspace(&root.join("plugins"), &root.join("target/plugins"))?;
    build_wasm_workspace(
        &root.join("tests/plugins"),
        &root.join("target/test-plugins"),
    )
}

/// Builds one wasm workspace and copies each `cdylib` member to `out/NAME.wasm`.
fn build_wasm_workspace(dir: &Path, out: &Path) -> Result<()> {
    run(cargo()
        .current_dir(dir)
        .args(["build", "--release", "--target", "wasm32-wasip2"]))?;
    std::fs::create_dir_all(out)?;
    // Shared with the host workspace, so plugins are built once per checkout.
    let built = dir.join("target/wasm32-wasip2/release");
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let manifest = entry?.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        if !text.contains("cdylib") {
            continue;
        }
        let name = manifest
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
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
    run(cargo().current_dir(root).args([
        "build",
        "--quiet",
        "-p",
        "fmhost",
        "-p",
        "fmhost-sandbox",
    ]))?;
    let bin = root.join("target/debug");

    let dir = root.join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let mut sandbox = Command::new(bin.join("fmhost-sandbox"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--write-secrets")
        .arg(dir.join("secrets.json"))
        .arg("--write-input")
        .arg(dir.join("input.json"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start fmhost-sandbox")?;
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sandbox.stdout.take().expect("piped")),
        &mut first,
    )?;
    let url = first
        .trim()
        .strip_prefix("listening on ")
        .context("sandbox did not say where it listens")?
        .to_string();
    let result = run_demo(root, &bin, pipeline, &url, &dir);
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    result
}

fn run_demo(root: &Path, bin: &Path, pipeline: &str, url: &str, dir: &Path) -> Result<()> {
    let report = dir.join("report.json");
    eprintln!("sandbox of Salesforce, Stripe, Intercom, internal, config and LLM APIs at {url}");
    eprintln!(
        "clock pinned to the seed's 2024-01-15T10:30:00Z (FMHOST_NOW) so the output matches its Expected Output\n"
    );
    let mut cmd = Command::new(bin.join("fmhost"));
    cmd.current_dir(root)
        .env("FMHOST_NOW", "2024-01-15T10:30:00Z")
        .args(["run", &format!("pipelines/{pipeline}.pipeline.json")])
        .arg("--input")
        .arg(dir.join("input.json"))
        .arg("--secrets")
        .arg(dir.join("secrets.json"))
        .arg("--report")
        .arg(&report)
        .arg("--state")
        .arg(dir.join("state"));
    run(&mut cmd)?;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    timeline(&report);
    eprintln!(
        "\njournaled: target/debug/fmhost runs show {} --state {}",
        report["run_id"].as_str().unwrap_or_default(),
        dir.join("state").display()
    );
    Ok(())
}

/// A per-stage Gantt chart of the run, from its report.
fn timeline(report: &serde_json::Value) {
    let stages = report["stages"].as_array().cloned().unwrap_or_default();
    let end = stages
        .iter()
        .filter_map(|s| Some(s["started_ms"].as_u64()? + s["duration_ms"].as_u64()?))
        .max()
        .unwrap_or(1)
        .max(1);
    let width = 48.0;
    eprintln!(
        "\ntimeline ({} ms, run {}):",
        report["duration_ms"],
        report["run_id"].as_str().unwrap_or("")
    );
    let mut sorted = stages.clone();
    sorted.sort_by_key(|s| s["started_ms"].as_u64().unwrap_or(u64::MAX));
    for s in &sorted {
        let (Some(start), Some(dur)) = (s["started_ms"].as_u64(), s["duration_ms"].as_u64()) else {
            continue;
        };
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
        .filter(|s| {
            [
                "fetch-salesforce",
                "fetch-stripe",
                "fetch-intercom",
                "fetch-internal",
            ]
            .contains(&s["id"].as_str().unwrap_or(""))
        })
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

/// Runs criterion and the end-to-end harness in one go and writes the results table.
fn bench(root: &Path, quick: bool, table_only: bool) -> Result<()> {
    let saved = root.join("target/bench/e2e.json");
    if table_only {
        let e2e: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&saved).context("no saved results; run `cargo xtask bench` first")?,
        )?;
        let table = results_table(root, &e2e, quick)?;
        std::fs::write(root.join("benchmarks/RESULTS.md"), &table)?;
        println!("{table}");
        return Ok(());
    }
    plugins(root)?;
    // One build with the bench profile and the bench targets, so `cargo bench` below finds
    // everything fresh instead of rebuilding with other features over the same directory.
    run(cargo().current_dir(root).args([
        "build",
        "--profile",
        "bench",
        "-p",
        "fmhost",
        "-p",
        "fmhost-sandbox",
        "-p",
        "fmhost-bench",
        "--bins",
        "--benches",
    ]))?;
    let _ = std::fs::remove_dir_all(root.join("target/criterion"));
    let mut criterion = cargo();
    criterion
        .current_dir(root)
        .args(["bench", "-p", "fmhost-bench", "--bench", "micro", "--"]);
    if quick {
        criterion.args([
            "--warm-up-time",
            "0.1",
            "--measurement-time",
            "0.2",
            "--sample-size",
            "10",
        ]);
    }
    run(&mut criterion)?;
    let mut harness = Command::new(root.join("target/release/fmhost-bench"));
    harness.current_dir(root);
    if quick {
        harness.arg("--quick");
    }
    eprintln!("$ {}", shown(&harness));
    let out = harness.output()?;
    if !out.status.success() {
        bail!(
            "the end-to-end harness failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let e2e: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    std::fs::create_dir_all(root.join("target/bench"))?;
    std::fs::write(&saved, &out.stdout)?;
    let table = results_table(root, &e2e, quick)?;
    std::fs::create_dir_all(root.join("benchmarks"))?;
    std::fs::write(root.join("benchmarks/RESULTS.md"), &table)?;
    println!("{table}");
    Ok(())
}

/// Criterion's median for a benchmark id, in microseconds.
fn median_us(root: &Path, id: &str) -> Option<f64> {
    // Criterion 0.8 keeps a benchmark id's `/` as `_` in its directory name.
    let path = root
        .join("target/criterion")
        .join(id.replace('/', "_"))
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64().map(|ns| ns / 1000.0)
}

fn results_table(root: &Path, e2e: &serde_json::Value, quick: bool) -> Result<String> {
    let cmd_out = |c: &mut Command| {
        c.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let nproc = cmd_out(Command::new("nproc").arg("--all"));
    let rustc = cmd_out(Command::new("rustc").arg("--version"));
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let wasmtime = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"wasmtime\"\n"))
        .and_then(|p| {
            p.lines()
                .find(|l| l.starts_with("version"))
                .map(|l| l.replace("version = ", "").replace('"', ""))
        })
        .unwrap_or_default();
    let date = cmd_out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let m = |id: &str| median_us(root, id);
    let f = |v: Option<f64>, digits: usize| {
        v.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "n/a".into())
    };
    let num = |v: &serde_json::Value| v.as_f64();
    let mut rows: Vec<String> = Vec::new();
    let mut row = |what: &str, figure: String, target: &str, verdict: &str| {
        rows.push(format!("| {what} | {figure} | {target} | {verdict} |"))
    };
    let check = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "n/a",
    };

    let inst = m("plugin/instantiate+invoke");
    row(
        "fresh instance + invoke as seen by the stage (json-transform, tiny input)",
        format!("{} µs", f(inst, 1)),
        "≤ 10 µs",
        check(inst.map(|v| v <= 10.0)),
    );
    let warm = m("plugin/warm-invoke");
    row(
        "warm call (same instance, chaos echo, tiny input)",
        format!("{} µs", f(warm, 1)),
        "-",
        "",
    );
    let (l0, l1k) = (m("plugin/host-import-x0"), m("plugin/host-import-x1000"));
    let per_import = l0.zip(l1k).map(|(a, b)| (b - a) / 1000.0 * 1000.0);
    row(
        "host-import call (log), per call",
        format!("{} ns", f(per_import, 0)),
        "-",
        "",
    );
    let echo0 = m("crossing-echo/0");
    for (label, kib) in [("1KiB", 1.0), ("64KiB", 64.0), ("1MiB", 1024.0)] {
        let v = m(&format!("crossing-echo/{label}"));
        let per = v.zip(echo0).map(|(v, z)| (v - z) / kib);
        row(
            &format!(
                "bytes into a fresh instance and back (string echo), {label}: beyond the 0-byte call, per KiB"
            ),
            format!(
                "{} µs/KiB ({} µs, 0 bytes {} µs)",
                f(per, 3),
                f(v, 1),
                f(echo0, 1)
            ),
            "≤ 0.5 µs/KiB",
            check(per.map(|p| p <= 0.5)),
        );
    }
    let tiny = m("identity/plugin/tiny");
    for (label, gated) in [("1KiB", false), ("64KiB", true), ("1MiB", true)] {
        let (p, n) = (
            m(&format!("identity/plugin/{label}")),
            m(&format!("identity/native/{label}")),
        );
        let ratio = p.zip(tiny).zip(n).map(|((p, t), n)| (p - t) / n);
        row(
            &format!(
                "JSON transform (identity) of {label} in a fresh instance, beyond the fixed cost / the same Rust code native"
            ),
            format!(
                "{}x ({} µs - {} µs fixed vs {} µs)",
                f(ratio, 2),
                f(p, 1),
                f(tiny, 1),
                f(n, 1)
            ),
            if gated { "≤ 1.5x" } else { "-" },
            if gated {
                check(ratio.map(|r| r <= 1.5))
            } else {
                ""
            },
        );
    }
    row(
        "template rendering (merge-responses config)",
        format!("{} µs", f(m("template/render-merge-config"), 2)),
        "-",
        "",
    );
    let (jp, jn) = (m("jmespath/plugin"), m("jmespath/native"));
    row(
        "JMESPath transform-stripe: plugin (fresh instance) vs native",
        format!(
            "{} µs vs {} µs ({}x)",
            f(jp, 1),
            f(jn, 1),
            f(jp.zip(jn).map(|(a, b)| a / b), 1)
        ),
        "≤ 3x",
        check(jp.zip(jn).map(|(a, b)| a / b <= 3.0)),
    );
    row(
        "schema validation (final-validation on the customer-360 output)",
        format!("{} µs", f(m("schema/validate-customer-360"), 2)),
        "-",
        "",
    );
    for shape in ["deep", "wide"] {
        for n in [2usize, 14, 64, 1000] {
            if let Some(v) = m(&format!("scheduler/logger/{shape}/{n}")) {
                row(
                    &format!("scheduling overhead per stage, {n} logger stages {shape}"),
                    format!("{:.2} µs", v / n as f64),
                    "-",
                    "",
                );
            }
        }
    }
    let (d2, d64) = (
        m("scheduler/logger/deep/2").map(|v| v / 2.0),
        m("scheduler/logger/deep/64").map(|v| v / 64.0),
    );
    let drift = d2.zip(d64).map(|(a, b)| (b - a) / a * 100.0);
    row(
        "per-stage overhead drift, 2 → 64 stages deep",
        format!("{}%", f(drift, 1)),
        "within ±10%",
        check(drift.map(|d| d.abs() <= 10.0)),
    );
    let wasm_stage = m("scheduler/json-transform/deep/64").map(|v| v / 64.0);
    row(
        "host overhead per stage with a fresh instance (64 json-transform stages deep)",
        format!("{} µs", f(wasm_stage, 1)),
        "≤ 25 µs",
        check(wasm_stage.map(|v| v <= 25.0)),
    );

    let z = &e2e["c360_inproc_zero"];
    let b = &e2e["baseline_tokio_zero"];
    let rps = num(&z["runs_per_s"]);
    let brps = num(&b["runs_per_s"]);
    row(
        "customer-360 in-process, zero upstream latency, 16 concurrent",
        format!(
            "{} runs/s (p50 {} ms, p99 {} ms)",
            f(rps, 0),
            f(num(&z["p50_ms"]), 2),
            f(num(&z["p99_ms"]), 2)
        ),
        "≥ 2,000 runs/s",
        check(rps.map(|r| r >= 2000.0)),
    );
    row(
        "hand-written tokio + reqwest, same calls, 16 concurrent",
        format!(
            "{} runs/s (p50 {} ms, p99 {} ms)",
            f(brps, 0),
            f(num(&b["p50_ms"]), 2),
            f(num(&b["p99_ms"]), 2)
        ),
        "-",
        "",
    );
    let ratio = rps.zip(brps).map(|(a, b)| a / b * 100.0);
    row(
        "fmhost / hand-written tokio (zero latency)",
        format!("{}%", f(ratio, 0)),
        "≥ 50%",
        check(ratio.map(|r| r >= 50.0)),
    );
    let j = &e2e["journal_seq"];
    let per_stage = num(&j["per_stage_us"]);
    row(
        "journal cost per stage: customer-360 zero latency, sequential, journaled vs not (p50, incl. the run's durable commit)",
        format!(
            "{} µs ({} ms vs {} ms per run of {} stages)",
            f(per_stage, 1),
            f(num(&j["with"]["p50_ms"]), 2),
            f(num(&j["without"]["p50_ms"]), 2),
            j["stages"]
        ),
        "≤ 1 ms",
        check(per_stage.map(|v| v <= 1000.0)),
    );
    let jl = &e2e["journal_load"];
    let jrps = num(&jl["runs_per_s"]);
    row(
        "customer-360 in-process, zero latency, 16 concurrent, journaled",
        format!(
            "{} runs/s (p50 {} ms, p99 {} ms)",
            f(jrps, 0),
            f(num(&jl["p50_ms"]), 2),
            f(num(&jl["p99_ms"]), 2)
        ),
        "-",
        "",
    );
    let jratio = jrps.zip(brps).map(|(a, b)| a / b * 100.0);
    row(
        "fmhost, journal on / hand-written tokio (zero latency, 16 concurrent)",
        format!("{}%", f(jratio, 0)),
        "≥ 50%",
        check(jratio.map(|r| r >= 50.0)),
    );
    let jown = jrps.zip(rps).map(|(a, b)| a / b * 100.0);
    row(
        "journaled / unjournaled throughput (16 concurrent)",
        format!("{}%", f(jown, 0)),
        "≥ 90%",
        check(jown.map(|r| r >= 90.0)),
    );
    let cp = num(&e2e["critical_path_ms"]).unwrap_or(500.0);
    let inproc = num(&e2e["c360_inproc_seed"]["p50_ms"]);
    let tokio_seed = num(&e2e["baseline_tokio_seed"]["p50_ms"]);
    let seq = num(&e2e["baseline_sequential_seed"]["p50_ms"]);
    let cli = num(&e2e["c360_cli_seed"]["p50_ms"]);
    row(
        "customer-360 at the seed's latencies, in-process (p50 wall)",
        format!("{} ms (critical path {cp} ms)", f(inproc, 1)),
        "-",
        "",
    );
    row(
        "hand-written tokio at the seed's latencies (p50 wall)",
        format!("{} ms", f(tokio_seed, 1)),
        "-",
        "",
    );
    row(
        "hand-written sequential script at the seed's latencies (p50 wall)",
        format!(
            "{} ms ({}x fmhost in-process)",
            f(seq, 1),
            f(seq.zip(inproc).map(|(s, i)| s / i), 2)
        ),
        "-",
        "",
    );
    row(
        "`fmhost run` CLI, warm compile cache, seed latencies (p50 wall)",
        format!(
            "{} ms (critical path + {} ms)",
            f(cli, 1),
            f(cli.map(|c| c - cp), 1)
        ),
        "≤ critical path + 10 ms",
        check(cli.map(|c| c - cp <= 10.0)),
    );
    for (key, label) in [
        ("memory_http_request", "http-request"),
        ("memory_connector", "salesforce connector plugin"),
    ] {
        let mem = &e2e[key];
        let per = num(&mem["kib_per_run"]);
        row(
            &format!("RSS per in-flight run, 1,000 runs waiting on a slow upstream ({label})"),
            format!(
                "{} KiB ({} of {} succeeded)",
                f(per, 0),
                mem["succeeded"],
                mem["runs"]
            ),
            "≤ 512 KiB",
            check(per.map(|p| p <= 512.0)),
        );
    }
    let sr = &e2e["serve_rss"];
    let peak = num(&sr["peak_kib"]);
    row(
        "peak RSS of `fmhost serve` (over HTTP) holding 1,000 in-flight connector runs",
        format!(
            "{} MiB (idle {} MiB, half-way {} MiB; {} of {} succeeded)",
            f(peak.map(|k| k / 1024.0), 0),
            f(num(&sr["idle_kib"]).map(|k| k / 1024.0), 0),
            f(num(&sr["during_kib"]).map(|k| k / 1024.0), 0),
            sr["succeeded"],
            sr["runs"]
        ),
        "≤ 300 MiB",
        check(peak.map(|k| k <= 300.0 * 1024.0)),
    );
    let fs = &e2e["fresh_state"];
    row(
        "fresh-instance guarantee: calls that saw no state from an earlier call (chaos `remember`)",
        format!("{} of {}", fs["saw_fresh_state"], fs["calls"]),
        "all",
        check(
            num(&fs["saw_fresh_state"])
                .zip(num(&fs["calls"]))
                .map(|(a, b)| a == b),
        ),
    );
    let fe = &e2e["foreach"];
    let body = num(&fe["body_us"]);
    let seq = &fe["runs"]["sequential"];
    let over = num(&seq["overhead_us"]);
    row(
        &format!(
            "foreach over {} items, json-transform body, sequential: loop overhead per iteration beyond the body",
            fe["items"]
        ),
        format!(
            "{} µs (per item {} µs, body alone {} µs)",
            f(over, 1),
            f(num(&seq["per_item_us"]), 1),
            f(body, 1)
        ),
        "≤ 20 µs",
        check(over.map(|o| o <= 20.0)),
    );
    let par = num(&fe["runs"]["parallel16"]["per_item_us"]);
    row(
        &format!(
            "foreach over {} items, json-transform body, max_parallel 16: wall per item",
            fe["items"]
        ),
        format!(
            "{} µs ({}x faster than the body alone: iterations overlap on the cores)",
            f(par, 1),
            f(body.zip(par).map(|(b, p)| b / p), 2)
        ),
        "-",
        "",
    );
    if let Some(rss) = fe["rss"].as_object() {
        let figures: Vec<String> = rss
            .iter()
            .map(|(n, v)| {
                format!(
                    "{n} items: {} KiB ({} KiB of output)",
                    f(num(&v["peak_kib"]), 0),
                    f(num(&v["output_bytes"]).map(|b| b / 1024.0), 0)
                )
            })
            .collect();
        row(
            "peak RSS of `fmhost run`, foreach with json-transform body, journal off",
            figures.join("; "),
            "grows only with the collected results",
            "",
        );
    }
    let w = &e2e["serve_run"];
    row(
        "`fmhost serve`: POST one-stage run → 200, 32 connections (fmhost-load)",
        format!(
            "{} req/s (p50 {} ms, p99 {} ms)",
            f(num(&w["requests_per_s"]), 0),
            f(num(&w["p50_ms"]), 2),
            f(num(&w["p99_ms"]), 2)
        ),
        "-",
        "",
    );
    let h = &e2e["serve_webhook"];
    let rate = num(&h["requests_per_s"]);
    row(
        "`fmhost serve`: signed webhook → journal commit (fsync) → 202, 32 connections (fmhost-load)",
        format!(
            "{} req/s (p50 {} ms, p99 {} ms)",
            f(rate, 0),
            f(num(&h["p50_ms"]), 2),
            f(num(&h["p99_ms"]), 2)
        ),
        "≥ 15,000/s",
        check(rate.map(|r| r >= 15_000.0)),
    );
    let c = &e2e["cluster"];
    if c.is_object() {
        for connections in [32, 8] {
            let h = &c[format!("serve_webhook_postgres_{connections}")]["intake"];
            let (rate, p99) = (num(&h["requests_per_s"]), num(&h["p99_ms"]));
            row(
                &format!(
                    "`fmhost serve` on the PostgreSQL journal: signed webhook → commit → 202, {connections} connections"
                ),
                format!(
                    "{} req/s (p50 {} ms, p99 {} ms)",
                    f(rate, 0),
                    f(num(&h["p50_ms"]), 2),
                    f(p99, 2)
                ),
                "≥ 1,000/s with p99 ≤ 20 ms",
                check(rate.zip(p99).map(|(r, p)| r >= 1_000.0 && p <= 20.0)),
            );
        }
        let (one, three) = (&c["cluster_1"], &c["cluster_3"]);
        let (r1, r3) = (num(&one["runs_per_s"]), num(&three["runs_per_s"]));
        row(
            "`serve --cluster`, webhooks at one worker, runs on all: 1 worker against 3 (PostgreSQL, nats-server and the load on the same 2 cores)",
            format!(
                "1: {} runs/s (intake {} req/s, p99 {} ms); 3: {} runs/s (intake {} req/s, p99 {} ms); ratio {}",
                f(r1, 0),
                f(num(&one["intake"]["requests_per_s"]), 0),
                f(num(&one["intake"]["p99_ms"]), 1),
                f(r3, 0),
                f(num(&three["intake"]["requests_per_s"]), 0),
                f(num(&three["intake"]["p99_ms"]), 1),
                f(r1.zip(r3).map(|(a, b)| b / a), 2)
            ),
            "bounded by the cores",
            "",
        );
    } else {
        row(
            "PostgreSQL journal and `serve --cluster`",
            "not measured: set FMHOST_BENCH_POSTGRES and install nats-server".to_string(),
            "",
            "",
        );
    }

    let mut md = String::new();
    md.push_str("# Benchmark results\n\n");
    md.push_str(&format!("Produced by `cargo xtask bench{}` on {date}: {nproc} cores ({cpu}), {rustc}, wasmtime {wasmtime}, release build.\n", if quick { " --quick" } else { "" }));
    md.push_str("Micro figures are criterion medians; end-to-end figures are medians over the run, all measured side by side in one invocation.\n");
    md.push_str("The sandbox runs as a separate process on the same machine, so both fmhost and the baselines share the 2 cores with it.\n\n");
    md.push_str("| measurement | figure | target | verdict |\n|---|---|---|---|\n");
    md.push_str(&rows.join("\n"));
    // What dominates each miss, and the plan, is written by a person and kept across runs.
    if let Ok(analysis) = std::fs::read_to_string(root.join("benchmarks/ANALYSIS.md")) {
        md.push_str("\n\n");
        md.push_str(analysis.trim_end());
    }
    md.push_str("\n\nRaw end-to-end results:\n\n```json\n");
    md.push_str(&serde_json::to_string_pretty(e2e)?);
    md.push_str("\n```\n");
    Ok(md)
}

fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2") =>
        {
            Ok(())
        }
        Ok(_) => run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"])),
        Err(_) => {
            eprintln!("rustup not found; assuming the wasm32-wasip2 target is installed");
            Ok(())
        }
    }
}
