//! Resilience through the real binary against loopback fakes with scripted faults.
//! Assertions are on what the server saw: attempts, gaps, concurrency, headers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Fake, Reply};

fn stage(id: &str, url: String, extra: Value) -> Value {
    let mut s = json!({"id": id, "component": "http-request", "config": {"url": url}});
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            if k == "config" {
                s["config"]
                    .as_object_mut()
                    .unwrap()
                    .extend(v.as_object().unwrap().clone());
            } else {
                s[k] = v;
            }
        }
    }
    s
}

async fn run(dir_name: &str, doc: Value, extra: &[&str]) -> (support::Ran, Value) {
    let dir = support::scratch(dir_name);
    let p = support::write_json(&dir, "p.json", &doc);
    let report = dir.join("report.json");
    let mut args = vec!["--report", report.to_str().unwrap()];
    args.extend_from_slice(extra);
    let ran = support::run_pipeline(&p, &json!({}), &args).await;
    let report = std::fs::read(&report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    (ran, report)
}

#[tokio::test]
async fn connection_resets_are_retried_then_reported_as_connect() {
    // A server that accepts and immediately drops every connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(sock);
        }
    });
    let doc = json!({"name": "reset", "stages": [
        stage("reset", format!("http://{addr}/x"), json!({"retry": {"max_attempts": 3, "delay_seconds": 0.05}}))
    ]});
    let (ran, report) = run("reset", doc, &[]).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "three attempts reached the server"
    );
    assert_eq!(report["stages"][0]["error"]["kind"], "connect");
    assert_eq!(report["stages"][0]["attempts"], 3);
}

