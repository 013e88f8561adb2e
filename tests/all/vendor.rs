//! Vendor API realities the host handles for every stage and plugin: service auth
//! (OAuth2 with single-flight refresh, API keys, bound to the service's origin),
//! pagination, a response cache with stale-if-error, request budgets and rate-limit
//! headroom. Against fake vendors on 127.0.0.1, through the library's engine (one
//! process, so token and cache state lives across runs) and the real binary.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fmhost::component::Registry;
use fmhost::engine::{Engine, RunOptions, RunReport};
use fmhost::secrets::Secrets;
use serde_json::{Value, json};

use crate::support::{self, Fake, Reply};

fn engine(secrets: &[(&str, String)]) -> Engine {
    Engine::new(Secrets::from_pairs(
        secrets.iter().map(|(k, v)| (k.to_string(), v.clone())),
    ))
}

async fn run(engine: &Engine, dir: &Path, doc: &Value, input: Value) -> RunReport {
    let path = support::write_json(dir, "p.pipeline.json", doc);
    let plan =
        fmhost::pipeline::load(&path, &Registry::builtins()).unwrap_or_else(|e| panic!("{e}"));
    engine
        .run(Arc::new(plan), input, RunOptions::default())
        .await
        .unwrap()
}

fn token_reply(n: u32, expires_in: u64) -> Reply {
    Reply::json(
        200,
        json!({"access_token": format!("tok-{n}-0123456789"), "token_type": "Bearer", "expires_in": expires_in}),
    )
}

/// OAuth2 client credentials: 32 concurrent calls share one token request; an expired
/// token is fetched again exactly once; a 401 renews it once and the call succeeds. The
/// token goes to the service's origin only, and never into a report.
#[tokio::test]
async fn oauth2_tokens_are_fetched_once_renewed_on_expiry_and_on_401() {
    let fake = Fake::start().await;
    let other = Fake::start().await;
    fake.route("/oauth/token", (1..=9).map(|n| token_reply(n, 2)).collect());
    fake.route("/data/x", vec![Reply::json(200, json!({"ok": true}))]);
    other.route("/elsewhere", vec![Reply::json(200, json!({}))]);
    let dir = support::scratch("vendor-oauth2");
    let services = json!({"crm": {
        "base_url": "{{secrets.CRM_URL}}",
        "auth": {"type": "oauth2_client_credentials", "token_url": "{{secrets.CRM_TOKEN_URL}}",
                 "client_id": "{{secrets.CRM_ID}}", "client_secret": "{{secrets.CRM_SECRET}}", "scope": "api"}}});
    let many: Vec<Value> = (0..32)
        .map(|i| {
            json!({"id": format!("s{i}"), "component": "http-request",
                        "config": {"service": "crm", "url": "/data/x"}})
        })
        .collect();
    let doc = json!({"name": "crm", "services": services, "stages": many});
    let e = engine(&[
        ("CRM_URL", fake.url("")),
        ("CRM_TOKEN_URL", fake.url("/oauth/token")),
        ("CRM_ID", "client-1".into()),
        ("CRM_SECRET", "shh-secret-value".into()),
    ]);
    let report = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    let tokens = fake.seen("/oauth/token");
    assert_eq!(tokens.len(), 1, "32 concurrent calls, one token request");
    let form = String::from_utf8_lossy(&tokens[0].body).to_string();
    for part in [
        "grant_type=client_credentials",
        "client_id=client-1",
        "client_secret=shh-secret-value",
        "scope=api",
    ] {
        assert!(form.contains(part), "{form}");
    }
    let calls = fake.seen("/data/x");
    assert_eq!(calls.len(), 32);
    assert!(
        calls
            .iter()
            .all(|c| c.header("authorization") == Some("Bearer tok-1-0123456789"))
    );
    let text = serde_json::to_string(&report).unwrap();
    assert!(!text.contains("tok-1-0123456789"), "no token in the report");

    // Expired: exactly one refresh for all 32.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let report = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    assert_eq!(
        fake.seen("/oauth/token").len(),
        2,
        "one refresh after expiry"
    );

    // A 401: one refresh and the call succeeds; another origin gets no credential.
    fake.route(
        "/data/once",
        vec![
            Reply::json(401, json!({"error": "expired"})),
            Reply::json(200, json!({"ok": 1})),
        ],
    );
    let doc = json!({"name": "crm", "services": services, "stages": [
        {"id": "a", "component": "http-request", "config": {"service": "crm", "url": "/data/once"}},
        {"id": "b", "component": "http-request", "config": {"service": "crm", "url": other.url("/elsewhere")}}]});
    let report = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    assert_eq!(
        fake.seen("/oauth/token").len(),
        3,
        "one refresh for the 401"
    );
    let once = fake.seen("/data/once");
    assert_eq!(once.len(), 2);
    assert_eq!(
        once[0].header("authorization"),
        Some("Bearer tok-2-0123456789")
    );
    assert_eq!(
        once[1].header("authorization"),
        Some("Bearer tok-3-0123456789")
    );
    assert_eq!(
        report.stage("a").unwrap().output.as_deref().unwrap()["body"],
        json!({"ok": 1})
    );
    assert_eq!(
        other.seen("/elsewhere")[0].header("authorization"),
        None,
        "credentials stay on the service's origin"
    );
}

