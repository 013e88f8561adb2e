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

/// `client_auth: "basic"`: the client's id and secret go to the token endpoint as
/// HTTP Basic (form-encoded first, RFC 6749 2.3.1), not in the form.
#[tokio::test]
async fn oauth2_clients_may_authenticate_with_basic() {
    let fake = Fake::start().await;
    fake.route("/oauth/token", vec![token_reply(1, 3600)]);
    fake.route("/data/x", vec![Reply::json(200, json!({"ok": true}))]);
    let dir = support::scratch("vendor-oauth2-basic");
    let doc = json!({"name": "basic-client", "services": {"crm": {
        "base_url": fake.url(""),
        "auth": {"type": "oauth2_client_credentials", "token_url": fake.url("/oauth/token"),
                 "client_id": "app id", "client_secret": "{{secrets.SECRET}}", "client_auth": "basic"}}},
        "stages": [{"id": "x", "component": "http-request", "config": {"service": "crm", "url": "/data/x"}}]});
    let report = run(
        &engine(&[("SECRET", "s3cr3t:+/x".into())]),
        &dir,
        &doc,
        json!({}),
    )
    .await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    let token = &fake.seen("/oauth/token")[0];
    assert_eq!(
        token.header("authorization"),
        Some("Basic YXBwK2lkOnMzY3IzdCUzQSUyQiUyRng="),
        "base64 of app+id:s3cr3t%3A%2B%2Fx"
    );
    let form = String::from_utf8_lossy(&token.body);
    assert!(
        form.contains("grant_type=client_credentials") && !form.contains("client_secret"),
        "{form}"
    );
    assert_eq!(
        fake.seen("/data/x")[0].header("authorization"),
        Some("Bearer tok-1-0123456789")
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

/// A vendor with 1,000 items, paged three ways: Stripe's cursor (`has_more`,
/// `starting_after`), GitHub's `Link` header, Salesforce's `nextRecordsUrl`; and page
/// numbers. 100 items a page.
async fn paged_vendor() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::extract::Query;
    use axum::response::IntoResponse;
    use std::collections::HashMap;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let item = |i: usize| json!({"id": format!("obj_{i:04}"), "n": i});
    let (c1, c2, c3, c4) = (calls.clone(), calls.clone(), calls.clone(), calls.clone());
    let count = |c: &Arc<std::sync::atomic::AtomicUsize>| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    };
    let app = axum::Router::new()
        .route(
            "/v1/customers",
            axum::routing::get(move |Query(q): Query<HashMap<String, String>>| {
                count(&c1);
                let start = q
                    .get("starting_after")
                    .and_then(|s| s.strip_prefix("obj_"))
                    .and_then(|n| n.parse::<usize>().ok())
                    .map_or(0, |n| n + 1);
                let end = (start + 100).min(1000);
                async move {
                    axum::Json(json!({"object": "list", "has_more": end < 1000,
                        "data": (start..end).map(item).collect::<Vec<_>>()}))
                }
            }),
        )
        .route(
            "/repos/items",
            axum::routing::get(move |Query(q): Query<HashMap<String, String>>| {
                count(&c2);
                let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
                let start = (page - 1) * 100;
                let body = json!(
                    (start..(start + 100).min(1000))
                        .map(item)
                        .collect::<Vec<_>>()
                );
                async move {
                    let mut links = Vec::new();
                    if page < 10 {
                        links.push(format!("</repos/items?page={}>; rel=\"next\"", page + 1));
                    }
                    links.push("</repos/items?page=10>; rel=\"last\"".to_string());
                    ([("link", links.join(", "))], axum::Json(body)).into_response()
                }
            }),
        )
        .route(
            "/services/data/query",
            axum::routing::get(move |Query(q): Query<HashMap<String, String>>| {
                count(&c3);
                let start: usize = q.get("offset").and_then(|p| p.parse().ok()).unwrap_or(0);
                let end = (start + 100).min(1000);
                async move {
                    let next = (end < 1000).then(|| format!("/services/data/query?offset={end}"));
                    axum::Json(
                        json!({"totalSize": 1000, "done": end >= 1000, "nextRecordsUrl": next,
                        "records": (start..end).map(item).collect::<Vec<_>>()}),
                    )
                }
            }),
        )
        .route(
            "/paged",
            axum::routing::get(move |Query(q): Query<HashMap<String, String>>| {
                count(&c4);
                let page: usize = q.get("p").and_then(|p| p.parse().ok()).unwrap_or(1);
                let start = (page - 1) * 100;
                let items: Vec<Value> = (start..(start + 100).min(1000)).map(item).collect();
                async move { axum::Json(json!({"items": items})) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

/// Every page of 1,000 items in each style, in order, with the page count; `max_pages`
/// and `max_items` cut a list short and say so.
#[tokio::test]
async fn pagination_follows_cursors_link_headers_and_next_urls() {
    let (base, calls) = paged_vendor().await;
    let dir = support::scratch("vendor-paging");
    let stage = |id: &str, url: String, paginate: Value| json!({"id": id, "component": "http-request", "config": {"url": url, "paginate": paginate}});
    let doc = json!({"name": "paging", "stages": [
        stage("stripe", format!("{base}/v1/customers?limit=100"),
              json!({"style": "cursor", "items_path": "data", "has_more_path": "has_more",
                     "cursor_param": "starting_after", "cursor_path": "data[-1].id", "max_pages": 50})),
        stage("github", format!("{base}/repos/items"),
              json!({"style": "link_header", "items_path": "@", "max_pages": 50})),
        stage("salesforce", format!("{base}/services/data/query"),
              json!({"style": "next_url", "items_path": "records", "next_url_path": "nextRecordsUrl"})),
        stage("numbered", format!("{base}/paged"),
              json!({"style": "page", "items_path": "items", "page_param": "p", "start": 1})),
        stage("cut", format!("{base}/v1/customers?limit=100"),
              json!({"style": "cursor", "items_path": "data", "has_more_path": "has_more",
                     "cursor_param": "starting_after", "cursor_path": "data[-1].id", "max_pages": 3})),
        stage("few", format!("{base}/repos/items"),
              json!({"style": "link_header", "items_path": "@", "max_items": 150}))
    ]});
    let e = engine(&[]);
    let report = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    let out = |id: &str| report.stage(id).unwrap().output.as_deref().unwrap().clone();
    for id in ["stripe", "github", "salesforce"] {
        let o = out(id);
        let items = o["items"].as_array().unwrap();
        assert_eq!(items.len(), 1000, "{id}");
        assert_eq!(o["pages"], 10, "{id}");
        assert_eq!(o["truncated"], false, "{id}");
        assert!(
            items.iter().enumerate().all(|(i, v)| v["n"] == i),
            "{id}: in order, none twice"
        );
    }
    let numbered = out("numbered");
    assert_eq!(numbered["items"].as_array().unwrap().len(), 1000);
    assert_eq!(numbered["pages"], 11, "pages until an empty one");
    let cut = out("cut");
    assert_eq!(cut["items"].as_array().unwrap().len(), 300);
    assert_eq!(cut["pages"], 3);
    assert_eq!(cut["truncated"], true);
    let few = out("few");
    assert_eq!(few["items"].as_array().unwrap().len(), 150);
    assert_eq!(few["pages"], 2);
    assert_eq!(few["truncated"], true);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        10 + 10 + 10 + 11 + 3 + 2
    );
}

/// A paged list whose fifth page fails: the failure carries the pages so far, and a
/// replay (or a resumed run) continues from the fifth page instead of starting over.
#[tokio::test]
async fn a_paged_list_that_fails_halfway_continues_from_there_on_replay() {
    use axum::extract::Query;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (broken, seen) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(Mutex::new(Vec::<usize>::new())),
    );
    let (b, s) = (broken.clone(), seen.clone());
    let app = axum::Router::new().route(
        "/v1/customers",
        axum::routing::get(move |Query(q): Query<HashMap<String, String>>| {
            let start = q
                .get("starting_after")
                .and_then(|s| s.strip_prefix("obj_"))
                .and_then(|n| n.parse::<usize>().ok())
                .map_or(0, |n| n + 1);
            s.lock().unwrap().push(start);
            let fail = start == 400 && b.load(Ordering::SeqCst);
            async move {
                if fail {
                    return (axum::http::StatusCode::BAD_GATEWAY, axum::Json(json!({"error": "upstream down"})));
                }
                let end = (start + 100).min(1000);
                (axum::http::StatusCode::OK, axum::Json(json!({"has_more": end < 1000,
                    "data": (start..end).map(|i| json!({"id": format!("obj_{i:04}"), "n": i})).collect::<Vec<_>>()})))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = support::scratch("vendor-paging-resume");
    let state = dir.join("state");
    let doc = json!({"name": "paging-resume", "stages": [{"id": "customers", "component": "http-request",
        "config": {"url": format!("{base}/v1/customers?limit=100"),
                   "paginate": {"style": "cursor", "items_path": "data", "has_more_path": "has_more",
                                "cursor_param": "starting_after", "cursor_path": "data[-1].id"}}}]});
    let path = support::write_json(&dir, "paging-resume.pipeline.json", &doc);
    let report = dir.join("report.json");
    let ran = support::run_pipeline(
        &path,
        &json!({}),
        &[
            "--state",
            state.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let failed: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let error = &failed["stages"][0]["error"];
    assert!(
        error["message"].as_str().unwrap().starts_with("page 5: "),
        "{error}"
    );
    assert_eq!(error["checkpoint"]["paginate"]["pages"], 4, "{error}");
    assert_eq!(*seen.lock().unwrap(), [0, 100, 200, 300, 400]);

    broken.store(false, Ordering::SeqCst);
    seen.lock().unwrap().clear();
    let mut replay = support::fmhost();
    replay.args([
        "--state",
        state.to_str().unwrap(),
        "replay",
        failed["run_id"].as_str().unwrap(),
    ]);
    let replayed: support::Ran = support::output(replay).await.into();
    assert_eq!(replayed.code, 0, "{}", replayed.stderr);
    assert_eq!(
        *seen.lock().unwrap(),
        [400, 500, 600, 700, 800, 900],
        "the first four pages come from the journal"
    );
    let out = replayed.json();
    let items = out["items"].as_array().unwrap();
    assert_eq!(items.len(), 1000);
    assert!(
        items.iter().enumerate().all(|(i, v)| v["n"] == i),
        "in order, none twice"
    );
    assert_eq!(out["pages"], 10);
}

/// A connector asks the host to page a list for it (`x-fmhost-paginate` on
/// `http.send`): it gets every item in one answer, each page an attempt of its own; a
/// malformed block is refused naming the header.
#[tokio::test]
async fn connectors_page_through_the_host() {
    let (base, calls) = paged_vendor().await;
    let dir = support::scratch("vendor-plugin-paging");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        crate::plugins::plugin_file("target/test-plugins", "chaos"),
        plugins.join("chaos.wasm"),
    )
    .unwrap();
    let port = base.rsplit(':').next().unwrap().to_string();
    let call = |id: &str, paginate: Value| {
        json!({"id": id, "component": "chaos", "allowed_hosts": [format!("127.0.0.1:{port}")],
               "config": {"mode": "call", "request": {"url": format!("{base}/v1/customers?limit=100"),
                          "headers": {"X-Fmhost-Paginate": paginate.to_string()}}}})
    };
    let doc = json!({"name": "plugin-paging", "stages": [
        call("all", json!({"style": "cursor", "items_path": "data", "has_more_path": "has_more",
                           "cursor_param": "starting_after", "cursor_path": "data[-1].id"})),
        call("bad", json!({"style": "cursor", "items_path": "data"}))
    ]});
    let path = support::write_json(&dir, "plugin-paging.pipeline.json", &doc);
    let ran = support::run_pipeline(
        &path,
        &json!({}),
        &[
            "--plugins",
            plugins.to_str().unwrap(),
            "--report",
            dir.join("report.json").to_str().unwrap(),
            "--no-journal",
        ],
    )
    .await;
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let stage = |id: &str| {
        report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("{id}: {}", ran.stderr))
            .clone()
    };
    let all = stage("all");
    assert_eq!(all["output"]["status"], 200, "{}", all["output"]["error"]);
    let body: Value = serde_json::from_str(all["output"]["body"].as_str().unwrap()).unwrap();
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1000);
    assert!(items.iter().enumerate().all(|(i, v)| v["n"] == i));
    assert_eq!(
        (body["pages"].clone(), body["truncated"].clone()),
        (json!(10), json!(false))
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 10);
    let bad = stage("bad");
    let error = bad["output"]["error"].to_string();
    assert!(
        error.contains("InvalidRequest")
            && error.contains("x-fmhost-paginate")
            && error.contains("cursor_param"),
        "{bad}"
    );
}

/// A service's cache: a fresh answer without asking, a 304 revalidation, and, with
/// the service failing and then its breaker open, the last good answer marked stale.
#[tokio::test]
async fn cached_answers_are_revalidated_and_stand_in_when_the_service_fails() {
    let fake = Fake::start().await;
    fake.route(
        "/rates",
        vec![
            Reply::json(200, json!({"usd_eur": 0.92})).header("etag", "\"v1\""),
            Reply::status(304).header("etag", "\"v1\""),
            Reply::json(503, json!({"error": "down"})),
        ],
    );
    let dir = support::scratch("vendor-cache");
    let doc = json!({"name": "rates",
        "services": {"fx": {"base_url": fake.url(""),
            "cache": {"ttl_seconds": 0.5, "stale_if_error_seconds": 3600},
            "circuit_breaker": {"failure_threshold": 1, "open_seconds": 60}}},
        "stages": [{"id": "rates", "component": "http-request",
                    "config": {"service": "fx", "url": "/rates"}}]});
    let e = engine(&[]);
    let output = |r: &RunReport| r.stage("rates").unwrap().output.as_deref().unwrap().clone();

    let first = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(output(&first)["body"], json!({"usd_eur": 0.92}));
    assert!(output(&first).get("cache").is_none(), "from the service");
    let hit = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(output(&hit)["cache"]["status"], "hit");
    assert_eq!(fake.seen("/rates").len(), 1, "a fresh answer asks nobody");

    tokio::time::sleep(Duration::from_millis(600)).await;
    let revalidated = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(output(&revalidated)["cache"]["status"], "revalidated");
    assert_eq!(output(&revalidated)["body"], json!({"usd_eur": 0.92}));
    let seen = fake.seen("/rates");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), Some("\"v1\""));

    tokio::time::sleep(Duration::from_millis(600)).await;
    let stale = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(stale.status.as_str(), "succeeded", "{:?}", stale.error);
    assert_eq!(output(&stale)["cache"]["status"], "stale");
    assert_eq!(output(&stale)["body"], json!({"usd_eur": 0.92}));
    assert_eq!(fake.seen("/rates").len(), 3, "the failing call was made");
    // The breaker is open now: nothing is sent, and the stale answer still stands in.
    let open = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(open.status.as_str(), "succeeded", "{:?}", open.error);
    assert_eq!(output(&open)["cache"]["status"], "stale");
    assert_eq!(fake.seen("/rates").len(), 3, "the breaker sent nothing");
}

/// An answer's own headers narrow the cache: one that `Vary`s by a request header
/// serves only requests with the same value, and `Cache-Control: max-age=0` makes the
/// next use a revalidation whatever the service's `ttl_seconds`.
#[tokio::test]
async fn the_cache_honours_vary_and_max_age() {
    let fake = Fake::start().await;
    fake.route(
        "/profile",
        vec![
            Reply::json(200, json!({"tenant": "a"})).header("vary", "X-Tenant"),
            Reply::json(200, json!({"tenant": "b"})).header("vary", "X-Tenant"),
        ],
    );
    fake.route(
        "/quote",
        vec![
            Reply::json(200, json!({"price": 10}))
                .header("etag", "\"q1\"")
                .header("cache-control", "max-age=0"),
            Reply::status(304).header("etag", "\"q1\""),
        ],
    );
    let dir = support::scratch("vendor-cache-vary");
    let get = |id: &str, after: Option<&str>, url: &str, tenant: &str| {
        let mut st = json!({"id": id, "component": "http-request",
            "config": {"service": "api", "url": url, "headers": {"X-Tenant": tenant}}});
        if let Some(a) = after {
            st["depends_on"] = json!([a]);
        }
        st
    };
    let doc = json!({"name": "vary",
        "services": {"api": {"base_url": fake.url(""), "cache": {"ttl_seconds": 60}}},
        "stages": [get("a", None, "/profile", "a"), get("b", Some("a"), "/profile", "b"),
                   get("b-again", Some("b"), "/profile", "b"),
                   get("quote", None, "/quote", "a"), get("quote-again", Some("quote"), "/quote", "a")]});
    let report = run(&engine(&[]), &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    let out = |id: &str| report.stage(id).unwrap().output.as_deref().unwrap().clone();
    assert_eq!(out("a")["body"]["tenant"], "a");
    assert_eq!(out("b")["body"]["tenant"], "b", "not tenant a's answer");
    assert_eq!(out("b-again")["body"]["tenant"], "b");
    assert_eq!(out("b-again")["cache"]["status"], "hit");
    assert_eq!(fake.seen("/profile").len(), 2);
    assert_eq!(out("quote-again")["cache"]["status"], "revalidated");
    let seen = fake.seen("/quote");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), Some("\"q1\""));
}

/// Budgets fail the stage that would exceed them, with kind `budget`: the run's
/// request count, a stage's retries, and a paginated list that would need more pages
/// than its stage may make (never a silently short list).
#[tokio::test]
async fn request_budgets_fail_the_stage_that_exceeds_them() {
    let fake = Fake::start().await;
    fake.route("/ok", vec![Reply::json(200, json!({}))]);
    fake.route("/busy", vec![Reply::json(503, json!({}))]);
    let (paged, _) = paged_vendor().await;
    let dir = support::scratch("vendor-budget");
    let e = engine(&[]);
    let get = |id: &str, dep: Option<&str>| {
        json!({"id": id, "component": "http-request", "depends_on": dep.map(|d| vec![d]).unwrap_or_default(),
               "config": {"url": fake.url("/ok")}})
    };
    let doc = json!({"name": "b", "budget": {"max_requests": 2},
                     "stages": [get("a", None), get("b", Some("a")), get("c", Some("b"))]});
    let report = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "failed");
    let c = report.stage("c").unwrap();
    let err = c.error.as_ref().unwrap();
    assert_eq!(err.kind.as_str(), "budget", "{err:?}");
    assert!(
        err.message.contains("run's budget of 2 requests"),
        "{err:?}"
    );
    assert_eq!(fake.seen("/ok").len(), 2);

    let doc = json!({"name": "b", "stages": [
        {"id": "retrying", "component": "http-request", "budget": {"max_requests": 2},
         "config": {"url": fake.url("/busy")},
         "retry": {"max_attempts": 5, "delay_seconds": 0.01}}]});
    let report = run(&e, &dir, &doc, json!({})).await;
    let err = report.stage("retrying").unwrap().error.clone().unwrap();
    assert_eq!(err.kind.as_str(), "budget", "{err:?}");
    assert_eq!(fake.seen("/busy").len(), 2, "no attempt beyond the budget");

    let doc = json!({"name": "b", "stages": [
        {"id": "list", "component": "http-request", "budget": {"max_requests": 3},
         "config": {"url": format!("{paged}/repos/items"),
                    "paginate": {"style": "link_header", "items_path": "@"}}}]});
    let report = run(&e, &dir, &doc, json!({})).await;
    let err = report.stage("list").unwrap().error.clone().unwrap();
    assert_eq!(err.kind.as_str(), "budget", "{err:?}");

    // Bad budgets are refused before any run, with their place.
    let bad = json!({"name": "b", "budget": {"max_request": 2},
                     "stages": [{"id": "x", "component": "logger", "budget": {"max_seconds": -1},
                                 "config": {"message": "m"}}]});
    let path = support::write_json(&dir, "bad.pipeline.json", &bad);
    let out = support::output({
        let mut c = support::fmhost();
        c.arg("validate").arg(&path);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("budget") && text.contains("max_request"),
        "{text}"
    );
    assert!(text.contains("budget.max_seconds"), "{text}");
}

/// Rate-limit headroom from the vendor's headers is exported per service in
/// `/metrics`, and a service that says nothing is left is not called until its reset.
#[tokio::test]
async fn rate_limit_headroom_is_exported_and_slows_the_service() {
    let fake = Fake::start().await;
    fake.route(
        "/api",
        vec![
            Reply::json(200, json!({}))
                .header("X-RateLimit-Limit", "100")
                .header("X-RateLimit-Remaining", "7")
                .header("X-RateLimit-Reset", "30"),
        ],
    );
    fake.route(
        "/tight",
        vec![
            Reply::json(200, json!({}))
                .header("RateLimit-Limit", "10")
                .header("RateLimit-Remaining", "0")
                .header("RateLimit-Reset", "1"),
            Reply::json(200, json!({}))
                .header("RateLimit-Limit", "10")
                .header("RateLimit-Remaining", "9")
                .header("RateLimit-Reset", "60"),
        ],
    );
    let dir = support::scratch("vendor-headroom");
    let pipelines = crate::serve::pipelines_dir(
        &dir,
        &[(
            "api.pipeline.json",
            json!({"name": "api", "services": {"vendor": {"base_url": fake.url("")}},
                   "stages": [{"id": "a", "component": "http-request",
                               "config": {"service": "vendor", "url": "/api"}}]}),
        )],
    );
    let server = crate::serve::Server::start(&dir, &pipelines, &dir.join("plugins"), &json!({}));
    let client = support::api_client();
    let resp = client
        .post(format!("{}/v1/pipelines/api/runs", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fmhost_rate_limit_remaining{service=\"vendor\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fmhost_rate_limit_limit{service=\"vendor\"} 100"),
        "{metrics}"
    );
    let services: Value = client
        .get(format!("{}/v1/services", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        services[0]["rate_limit"],
        json!({"remaining": 7, "limit": 100}),
        "{services}"
    );

    // Nothing left until the reset a second from now: the next call waits for it.
    let doc = json!({"name": "tight", "stages": [
        {"id": "a", "component": "http-request", "config": {"url": fake.url("/tight")}},
        {"id": "b", "component": "http-request", "depends_on": ["a"], "config": {"url": fake.url("/tight")}}]});
    let e = engine(&[]);
    let report = run(&e, &dir, &doc, json!({})).await;
    assert_eq!(report.status.as_str(), "succeeded", "{:?}", report.error);
    let gaps = fake.gaps("/tight");
    assert!(
        gaps[0] >= Duration::from_millis(800),
        "held until the reset: {gaps:?}"
    );
}

/// A rotated secrets file is picked up by a running `fmhost serve` (a stage's header
/// and a service's auth alike) without a restart; `fmhost secrets check` names what a
/// pipeline needs and what is missing, and never prints a value.
#[tokio::test]
async fn rotated_secrets_apply_without_a_restart_and_check_names_what_is_missing() {
    let fake = Fake::start().await;
    fake.route("/a", vec![Reply::json(200, json!({}))]);
    fake.route("/b", vec![Reply::json(200, json!({}))]);
    let dir = support::scratch("vendor-rotate");
    let doc = json!({"name": "rot",
        "services": {"svc": {"base_url": fake.url(""), "auth": {"type": "bearer", "token": "{{secrets.SVC_TOKEN}}"}}},
        "stages": [
            {"id": "a", "component": "http-request",
             "config": {"url": fake.url("/a"), "headers": {"Authorization": "Bearer {{secrets.TOKEN}}"}}},
            {"id": "b", "component": "http-request", "depends_on": ["a"],
             "config": {"service": "svc", "url": "/b"}}]});
    let pipelines = crate::serve::pipelines_dir(&dir, &[("rot.pipeline.json", doc)]);
    let server = crate::serve::Server::start(
        &dir,
        &pipelines,
        &dir.join("plugins"),
        &json!({"TOKEN": "first-1111111111", "SVC_TOKEN": "svc-first-22222222"}),
    );
    let client = support::api_client();
    let post = || async {
        client
            .post(format!("{}/v1/pipelines/rot/runs", server.url))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(post().await, 200);
    assert_eq!(
        fake.seen("/a")[0].header("authorization"),
        Some("Bearer first-1111111111")
    );
    assert_eq!(
        fake.seen("/b")[0].header("authorization"),
        Some("Bearer svc-first-22222222")
    );

    // Rotate: written beside, then renamed over, as deploy tools do.
    let file = dir.join("secrets.json");
    let tmp = dir.join("secrets.json.tmp");
    std::fs::write(
        &tmp,
        json!({"TOKEN": "second-333333333", "SVC_TOKEN": "svc-second-4444444"}).to_string(),
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        assert_eq!(post().await, 200);
        let a = fake.seen("/a");
        if a.last().unwrap().header("authorization") == Some("Bearer second-333333333") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated secret was not used:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fake.seen("/b").last().unwrap().header("authorization"),
        Some("Bearer svc-second-4444444")
    );

    // What a pipeline needs, checked before a run.
    let partial = support::write_json(&dir, "partial.json", &json!({"TOKEN": "x-value-55555555"}));
    let check = support::output({
        let mut c = support::fmhost();
        c.args(["secrets", "check"])
            .arg(pipelines.join("rot.pipeline.json"))
            .arg("--secrets")
            .arg(&partial);
        c
    })
    .await;
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(
        out.contains("SVC_TOKEN") && out.contains("MISSING"),
        "{out}"
    );
    assert!(out.contains("services.svc.auth.token"), "{out}");
    assert!(
        out.contains("TOKEN") && out.contains("set (secrets file)"),
        "{out}"
    );
    assert!(!out.contains("x-value-55555555"), "no value is printed");
}

/// A secret rotated while a run goes on: the stages that start after it use the new
/// value, and the journal masks it as a reference like the old one.
#[tokio::test]
async fn a_secret_rotated_mid_run_is_masked_in_the_journal() {
    let fake = Fake::start().await;
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_secs(3))],
    );
    let dir = support::scratch("vendor-rotate-mid-run");
    let doc = json!({"name": "mid", "stages": [
        {"id": "slow", "component": "http-request", "config": {"url": fake.url("/slow")}},
        {"id": "remember", "component": "variable_set", "depends_on": ["slow"],
         "config": {"name": "seen", "value": "token {{secrets.TOKEN}}"}}]});
    let pipelines = crate::serve::pipelines_dir(&dir, &[("mid.pipeline.json", doc)]);
    let server = crate::serve::Server::start(
        &dir,
        &pipelines,
        &dir.join("plugins"),
        &json!({"TOKEN": "old-value-1111111"}),
    );
    let client = support::api_client();
    let started: Value = client
        .post(format!("{}/v1/pipelines/mid/runs?mode=async", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["run_id"].as_str().unwrap().to_string();
    // While `slow` waits, the file is rotated.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let file = dir.join("secrets.json");
    std::fs::write(
        dir.join("secrets.tmp"),
        json!({"TOKEN": "new-value-2222222"}).to_string(),
    )
    .unwrap();
    std::fs::rename(dir.join("secrets.tmp"), &file).unwrap();
    let detail = loop {
        let d: Value = client
            .get(format!("{}/v1/runs/{id}", server.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["status"] != "running" {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(detail["status"], "succeeded", "{detail}");
    let text = detail.to_string();
    assert!(
        !text.contains("new-value-2222222") && !text.contains("old-value-1111111"),
        "{text}"
    );
    let remember = detail["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "remember")
        .unwrap();
    assert_eq!(
        remember["output"]["value"], "token {{secrets.TOKEN}}",
        "{remember}"
    );
}

/// A service has one live state: a second pipeline that declares it differently does
/// not reset its open breaker (or make a second bulkhead); `fmhost validate` reports the
/// conflict before anything runs.
#[tokio::test]
async fn a_service_has_one_live_state_and_conflicts_are_reported() {
    let fake = Fake::start().await;
    fake.route("/down", vec![Reply::json(503, json!({}))]);
    let dir = support::scratch("vendor-one-state");
    let pipeline = |name: &str, threshold: u32| {
        json!({"name": name,
               "services": {"svc": {"base_url": fake.url(""),
                   "circuit_breaker": {"failure_threshold": threshold, "open_seconds": 60}}},
               "stages": [{"id": "call", "component": "http-request",
                           "config": {"service": "svc", "url": "/down"}}]})
    };
    let e = engine(&[]);
    let first = run(&e, &dir, &pipeline("first", 1), json!({})).await;
    assert_eq!(first.status.as_str(), "failed");
    assert_eq!(fake.seen("/down").len(), 1);
    let second = run(&e, &dir, &pipeline("second", 5), json!({})).await;
    let err = second.stage("call").unwrap().error.clone().unwrap();
    assert_eq!(
        err.kind.as_str(),
        "circuit-open",
        "the open breaker stays open: {err:?}"
    );
    assert_eq!(fake.seen("/down").len(), 1, "nothing was sent");

    let a = support::write_json(&dir, "a.pipeline.json", &pipeline("a", 1));
    let b = support::write_json(&dir, "b.pipeline.json", &pipeline("b", 5));
    let out = support::output({
        let mut c = support::fmhost();
        c.arg("validate").arg(&a).arg(&b);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("services.svc") && text.contains("a.pipeline.json"),
        "{text}"
    );
    assert!(text.contains("b.pipeline.json"), "{text}");
}
