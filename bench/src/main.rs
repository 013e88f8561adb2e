//! End-to-end benchmarks, printed as one JSON object for `cargo xtask bench`:
//! customer-360 throughput and latency in-process and from the CLI against the sandbox
//! (run as a separate process), the hand-written baselines measured in the same run,
//! memory per in-flight run, and `fmhost serve` under a load generator.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmhost::engine::{Engine, RunOptions, RunStatus};
use fmhost::plugin::PluginRuntime;
use fmhost::secrets::Secrets;
use fmhost_bench::{self as fx, baseline};
use fmhost_sandbox::{input_for, secrets_for};
use serde_json::{Map, Value, json};

const CUSTOMER: &str = "cust_abc123def456gh";

struct Proc(Child, String);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(name: &str) -> std::path::PathBuf {
    fx::root().join("target/release").join(name)
}

/// Starts a process that prints `listening on URL` first.
/// The API token the benchmarked server is started with.
const BENCH_TOKEN: &str = "bench-admin-token-0123456789";

fn start(cmd: &mut Command) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    Proc(child, url)
}

/// `fmhost serve` on an ephemeral port over `dir`'s `pipelines/`, `plugins/`,
/// `secrets.json` and `state/`, with the bench's admin token.
fn serve(dir: &std::path::Path) -> Proc {
    start(
        Command::new(bin("fmhost"))
            .current_dir(dir)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--pipelines",
                "pipelines",
            ])
            .args([
                "--plugins",
                "plugins",
                "--secrets",
                "secrets.json",
                "--state",
                "state",
            ])
            .env("FMHOST_LOG", "warn")
            .env("FMHOST_API_TOKEN", BENCH_TOKEN),
    )
}

fn sandbox(scale: f64) -> Proc {
    start(Command::new(bin("fmhost-sandbox")).args(["--latency-scale", &scale.to_string()]))
}

