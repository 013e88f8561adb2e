//! Secrets stay secret on every path a run's data takes: text that looks like a secret
//! reference is sent as the text it is (a run, replays from every stage through the CLI
//! and the API, a DLQ retry, a webhook, a shadow run), and a credential an upstream
//! echoes back is masked in every output a run produces.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};

use crate::plugins::plugin_file;
use crate::serve::{Server, get_json, pipelines_dir};
use crate::support::{self, Fake, Reply};

const TOKEN: &str = "tok-4f9a1c27e8d3b6a5";
const STRIPE: &str = "sk_test_51HxQ9LmNoPqRsTuVwXyZ";
const HOOK: &str = "hook-signing-7d1e0c9b55";

/// Every form a secret may take on the wire: itself, percent-encoded, base64 (standard
/// and URL-safe, with and without padding) and JSON-escaped.
fn forms(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_string()];
    let pct: String = secret
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    out.push(pct);
    for e in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        let b = e.encode(secret);
        out.push(b.trim_end_matches('=').to_string());
    }
    let js = Value::String(secret.into()).to_string();
    out.push(js[1..js.len() - 1].to_string());
    out.sort();
    out.dedup();
    out
}

/// Panics naming `what` when `text` holds any form of any of `secrets`.
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        for f in forms(s) {
            assert!(
                !text.contains(&f),
                "{what} holds a secret ({f}):\n{}",
                &text[..text.len().min(4000)]
            );
        }
    }
}

/// Strings that look like secret references in every way the generator knows: any
/// name, spacing, escapes (`{{!`), filters, missing or doubled braces, nested, repeated,
/// at the start, in the middle or at the end, beside the values' own fragments.
fn reference_like() -> impl Strategy<Value = String> {
    use proptest::sample::select;
    let name = select(vec![
        "TOKEN",
        "STRIPE_SECRET_KEY",
        "SINK_URL",
        "HOOK",
        "NOPE",
        "TOKEN}}",
    ]);
    let open = select(vec![
        "{{", "{{ ", "{{  ", "{{!", "{{!!", "{{{{", "{ {", "{{!{{", "{{\t",
    ]);
    let close = select(vec![
        "}}",
        " }}",
        "}",
        "",
        " | upper}}",
        " | default('x')}}",
        "}}}}",
        " ~ secrets.TOKEN}}",
        "}}{{secrets.STRIPE_SECRET_KEY}}",
    ]);
    let around = select(vec![
        "", "hi ", " post", "tok-", "sk_", "é ", "%7B%7B", "\\\"", "a/b?c=d&", "{{", "}}",
    ]);
    let piece = (around.clone(), open, name, close, around)
        .prop_map(|(a, o, n, c, z)| format!("{a}{o}secrets.{n}{c}{z}"));
    proptest::collection::vec(piece, 1..4).prop_map(|parts| parts.concat())
}

/// `n` generated strings, from `PROPTEST_RNG_SEED` when set (`cargo xtask fuzz` sets it
/// per round), else a fixed seed.
fn generated(n: usize) -> Vec<String> {
    let seed: u64 = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5ec7e75);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let strategy = reference_like();
    let mut out = vec![
        // The issue's own case, and the journal's escape written as data.
        "hi {{secrets.STRIPE_SECRET_KEY}}".to_string(),
        "{{!secrets.TOKEN}} and {{!!secrets.TOKEN}}".to_string(),
    ];
    while out.len() < n {
        out.push(strategy.new_tree(&mut runner).unwrap().current());
    }
    out
}

