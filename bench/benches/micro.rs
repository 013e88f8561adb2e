//! Micro benchmarks (criterion). `cargo xtask bench` runs them and reads the medians
//! from target/criterion into benchmarks/RESULTS.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use fmhost::component::{Component, StageContext};
use fmhost::engine::{Engine, RunOptions};
use fmhost::plugin::{PluginRuntime, WasmComponent};
use fmhost::secrets::Secrets;
use fmhost::template::{Scope, StageLookup};
use fmhost_bench as fx;
use serde_json::{Value, json};

struct Outputs(HashMap<String, Value>);
impl StageLookup for Outputs {
    fn stage_field(&self, id: &str, field: &str) -> Option<&Value> {
        (field == "output").then(|| self.0.get(id)).flatten()
    }
    fn has_stage(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }
}

fn micro(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = PluginRuntime::new().unwrap();
    let registry = rt.block_on(fx::registry(&runtime));
    let jt = rt.block_on(fx::plugin(&runtime, "target/plugins", "json-transform"));
    let chaos = rt.block_on(fx::plugin(&runtime, "target/test-plugins", "chaos"));
    let fresh = WasmComponent::new(jt.clone());
    let ctx = StageContext::standalone(
        "bench",
        fmhost::http::Outbound::new(),
        Arc::new(Secrets::default()),
    );
    let small = json!({"data": {"a": 1}, "expression": "a"});

    c.bench_function("plugin/instantiate+invoke", |b| {
        b.to_async(&rt).iter(|| async {
            fresh
                .invoke(&ctx, small.clone(), Arc::new(Value::Null))
                .await
                .unwrap()
        })
    });
    // A warm call: the same instance called again (never done for a stage). chaos in
    // `echo` mode, since json-transform leaves its documents to the instance's end.
    let mut warm = rt.block_on(chaos.warm_instance()).unwrap();
    let small_text = json!({"mode": "echo"}).to_string();
    c.bench_function("plugin/warm-invoke", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    warm.invoke(&small_text, "null").await.unwrap();
                }
                t.elapsed()
            })
        })
    });
    let mut chaos_warm = rt.block_on(chaos.warm_instance()).unwrap();
    for n in [0u32, 1000] {
        let config = json!({"mode": "log", "n": n}).to_string();
        c.bench_function(&format!("plugin/host-import-x{n}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        chaos_warm.invoke(&config, "null").await.unwrap();
                    }
                    t.elapsed()
                })
            })
        });
    }
    // Bytes into a fresh instance and back: `chaos` in `echo` mode returns its input
    // text unparsed, so beyond the 0-byte call this is the crossing alone.
    let echo_config = json!({"mode": "echo"}).to_string();
    for (label, size) in [
        ("0", 0usize),
        ("1KiB", 1 << 10),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
    ] {
        let text = "x".repeat(size);
        c.bench_function(&format!("crossing-echo/{label}"), |b| {
            b.to_async(&rt)
                .iter(|| async { chaos.invoke_text(&echo_config, &text).await.unwrap() })
        });
    }
    // A JSON transform with the identity expression in a fresh instance, against the
    // same Rust code (the json-transform plugin's) run natively on the same text.
    for (label, size) in [
        ("tiny", 0usize),
        ("1KiB", 1 << 10),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
    ] {
        let data = if size == 0 {
            json!({"a": 1})
        } else {
            fx::payload(size)
        };
        let config = json!({"data": data, "expression": "@"}).to_string();
        c.bench_function(&format!("identity/plugin/{label}"), |b| {
            b.to_async(&rt)
                .iter(|| async { jt.invoke_text(&config, "null").await.unwrap() })
        });
        c.bench_function(&format!("identity/native/{label}"), |b| {
            b.iter(|| fx::json_transform_native(&config, "null"))
        });
    }

    let c360 = fx::pipeline("customer-360", &registry);
    let merge = &c360.stages[c360.stage_index("merge-responses").unwrap()];
    let outputs = Outputs(HashMap::from([
        (
            "transform-salesforce".into(),
            json!({"company_name": "Acme Corp", "industry": "Technology", "employee_count": 250, "deal_stage": "Customer", "owner": "Sarah Johnson"}),
        ),
        (
            "transform-stripe".into(),
            json!({"email": "billing@acme.example", "currency": "usd", "subscriptions": [{"status": "active", "amount": 49900}], "total_spent": 598800}),
        ),
        (
            "transform-intercom".into(),
            json!({"last_seen": "2024-01-14T18:30:00Z", "open_tickets": 2}),
        ),
        (
            "transform-internal".into(),
            json!({"account_health_score": 78, "monthly_active_days": 22}),
        ),
    ]));
    let secrets = Secrets::default();
    let input = json!({"customer_id": "cust_abc123def456gh"});
    let run = json!({"id": "run_bench", "pipeline": "customer-360"});
    c.bench_function("template/render-merge-config", |b| {
        b.iter(|| {
            let scope = Scope {
                input: &input,
                stages: &outputs,
                secrets: &secrets,
                output: None,
                run: &run,
                now: None,
                keep_secrets: false,
                locals: None,
            };
            merge.config.render(&scope).unwrap()
        })
    });

    let stripe_config = json!({"data": fx::stripe_customer(), "expression": fx::STRIPE_EXPRESSION});
    c.bench_function("jmespath/plugin", |b| {
        b.to_async(&rt).iter(|| async {
            fresh
                .invoke(&ctx, stripe_config.clone(), Arc::new(Value::Null))
                .await
                .unwrap()
        })
    });
    let customer = fx::stripe_customer();
    c.bench_function("jmespath/native", |b| {
        b.iter(|| {
            jpx_core::compile(fx::STRIPE_EXPRESSION)
                .unwrap()
                .search(&customer)
                .unwrap()
        })
    });

    let final_validation = c360.source["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "final-validation")
        .unwrap()["config"]["schema"]
        .clone();
    let validator = fmhost::schema::compile(&final_validation).unwrap();
    let expected: Value = serde_json::from_slice(
        &std::fs::read(fx::root().join("tests/golden/customer-360.expected.json")).unwrap(),
    )
    .unwrap();
    c.bench_function("schema/validate-customer-360", |b| {
        b.iter(|| fmhost::schema::violations(&validator, &expected))
    });

    let engine = Engine::new(Secrets::default());
    for (component, sizes) in [
        ("logger", &[2usize, 14, 64, 1000][..]),
        ("json-transform", &[14, 64][..]),
    ] {
        for deep in [true, false] {
            for &n in sizes {
                let plan = fx::dag(n, deep, component, &registry);
                let shape = if deep { "deep" } else { "wide" };
                c.bench_function(&format!("scheduler/{component}/{shape}/{n}"), |b| {
                    b.to_async(&rt).iter(|| async {
                        engine
                            .run(plan.clone(), json!({}), RunOptions::default())
                            .await
                            .unwrap()
                    })
                });
            }
        }
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

criterion_group! { name = benches; config = config(); targets = micro }
criterion_main!(benches);
