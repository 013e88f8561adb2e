//! A small HTTP/1.1 load generator, so `cargo xtask bench` needs nothing installed:
//! keep-alive connections, each sending its next request when the last is answered,
//! for a fixed time; prints requests/s and latency percentiles as JSON on stdout.
//!
//!     fmhost-load URL [--connections 32] [--seconds 5] [--threads 1] [--body TEXT]
//!                     [--header 'Name: value']... [--expect 200]
//!                     [--github-secret SECRET]
//!
//! With `--github-secret`, every request is a distinct webhook delivery: body
//! `{"n": N}`, `X-Hub-Signature-256` over it and `X-GitHub-Delivery: d-N`, so the
//! server verifies, journals and runs each one (nothing is deduplicated).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;

struct Options {
    url: hyper::Uri,
    connections: usize,
    seconds: f64,
    threads: usize,
    body: String,
    headers: Vec<(String, String)>,
    expect: u16,
    github_secret: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: fmhost-load URL [--connections N] [--seconds S] [--threads N] [--body TEXT] [--header 'Name: value']... [--expect STATUS] [--github-secret SECRET]"
    );
    std::process::exit(2)
}

fn options() -> Options {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| usage());
    let mut o = Options {
        url: url.parse().unwrap_or_else(|_| usage()),
        connections: 32,
        seconds: 5.0,
        threads: 1,
        body: String::new(),
        headers: Vec::new(),
        expect: 200,
        github_secret: None,
    };
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--connections" => o.connections = value.parse().unwrap_or_else(|_| usage()),
            "--seconds" => o.seconds = value.parse().unwrap_or_else(|_| usage()),
            "--threads" => o.threads = value.parse().unwrap_or_else(|_| usage()),
            "--body" => o.body = value,
            "--expect" => o.expect = value.parse().unwrap_or_else(|_| usage()),
            "--github-secret" => o.github_secret = Some(value),
            "--header" => {
                let (name, v) = value.split_once(':').unwrap_or_else(|| usage());
                o.headers
                    .push((name.trim().to_string(), v.trim().to_string()));
            }
            _ => usage(),
        }
    }
    if o.url.scheme_str() != Some("http") || o.connections == 0 || o.threads == 0 {
        usage()
    }
    o
}

/// One connection's loop: its latencies in µs and the answers that were not `expect`.
async fn connection(
    o: Arc<Options>,
    counter: Arc<AtomicU64>,
    until: Instant,
) -> Result<(Vec<u32>, u64), String> {
    let Some(authority) = o.url.authority().cloned() else {
        return Err(format!("{}: no host:port", o.url));
    };
    let stream = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    stream.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{authority}: HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(conn);
    let path = o
        .url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let (mut latencies, mut unexpected) = (Vec::new(), 0);
    while Instant::now() < until {
        let mut req = Request::post(&path).header("host", authority.as_str());
        for (name, value) in &o.headers {
            req = req.header(name, value);
        }
        let body = match &o.github_secret {
            Some(secret) => {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let body = json!({ "n": n }).to_string();
                req = req
                    .header(
                        "X-Hub-Signature-256",
                        fmhost::serve::webhooks::github_signature(secret, body.as_bytes()),
                    )
                    .header("X-GitHub-Delivery", format!("d-{n}"));
                body
            }
            None => o.body.clone(),
        };
        let req = req
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let t = Instant::now();
        if sender.ready().await.is_err() {
            break;
        }
        let Ok(response) = sender.send_request(req).await else {
            break;
        };
        let status = response.status().as_u16();
        // The whole answer is read before the next request goes.
        let _ = response.into_body().collect().await;
        latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if status != o.expect {
            unexpected += 1;
        }
    }
    Ok((latencies, unexpected))
}

fn main() {
    let o = Arc::new(options());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async {
        let counter = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(o.seconds);
        let tasks: Vec<_> = (0..o.connections)
            .map(|_| tokio::spawn(connection(o.clone(), counter.clone(), until)))
            .collect();
        let (mut all, mut unexpected) = (Vec::new(), 0);
        for t in tasks {
            match t.await.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok((l, u)) => {
                    all.extend(l);
                    unexpected += u;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .map(|us| *us as f64 / 1000.0)
        };
        json!({
            "requests": all.len(),
            "unexpected": unexpected,
            "expected_status": o.expect,
            "connections": o.connections,
            "seconds": elapsed,
            "requests_per_s": all.len() as f64 / elapsed,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
        })
    });
    println!("{result}");
}