fn forward_pipeline(record: bool) -> Value {
    json!({
        "name": "forward",
        "record": record,
        "triggers": [{"type": "webhook", "path": "/hooks/forward", "secret": "{{secrets.HOOK}}", "signature": "github"}],
        "stages": [
            {"id": "forward", "component": "http-request", "config": {
                "url": "{{secrets.SINK_URL}}/a", "method": "POST",
                "headers": {"Authorization": "Bearer {{secrets.TOKEN}}", "X-Note": "{{input.note}}"},
                "body": {"items": "{{input.items}}", "note": "pre {{input.note}} post"}}},
            {"id": "shape", "component": "json-transform", "depends_on": ["forward"], "config": {
                "expression": "body.body", "data": "{{stages.forward.output}}"}},
            {"id": "again", "component": "http-request", "depends_on": ["shape"], "config": {
                "url": "{{secrets.SINK_URL}}/b", "method": "POST",
                "query_params": {"q": "{{input.note}}"},
                "body": {"echo": "{{stages.shape.output}}", "items": "{{input.items}}"}}}
        ]
    })
}

/// What the upstream must have been sent: the items as the caller wrote them.
fn check_upstream(fake: &Fake, input: &Value, secrets: &[&str]) -> usize {
    let seen = fake.all_seen();
    for s in &seen {
        let where_ = format!("{} {}", s.method, s.path);
        assert_clean(
            &format!("{where_} body"),
            &String::from_utf8_lossy(&s.body),
            secrets,
        );
        assert_clean(&format!("{where_} query"), &s.query, secrets);
        for (k, v) in &s.headers {
            let v = String::from_utf8_lossy(v.as_bytes());
            if k == "authorization" {
                assert_eq!(v, format!("Bearer {TOKEN}"), "{where_}");
            } else {
                assert_clean(&format!("{where_} header {k}"), &v, secrets);
            }
        }
        let body: Value = serde_json::from_slice(&s.body).unwrap_or(Value::Null);
        assert_eq!(
            body["items"], input["items"],
            "{where_}: the items went out as written"
        );
        if s.path == "/a" {
            assert_eq!(
                body["note"],
                json!(format!("pre {} post", input["note"].as_str().unwrap())),
                "{where_}"
            );
        }
    }
    seen.len()
}

