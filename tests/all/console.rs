//! The web console of `fmhost serve` in a real browser: headless Chromium driven over
//! WebDriver (`chromedriver`, Debian's `chromium-driver`). Screenshots of each page are
//! kept in `target/test-artifacts/console/`.
//!
//! Without Chromium the browser test is skipped with a note, unless
//! FMHOST_REQUIRE_TOOLCHAINS is set (CI sets it and installs both packages).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::{Value, json};

use crate::plugins::plugin_file;
use crate::serve::{Server, pipelines_dir};
use crate::support::{self, Fake, Reply};

const READ_TOKEN: &str = "test-read-token-0123456789";

fn find_tool(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    names
        .iter()
        .map(|n| Path::new("/usr/bin").join(n))
        .find(|p| p.exists())
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser() -> Option<(Driver, Client)> {
    let chromium = find_tool(
        "FMHOST_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let driver = find_tool("FMHOST_CHROMEDRIVER", &["chromedriver"]);
    let (Some(chromium), Some(driver)) = (chromium, driver) else {
        assert!(
            std::env::var_os("FMHOST_REQUIRE_TOOLCHAINS").is_none(),
            "chromium and chromedriver are required (FMHOST_REQUIRE_TOOLCHAINS is set)"
        );
        eprintln!(
            "skipped: chromium or chromedriver is not installed (apt-get install chromium chromium-driver)"
        );
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", driver.display()));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": chromium, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,1000", "--no-first-run", "--disable-extensions"]}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(caps.clone())
        .connect(&driver.url)
        .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot start a WebDriver session on {}: {e}", driver.url),
        }
    };
    Some((driver, client))
}

/// Runs `script` (a JS function body) until it returns something truthy; returns it.
async fn until(c: &Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c.execute(script, vec![]).await.unwrap_or(Value::Null);
        if !matches!(v, Value::Null | Value::Bool(false)) && v != json!("") {
            return v;
        }
        if Instant::now() > deadline {
            let shown = c
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out waiting for {what}; the page shows:\n{shown}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(c: &Client, name: &str) {
    let dir = support::root().join("target/test-artifacts/console");
    std::fs::create_dir_all(&dir).unwrap();
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn click(c: &Client, css: &str) {
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// A new user's path through the console: sign in with the link `fmhost serve` printed,
/// find the failed run, see the failing stage marked with its error on the DAG, retry
/// it from the dead-letter view once the vendor is fixed and see it succeed, swap a
/// plugin by upload; and a read-only session can look but not act.
#[tokio::test]
async fn a_failed_run_is_found_understood_and_retried_in_the_browser() {
    let Some((_driver, c)) = browser().await else {
        return;
    };
    let fake = Fake::start().await;
    fake.route(
        "/orders/7",
        vec![Reply::json(500, json!({"error": "db down"}))],
    );
    let dir = support::scratch("console");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in ["intercom", "json-transform"] {
        std::fs::copy(
            plugin_file("target/plugins", name),
            plugins.join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    let doc = json!({"name": "orders", "stages": [
        {"id": "fetch-order", "component": "http-request", "config": {"url": fake.url("/orders/7")}},
        {"id": "shape", "component": "json_transform", "depends_on": ["fetch-order"],
         "config": {"data": "{{stages.fetch-order.output.body}}", "expression": "{order: id}"}}
    ]});
    let pipelines = pipelines_dir(&dir, &[("orders.pipeline.json", doc)]);
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("admin {}\nread {READ_TOKEN}\n", support::API_TOKEN),
    )
    .unwrap();
    let server = Server::start_with(
        &dir,
        &pipelines,
        &plugins,
        &json!({}),
        &["--api-token-file", tokens.to_str().unwrap()],
    );
    let api = support::api_client();
    let resp = api
        .post(format!("{}/v1/pipelines/orders/runs", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let report: Value = resp.json().await.unwrap();
    assert_eq!(report["status"], "failed", "{report}");
    let run_id = report["run_id"].as_str().unwrap().to_string();

    // Signing in spends the one-time code and leaves it out of the address bar.
    let sign_in = server
        .console
        .clone()
        .expect("a console sign-in URL on stdout");
    c.goto(&sign_in).await.unwrap();
    let row = format!("#runs tr[data-run=\"{run_id}\"]");
    let status = until(
        &c,
        "the failed run in the runs list",
        &format!("const r = document.querySelector('{row}'); return r && r.dataset.status"),
    )
    .await;
    assert_eq!(status, "failed");
    let url = c.current_url().await.unwrap();
    assert!(!url.as_str().contains("code="), "{url}");
    screenshot(&c, "runs").await;

    // The run: its failing stage marked on the DAG and in the table, with its error.
    click(&c, &format!("{row} a")).await;
    let marked = until(
        &c,
        "the failing stage on the DAG",
        "const n = document.querySelector('#dag g.node[data-stage=\"fetch-order\"]'); return n && n.dataset.status",
    )
    .await;
    assert_eq!(marked, "failed");
    let skipped = until(
        &c,
        "the stage after it",
        "const n = document.querySelector('#dag g.node[data-stage=\"shape\"]'); return n && n.dataset.status",
    )
    .await;
    assert_eq!(skipped, "skipped");
    let error = until(
        &c,
        "the run's error",
        "const e = document.querySelector('#run-error'); return e && e.textContent",
    )
    .await;
    let error = error.as_str().unwrap();
    assert!(
        error.contains("fetch-order") && error.contains("500"),
        "{error}"
    );
    let stage_error = until(
        &c,
        "the stage's error",
        "const e = document.querySelector('#stages tr[data-stage=\"fetch-order\"] .stage-error'); return e && e.textContent",
    )
    .await;
    assert!(
        stage_error.as_str().unwrap().contains("http-5xx"),
        "{stage_error}"
    );
    until(
        &c,
        "the timeline",
        "return document.querySelector('#timeline rect[data-stage=\"fetch-order\"][data-status=\"failed\"]') !== null",
    )
    .await;
    screenshot(&c, "run").await;

    // The vendor is fixed; the dead letter is retried from its view.
    fake.route("/orders/7", vec![Reply::json(200, json!({"id": 7}))]);
    click(&c, "header nav a[data-nav=\"dlq\"]").await;
    let entry = until(
        &c,
        "the open dead letter",
        &format!(
            "const r = [...document.querySelectorAll('#dlq tr[data-dlq]')].find(r => r.textContent.includes('{run_id}')); return r && r.dataset.dlq"
        ),
    )
    .await;
    let entry = entry.as_str().unwrap().to_string();
    screenshot(&c, "dlq").await;
    click(
        &c,
        &format!("#dlq tr[data-dlq=\"{entry}\"] button[data-action=\"retry\"]"),
    )
    .await;
    let flash = until(
        &c,
        "the retry's outcome",
        "const f = document.querySelector('#flash'); return f && !f.hidden && f.textContent.includes(': succeeded') && f.textContent",
    )
    .await;
    assert!(flash.as_str().unwrap().contains("succeeded"), "{flash}");
    until(
        &c,
        "the entry to leave the open list",
        &format!("return document.querySelector('#dlq tr[data-dlq=\"{entry}\"]') === null"),
    )
    .await;
    let dl: Value = api
        .get(format!("{}/v1/dlq/{entry}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dl["status"], "resolved", "{dl}");
    screenshot(&c, "dlq-retried").await;

    // A plugin swapped by upload.
    click(&c, "header nav a[data-nav=\"plugins\"]").await;
    until(
        &c,
        "the plugin list",
        "const v = document.querySelector('#plugins tr[data-plugin=\"intercom\"] td.version'); return v && v.textContent",
    )
    .await;
    click(&c, "#upload-name option[value=\"intercom\"]").await;
    let upload = plugin_file("target/test-plugins", "intercom-v2");
    c.find(Locator::Css("#upload-file"))
        .await
        .unwrap()
        .send_keys(upload.to_str().unwrap())
        .await
        .unwrap();
    click(&c, "#upload").await;
    let version = until(
        &c,
        "intercom 2.0.0 in the list",
        "const v = document.querySelector('#plugins tr[data-plugin=\"intercom\"] td.version'); return v && v.textContent === '2.0.0' && v.textContent",
    )
    .await;
    assert_eq!(version, "2.0.0");
    until(
        &c,
        "a rollback button",
        "return document.querySelector('#plugins tr[data-plugin=\"intercom\"] button[data-action=\"rollback\"]') !== null",
    )
    .await;
    screenshot(&c, "plugins").await;

    // The old version tried again as a 10% canary, shown beside the current one, then
    // rolled back from the page.
    c.execute("document.querySelector('#upload-file').value = ''", vec![])
        .await
        .unwrap();
    let v1 = plugin_file("target/plugins", "intercom");
    c.find(Locator::Css("#upload-file"))
        .await
        .unwrap()
        .send_keys(v1.to_str().unwrap())
        .await
        .unwrap();
    c.find(Locator::Css("#upload-canary"))
        .await
        .unwrap()
        .send_keys("10")
        .await
        .unwrap();
    click(&c, "#upload").await;
    let canary = until(
        &c,
        "the canary in the list",
        "const v = document.querySelector('#plugins tr[data-plugin=\"intercom\"] td.canary'); return v && v.textContent.includes('1.0.0') && v.textContent",
    )
    .await;
    assert!(canary.as_str().unwrap().contains("at 10%"), "{canary}");
    screenshot(&c, "plugins-canary").await;
    click(
        &c,
        "#plugins tr[data-plugin=\"intercom\"] button[data-action=\"rollback\"]",
    )
    .await;
    until(
        &c,
        "the canary gone, 2.0.0 serving",
        "const r = document.querySelector('#plugins tr[data-plugin=\"intercom\"]'); return r && r.querySelector('td.canary').textContent === '' && r.querySelector('td.version').textContent === '2.0.0'",
    )
    .await;

    click(&c, "header nav a[data-nav=\"services\"]").await;
    until(
        &c,
        "the vendor's service row",
        "return document.querySelector('#services tr[data-service]') !== null",
    )
    .await;
    screenshot(&c, "services").await;
    click(&c, "header nav a[data-nav=\"triggers\"]").await;
    until(
        &c,
        "the triggers table",
        "return document.querySelector('#triggers tbody tr') !== null",
    )
    .await;
    screenshot(&c, "triggers").await;

    // A read session sees, and cannot act.
    c.find(Locator::Css("form[action=\"/console/logout\"] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &c,
        "the sign-in form",
        "return document.querySelector('#token') !== null",
    )
    .await;
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(READ_TOKEN)
        .await
        .unwrap();
    click(&c, "#signin").await;
    let scope = until(
        &c,
        "a read session",
        "const s = document.querySelector('#scope'); return s && s.textContent",
    )
    .await;
    assert_eq!(scope, "read");
    c.goto(&format!("{}/#/runs/{run_id}", server.url))
        .await
        .unwrap();
    let disabled = until(
        &c,
        "the replay button",
        "const b = document.querySelector('#replay'); return b && String(b.disabled)",
    )
    .await;
    assert_eq!(disabled, "true");
    let refused = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const csrf = document.querySelector('meta[name=\"fmhost-csrf\"]').content;
             fetch(arguments[0], {method: 'POST', headers: {'X-CSRF-Token': csrf}}).then(r => done(r.status));",
            vec![json!(format!("/v1/runs/{run_id}/replay"))],
        )
        .await
        .unwrap();
    assert_eq!(refused, 403, "a read session may not replay");
    c.close().await.unwrap();
}

/// The console's session rules without a browser: a code works once, a cookie alone
/// cannot change anything without the session's CSRF token, a foreign page is refused.
#[tokio::test]
async fn console_sessions_need_their_csrf_token_and_codes_work_once() {
    let dir = support::scratch("console-csrf");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "noop.pipeline.json",
            json!({"name": "noop", "stages": [{"id": "log", "component": "logger", "config": {"message": "hi"}}]}),
        )],
    );
    let server = Server::start(&dir, &pipelines, &dir.join("plugins"), &json!({}));
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let code_url = server.console.clone().unwrap();
    let first = plain.get(&code_url).send().await.unwrap();
    assert_eq!(first.status(), 303);
    let cookie = first.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let again = plain.get(&code_url).send().await.unwrap();
    assert_eq!(again.status(), 401, "a code signs in once");

    let page = plain
        .get(format!("{}/", server.url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    let csrf = html
        .split("name=\"fmhost-csrf\" content=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    assert!(
        !html.contains(support::API_TOKEN),
        "the page holds no API token"
    );

    let run = |csrf: Option<&str>, origin: Option<&str>| {
        let mut r = plain
            .post(format!("{}/v1/pipelines/noop/runs", server.url))
            .header("cookie", &session)
            .json(&json!({}));
        if let Some(t) = csrf {
            r = r.header("x-csrf-token", t);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    assert_eq!(
        run(None, None).await.unwrap().status(),
        403,
        "no CSRF token"
    );
    assert_eq!(
        run(Some("nope"), None).await.unwrap().status(),
        403,
        "a wrong one"
    );
    assert_eq!(
        run(Some(&csrf), Some("http://evil.example"))
            .await
            .unwrap()
            .status(),
        403,
        "a foreign page"
    );
    assert_eq!(run(Some(&csrf), None).await.unwrap().status(), 200);
    let listed = plain
        .get(format!("{}/v1/runs", server.url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200, "reads need no CSRF token");
    let forged = plain
        .get(format!("{}/v1/runs", server.url))
        .header("cookie", "fmhost_session=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    // Signing out ends the session.
    let out = plain
        .post(format!("{}/console/logout", server.url))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = plain
        .get(format!("{}/v1/runs", server.url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
}
