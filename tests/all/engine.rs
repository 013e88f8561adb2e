//! The engine through the real binary: retries, optional stages, templates, secrets,
//! exit codes, timeouts and cancellation.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Fake, Reply};

fn pipeline(stages: Value) -> Value {
    json!({"name": "t", "version": "1", "stages": stages})
}

fn report(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("report is JSON")
}

#[tokio::test]
async fn retries_back_off_with_growing_gaps_and_honour_retry_after() {
    let fake = Fake::start().await;
    fake.route(
        "/flaky",
        vec![
            Reply::status(503),
            Reply::status(503),
            Reply::json(200, json!({"ok": true})),
        ],
    );
    fake.route(
        "/limited",
        vec![
            Reply::status(429).header("Retry-After", "1"),
            Reply::json(200, json!({"ok": 2})),
        ],
    );
    fake.route(
        "/charge",
        vec![
            Reply::status(503),
            Reply::status(502),
            Reply::json(201, json!({"id": "ch_1"})),
        ],
    );
    let dir = support::scratch("retries");
    let p = support::write_json(
        &dir,
        "p.json",
        &pipeline(json!([
            {"id": "flaky", "component": "http-request", "config": {
                "url": fake.url("/flaky"),
                "retry": {"max_attempts": 3, "delay_seconds": 0.2, "backoff_multiplier": 2}}},
            {"id": "limited", "component": "http-request", "config": {
                "url": fake.url("/limited"),
                "retry": {"max_attempts": 2, "delay_seconds": 0.01, "condition": "{{output.status_code == 429}}"}}},
            {"id": "charge", "component": "http-request", "config": {
                "url": fake.url("/charge"), "method": "POST", "body": {"amount": 100},
                "retry": {"max_attempts": 3, "delay_seconds": 0.05}}}
        ])),
    );
    let report_path = dir.join("report.json");
    let ran =
        support::run_pipeline(&p, &json!({}), &["--report", report_path.to_str().unwrap()]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);

    let gaps = fake.gaps("/flaky");
    assert_eq!(gaps.len(), 2, "three attempts");
    assert!(gaps[0] >= Duration::from_millis(200), "first gap {gaps:?}");
    assert!(gaps[1] > gaps[0], "gaps grow: {gaps:?}");

    let gaps = fake.gaps("/limited");
    assert!(
        gaps[0] >= Duration::from_secs(1),
        "Retry-After: 1 honoured, gap {gaps:?}"
    );

    let charges = fake.seen("/charge");
    assert_eq!(charges.len(), 3);
    assert!(charges.iter().all(|c| c.method == axum::http::Method::POST));
    let keys: Vec<_> = charges
        .iter()
        .map(|s| s.header("idempotency-key").expect("key sent").to_string())
        .collect();
    assert!(
        keys.iter().all(|k| k == &keys[0]),
        "one key across attempts: {keys:?}"
    );
    assert_eq!(charges[0].body.as_ref(), br#"{"amount":100}"#);
    assert!(
        charges[0]
            .header("x-correlation-id")
            .is_some_and(|c| c.starts_with("run_"))
    );

    let r = report(&report_path);
    assert_eq!(r["stages"][0]["attempts"], 3);
    assert_eq!(r["stages"][1]["attempts"], 2);
    assert_eq!(r["stages"][2]["output"]["status_code"], 201);
}

#[tokio::test]
async fn a_failed_stage_fails_the_run_naming_stage_attempts_and_error() {
    let fake = Fake::start().await;
    fake.route("/down", vec![Reply::status(503)]);
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_millis(300))],
    );
    let dir = support::scratch("failing");
    let p = support::write_json(
        &dir,
        "p.json",
        &pipeline(json!([
            // Only 429 is retried here, so a 503 fails at once.
            {"id": "fetch-stripe", "component": "http-request", "config": {
                "url": fake.url("/down"),
                "retry": {"max_attempts": 3, "delay_seconds": 0.01, "condition": "{{output.status_code == 429}}"}}},
            {"id": "fetch-other", "component": "http-request", "config": {"url": fake.url("/slow")}},
            {"id": "after", "component": "logger", "depends_on": ["fetch-stripe", "fetch-other"], "config": {"message": "never"}}
        ])),
    );
    let report_path = dir.join("report.json");
    let ran =
        support::run_pipeline(&p, &json!({}), &["--report", report_path.to_str().unwrap()]).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert_eq!(ran.stdout, "");
    assert_eq!(fake.seen("/down").len(), 1);
    assert!(
        ran.stderr
            .contains("stage \"fetch-stripe\" failed after 1 attempt: http-5xx: GET"),
        "{}",
        ran.stderr
    );
    assert!(ran.stderr.contains("http 503"), "{}", ran.stderr);
    let r = report(&report_path);
    assert_eq!(r["status"], "failed");
    // The stage already running finished; the dependent was skipped.
    assert_eq!(r["stages"][1]["status"], "succeeded");
    assert_eq!(r["stages"][2]["status"], "skipped");
    assert_eq!(r["stages"][0]["error"]["kind"], "http-5xx");
    assert_eq!(r["stages"][0]["error"]["status"], 503);
}

