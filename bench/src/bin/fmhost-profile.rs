//! A steady loop of one thing, to run under `perf record -g` or
//! `valgrind --tool=callgrind` (criterion's own statistics would drown the profile):
//!
//!     fmhost-profile invoke 20000          fresh json-transform instance + tiny invoke
//!     fmhost-profile crossing 65536 500    the same with an N-byte payload
//!     fmhost-profile c360 8 [--journal]    customer-360 at zero latency, 16 concurrent, N s
//!
//! Prints what it measured (median-free: total time / iterations) on stderr.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fmhost::component::{Component, StageContext};
use fmhost::engine::Engine;
use fmhost::plugin::{PluginRuntime, WasmComponent};
use fmhost::secrets::Secrets;
use fmhost_bench as fx;
use serde_json::{Value, json};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let runtime = PluginRuntime::new().unwrap();
    match args.first().map(String::as_str) {
        Some("invoke") | Some("crossing") => {
            let (size, n) = if args[0] == "invoke" {
                (0, arg(1, 20_000))
            } else {
                (arg(1, 65536), arg(2, 500))
            };
            let jt = fx::plugin(&runtime, "target/plugins", "json-transform").await;
            let fresh = WasmComponent::new(jt);
            let ctx = StageContext::standalone(
                "profile",
                fmhost::http::Outbound::new(),
                Arc::new(Secrets::default()),
            );
            let config = if size == 0 {
                json!({"data": {"a": 1}, "expression": "a"})
            } else {
                json!({"data": fx::payload(size), "expression": "`0`"})
            };
            let t = Instant::now();
            for _ in 0..n {
                fresh
                    .invoke(&ctx, config.clone(), Arc::new(Value::Null))
                    .await
                    .unwrap();
            }
            eprintln!(
                "{} µs per invocation",
                t.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        }
        Some("c360") => {
            let secs = arg(1, 8) as u64;
            let journal = args.iter().any(|a| a == "--journal");
            let registry = fx::registry(&runtime).await;
            let plan = fx::pipeline("customer-360", &registry);
            let sb = fmhost_sandbox::Sandbox::start(fmhost_sandbox::Options { latency_scale: 0.0 })
                .await
                .unwrap();
            let secrets = sb.secrets();
            let engine = Arc::new(Engine::new(Secrets::from_pairs(
                secrets
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())),
            )));
            let input = sb.input();
            let dir = fx::root().join("target/bench/profile-journal");
            let _ = std::fs::remove_dir_all(&dir);
            let j = journal.then(|| fmhost::journal::Journal::open(&dir).unwrap());
            let start = Instant::now();
            let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let workers: Vec<_> = (0..16)
                .map(|_| {
                    let (e, p, i, j, runs) = (
                        engine.clone(),
                        plan.clone(),
                        input.clone(),
                        j.clone(),
                        runs.clone(),
                    );
                    tokio::spawn(async move {
                        while start.elapsed() < Duration::from_secs(secs) {
                            fx::run_once(&e, j.as_ref(), p.clone(), i.clone()).await;
                            runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.unwrap();
            }
            let n = runs.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "{:.0} runs/s ({n} runs)",
                n as f64 / start.elapsed().as_secs_f64()
            );
        }
        _ => {
            eprintln!("usage: fmhost-profile invoke N | crossing BYTES N | c360 SECS [--journal]");
            std::process::exit(2);
        }
    }
}