/// An engine holding a sandbox's secrets.
fn engine_for(secrets: &Value) -> Engine {
    let pairs = secrets
        .as_object()
        .expect("secrets are an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()));
    Engine::new(Secrets::from_pairs(pairs))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn summary(mut ms: Vec<f64>, elapsed: Duration) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({"runs": ms.len(), "runs_per_s": ms.len() as f64 / elapsed.as_secs_f64(), "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99)})
}

/// Runs `f` from `concurrency` workers for `duration`; latencies in ms.
async fn load<F, Fut>(concurrency: usize, duration: Duration, f: F) -> Value
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut ms = Vec::new();
                while start.elapsed() < duration {
                    let t = Instant::now();
                    f().await;
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                ms
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    summary(all, start.elapsed())
}

/// Sequential repetitions; latencies in ms.
async fn repeat<F, Fut>(n: usize, f: F) -> Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let mut ms = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    summary(ms, start.elapsed())
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only zero,journal,...`: run only these sections (for profiling one of them).
    let only: Vec<String> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let want = |section: &str| only.is_empty() || only.iter().any(|o| o == section);
    let secs = if quick { 2 } else { 8 };
    let reps = if quick { 5 } else { 25 };
    // The slow upstream of the memory test: 4 s (2 s with --quick); sampled half-way.
    let (slow_scale, sample_after) = if quick { (10.0, 1200) } else { (20.0, 2500) };
    let mut out = Map::new();
    let runtime = PluginRuntime::new().unwrap();
    let registry = fx::registry(&runtime).await;
    let c360 = fx::pipeline("customer-360", &registry);
    let client = reqwest::Client::new();

    // Zero upstream latency: what the host costs.
    if want("zero") {
        let sb = sandbox(0.0);
        let engine = Arc::new(engine_for(&secrets_for(&sb.1)));
        let input = input_for(&sb.1);
        for _ in 0..20 {
            engine
                .run(c360.clone(), input.clone(), RunOptions::default())
                .await
                .unwrap();
        }
        let (e, p, i) = (engine.clone(), c360.clone(), input.clone());
        out.insert(
            "c360_inproc_zero".into(),
            load(16, Duration::from_secs(secs), move || {
                let (e, p, i) = (e.clone(), p.clone(), i.clone());
                async move {
                    let r = e.run(p, i, RunOptions::default()).await.unwrap();
                    assert_eq!(r.status, RunStatus::Succeeded, "{:?}", r.error);
                }
            })
            .await,
        );
        let (c, u) = (client.clone(), sb.1.clone());
        out.insert(
            "baseline_tokio_zero".into(),
            load(16, Duration::from_secs(secs), move || {
                let (c, u) = (c.clone(), u.clone());
                async move {
                    baseline::concurrent(&c, &u, CUSTOMER).await;
                }
            })
            .await,
        );
    }

    // The journal's cost: the same zero-latency run with and without it, interleaved.
    // With it, every stage update and attempt is queued to the writer thread and the run
    // waits for its durable commit (fsync) before it counts as done.
    if want("journal") {
        let sb = sandbox(0.0);
        let engine = Arc::new(engine_for(&secrets_for(&sb.1)));
        let input = input_for(&sb.1);
        let dir = fx::root().join("target/bench/journal");
        let _ = std::fs::remove_dir_all(&dir);
        let journal = fmhost::journal::Journal::open(&dir).unwrap();
        let journaled =
            |e: Arc<Engine>,
             j: fmhost::journal::Journal,
             p: Arc<fmhost::pipeline::Plan>,
             i: Value| async move { fx::run_once(&e, Some(&j), p, i).await };
        let n = if quick { 60 } else { 300 };
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            engine
                .run(c360.clone(), input.clone(), RunOptions::default())
                .await
                .unwrap();
            without.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            journaled(engine.clone(), journal.clone(), c360.clone(), input.clone()).await;
            with.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let stages = c360.stages.len() as f64;
        let (with, without) = (
            summary(with, Duration::ZERO),
            summary(without, Duration::ZERO),
        );
        let per_stage_us = (with["p50_ms"].as_f64().unwrap() - without["p50_ms"].as_f64().unwrap())
            * 1000.0
            / stages;
        out.insert("journal_seq".into(), json!({"stages": c360.stages.len(), "with": with, "without": without, "per_stage_us": per_stage_us}));
        let (e, j, p, i) = (engine.clone(), journal.clone(), c360.clone(), input.clone());
        let loaded = load(16, Duration::from_secs(secs), move || {
            journaled(e.clone(), j.clone(), p.clone(), i.clone())
        })
        .await;
        out.insert("journal_load".into(), loaded);
        let db = std::fs::metadata(dir.join("journal.db"))
            .map(|m| m.len())
            .unwrap_or(0)
            + std::fs::metadata(dir.join("journal.db-wal"))
                .map(|m| m.len())
                .unwrap_or(0);
        out.insert("journal_bytes".into(), json!(db));
    }

    // The seed's latencies: wall time against the critical path (200 ms fetches + 300 ms LLM).
    if want("seed") {
        let sb = sandbox(1.0);
        let secrets = secrets_for(&sb.1);
        let engine = engine_for(&secrets);
        let input = input_for(&sb.1);
        out.insert("critical_path_ms".into(), json!(500));
        out.insert(
            "c360_inproc_seed".into(),
            repeat(reps, || async {
                engine
                    .run(c360.clone(), input.clone(), RunOptions::default())
                    .await
                    .unwrap();
            })
            .await,
        );
        out.insert(
            "baseline_tokio_seed".into(),
            repeat(reps, || async {
                baseline::concurrent(&client, &sb.1, CUSTOMER).await;
            })
            .await,
        );
        out.insert(
            "baseline_sequential_seed".into(),
            repeat(reps.min(10), || async {
                baseline::sequential(&client, &sb.1, CUSTOMER).await;
            })
            .await,
        );
        let dir = fx::root().join("target/bench");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secrets.json"), secrets.to_string()).unwrap();
        std::fs::write(dir.join("input.json"), input.to_string()).unwrap();
        let cli = || {
            let status = Command::new(bin("fmhost"))
                .current_dir(fx::root())
                .args(["run", "pipelines/customer-360.pipeline.json"])
                .arg("--state")
                .arg(dir.join("cli-state"))
                .arg("--input")
                .arg(dir.join("input.json"))
                .arg("--secrets")
                .arg(dir.join("secrets.json"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
        };
        cli(); // warm the compile cache
        out.insert(
            "c360_cli_seed".into(),
            repeat(reps.min(10), || async { cli() }).await,
        );
    }

    // Memory per in-flight run: 1,000 runs waiting on a slow upstream.
    for (label, component) in [
        ("memory_http_request", "http-request"),
        ("memory_connector", "salesforce"),
    ] {
        if !want("memory") {
            continue;
        }
        let sb = sandbox(slow_scale);
        let fetch = if component == "http-request" {
            json!({"id": "fetch", "component": "http-request", "depends_on": ["validate"], "config": {
                "url": "{{secrets.SALESFORCE_URL}}/services/data/v58.0/sobjects/Account/{{input.customer_id}}",
                "headers": {"Authorization": "Bearer {{secrets.SALESFORCE_TOKEN}}"}, "timeout": 60000}})
        } else {
            json!({"id": "fetch", "component": "salesforce", "depends_on": ["validate"], "timeout": 60000, "config": {"account_id": "{{input.customer_id}}"}})
        };
        let doc = json!({"name": "memory", "stages": [
            {"id": "validate", "component": "schema-validate", "config": {"data": "{{input}}", "schema": {"type": "object", "required": ["customer_id"]}}},
            fetch,
            {"id": "shape", "component": "json-transform", "depends_on": ["fetch"], "config": {"data": "{{stages.fetch.output}}", "expression": "@"}}
        ]});
        let plan = Arc::new(fmhost::pipeline::compile(&doc.to_string(), &registry).unwrap());
        let secrets = secrets_for(&sb.1);
        let engine = Arc::new(engine_for(&secrets));
        let input = json!({"customer_id": CUSTOMER});
        let before = fx::rss_kib();
        let n = 1000;
        let runs: Vec<_> = (0..n)
            .map(|_| {
                let (e, p, i) = (engine.clone(), plan.clone(), input.clone());
                tokio::spawn(
                    async move { e.run(p, i, RunOptions::default()).await.unwrap().status },
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(sample_after)).await;
        let during = fx::rss_kib();
        let mut ok = 0;
        for r in runs {
            if r.await.unwrap() == RunStatus::Succeeded {
                ok += 1;
            }
        }
        out.insert(label.into(), json!({"runs": n, "succeeded": ok, "rss_before_kib": before, "rss_during_kib": during, "kib_per_run": (during.saturating_sub(before)) as f64 / n as f64}));
    }

    // The real server over HTTP holding 1,000 connector runs in flight (sync mode, one
    // connection each) against a slow upstream: its peak RSS (VmHWM) and its RSS
    // half-way, read from /proc, against the same server idle.
    if want("serve_rss") {
        let sb = sandbox(slow_scale);
        let dir = fx::root().join("target/bench/serve-rss");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pipelines")).unwrap();
        std::fs::create_dir_all(dir.join("plugins")).unwrap();
        std::fs::copy(
            fx::root().join("target/plugins/salesforce.wasm"),
            dir.join("plugins/salesforce.wasm"),
        )
        .unwrap();
        std::fs::write(
            dir.join("pipelines/held.json"),
            json!({"name": "held", "stages": [
                {"id": "fetch", "component": "salesforce", "timeout": 60000, "config": {"account_id": "{{input.customer_id}}"}},
                {"id": "shape", "component": "json-transform", "depends_on": ["fetch"], "config": {"data": "{{stages.fetch.output}}", "expression": "@"}}]})
            .to_string(),
        )
        .unwrap();
        std::fs::copy(
            fx::root().join("target/plugins/json-transform.wasm"),
            dir.join("plugins/json-transform.wasm"),
        )
        .unwrap();
        std::fs::write(dir.join("secrets.json"), secrets_for(&sb.1).to_string()).unwrap();
        let server = serve(&dir);
        let pid = server.0.id();
        let status = move |field: &str| -> u64 {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with(field))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(0)
        };
        let idle = status("VmRSS:");
        let n = 1000;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let runs: Vec<_> = (0..n)
            .map(|_| {
                let (c, u) = (client.clone(), server.1.clone());
                tokio::spawn(async move {
                    c.post(format!("{u}/v1/pipelines/held/runs"))
                        .bearer_auth(BENCH_TOKEN)
                        .json(&json!({"customer_id": CUSTOMER}))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(sample_after)).await;
        let during = status("VmRSS:");
        let mut ok = 0;
        for r in runs {
            if r.await.unwrap() == 200 {
                ok += 1;
            }
        }
        let peak = status("VmHWM:");
        out.insert("serve_rss".into(), json!({"runs": n, "succeeded": ok, "idle_kib": idle, "during_kib": during, "peak_kib": peak}));
    }

    // The fresh-instance guarantee, in the same run as the rows it makes cheap: a
    // plugin that counts its calls in a static sees 1 on every call, spares or not.
    if want("fresh") {
        let chaos = fx::plugin(&runtime, "target/test-plugins", "chaos").await;
        let config = json!({"mode": "remember"}).to_string();
        let n = 1000;
        let mut fresh = 0;
        for _ in 0..n / 2 {
            if chaos.invoke_text(&config, "null").await.as_deref() == Ok("1") {
                fresh += 1;
            }
        }
        let calls: Vec<_> = (0..n / 2)
            .map(|_| {
                let (p, c) = (chaos.clone(), config.clone());
                tokio::spawn(async move { p.invoke_text(&c, "null").await })
            })
            .collect();
        for call in calls {
            if call.await.unwrap().as_deref() == Ok("1") {
                fresh += 1;
            }
        }
        out.insert(
            "fresh_state".into(),
            json!({"calls": n, "saw_fresh_state": fresh}),
        );
    }

    // foreach over many items with a json-transform body: the loop's own cost per
    // iteration beyond the body's, sequential and 16 at a time, and the peak RSS of the
    // real binary at two item counts (it must not grow beyond the collected results).
    if want("foreach") {
        let n = if quick { 2_000 } else { 10_000 };
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"sku": format!("SKU-{i:05}"), "qty": i % 13}))
            .collect();
        let expression = "{sku: sku, qty: qty}";
        let engine = Arc::new(engine_for(&json!({})));
        // The body alone: the same component invoked with the same rendered config.
        let body = registry.get("json-transform").unwrap().clone();
        let ctx = fmhost::component::StageContext::standalone(
            "body",
            engine.outbound.clone(),
            engine.secrets(),
        );
        let t = Instant::now();
        for item in items.iter().take(n / 4) {
            body.invoke(
                &ctx,
                json!({"data": item, "expression": expression}),
                Arc::new(Value::Null),
            )
            .await
            .unwrap();
        }
        let body_us = t.elapsed().as_secs_f64() * 1e6 / (n / 4) as f64;
        let plan_for = |parallel: bool| {
            let doc = json!({"name": "foreach-bench", "output_stage": "each", "stages": [
                {"id": "each", "component": "foreach", "config": {
                    "items": "{{input.items}}", "loop_stages": ["body"], "parallel": parallel, "max_parallel": 16}},
                {"id": "body", "component": "json-transform", "depends_on": ["each"],
                 "config": {"data": "{{context.item}}", "expression": expression}}]});
            Arc::new(fmhost::pipeline::compile(&doc.to_string(), &registry).unwrap())
        };
        let input = json!({"items": items});
        let mut rows = Map::new();
        for (label, parallel) in [("sequential", false), ("parallel16", true)] {
            let plan = plan_for(parallel);
            let mut per_item = Vec::new();
            for _ in 0..if quick { 1 } else { 3 } {
                let t = Instant::now();
                let r = engine
                    .run(plan.clone(), input.clone(), RunOptions::default())
                    .await
                    .unwrap();
                assert_eq!(r.status, RunStatus::Succeeded, "{:?}", r.error);
                per_item.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
            }
            per_item.sort_by(f64::total_cmp);
            let median = per_item[per_item.len() / 2];
            rows.insert(
                label.into(),
                json!({"per_item_us": median, "overhead_us": median - body_us}),
            );
        }
        // Peak RSS of `fmhost run` (journal off) at 1/5 and all of the items.
        let dir = fx::root().join("target/bench/foreach");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pipeline.json"), serde_json::to_string(&json!({"name": "foreach-rss", "output_stage": "each", "stages": [
            {"id": "each", "component": "foreach", "config": {"items": "{{input.items}}", "loop_stages": ["body"], "parallel": true, "max_parallel": 16}},
            {"id": "body", "component": "json-transform", "depends_on": ["each"], "config": {"data": "{{context.item}}", "expression": expression}}]})).unwrap()).unwrap();
        let mut rss = Map::new();
        for count in [n / 5, n] {
            let file = dir.join(format!("input-{count}.json"));
            std::fs::write(&file, json!({"items": &items[..count]}).to_string()).unwrap();
            let o = Command::new("/usr/bin/time")
                .args(["-f", "%M"])
                .arg(bin("fmhost"))
                .current_dir(fx::root())
                .args(["run", "--no-journal", "--plugins", "target/plugins"])
                .arg(dir.join("pipeline.json"))
                .arg("--input")
                .arg(&file)
                .env("FMHOST_LOG", "warn")
                .output();
            let peak = o.ok().and_then(|o| {
                let results = o.stdout.len();
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()?
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .map(|k| json!({"peak_kib": k, "output_bytes": results}))
            });
            rss.insert(
                count.to_string(),
                peak.unwrap_or(json!({"skipped": "/usr/bin/time is not installed"})),
            );
        }
        out.insert(
            "foreach".into(),
            json!({"items": n, "body_us": body_us, "runs": rows, "rss": rss}),
        );
    }

    // fmhost serve under wrk: POST a one-stage pipeline run, and signed webhook intake.
    if want("serve") {
        let dir = fx::root().join("target/bench/serve");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pipelines")).unwrap();
        std::fs::create_dir_all(dir.join("plugins")).unwrap();
        std::fs::write(
            dir.join("pipelines/one.json"),
            json!({"name": "one", "triggers": [{"type": "webhook", "path": "/hooks/one", "secret": "{{secrets.HOOK}}", "signature": "github"}],
                   "stages": [{"id": "log", "component": "logger", "config": {"level": "debug", "message": "event {{input.n}}"}}]})
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.join("secrets.json"),
            json!({"HOOK": "bench-hook-secret"}).to_string(),
        )
        .unwrap();
        let server = serve(&dir);
        // A separate process, as a client on another machine would be; on these two
        // cores it takes one of them (one runtime thread), the server has the rest.
        let generate = |path: &str, args: &[&str]| -> Value {
            let o = Command::new(bin("fmhost-load"))
                .arg(format!("{}{path}", server.1))
                .args(["--connections", "32", "--seconds", &secs.to_string()])
                .args(args)
                .output()
                .expect("fmhost-load is built with the bench binaries");
            assert!(
                o.status.success(),
                "fmhost-load: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v: Value = serde_json::from_slice(&o.stdout).expect("fmhost-load prints JSON");
            assert_eq!(
                v["unexpected"], 0,
                "fmhost-load got unexpected answers: {v}"
            );
            v
        };
        let auth = format!("Authorization: Bearer {BENCH_TOKEN}");
        out.insert(
            "serve_run".into(),
            generate(
                "/v1/pipelines/one/runs",
                &[
                    "--body",
                    r#"{"n": 1}"#,
                    "--header",
                    &auth,
                    "--expect",
                    "200",
                ],
            ),
        );
        // Webhooks: every delivery unique and signed, so each is verified, fsync'd and run.
        out.insert(
            "serve_webhook".into(),
            generate(
                "/hooks/one",
                &["--github-secret", "bench-hook-secret", "--expect", "202"],
            ),
        );
    }

    // The PostgreSQL journal and the cluster, with FMHOST_BENCH_POSTGRES (a server's
    // URL; each measurement gets a database of its own) and nats-server on the machine.
    if want("cluster") {
        match cluster_bench(secs).await {
            Ok(figures) => {
                out.insert("cluster".into(), figures);
            }
            Err(why) => eprintln!("bench: cluster skipped: {why}"),
        }
    }

    // A plugin stage served with and without a canary, side by side: what routing and
    // per-version accounting cost. The canary is the same component with a custom
    // section appended (another sha256, the same code), taking half the runs.
    if want("canary") {
        let dir = fx::root().join("target/bench/canary");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pipelines")).unwrap();
        std::fs::create_dir_all(dir.join("plugins")).unwrap();
        std::fs::write(
            dir.join("pipelines/t.json"),
            json!({"name": "t", "stages": [{"id": "t", "component": "json-transform",
                   "config": {"data": "{{input}}", "expression": "{n: n, twice: [n, n]}"}}]})
            .to_string(),
        )
        .unwrap();
        std::fs::write(dir.join("secrets.json"), "{}").unwrap();
        let component = std::fs::read(fx::root().join("target/plugins/json-transform.wasm"))
            .expect("run `cargo xtask plugins` first");
        std::fs::write(dir.join("plugins/json-transform.wasm"), &component).unwrap();
        let server = serve(&dir);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {BENCH_TOKEN}").parse().unwrap(),
        );
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        let runs = |client: reqwest::Client, url: String| {
            move || {
                let (c, u) = (client.clone(), url.clone());
                async move {
                    let r = c
                        .post(format!("{u}/v1/pipelines/t/runs"))
                        .json(&json!({"n": 1}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            }
        };
        eprintln!("bench: canary, a plugin stage over the API without a canary ...");
        let plain = load(
            16,
            Duration::from_secs(secs),
            runs(client.clone(), server.1.clone()),
        )
        .await;
        let mut candidate = component.clone();
        let name = b"fmhost-bench";
        let payload = b"canary";
        candidate.extend_from_slice(&[0, (1 + name.len() + payload.len()) as u8, name.len() as u8]);
        candidate.extend_from_slice(name);
        candidate.extend_from_slice(payload);
        let r = client
            .put(format!("{}/v1/plugins/json-transform?canary=50", server.1))
            .body(candidate)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        eprintln!("bench: canary, ... and with a 50% canary");
        let canary = load(
            16,
            Duration::from_secs(secs),
            runs(client.clone(), server.1.clone()),
        )
        .await;
        let plugins: Value = client
            .get(format!("{}/v1/plugins", server.1))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let t = plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "json-transform")
            .cloned()
            .unwrap_or_default();
        out.insert(
            "canary".into(),
            json!({"plain": plain, "canary_50": canary,
                   "runs_by_version": {"current": t["stats"], "canary": t["canary"]["stats"]}}),
        );
    }

    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(out)).unwrap()
    );
}

/// A fresh database `name` on the server at `base`, by `psql`; its URL.
fn fresh_database(base: &str, name: &str) -> Result<String, String> {
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        let o = Command::new("psql")
            .args([base, "-q", "-c", &sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !o.status.success() {
            return Err(format!("psql: {}", String::from_utf8_lossy(&o.stderr)));
        }
    }
    let (head, _) = base
        .rsplit_once('/')
        .ok_or("FMHOST_BENCH_POSTGRES is not a URL")?;
    Ok(format!("{head}/{name}"))
}

/// `fmhost serve` over `dir` with its journal at `journal`, as cluster worker `worker`
/// of the NATS server `nats` when there is one.
fn serve_on(dir: &std::path::Path, journal: &str, cluster: Option<(&str, &str)>) -> Proc {
    let mut cmd = Command::new(bin("fmhost"));
    cmd.current_dir(dir)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pipelines",
            "pipelines",
        ])
        .args(["--plugins", "plugins", "--secrets", "secrets.json"])
        .env("FMHOST_LOG", "warn")
        .env("FMHOST_API_TOKEN", BENCH_TOKEN)
        .env("FMHOST_JOURNAL", journal);
    match cluster {
        Some((nats, worker)) => {
            let state = format!("state-{worker}");
            cmd.args(["--state", &state, "--cluster", nats, "--worker-id", worker]);
            start(&mut cmd)
        }
        None => start(cmd.args(["--state", "state"])),
    }
}

/// Signed webhooks at `url` from `connections` connections for `secs`.
fn webhooks(url: &str, connections: usize, secs: u64) -> Value {
    let o = Command::new(bin("fmhost-load"))
        .arg(format!("{url}/hooks/one"))
        .args([
            "--connections",
            &connections.to_string(),
            "--seconds",
            &secs.to_string(),
        ])
        .args(["--github-secret", "bench-hook-secret", "--expect", "202"])
        .output()
        .expect("fmhost-load is built with the bench binaries");
    serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
}

/// Waits until no run at `url` is running; how long that took.
async fn until_all_ran(url: &str) -> Duration {
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        let running: Value = client
            .get(format!("{url}/v1/runs?status=running&limit=1"))
            .bearer_auth(BENCH_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if running.as_array().is_some_and(|a| a.is_empty())
            || t0.elapsed() > Duration::from_secs(300)
        {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Webhook intake on the PostgreSQL journal (one server), and one worker against three
/// with `--cluster`: intake from one load generator at the first worker, then how long
/// until every accepted run has run, wherever it ran.
async fn cluster_bench(secs: u64) -> Result<Value, String> {
    let base = std::env::var("FMHOST_BENCH_POSTGRES")
        .map_err(|_| "set FMHOST_BENCH_POSTGRES to a PostgreSQL server's URL".to_string())?;
    let nats_bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or("no nats-server (apt-get install nats-server)")?;
    let dir = fx::root().join("target/bench/cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    std::fs::write(
        dir.join("pipelines/one.json"),
        json!({"name": "one", "triggers": [{"type": "webhook", "path": "/hooks/one", "secret": "{{secrets.HOOK}}", "signature": "github"}],
               "stages": [{"id": "log", "component": "logger", "config": {"level": "debug", "message": "event {{input.n}}"}}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("secrets.json"),
        json!({"HOOK": "bench-hook-secret"}).to_string(),
    )
    .unwrap();
    let mut out = Map::new();

    eprintln!("bench: cluster, webhook intake on the PostgreSQL journal (one server) ...");
    // Closed-loop: 32 connections find the most it takes, 8 its latency below that.
    // Each on a journal of its own (the load's delivery ids start again at 0).
    for connections in [32usize, 8] {
        let journal = fresh_database(&base, &format!("fmhost_bench_one_{connections}"))?;
        let server = serve_on(&dir, &journal, None);
        let intake = webhooks(&server.1, connections, secs);
        let drained = until_all_ran(&server.1).await;
        out.insert(
            format!("serve_webhook_postgres_{connections}"),
            json!({"intake": intake, "all_ran_after_s": drained.as_secs_f64()}),
        );
    }

    for workers in [1usize, 3] {
        eprintln!("bench: cluster, {workers} worker(s) on PostgreSQL and NATS JetStream ...");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = dir.join(format!("nats-{workers}"));
        let mut nats = Command::new(nats_bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("nats-server: {e}"))?;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!("nats://127.0.0.1:{port}");
        let journal = fresh_database(&base, &format!("fmhost_bench_cluster_{workers}"))?;
        let procs: Vec<Proc> = (0..workers)
            .map(|i| serve_on(&dir, &journal, Some((&url, &format!("b{i}")))))
            .collect();
        let t0 = Instant::now();
        let intake = webhooks(&procs[0].1, 32, secs);
        until_all_ran(&procs[0].1).await;
        let total = t0.elapsed().as_secs_f64();
        let accepted = intake["requests"].as_f64().unwrap_or(0.0);
        out.insert(
            format!("cluster_{workers}"),
            json!({"workers": workers, "intake": intake, "runs": accepted, "all_ran_after_s": total,
                   "runs_per_s": accepted / total}),
        );
        drop(procs);
        let _ = nats.kill();
        let _ = nats.wait();
    }
    Ok(Value::Object(out))
}
