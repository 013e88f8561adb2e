//! WASM plugins through the real host and the real compiled components: the JMESPath
//! compliance suite, the sandbox's limits, egress and secrets, discovery and the cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fmhost::component::{Component, StageContext};
use fmhost::plugin::{PluginRuntime, WasmComponent};
use serde_json::{Value, json};

use crate::support::{self, Fake, Reply};

/// A compiled plugin, or a clear pointer to the command that builds it.
pub fn plugin_file(dir: &str, name: &str) -> PathBuf {
    let path = support::root().join(dir).join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask plugins` (`cargo xtask test` does it for you)",
        path.display()
    );
    path
}

/// JSON equality where 1 and 1.0 are the same number, as JMESPath has one number type.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test]
async fn json_transform_passes_the_jmespath_compliance_suite() {
    let runtime = PluginRuntime::new().unwrap();
    let plugin = runtime
        .load_file(&plugin_file("target/plugins", "json-transform"))
        .await
        .unwrap();
    let component = WasmComponent::new(Arc::new(plugin));
    let ctx = StageContext::standalone(
        "compliance",
        fmhost::http::Outbound::new(),
        Arc::new(Default::default()),
    );
    let dir = support::root().join("tests/jmespath-compliance");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let (mut passed, mut failures) = (0usize, Vec::new());
    for file in &files {
        let suites: Vec<Value> = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        for suite in &suites {
            for case in suite["cases"].as_array().unwrap() {
                if case.get("bench").is_some() {
                    continue;
                }
                let expression = case["expression"].as_str().unwrap();
                let config = json!({"data": suite["given"], "expression": expression});
                let got = component.invoke(&ctx, config, Arc::new(Value::Null)).await;
                let ok = match (case.get("error"), &got) {
                    (Some(_), Err(_)) => true,
                    (None, Ok(v)) => same(v, &case["result"]),
                    _ => false,
                };
                if ok {
                    passed += 1;
                } else {
                    failures.push(format!(
                        "{}: {expression}: expected {}, got {got:?}",
                        file.file_name().unwrap().to_string_lossy(),
                        case.get("error").unwrap_or(&case["result"])
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{passed} passed, {} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        passed, 892,
        "the vendored suite has 892 non-benchmark cases"
    );
}

fn chaos_pipeline(dir: &std::path::Path, name: &str, stage: Value) -> PathBuf {
    let mut s = json!({"id": "chaos", "component": "chaos"});
    s.as_object_mut()
        .unwrap()
        .extend(stage.as_object().unwrap().clone());
    support::write_json(
        dir,
        &format!("{name}.json"),
        &json!({"name": name, "stages": [s]}),
    )
}

async fn run_chaos(pipeline: &std::path::Path, extra_env: &[(&str, &str)]) -> support::Ran {
    // Only chaos: the other fixtures reuse real plugin names on purpose.
    let dir = pipeline.parent().unwrap().join("chaos-plugin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        plugin_file("target/test-plugins", "chaos"),
        dir.join("chaos.wasm"),
    )
    .unwrap();
    let mut cmd = support::fmhost();
    cmd.args(["--log-format", "json", "run"])
        .arg(pipeline)
        .arg("--plugins")
        .arg(&dir);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    support::output(cmd).await.into()
}

fn stage_error(ran: &support::Ran) -> String {
    ran.stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "failed")
        .map(|v| {
            format!(
                "{}: {}",
                v["error_kind"].as_str().unwrap_or(""),
                v["error"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_else(|| panic!("no stage failure in:\n{}", ran.stderr))
}

#[tokio::test]
async fn a_plugin_that_spins_is_stopped_at_its_deadline() {
    let dir = support::scratch("chaos-spin");
    let p = chaos_pipeline(
        &dir,
        "spin",
        json!({"timeout": 500, "config": {"mode": "spin"}}),
    );
    let ran = run_chaos(&p, &[]).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let err = stage_error(&ran);
    assert!(
        err.starts_with("sandbox: plugin chaos was stopped at its CPU deadline"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plugin_past_its_memory_limit_fails_cleanly() {
    let dir = support::scratch("chaos-hog");
    let p = chaos_pipeline(&dir, "hog", json!({"config": {"mode": "hog"}}));
    let ran = run_chaos(&p, &[("FMHOST_PLUGIN_MEMORY_MB", "32")]).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let err = stage_error(&ran);
    assert!(
        err.starts_with("sandbox: plugin chaos exceeded its memory limit of 32 MiB"),
        "{err}"
    );
}

#[tokio::test]
async fn a_panicking_plugin_is_a_stage_error_with_its_message() {
    let dir = support::scratch("chaos-panic");
    let p = chaos_pipeline(&dir, "panic", json!({"config": {"mode": "panic"}}));
    let ran = run_chaos(&p, &[]).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let err = stage_error(&ran);
    assert!(
        err.starts_with("sandbox: plugin chaos trapped")
            && err.contains("chaos was asked to panic"),
        "{err}"
    );
}

#[tokio::test]
async fn wasi_grants_nothing_beyond_the_world() {
    let dir = support::scratch("chaos-env");
    let p = chaos_pipeline(&dir, "env", json!({"config": {"mode": "env"}}));
    let ran = run_chaos(&p, &[("FMHOST_SECRET_LEAK", "should-not-be-visible")]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let out = ran.json();
    assert_eq!(out["env"], json!([]));
    assert_eq!(out["args"], json!([]));
    assert!(out["root"].as_str().unwrap().starts_with("Err"), "{out}");
}

#[tokio::test]
async fn egress_outside_the_allowed_hosts_is_refused() {
    let fake = Fake::start().await;
    fake.route("/steal", vec![Reply::json(200, json!({}))]);
    let dir = support::scratch("chaos-egress");
    let p = chaos_pipeline(
        &dir,
        "egress",
        json!({"config": {"mode": "call", "request": {"url": fake.url("/steal")}}}),
    );
    let ran = run_chaos(&p, &[]).await;
    assert_eq!(
        ran.code, 1,
        "a refused request fails the stage:\n{}",
        ran.stderr
    );
    let message = stage_error(&ran);
    assert!(
        message.starts_with("sandbox: plugin chaos in stage chaos: refused: ")
            && message.contains(&format!(
                "host 127.0.0.1:{} is not granted (granted: none); the plugin declares declared.example but declaring is not granting",
                fake.addr.port()
            )),
        "{message}"
    );
    assert!(fake.seen("/steal").is_empty(), "nothing reached the server");
}

#[tokio::test]
async fn a_secret_reaches_the_upstream_while_the_plugin_sees_only_the_template() {
    let fake = Fake::start().await;
    fake.route("/api", vec![Reply::json(200, json!({"ok": true}))]);
    let dir = support::scratch("chaos-secret");
    let secret = "tok_live_7a6b5c4d3e";
    let p = chaos_pipeline(
        &dir,
        "secret",
        json!({
            "allowed_hosts": [format!("127.0.0.1:{}", fake.addr.port())],
            "config": {"mode": "call", "token": "{{secrets.API_TOKEN}}", "request": {
                "url": format!("{}?key={{{{secrets.API_TOKEN}}}}", fake.url("/api")),
                "headers": {"Authorization": "Bearer {{secrets.API_TOKEN}}"}}}
        }),
    );
    let ran = run_chaos(&p, &[("FMHOST_SECRET_API_TOKEN", secret)]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let seen = fake.seen("/api");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {secret}").as_str())
    );
    // Outside a credential slot `{{secrets.NAME}}` is literal text.
    assert!(!seen[0].query.contains(secret), "{}", seen[0].query);
    assert!(
        seen[0].query.contains("secrets.API_TOKEN"),
        "{}",
        seen[0].query
    );
    let out = ran.json();
    assert_eq!(out["status"], 200);
    // Everything the plugin held: its config and the request it built.
    assert_eq!(out["sent"]["config_seen"]["token"], "{{secrets.API_TOKEN}}");
    assert_eq!(
        out["sent"]["headers"]["Authorization"],
        "Bearer {{secrets.API_TOKEN}}"
    );
    assert!(!ran.stdout.contains(secret) && !ran.stderr.contains(secret));
}

#[tokio::test]
async fn duplicate_plugin_names_name_both_files_and_the_cache_is_reused() {
    let dir = support::scratch("discovery");
    let (a, b, cache) = (dir.join("a"), dir.join("b"), dir.join("cache"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::copy(
        plugin_file("target/plugins", "stripe"),
        a.join("stripe.wasm"),
    )
    .unwrap();
    std::fs::copy(
        plugin_file("target/plugins", "stripe"),
        b.join("billing.wasm"),
    )
    .unwrap();
    let mut cmd = support::fmhost();
    cmd.env("FMHOST_CACHE_DIR", &cache)
        .args(["plugins", "list", "--plugins"])
        .arg(&a)
        .arg("--plugins")
        .arg(&b);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("two plugins are named \"stripe\"")
            && ran.stderr.contains("a/stripe.wasm")
            && ran.stderr.contains("b/billing.wasm"),
        "{}",
        ran.stderr
    );

    // One compiled artifact for the (identical) component, reused by the next process.
    let hash = fmhost::plugin::content_hash(&std::fs::read(a.join("stripe.wasm")).unwrap());
    let artifacts = || {
        std::fs::read_dir(cache.join("components"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                name.starts_with(&hash[..32]) && name.ends_with(".cwasm")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(artifacts().len(), 1);
    let before = std::fs::metadata(&artifacts()[0])
        .unwrap()
        .modified()
        .unwrap();
    let mut cmd = support::fmhost();
    cmd.env("FMHOST_CACHE_DIR", &cache)
        .args(["plugins", "inspect", "--json"])
        .arg(a.join("stripe.wasm"));
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(ran.json()["world"], "connector");
    assert_eq!(ran.json()["allowed_hosts"], json!(["api.stripe.com"]));
    assert_eq!(
        std::fs::metadata(&artifacts()[0])
            .unwrap()
            .modified()
            .unwrap(),
        before,
        "not recompiled"
    );

    // Beside it, what the component described itself as: a run that names no plugin
    // loads none, yet every file on the path is still known by name, so the duplicate
    // is still refused, now from the cache.
    let described: Vec<_> = std::fs::read_dir(cache.join("components"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&hash[..32]) && n.ends_with(".describe.json"))
        .collect();
    assert_eq!(described.len(), 1, "{described:?}");
    let run = |pipeline: &std::path::Path, dirs: &[&std::path::Path]| {
        let mut cmd = support::fmhost();
        cmd.env("FMHOST_CACHE_DIR", &cache)
            .current_dir(&dir)
            .arg("run")
            .arg(pipeline)
            .arg("--no-journal");
        for d in dirs {
            cmd.arg("--plugins").arg(d);
        }
        async move { support::Ran::from(support::output(cmd).await) }
    };
    let p = support::write_json(
        &dir,
        "logs.json",
        &json!({"name": "logs", "stages": [{"id": "a", "component": "logger", "config": {"message": "x"}}]}),
    );
    let ran = run(&p, &[&a, &b]).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("two plugins are named \"stripe\""),
        "{}",
        ran.stderr
    );
    // With one of them, the run goes ahead; a pipeline naming the plugin gets it
    // (here: a config the plugin's cached schema refuses, found before any run).
    let ran = run(&p, &[&a]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let p = support::write_json(
        &dir,
        "charge.json",
        &json!({"name": "charge", "stages": [{"id": "s", "component": "stripe", "config": {"no_such_field": 1}}]}),
    );
    let ran = run(&p, &[&a]).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("stage \"s\"") && !ran.stderr.contains("unknown component"),
        "{}",
        ran.stderr
    );

    let junk = dir.join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("broken.wasm"), b"\0asm not really").unwrap();
    let mut cmd = support::fmhost();
    cmd.args(["plugins", "list", "--plugins"]).arg(&junk);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2);
    assert!(
        ran.stderr
            .contains("broken.wasm: not a valid WebAssembly component"),
        "{}",
        ran.stderr
    );
}

/// Both customer-360 pipelines give the seed's expected output against the sandbox.
async fn customer_360(pipeline: &str) -> (Value, Value) {
    let sandbox = fmhost_sandbox::Sandbox::start(Default::default())
        .await
        .unwrap();
    let dir = support::scratch(pipeline);
    let secrets = support::write_json(&dir, "secrets.json", &sandbox.secrets());
    let report = dir.join("report.json");
    let mut cmd = support::fmhost();
    cmd.env("FMHOST_NOW", "2024-01-15T10:30:00Z")
        .args([
            "run",
            &format!("pipelines/{pipeline}.pipeline.json"),
            "--input-json",
            &sandbox.input().to_string(),
        ])
        .arg("--secrets")
        .arg(&secrets)
        .arg("--report")
        .arg(&report);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let expected: Value = serde_json::from_slice(
        &std::fs::read(support::root().join("tests/golden/customer-360.expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ran.json(), expected);
    for vendor in [
        "salesforce",
        "stripe",
        "intercom",
        "internal",
        "config",
        "llm",
    ] {
        assert_eq!(sandbox.hits(vendor), 1, "{vendor} called once");
    }
    assert!(
        ran.stderr
            .contains("Customer 360 built for cust_abc123def456gh: health_score=78, risk=medium")
    );
    (
        serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap(),
        expected,
    )
}

/// The four fetches overlapped: each started before any of them finished.
fn assert_fetches_overlap(report: &Value) {
    let fetches: Vec<&Value> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            [
                "fetch-salesforce",
                "fetch-stripe",
                "fetch-intercom",
                "fetch-internal",
            ]
            .contains(&s["id"].as_str().unwrap())
        })
        .collect();
    assert_eq!(fetches.len(), 4);
    let last_start = fetches
        .iter()
        .map(|s| s["started_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    let first_end = fetches
        .iter()
        .map(|s| s["started_ms"].as_u64().unwrap() + s["duration_ms"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(
        last_start <= first_end,
        "fetches ran one after another: {fetches:?}"
    );
}

#[tokio::test]
async fn customer_360_runs_with_wasm_transforms_and_generator() {
    let (report, _) = customer_360("customer-360").await;
    assert_fetches_overlap(&report);
    assert_eq!(report["stages"].as_array().unwrap().len(), 14);
}

#[tokio::test]
async fn customer_360_with_connector_plugins_gives_the_same_output() {
    let (report, _) = customer_360("customer-360-connectors").await;
    assert_fetches_overlap(&report);
}

#[tokio::test]
async fn a_connector_fails_loudly_when_the_vendor_changes_shape() {
    let sandbox = fmhost_sandbox::Sandbox::start(fmhost_sandbox::Options { latency_scale: 0.0 })
        .await
        .unwrap();
    sandbox.set_intercom_version("2.11");
    let dir = support::scratch("intercom-2.11");
    let secrets = support::write_json(&dir, "secrets.json", &sandbox.secrets());
    let mut cmd = support::fmhost();
    cmd.args([
        "run",
        "pipelines/customer-360-connectors.pipeline.json",
        "--input-json",
        &sandbox.input().to_string(),
    ])
    .arg("--secrets")
    .arg(&secrets);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 1);
    assert!(
        ran.stderr.contains("stage \"fetch-intercom\" failed after 1 attempt: validation: plugin intercom: intercom response has no field `last_seen_at`"),
        "{}",
        ran.stderr
    );
    let _ = Duration::ZERO;
}

/// A plugin from another language: Python through componentize-py. Skipped, saying so,
/// when the toolchain is absent, unless FMHOST_REQUIRE_TOOLCHAINS is set (CI sets it).
#[tokio::test]
async fn a_python_plugin_loads_and_runs_unchanged() {
    let present = std::process::Command::new("componentize-py")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("FMHOST_REQUIRE_TOOLCHAINS").is_none(),
            "componentize-py is required (FMHOST_REQUIRE_TOOLCHAINS is set)"
        );
        eprintln!(
            "SKIPPED a_python_plugin_loads_and_runs_unchanged: componentize-py is not installed (pip install componentize-py)"
        );
        return;
    }
    let dir = support::scratch("python-plugin");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let wasm = plugins.join("mask-fields.wasm");
    let built = std::process::Command::new(support::root().join("examples/python-plugin/build.sh"))
        .arg(&wasm)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let p = support::write_json(
        &dir,
        "p.json",
        &json!({"name": "mask", "stages": [
            {"id": "mask", "component": "mask-fields", "config": {"fields": ["email"], "data": "{{input}}"}}
        ]}),
    );
    let mut cmd = support::fmhost();
    cmd.env("FMHOST_CACHE_DIR", dir.join("cache"))
        .args(["run"])
        .arg(&p)
        .args(["--input-json", r#"{"customer": {"email": "billing@acme.com", "contacts": [{"email": "ceo@acme.com", "name": "Ada"}]}}"#])
        .arg("--plugins")
        .arg(&plugins);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(
        ran.json(),
        json!({"customer": {"email": "b******@acme.com", "contacts": [{"email": "c**@acme.com", "name": "Ada"}]}})
    );
    assert!(
        ran.stderr.contains("mask-fields: masked 2 value(s)"),
        "the plugin's log reaches the host:\n{}",
        ran.stderr
    );
}

/// Every invocation runs in an instance nothing ran in before, spare instances made
/// ahead of time included: a plugin that counts its calls in a static sees 1 each time,
/// 40 calls in a loop, 8 at once and one after another.
#[tokio::test]
async fn no_state_survives_from_one_invocation_to_the_next() {
    let dir = support::scratch("chaos-remember");
    for (name, parallel) in [("parallel", true), ("sequential", false)] {
        let p = support::write_json(
            &dir,
            &format!("{name}.json"),
            &json!({"name": name, "output_stage": "each", "stages": [
                {"id": "each", "component": "foreach", "config": {
                    "items": "{{input.items}}", "loop_stages": ["remember"],
                    "parallel": parallel, "max_parallel": 8}},
                {"id": "remember", "component": "chaos", "depends_on": ["each"],
                 "config": {"mode": "remember"}}]}),
        );
        let items: Vec<u32> = (0..40).collect();
        let input = support::write_json(&dir, "input.json", &json!({"items": items}));
        let plugin_dir = dir.join("chaos-plugin");
        std::fs::create_dir_all(&plugin_dir).unwrap();
        std::fs::copy(
            plugin_file("target/test-plugins", "chaos"),
            plugin_dir.join("chaos.wasm"),
        )
        .unwrap();
        let mut cmd = support::fmhost();
        cmd.args(["run", "--no-journal"])
            .arg(&p)
            .arg("--input")
            .arg(&input)
            .arg("--plugins")
            .arg(&plugin_dir);
        let ran: support::Ran = support::output(cmd).await.into();
        assert_eq!(ran.code, 0, "{}", ran.stderr);
        let out = ran.json();
        let results = out["results"].as_array().unwrap_or_else(|| panic!("{out}"));
        assert_eq!(results.len(), 40, "{out}");
        assert!(results.iter().all(|r| r == &json!(1)), "{name}: {out}");
    }
}

/// A transform that has been quick is called inline on the stage's thread; one that then
/// runs past an epoch tick there goes on on the plugin threads, finishes correctly, and
/// loses its inline calls (the log says so).
#[tokio::test]
async fn a_quick_transform_called_inline_that_turns_slow_moves_to_the_plugin_threads() {
    let dir = support::scratch("inline-demotion");
    let items: Vec<Value> = (0..20_000)
        .map(|i| json!({"id": format!("item-{i:06}"), "tags": ["a", "b", "c"], "n": i}))
        .collect();
    let p = support::write_json(
        &dir,
        "pipeline.json",
        &json!({"name": "inline", "output_stage": "count", "stages": [
            {"id": "each", "component": "foreach", "config": {
                "items": "{{input.small}}", "loop_stages": ["quick"], "parallel": false}},
            {"id": "quick", "component": "json-transform", "depends_on": ["each"],
             "config": {"data": "{{context.item}}", "expression": "@"}},
            {"id": "count", "component": "json-transform", "depends_on": ["each"],
             "config": {"data": "{{input.big}}", "expression": "{count: length(@), last: [-1].id}"}}]}),
    );
    let small: Vec<u32> = (0..40).collect();
    let input = support::write_json(&dir, "input.json", &json!({"small": small, "big": items}));
    let mut cmd = support::fmhost();
    cmd.args(["--log-format", "json", "run", "--no-journal"])
        .arg(&p)
        .arg("--input")
        .arg(&input)
        .args(["--plugins", "target/plugins"]);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(
        ran.json(),
        json!({"count": 20_000, "last": "item-019999"}),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr
            .contains("an inline call did not finish within one epoch tick"),
        "the big call was not made inline, or was not moved: {}",
        ran.stderr
    );
}