#[tokio::test]
async fn malformed_json_is_a_parse_error_and_not_retried() {
    let fake = Fake::start().await;
    fake.route(
        "/broken",
        vec![Reply::raw(200, "application/json", "{\"truncated\": ")],
    );
    let doc = json!({"name": "parse", "stages": [
        stage("parse", fake.url("/broken"), json!({"retry": {"max_attempts": 3, "delay_seconds": 0.01}}))
    ]});
    let (ran, report) = run("parse", doc, &[]).await;
    assert_eq!(ran.code, 1);
    assert_eq!(fake.seen("/broken").len(), 1);
    assert_eq!(report["stages"][0]["error"]["kind"], "parse");
    assert!(
        report["stages"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
}

#[tokio::test]
async fn a_stalled_body_times_out_per_request() {
    let fake = Fake::start().await;
    fake.route(
        "/stall",
        vec![Reply::json(200, json!({"pad": "x".repeat(64)})).stall_body(Duration::from_secs(5))],
    );
    let doc = json!({"name": "stall", "stages": [stage("stall", fake.url("/stall"), json!({"config": {"timeout": 300}}))]});
    let (ran, report) = run("stall", doc, &[]).await;
    assert_eq!(ran.code, 1);
    assert_eq!(report["stages"][0]["error"]["kind"], "timeout");
}

#[tokio::test]
async fn retry_after_of_two_seconds_is_waited() {
    let fake = Fake::start().await;
    fake.route(
        "/limited",
        vec![
            Reply::status(429).header("Retry-After", "2"),
            Reply::json(200, json!({})),
        ],
    );
    let doc = json!({"name": "ra", "stages": [
        stage("ra", fake.url("/limited"), json!({"retry": {"max_attempts": 2, "delay_seconds": 0.01}}))
    ]});
    let (ran, _) = run("retry-after", doc, &[]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let gaps = fake.gaps("/limited");
    assert!(gaps[0] >= Duration::from_secs(2), "{gaps:?}");
}

#[tokio::test]
async fn a_breaker_opens_fails_fast_and_recovers_through_half_open() {
    let fake = Fake::start().await;
    fake.route(
        "/flaky",
        vec![
            Reply::status(503),
            Reply::status(503),
            Reply::status(503),
            Reply::json(200, json!({"ok": true})),
        ],
    );
    fake.route(
        "/pause",
        vec![Reply::json(200, json!({})).delay(Duration::from_millis(1200))],
    );
    let flaky = |id: &str, deps: &[&str]| {
        stage(
            id,
            fake.url("/flaky"),
            json!({"optional": true, "depends_on": deps, "config": {"service": "flaky"}}),
        )
    };
    let doc = json!({
        "name": "breaker",
        "services": {"flaky": {"circuit_breaker": {"failure_threshold": 3, "open_seconds": 1, "half_open_max_calls": 1}}},
        "stages": [
            flaky("f1", &[]), flaky("f2", &["f1"]), flaky("f3", &["f2"]),
            flaky("fast-fail", &["f3"]),
            stage("wait", fake.url("/pause"), json!({"depends_on": ["fast-fail"]})),
            flaky("probe", &["wait"]),
            flaky("after", &["probe"])
        ]
    });
    let (ran, report) = run("breaker", doc, &["--metrics"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let kind = |i: usize| report["stages"][i]["error"]["kind"].clone();
    assert_eq!(
        (kind(0), kind(1), kind(2)),
        (json!("http-5xx"), json!("http-5xx"), json!("http-5xx"))
    );
    assert_eq!(
        kind(3),
        "circuit-open",
        "fails fast once open: {}",
        report["stages"][3]
    );
    assert_eq!(
        report["stages"][5]["status"], "succeeded",
        "the half-open probe succeeds"
    );
    assert_eq!(
        report["stages"][6]["status"], "succeeded",
        "and the circuit is closed again"
    );
    // The server never saw the fast-failed call: 3 failures, the probe, and the one after.
    assert_eq!(fake.seen("/flaky").len(), 5);
    assert!(
        ran.stderr.contains("circuit for service flaky is now open"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr
            .contains("circuit for service flaky is now closed"),
        "{}",
        ran.stderr
    );
    let row = ran
        .stderr
        .lines()
        .find(|l| l.starts_with("flaky "))
        .unwrap_or_else(|| panic!("no metrics row:\n{}", ran.stderr));
    assert!(
        row.contains("circuit-open=1") && row.contains("http-5xx=3") && row.contains("closed"),
        "{row}"
    );
}

#[tokio::test]
async fn a_rate_limit_spreads_parallel_calls_over_time() {
    let fake = Fake::start().await;
    fake.route("/limited", vec![Reply::json(200, json!({}))]);
    let stages: Vec<Value> = (0..10)
        .map(|i| {
            stage(
                &format!("call-{i}"),
                fake.url("/limited"),
                json!({"config": {"service": "limited"}}),
            )
        })
        .collect();
    let doc = json!({"name": "rate", "services": {"limited": {"rate_limit": {"requests_per_second": 5, "burst": 1}}}, "stages": stages});
    let (ran, _) = run("rate-limit", doc, &[]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let seen = fake.seen("/limited");
    assert_eq!(seen.len(), 10);
    let span = seen.last().unwrap().at - seen.first().unwrap().at;
    // Ten calls at 5 per second with a burst of 1 need at least 9 intervals of 200 ms.
    assert!(
        span >= Duration::from_millis(1700),
        "calls were not spread out: {span:?}"
    );
    let min_gap = fake.gaps("/limited").into_iter().min().unwrap();
    assert!(
        min_gap >= Duration::from_millis(150),
        "two calls came together: {min_gap:?}"
    );
}

#[tokio::test]
async fn a_bulkhead_of_two_never_lets_three_calls_be_in_flight() {
    let fake = Fake::start().await;
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_millis(200))],
    );
    let stages: Vec<Value> = (0..6)
        .map(|i| stage(&format!("call-{i}"), fake.url("/slow"), json!({})))
        .collect();
    let service = format!("127.0.0.1:{}", fake.addr.port());
    let doc = json!({"name": "bulkhead", "services": {service: {"max_concurrency": 2}}, "stages": stages});
    let (ran, _) = run("bulkhead", doc, &[]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(fake.seen("/slow").len(), 6);
    assert_eq!(fake.max_in_flight(), 2);
}

#[tokio::test]
async fn invalid_service_policies_are_reported_by_validate() {
    let dir = support::scratch("bad-services");
    let p = support::write_json(
        &dir,
        "p.json",
        &json!({"name": "x", "services": {"a": {"rate_limit": {"requests_per_second": 0}}, "b": {"max_concurency": 2}},
                "stages": [{"id": "s", "component": "logger", "config": {"message": "hi"}}]}),
    );
    let mut cmd = support::fmhost();
    cmd.arg("validate").arg(&p);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2);
    assert!(
        ran.stderr
            .contains("services.a.rate_limit.requests_per_second: must be a positive number"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr
            .contains("services.b.max_concurency: unknown field `max_concurency`, expected one of"),
        "{}",
        ran.stderr
    );
}
