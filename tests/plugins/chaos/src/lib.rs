//! `chaos`: a connector that misbehaves on request (`config.mode`), to test the sandbox.
//! - `spin`: loops forever.
//! - `hog`: allocates until it cannot.
//! - `panic`: panics with a message.
//! - `call`: sends `config.request` through host http and returns what it sent and got.
//! - `log`: calls the host's log import `config.n` times (for benchmarks).
//! - `env`: reports what WASI lets it see (environment, files, arguments).
//! - `flood`: writes `config.mib` MiB to stderr and stdout, then succeeds.
//! - `recurse`: recurses until the stack runs out.
//! - `echo`: returns its input text unchanged, unparsed (to measure the crossing alone).
//! - `remember`: counts its calls in a static and returns the count; in a fresh
//!   instance per invocation it is always 1 (the benchmarks check that it stays so).

use fmhost_plugin_sdk::{
    Descriptor, Guest, PluginError, PluginKind, Request, export_connector, invalid_config,
    parse_config,
};
use serde_json::{Value, json};

struct Chaos;

impl Guest for Chaos {
    fn describe() -> Descriptor {
        Descriptor {
            name: "chaos".into(),
            version: "0.1.0".into(),
            kind: PluginKind::Connector,
            description: "Misbehaves on purpose".into(),
            config_schema: String::new(),
            allowed_hosts: vec!["declared.example".into()],
        }
    }

    fn invoke(config: String, input: String) -> Result<String, PluginError> {
        let config = parse_config(&config)?;
        match config["mode"].as_str().unwrap_or("") {
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("chaos was asked to panic"),
            "flood" => {
                use std::io::Write;
                let line = [b'x'; 1024];
                for _ in 0..config["mib"].as_u64().unwrap_or(1) * 1024 {
                    let _ = std::io::stderr().write_all(&line);
                    let _ = std::io::stdout().write_all(&line);
                }
                Ok("\"flooded\"".into())
            }
            "recurse" => Ok(depth(std::hint::black_box(0)).to_string()),
            "echo" => Ok(input),
            "remember" => {
                static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Ok(n.to_string())
            }
            "log" => {
                let n = config["n"].as_u64().unwrap_or(1);
                for _ in 0..n {
                    fmhost_plugin_sdk::log::log(fmhost_plugin_sdk::Level::Trace, "tick");
                }
                Ok("null".into())
            }
            "call" => {
                let r = &config["request"];
                let req = Request {
                    method: r["method"].as_str().unwrap_or("GET").into(),
                    url: r["url"].as_str().unwrap_or_default().into(),
                    headers: r["headers"]
                        .as_object()
                        .map(|h| {
                            h.iter()
                                .map(|(k, v)| {
                                    (k.clone(), v.as_str().unwrap_or_default().to_string())
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    body: r.get("body").map(|b| b.to_string().into_bytes()),
                    timeout_ms: None,
                    idempotency_key: None,
                    retry: None,
                };
                let sent = json!({"url": req.url, "headers": r["headers"], "config_seen": config, "input_seen": input});
                match fmhost_plugin_sdk::http::send(&req) {
                    Ok(resp) => Ok(json!({"sent": sent, "status": resp.status, "body": String::from_utf8_lossy(&resp.body)}).to_string()),
                    Err(e) => Ok(json!({"sent": sent, "error": {"kind": format!("{:?}", e.kind), "message": e.message}}).to_string()),
                }
            }
            "env" => {
                let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let root = std::fs::read_dir("/")
                    .map(|d| d.count())
                    .map_err(|e| e.to_string());
                let args: Vec<String> = std::env::args().collect();
                Ok(json!({"env": env, "root": format!("{root:?}"), "args": args}).to_string())
            }
            other => Err(invalid_config(format!(
                "config.mode: unknown mode {other:?}: {}",
                Value::Null
            ))),
        }
    }
}

fn depth(n: u64) -> u64 {
    let pad = std::hint::black_box([n; 64]);
    if pad[0] == u64::MAX {
        return 0;
    }
    depth(n + 1) + pad[1]
}

export_connector!(Chaos);