/// API keys in a query parameter and basic auth: attached by the host, masked in every
/// URL the report shows, and attached to a plugin-less built-in and a plugin alike
/// (the plugin's call is matched to the service by its origin).
#[tokio::test]
async fn api_keys_and_basic_auth_are_attached_and_masked() {
    let fake = Fake::start().await;
    fake.route("/v1/things", vec![Reply::json(200, json!({"n": 1}))]);
    let dir = support::scratch("vendor-apikey");
    let doc = json!({"name": "keys",
        "services": {
            "things": {"base_url": fake.url("/v1"),
                       "auth": {"type": "api_key", "query": "key", "value": "{{secrets.THINGS_KEY}}"}}},
        "stages": [{"id": "get", "component": "http-request",
                    "config": {"service": "things", "url": "/things", "query_params": {"limit": 5}}}]});
    let e = engine(&[("THINGS_KEY", "k-123456789-abcdef".into())]);
    let report = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    let seen = &fake.seen("/v1/things")[0];
    assert!(
        seen.query.contains("key=k-123456789-abcdef"),
        "{}",
        seen.query
    );
    assert!(seen.query.contains("limit=5"), "{}", seen.query);

    let basic = json!({"name": "basic",
        "services": {"things": {"base_url": fake.url(""),
            "auth": {"type": "basic", "username": "u", "password": "{{secrets.PW}}"}}},
        "stages": [{"id": "get", "component": "http-request",
                    "config": {"url": fake.url("/v1/things")}}]});
    let e = engine(&[("PW", "p4ssw0rd-xyz".into())]);
    let report = run(&e, &dir, &basic, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    // Matched to the service by origin, though the stage did not name it.
    assert_eq!(
        fake.seen("/v1/things")[1].header("authorization"),
        Some("Basic dTpwNHNzdzByZC14eXo=")
    );

    // A plugin's call to the service's origin gets the credential from the host; the
    // plugin never holds it, and what it returns does not carry it.
    fake.route(
        "/v1/echo",
        vec![Reply::json(
            200,
            json!({"you_sent": "Bearer bt-0123456789-zz"}),
        )],
    );
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        crate::plugins::plugin_file("target/test-plugins", "chaos"),
        plugins.join("chaos.wasm"),
    )
    .unwrap();
    let doc = json!({"name": "plugin-auth",
        "services": {"things": {"base_url": fake.url(""),
            "auth": {"type": "bearer", "token": "{{secrets.BT}}"}}},
        "stages": [{"id": "call", "component": "chaos",
                    "allowed_hosts": [format!("127.0.0.1:{}", fake.addr.port())],
                    "config": {"mode": "call", "request": {"url": fake.url("/v1/echo")}}}]});
    let path = support::write_json(&dir, "plugin-auth.pipeline.json", &doc);
    let secrets = support::write_json(&dir, "secrets.json", &json!({"BT": "bt-0123456789-zz"}));
    let ran = support::run_pipeline(
        &path,
        &json!({}),
        &[
            "--plugins",
            plugins.to_str().unwrap(),
            "--secrets",
            secrets.to_str().unwrap(),
            "--no-journal",
        ],
    )
    .await;
    let seen = fake.seen("/v1/echo");
    assert_eq!(seen.len(), 1, "{}", ran.stderr);
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer bt-0123456789-zz")
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(!ran.stdout.contains("bt-0123456789-zz"), "{}", ran.stdout);
}
