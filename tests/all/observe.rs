//! Seeing runs: a run followed as one OpenTelemetry trace (an in-process OTLP receiver
//! decodes what `fmhost serve` exports, and the fake vendor sees the same ids in
//! `traceparent`), and the pictures `fmhost graph` and `fmhost runs show --timeline` draw.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::{Value, json};

use crate::plugins::plugin_file;
use crate::serve::{Server, pipelines_dir};
use crate::support::{self, Fake, Reply};

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: String,
    id: String,
    parent: String,
    kind: i32,
    attrs: HashMap<String, String>,
    error: bool,
    service: String,
}

/// An OTLP/HTTP receiver on loopback: `POST /v1/traces`, protobuf.
async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| text(&a.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            kept.lock().unwrap().push(Span {
                                name: s.name,
                                trace: hex::encode(&s.trace_id),
                                id: hex::encode(&s.span_id),
                                parent: hex::encode(&s.parent_span_id),
                                kind: s.kind,
                                attrs: s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), text(&a.value)))
                                    .collect(),
                                error: s.status.is_some_and(|st| st.code == 2),
                                service: service.clone(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// A run started with a caller's `traceparent` joins its trace: one span for the run
/// (the caller's child), one per stage, one for the plugin's invocation, one client span
/// per outbound attempt with the HTTP attributes; the vendor received each attempt's
/// own span id. The journal, `runs show` and the timeline name the same run.
#[tokio::test]
async fn a_run_is_one_trace_from_the_caller_to_every_attempt() {
    let (otlp, spans) = receiver().await;
    let fake = Fake::start().await;
    fake.route(
        "/lookup",
        vec![
            Reply::json(503, json!({"error": "busy"})),
            Reply::json(200, json!({"id": 7})),
        ],
    );
    fake.route("/notify", vec![Reply::json(202, json!({"queued": true}))]);
    let dir = support::scratch("observe-otel");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        plugin_file("target/test-plugins", "chaos"),
        plugins.join("chaos.wasm"),
    )
    .unwrap();
    let doc = json!({"name": "traced", "stages": [
        {"id": "lookup", "component": "http-request",
         "config": {"url": fake.url("/lookup")},
         "retry": {"max_attempts": 2, "delay_seconds": 0.01}},
        {"id": "notify", "component": "chaos", "depends_on": ["lookup"],
         "allowed_hosts": [format!("127.0.0.1:{}", fake.addr.port())],
         "config": {"mode": "call", "request": {"method": "POST", "url": fake.url("/notify")}}}
    ]});
    let pipelines = pipelines_dir(&dir, &[("traced.pipeline.json", doc)]);
    let server = Server::start_env(
        &dir,
        &pipelines,
        &plugins,
        &json!({}),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
            ("OTEL_SERVICE_NAME", "fmhost-otel-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let resp = support::api_client()
        .post(format!("{}/v1/pipelines/traced/runs", server.url))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", server.log());
    let report: Value = resp.json().await.unwrap();
    let run_id = report["run_id"].as_str().unwrap().to_string();
    assert_eq!(report["trace"]["trace_id"], caller_trace, "{report}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let got = spans.lock().unwrap().clone();
        if got.len() >= 7 {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "spans received: {got:#?}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(spans.len(), 7, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace == caller_trace), "{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "fmhost-otel-test"));
    let named = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    let run = named("run traced")[0];
    assert_eq!(run.parent, caller_span, "the run joins the caller's span");
    assert_eq!(run.attrs["fmhost.run_id"], run_id);
    assert_eq!(run.attrs["fmhost.run.status"], "succeeded");
    assert_eq!(run.id, report["trace"]["span_id"].as_str().unwrap());
    let lookup = named("stage lookup")[0];
    let notify = named("stage notify")[0];
    assert_eq!(lookup.parent, run.id);
    assert_eq!(notify.parent, run.id);
    assert_eq!(lookup.attrs["fmhost.stage.attempts"], "2");
    let plugin = named("plugin chaos")[0];
    assert_eq!(plugin.parent, notify.id);
    assert_eq!(plugin.attrs["fmhost.plugin.version"], "0.1.0");

    let mut gets = named("GET");
    gets.sort_by_key(|s| s.attrs.get("http.request.resend_count").cloned());
    assert_eq!(gets.len(), 2, "{spans:#?}");
    for g in &gets {
        assert_eq!(g.parent, lookup.id);
        assert_eq!(g.kind, 3, "a client span");
        assert_eq!(g.attrs["url.full"], fake.url("/lookup"));
        assert_eq!(g.attrs["http.request.method"], "GET");
        assert_eq!(g.attrs["server.address"], "127.0.0.1");
    }
    let (first, second) = (gets[0], gets[1]);
    assert_eq!(first.attrs["http.response.status_code"], "503");
    assert!(
        first.error && first.attrs.contains_key("error.type"),
        "{first:?}"
    );
    assert_eq!(second.attrs["http.response.status_code"], "200");
    assert_eq!(second.attrs["http.request.resend_count"], "1");
    let post = named("POST")[0];
    assert_eq!(
        post.parent, plugin.id,
        "a plugin's call is a child of its invocation"
    );
    assert_eq!(post.attrs["http.response.status_code"], "202");

    // The vendor saw each attempt's own span as the parent.
    let sent: Vec<String> = fake
        .seen("/lookup")
        .iter()
        .map(|s| s.header("traceparent").unwrap_or_default().to_string())
        .collect();
    let mut expected: Vec<String> = gets
        .iter()
        .map(|g| format!("00-{caller_trace}-{}-01", g.id))
        .collect();
    let mut sent_sorted = sent.clone();
    sent_sorted.sort();
    expected.sort();
    assert_eq!(sent_sorted, expected);
    assert_eq!(
        fake.seen("/notify")[0].header("traceparent"),
        Some(format!("00-{caller_trace}-{}-01", post.id).as_str())
    );

    // The journal keeps the trace id; the CLI shows it and draws the run.
    let run_json: Value = support::api_client()
        .get(format!("{}/v1/runs/{run_id}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run_json["trace_id"], caller_trace, "{run_json}");
    assert_eq!(run_json["trace"]["parent_span_id"], caller_span);
    let state = dir.join("state");
    let show = support::output({
        let mut c = support::fmhost();
        c.arg("--state").arg(&state).args(["runs", "show", &run_id]);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains(&format!("trace {caller_trace}")), "{text}");
    let timeline = support::output({
        let mut c = support::fmhost();
        c.arg("--state")
            .arg(&state)
            .args(["runs", "show", &run_id, "--timeline"]);
        c
    })
    .await;
    let gantt = String::from_utf8_lossy(&timeline.stdout);
    assert!(timeline.status.success(), "{gantt}");
    assert!(gantt.starts_with("gantt\n"), "{gantt}");
    assert!(gantt.contains("dateFormat x"), "{gantt}");
    let port = fake.addr.port();
    for want in [
        "section lookup".to_string(),
        "lookup (succeeded) :done".to_string(),
        "section notify".to_string(),
        // The service is 127.0.0.1:PORT; a Mermaid task name cannot hold a colon.
        format!("GET 127.0.0.1 {port} try 1 503 :crit"),
        format!("GET 127.0.0.1 {port} try 2 200 :"),
        format!("POST 127.0.0.1 {port} try 1 202 :"),
    ] {
        assert!(gantt.contains(&want), "{want:?} missing in:\n{gantt}");
    }

    // The pipeline as a picture: one edge per dependency, in Mermaid and dot.
    let file = pipelines.join("traced.pipeline.json");
    let graph = |format: &str| {
        let mut c = support::fmhost();
        c.arg("graph")
            .arg(&file)
            .arg("--plugins")
            .arg(&plugins)
            .args(["--format", format]);
        c
    };
    let mermaid = support::output(graph("mermaid")).await;
    let mermaid = String::from_utf8_lossy(&mermaid.stdout);
    assert_eq!(
        mermaid,
        "flowchart TD\n  s0[\"lookup<br/><small>http-request</small>\"]\n  s1[\"notify<br/><small>chaos</small>\"]\n  s0 --> s1\n"
    );
    let dot = support::output(graph("dot")).await;
    let dot = String::from_utf8_lossy(&dot.stdout);
    assert!(dot.starts_with("digraph \"traced\" {"), "{dot}");
    assert!(dot.contains("\"lookup\" -> \"notify\";"), "{dot}");
}

/// Control flow is drawn as such: a loop body inside its box, the branches a
/// conditional chooses as labelled dashed edges rather than plain dependencies.
#[tokio::test]
async fn graphs_draw_branches_and_loop_bodies() {
    let out = support::output({
        let mut c = support::fmhost();
        c.args(["graph", "pipelines/order-intake.pipeline.json"]);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("s1{\"lane<br/><small>conditional</small>\"}"),
        "{text}"
    );
    assert!(text.contains("s1 -.->|true_branch| s2"), "{text}");
    assert!(text.contains("s1 -.->|false_branch| s3"), "{text}");
    assert!(
        !text.contains("s1 --> s2"),
        "a branch is not also a plain edge:\n{text}"
    );
    let out = support::output({
        let mut c = support::fmhost();
        c.args([
            "graph",
            "pipelines/customer-sync.pipeline.json",
            "--format",
            "json",
        ]);
        c
    })
    .await;
    let dag: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dag["blocks"][0]["controller"], "each", "{dag}");
    assert_eq!(dag["blocks"][0]["per_item"], true, "{dag}");
    let enrich = dag["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "enrich")
        .unwrap();
    assert_eq!(enrich["block"], 0, "{dag}");
}