#[tokio::test]
async fn an_optional_failure_yields_null_and_dependents_still_run() {
    let fake = Fake::start().await;
    fake.route(
        "/ok",
        vec![Reply::json(
            200,
            json!({"n": 7, "items": [{"id": "a"}, {"id": "b"}]}),
        )],
    );
    fake.route("/broken", vec![Reply::status(500)]);
    let dir = support::scratch("optional");
    let p = support::write_json(
        &dir,
        "p.json",
        &pipeline(json!([
            {"id": "fetch-ok", "component": "http-request", "config": {"url": fake.url("/ok")}},
            {"id": "fetch-broken", "component": "http-request", "optional": true, "config": {"url": fake.url("/broken")}},
            {"id": "merge", "component": "schema-validate", "depends_on": ["fetch-ok", "fetch-broken"], "config": {
                "data": {
                    "n": "{{stages.fetch-ok.output.body.n}}",
                    "first": "{{stages.fetch-ok.output.body.items[0].id}}",
                    "all": "{{stages.fetch-ok.output.body.items}}",
                    "label": "n={{stages.fetch-ok.output.body.n}} items={{stages.fetch-ok.output.body.items | length}}",
                    "broken": "{{stages.fetch-broken.output}}",
                    "broken_kind": "{{stages.fetch-broken.error.kind}}",
                    "fallback": "{{stages.fetch-broken.output.body | default('unavailable')}}"
                },
                "schema": {"type": "object"}}}
        ])),
    );
    let ran = support::run_pipeline(&p, &json!({}), &[]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(
        ran.json(),
        json!({
            "n": 7, "first": "a", "all": [{"id": "a"}, {"id": "b"}], "label": "n=7 items=2",
            "broken": null, "broken_kind": "http-5xx", "fallback": "unavailable"
        })
    );
    assert!(
        ran.stderr.contains("fetch-broken: failed"),
        "{}",
        ran.stderr
    );
}

#[tokio::test]
async fn a_missing_reference_fails_naming_stage_and_path() {
    let fake = Fake::start().await;
    fake.route("/ok", vec![Reply::json(200, json!({"body_field": 1}))]);
    let dir = support::scratch("missing-ref");
    let p = support::write_json(
        &dir,
        "p.json",
        &pipeline(json!([
            {"id": "fetch-salesforce", "component": "http-request", "config": {"url": fake.url("/ok")}},
            {"id": "use-it", "component": "logger", "depends_on": ["fetch-salesforce"],
             "config": {"message": "{{stages.fetch-salesforce.output.body.Name}}"}}
        ])),
    );
    let ran = support::run_pipeline(&p, &json!({}), &[]).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("stage \"use-it\" failed"),
        "{}",
        ran.stderr
    );
    assert!(ran.stderr.contains("config.message"), "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains("`stages.fetch-salesforce.output.body` has no field `Name`"),
        "{}",
        ran.stderr
    );
}