/// The property, over `PROPTEST_CASES` generated strings (64 unless set, at most 2,000)
/// carried in one input: no path hands a secret to an upstream or to an output.
#[tokio::test]
async fn data_that_looks_like_a_secret_reference_stays_text_on_every_path() {
    let cases: usize = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
        .clamp(4, 2000);
    let strings = generated(cases);
    let note = strings
        .iter()
        .find(|s| s.is_ascii() && !s.contains(['\t', '\\']))
        .cloned()
        .unwrap_or_else(|| "{{secrets.TOKEN}}".into());
    let input = json!({"items": strings, "note": note});
    let fake = Fake::start().await;
    let sink = fake.url("");
    let secret_values = [TOKEN, STRIPE, HOOK, sink.as_str()];
    let secrets =
        json!({"TOKEN": TOKEN, "STRIPE_SECRET_KEY": STRIPE, "HOOK": HOOK, "SINK_URL": sink});
    let dir = support::scratch("secrecy-property");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let transform = plugins.join("json-transform.wasm");
    std::fs::copy(plugin_file("target/plugins", "json-transform"), &transform).unwrap();
    let mut outputs: Vec<(String, String)> = Vec::new();

    // The CLI: a run that fails at its last stage, replays from nowhere and every
    // stage, a DLQ retry, and a shadow of the transform over the recorded runs.
    fake.route("/a", vec![Reply::echo()]);
    fake.route("/b", vec![Reply::status(500), Reply::echo()]);
    let pipeline = support::write_json(&dir, "forward.json", &forward_pipeline(true));
    let secrets_file = support::write_json(&dir, "secrets.json", &secrets);
    let state = dir.join("cli-state");
    let cli = |args: Vec<String>| {
        let mut cmd = support::fmhost();
        cmd.arg("--state")
            .arg(&state)
            .env("FMHOST_CACHE_DIR", dir.join("cache"))
            .args(args);
        support::output(cmd)
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let input_file = support::write_json(&dir, "input.json", &input);
    let common = |mut v: Vec<String>| {
        v.extend(s(&["--secrets", &secrets_file.display().to_string()]));
        v
    };
    let first: support::Ran = cli(common(s(&[
        "run",
        &pipeline.display().to_string(),
        "--input",
        &input_file.display().to_string(),
    ])))
    .await
    .into();
    assert_eq!(
        first.code, 1,
        "the first run fails at `again`: {}",
        first.stderr
    );
    outputs.push(("fmhost run".into(), first.stdout + &first.stderr));
    let listed: support::Ran = cli(s(&["runs", "list", "--json"])).await.into();
    let run_id = listed.json()[0]["run_id"].as_str().unwrap().to_string();
    let dlq: support::Ran = cli(s(&["dlq", "list", "--json"])).await.into();
    let entry = dlq.json()[0]["id"]
        .as_i64()
        .expect("the failed run is dead-lettered");
    // Replays and retries take the run's own secrets file and plugin directories.
    let retried: support::Ran = cli(s(&["dlq", "retry", &entry.to_string()])).await.into();
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    outputs.push(("fmhost dlq retry".into(), retried.stdout + &retried.stderr));
    for from in [None, Some("forward"), Some("shape"), Some("again")] {
        let mut args = s(&["replay", &run_id]);
        if let Some(f) = from {
            args.extend(s(&["--from", f]));
        }
        let ran: support::Ran = cli(args).await.into();
        assert_eq!(ran.code, 0, "replay --from {from:?}: {}", ran.stderr);
        outputs.push((
            format!("fmhost replay --from {from:?}"),
            ran.stdout + &ran.stderr,
        ));
    }
    let shown: support::Ran = cli(s(&["runs", "show", &run_id, "--json"])).await.into();
    outputs.push(("fmhost runs show".into(), shown.stdout + &shown.stderr));
    let sent = fake.all_seen().len();
    let shadow: support::Ran = cli(s(&[
        "plugins",
        "test",
        &transform.display().to_string(),
        "--pipeline",
        "forward",
        "--json",
    ]))
    .await
    .into();
    assert!(shadow.stdout.contains("\"verdict\""), "{}", shadow.stderr);
    outputs.push(("fmhost plugins test".into(), shadow.stdout + &shadow.stderr));
    assert_eq!(fake.all_seen().len(), sent, "a shadow run sends nothing");
    let cli_requests = check_upstream(&fake, &input, &secret_values);
    // The run (2 requests), the retry (1: `again`), the replays (1, 2, 1, 1).
    assert_eq!(
        cli_requests,
        8,
        "{:?}",
        fake.all_seen().iter().map(|s| &s.path).collect::<Vec<_>>()
    );

    // The API: the same, against `fmhost serve`, and a signed webhook.
    fake.route("/b", vec![Reply::status(500), Reply::echo()]);
    let pipelines = pipelines_dir(&dir, &[("forward.json", forward_pipeline(true))]);
    let server = Server::start(&dir, &pipelines, &plugins, &secrets);
    let client = support::api_client();
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    };
    let (status, body) = answer(
        client
            .post(format!("{}/v1/pipelines/forward/runs", server.url))
            .json(&input)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    let run_id = serde_json::from_str::<Value>(&body).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    outputs.push(("POST /v1/pipelines/forward/runs".into(), body));
    let dlq = get_json(&client, format!("{}/v1/dlq", server.url)).await;
    let entry = dlq[0]["id"].as_i64().expect("dead-lettered");
    outputs.push(("GET /v1/dlq".into(), dlq.to_string()));
    let (status, body) = answer(
        client
            .post(format!("{}/v1/dlq/{entry}/retry", server.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    outputs.push(("POST /v1/dlq/retry".into(), body));
    for from in ["", "?from=forward", "?from=shape", "?from=again"] {
        let (status, body) = answer(
            client
                .post(format!("{}/v1/runs/{run_id}/replay{from}", server.url))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "replay{from}: {body}");
        outputs.push((format!("POST replay{from}"), body));
    }
    let payload = input.to_string();
    let (status, body) = answer(
        client
            .post(format!("{}/hooks/forward", server.url))
            .header("X-GitHub-Delivery", "evt-secrecy-1")
            .header(
                "X-Hub-Signature-256",
                fmhost::serve::webhooks::github_signature(HOOK, payload.as_bytes()),
            )
            .body(payload)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let hook_run = serde_json::from_str::<Value>(&body).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    outputs.push(("POST /hooks/forward".into(), body));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = get_json(&client, format!("{}/v1/runs/{hook_run}", server.url)).await;
        if run["status"] == "succeeded" {
            outputs.push(("GET /v1/runs/{webhook run}".into(), run.to_string()));
            break;
        }
        assert!(Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = fake.all_seen().len();
    let wasm = std::fs::read(&transform).unwrap();
    let (status, body) = answer(
        client
            .post(format!(
                "{}/v1/plugins/json-transform/shadow?pipeline=forward",
                server.url
            ))
            .body(wasm)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    outputs.push(("POST shadow".into(), body));
    assert_eq!(fake.all_seen().len(), sent, "a shadow run sends nothing");
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    outputs.push(("/metrics".into(), metrics));
    let all = check_upstream(&fake, &input, &secret_values);
    // After the CLI's: the run (2), the retry (1), the replays (5), the webhook (2).
    assert_eq!(all - cli_requests, 10);
    drop(server);
    outputs.push((
        "server log".into(),
        std::fs::read_to_string(dir.join("server.log")).unwrap(),
    ));
    for (what, text) in &outputs {
        assert_clean(what, text, &secret_values);
    }
}

/// An OTLP receiver that keeps every request body as bytes.
async fn raw_receiver() -> (String, Arc<Mutex<Vec<u8>>>) {
    let got: Arc<Mutex<Vec<u8>>> = Arc::default();
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().extend_from_slice(&body);
                [("content-type", "application/x-protobuf")]
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

/// Every file in `dir` (a file removed meanwhile, as a WAL is at close, is skipped),
/// and the PostgreSQL journal's rows when the tests run with one.
fn read_all(dir: &Path) -> String {
    let mut out = String::new();
    // With the journal in PostgreSQL, a CLI run may leave no state directory at all.
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        if let Ok(bytes) = std::fs::read(&p) {
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    if support::postgres_journal().is_some() {
        out.push_str(&String::from_utf8_lossy(&support::journal_text(dir)));
    }
    out
}

/// An upstream that echoes the credential it was sent (raw, and base64 and
/// percent-encoded in its body): the value is in no output of the run, neither the
/// CLI's stdout, stderr, `--report` and `--metrics` nor its journal, recording, OTLP
/// spans, nor the server's synchronous answer, run record, webhook answer and log.
#[tokio::test]
async fn a_credential_an_upstream_echoes_is_masked_in_every_output() {
    let fake = Fake::start().await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(TOKEN);
    fake.route("/echo", vec![Reply::echo()]);
    fake.route(
        "/encoded",
        vec![Reply::json(
            200,
            json!({"basic": format!("Basic {b64}"), "link": format!("https://x/?t={}", TOKEN.replace('-', "%2D")),
                   "nested": {"k": [TOKEN]}}),
        )],
    );
    let doc = json!({
        "name": "echo", "record": true,
        "triggers": [{"type": "webhook", "path": "/hooks/echo", "secret": "{{secrets.HOOK}}", "signature": "github"}],
        "stages": [
            {"id": "call", "component": "http-request", "config": {
                "url": fake.url("/echo"), "headers": {"Authorization": "Bearer {{secrets.TOKEN}}"}}},
            {"id": "encoded", "component": "http-request", "config": {
                "url": fake.url("/encoded"), "query_params": {"api_key": "{{secrets.TOKEN}}"}}},
            {"id": "fail", "component": "http-request", "optional": true, "depends_on": ["encoded"], "config": {
                "url": fake.url("/missing"), "headers": {"Authorization": "Bearer {{secrets.TOKEN}}"}}}
        ]
    });
    let secrets = json!({"TOKEN": TOKEN, "HOOK": HOOK});
    let dir = support::scratch("secrecy-echo");
    let pipeline = support::write_json(&dir, "echo.json", &doc);
    let secrets_file = support::write_json(&dir, "secrets.json", &secrets);
    let state = dir.join("state");
    let report = dir.join("report.json");
    let (otlp, spans) = raw_receiver().await;
    let mut cmd = support::fmhost();
    cmd.arg("--state")
        .arg(&state)
        .arg("run")
        .arg(&pipeline)
        .arg("--secrets")
        .arg(&secrets_file)
        .arg("--report")
        .arg(&report)
        .arg("--metrics")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let out = ran.json();
    assert_eq!(
        out["call"]["body"]["headers"]["authorization"], "Bearer ***",
        "the echo is there, masked: {out}"
    );
    let report_text = std::fs::read_to_string(&report).unwrap();
    let journal = read_all(&state);
    let listed: support::Ran = {
        let mut c = support::fmhost();
        c.arg("--state")
            .arg(&state)
            .args(["runs", "list", "--json"]);
        support::output(c).await.into()
    };
    let run_id = listed.json()[0]["run_id"].as_str().unwrap().to_string();
    let recorded_dir = dir.join("recorded");
    let recorded: support::Ran = {
        let mut c = support::fmhost();
        c.arg("--state")
            .arg(&state)
            .args(["record", &run_id, "--out"])
            .arg(&recorded_dir);
        support::output(c).await.into()
    };
    assert_eq!(recorded.code, 0, "{}", recorded.stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while spans.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no spans were exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pipelines = pipelines_dir(&dir, &[("echo.json", doc.clone())]);
    let server = Server::start_env(
        &dir,
        &pipelines,
        &dir.join("no-plugins"),
        &secrets,
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str())],
    );
    let client = support::api_client();
    let sync = client
        .post(format!("{}/v1/pipelines/echo/runs", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(sync.status(), 200);
    let sync: Value = sync.json().await.unwrap();
    let api_run = sync["run_id"].as_str().unwrap();
    let stored = get_json(&client, format!("{}/v1/runs/{api_run}", server.url)).await;
    let payload = "{}";
    let hook = client
        .post(format!("{}/hooks/echo", server.url))
        .header("X-GitHub-Delivery", "evt-echo-1")
        .header(
            "X-Hub-Signature-256",
            fmhost::serve::webhooks::github_signature(HOOK, payload.as_bytes()),
        )
        .body(payload)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hook_run = serde_json::from_str::<Value>(&hook).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let hook_record = loop {
        let run = get_json(&client, format!("{}/v1/runs/{hook_run}", server.url)).await;
        if run["status"] == "succeeded" {
            break run;
        }
        assert!(Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(server);
    let server_journal = read_all(&dir.join("state"));
    let spans = String::from_utf8_lossy(&spans.lock().unwrap()).into_owned();
    for (what, text) in [
        ("stdout", ran.stdout.as_str()),
        ("stderr (with --metrics)", ran.stderr.as_str()),
        ("--report", report_text.as_str()),
        ("the CLI's journal", journal.as_str()),
        ("fmhost record", read_all(&recorded_dir).as_str()),
        ("OTLP spans", spans.as_str()),
        ("the sync answer", sync.to_string().as_str()),
        ("GET /v1/runs", stored.to_string().as_str()),
        ("the webhook answer", hook.as_str()),
        ("the webhook's run", hook_record.to_string().as_str()),
        ("the server's journal", server_journal.as_str()),
        (
            "the server log",
            std::fs::read_to_string(dir.join("server.log"))
                .unwrap()
                .as_str(),
        ),
    ] {
        assert_clean(what, text, &[TOKEN, HOOK]);
    }
    // The upstream did get the credential where the pipeline put it.
    assert_eq!(
        fake.seen("/echo")[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}
