//! Fixtures shared by the micro benchmarks and the end-to-end harness: the repository's
//! compiled plugins, its pipelines, generated DAGs and the seed's payloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fmhost::component::Registry;
use fmhost::pipeline::Plan;
use fmhost::plugin::{Plugin, PluginRuntime, WasmComponent};
use serde_json::{Value, json};

pub mod baseline;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

/// Loads one compiled plugin from `target/plugins` (or `target/test-plugins`).
pub async fn plugin(runtime: &Arc<PluginRuntime>, dir: &str, name: &str) -> Arc<Plugin> {
    let path = root().join(dir).join(format!("{name}.wasm"));
    Arc::new(
        runtime
            .load_file(&path)
            .await
            .unwrap_or_else(|e| panic!("{e} (run `cargo xtask plugins`)")),
    )
}

/// The built-ins plus the repository's plugins.
pub async fn registry(runtime: &Arc<PluginRuntime>) -> Registry {
    let mut r = Registry::builtins();
    for name in [
        "json-transform",
        "generator",
        "stripe",
        "salesforce",
        "intercom",
    ] {
        r.register(Arc::new(WasmComponent::new(
            plugin(runtime, "target/plugins", name).await,
        )));
    }
    r
}

pub fn pipeline(name: &str, registry: &Registry) -> Arc<Plan> {
    let text = std::fs::read_to_string(root().join(format!("pipelines/{name}.pipeline.json")))
        .expect("pipeline file");
    Arc::new(fmhost::pipeline::compile(&text, registry).unwrap_or_else(|d| panic!("{d:?}")))
}

/// A DAG of `n` stages of `component`: a chain (`deep`) or all independent (`wide`).
pub fn dag(n: usize, deep: bool, component: &str, registry: &Registry) -> Arc<Plan> {
    let stages: Vec<Value> = (0..n)
        .map(|i| {
            let deps: Vec<String> = if deep && i > 0 { vec![format!("s{}", i - 1)] } else { vec![] };
            let config = match component {
                "logger" => json!({"level": "trace", "message": "stage {{run.id}}"}),
                _ => json!({"data": {"a": {"b": i}}, "expression": "a.b"}),
            };
            json!({"id": format!("s{i}"), "component": component, "depends_on": deps, "config": config})
        })
        .collect();
    let doc = json!({"name": format!("dag-{n}"), "stages": stages});
    Arc::new(
        fmhost::pipeline::compile(&doc.to_string(), registry).unwrap_or_else(|d| panic!("{d:?}")),
    )
}

/// A JSON document of about `bytes` bytes.
pub fn payload(bytes: usize) -> Value {
    let item = json!({"id": "cus_0000000000", "email": "someone@example.com", "amount": 49900, "tags": ["a", "b"]});
    let per = item.to_string().len() + 1;
    json!({"items": vec![item; (bytes / per).max(1)]})
}

/// The Stripe customer the sandbox serves, for transform benchmarks.
pub fn stripe_customer() -> Value {
    json!({
        "id": "cust_abc123def456gh", "object": "customer", "balance": 0, "currency": "usd",
        "email": "billing@acme.example", "metadata": {"lifetime_value": "598800"},
        "invoice_settings": {"default_payment_method": "pm_1OaBcD2eZvKYlo2C"},
        "subscriptions": {"object": "list", "data": [
            {"id": "sub_1", "status": "active", "plan": {"nickname": "Enterprise", "amount": 49900, "interval": "month"}}
        ]}
    })
}

pub const STRIPE_EXPRESSION: &str = "{source: 'stripe', email: email, currency: currency, balance: balance, subscriptions: subscriptions.data[*].{id: id, status: status, plan: plan.nickname, amount: plan.amount, interval: plan.interval}, total_spent: to_number(metadata.lifetime_value) || `0`, payment_method: invoice_settings.default_payment_method}";

/// Current resident set size of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// What the json-transform plugin's `invoke` does, run natively: parse the config
/// text, take `data` (or parse the input), compile and search the expression, write the
/// result as text. The benchmarks compare the plugin against it.
pub fn json_transform_native(config: &str, input: &str) -> String {
    let mut config: Value = serde_json::from_str(config).expect("config is JSON");
    let expression = config["expression"].as_str().unwrap_or("@").to_string();
    let data = match config.get_mut("data") {
        Some(d) => d.take(),
        None => serde_json::from_str(input).expect("input is JSON"),
    };
    let result = jpx_core::compile(&expression)
        .expect("expression compiles")
        .search(&data)
        .expect("search succeeds");
    serde_json::to_string(&result).expect("the result is written")
}

/// One run of `plan`, journaled in `journal` when there is one (waiting for its durable
/// commit), as `fmhost run` does; panics unless it succeeds.
pub async fn run_once(
    engine: &fmhost::engine::Engine,
    journal: Option<&fmhost::journal::Journal>,
    plan: Arc<Plan>,
    input: Value,
) {
    let watcher = journal.map(|j| {
        let start = fmhost::journal::RunStart::new(
            fmhost::engine::new_run_id(),
            &plan.name,
            Default::default(),
            "bench",
            "bench",
            engine.secrets().store(&input),
        );
        fmhost::journal::RunJournal::new(j.clone(), start, engine.secrets())
    });
    let (r, committed) = fmhost::journal::run_journaled(
        engine,
        plan,
        input,
        fmhost::engine::RunOptions::default(),
        watcher,
    )
    .await
    .expect("the run starts");
    committed.expect("the run is journaled");
    assert_eq!(
        r.status,
        fmhost::engine::RunStatus::Succeeded,
        "{:?}",
        r.error
    );
}