#[tokio::test]
async fn secrets_reach_the_upstream_but_never_logs_errors_or_output() {
    let fake = Fake::start().await;
    let secret = "sk_live_9f8e7d6c5b4a";
    // An upstream that echoes the credential back, and one that fails mentioning it.
    fake.route(
        "/echo",
        vec![Reply::json(
            200,
            json!({"you_sent": format!("Bearer {secret}")}),
        )],
    );
    fake.route(
        "/fail",
        vec![Reply::json(
            401,
            json!({"error": format!("bad key {secret}")}),
        )],
    );
    let dir = support::scratch("secrets");
    let p = support::write_json(
        &dir,
        "p.json",
        &pipeline(json!([
            {"id": "echo", "component": "http-request", "config": {
                "url": format!("{}?key={{{{secrets.API_KEY}}}}", fake.url("/echo")),
                "headers": {"Authorization": "Bearer {{secrets.API_KEY}}"}}},
            {"id": "fail", "component": "http-request", "optional": true, "config": {
                "url": fake.url("/fail"), "headers": {"Authorization": "Bearer {{secrets.API_KEY}}"}}},
            {"id": "log", "component": "logger", "depends_on": ["echo", "fail"], "config": {"message": "key is {{secrets.API_KEY}}"}}
        ])),
    );
    let mut cmd = support::fmhost();
    cmd.env("FMHOST_SECRET_API_KEY", secret)
        .args(["--log-format", "json", "run"])
        .arg(&p);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(
        fake.seen("/echo")[0].header("authorization"),
        Some(format!("Bearer {secret}").as_str())
    );
    assert_eq!(fake.seen("/echo")[0].query, format!("key={secret}"));
    assert!(
        !ran.stdout.contains(secret),
        "stdout leaks:\n{}",
        ran.stdout
    );
    assert!(
        !ran.stderr.contains(secret),
        "stderr leaks:\n{}",
        ran.stderr
    );
    assert!(ran.stdout.contains("Bearer ***"));
    // The JSON log has one line per outbound call with the redacted URL.
    let calls: Vec<Value> = ran
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "fmhost::http")
        .collect();
    assert_eq!(calls.len(), 2, "{}", ran.stderr);
    let echo = calls.iter().find(|c| c["stage"] == "echo").unwrap();
    assert_eq!(echo["url"], format!("{}?key=***", fake.url("/echo")));
    assert_eq!(echo["status"], 200);
    assert!(echo["run_id"].as_str().unwrap().starts_with("run_"));
}

#[tokio::test]
async fn timeouts_stage_run_and_stalled_body() {
    let fake = Fake::start().await;
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_secs(5))],
    );
    fake.route(
        "/stall",
        vec![Reply::json(200, json!({"long": "x".repeat(100)})).stall_body(Duration::from_secs(5))],
    );
    let dir = support::scratch("timeouts");
    let one = |id: &str, path: &str, extra: Value| {
        let mut stage =
            json!({"id": id, "component": "http-request", "config": {"url": fake.url(path)}});
        stage
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        support::write_json(&dir, &format!("{id}.json"), &pipeline(json!([stage])))
    };
    let per_request = one(
        "per-request",
        "/slow",
        json!({"config": {"url": fake.url("/slow"), "timeout": 200}}),
    );
    let ran = support::run_pipeline(&per_request, &json!({}), &[]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.stderr.contains("timeout: GET") && ran.stderr.contains("timed out after 200 ms"),
        "{}",
        ran.stderr
    );

    let stage_timeout = one("stage", "/stall", json!({"timeout": "300ms"}));
    let ran = support::run_pipeline(&stage_timeout, &json!({}), &[]).await;
    assert_eq!(ran.code, 1);
    assert!(ran.stderr.contains("timed out"), "{}", ran.stderr);

    let run_timeout = one("run", "/slow", json!({}));
    let ran = support::run_pipeline(&run_timeout, &json!({}), &["--timeout", "300ms"]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.stderr.contains("run timed out after 300ms"),
        "{}",
        ran.stderr
    );
}

#[tokio::test]
async fn ctrl_c_cancels_the_run_cleanly() {
    let fake = Fake::start().await;
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_secs(10))],
    );
    let dir = support::scratch("ctrl-c");
    let p = support::write_json(
        &dir,
        "p.json",
        &pipeline(
            json!([{"id": "wait", "component": "http-request", "config": {"url": fake.url("/slow")}}]),
        ),
    );
    let mut cmd = support::fmhost();
    cmd.arg("run")
        .arg(&p)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Interrupt once the request is in flight, as seen by the server.
    for _ in 0..100 {
        if !fake.seen("/slow").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.seen("/slow").len(), 1);
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let ran: support::Ran = out.into();
    assert_eq!(ran.code, 130, "{}", ran.stderr);
    assert!(ran.stderr.contains("run cancelled"), "{}", ran.stderr);
}

#[tokio::test]
async fn bad_input_and_usage_exit_2() {
    let dir = support::scratch("bad-input");
    let p = support::root().join("pipelines/parallel-fetch.pipeline.json");
    let ran = support::run_pipeline(&p, &json!({"customer_id": "nope"}), &[]).await;
    assert_eq!(ran.code, 2);
    assert!(
        ran.stderr.contains("/customer_id") && ran.stderr.contains("(root)"),
        "{}",
        ran.stderr
    );

    let bad = dir.join("input.json");
    std::fs::write(&bad, "{\"a\": ").unwrap();
    let mut cmd = support::fmhost();
    cmd.arg("run").arg(&p).arg("--input").arg(&bad);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2);
    assert!(ran.stderr.contains("input.json:1:"), "{}", ran.stderr);

    let mut cmd = support::fmhost();
    cmd.args(["run", "--no-such-flag"]);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2);
}
