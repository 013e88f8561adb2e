//! `fmhost test`: pipeline tests with mocks, offline, through the real binary: the
//! shipped customer-360 tests pass; failures, unmocked calls (from `http-request` and
//! from a plugin) and JUnit output are reported as a CI reads them.

use serde_json::json;

use crate::plugins::plugin_file;
use crate::support;

#[tokio::test]
async fn pipeline_tests_run_offline_and_report_each_failure() {
    let dir = support::scratch("pipeline-tests");
    // The shipped tests: customer-360 with every vendor mocked.
    let junit = dir.join("c360.xml");
    let out = support::output({
        let mut c = support::fmhost();
        c.args(["test", "pipelines/"]).arg("--junit").arg(&junit);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("PASS  customer-360 › builds the view for an active customer"),
        "{text}"
    );
    assert!(text.ends_with("2 passed, 0 failed\n"), "{text}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("<testsuite name=\"customer-360\"") && xml.contains("failures=\"0\""),
        "{xml}"
    );

    // A suite of our own: passing, failing, and unmocked.
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // chaos, beside the shipped plugins found in target/plugins.
    std::fs::copy(
        plugin_file("target/test-plugins", "chaos"),
        plugins.join("chaos.wasm"),
    )
    .unwrap();
    support::write_json(
        &dir,
        "orders.pipeline.json",
        &json!({"name": "orders", "output_stage": "shape", "stages": [
            {"id": "fetch", "component": "http-request",
             "config": {"url": "https://shop.example.com/orders/{{input.id}}",
                        "headers": {"Authorization": "Bearer {{secrets.SHOP_KEY}}"}}},
            {"id": "shape", "component": "json_transform", "depends_on": ["fetch"],
             "config": {"data": "{{stages.fetch.output.body}}", "expression": "{order: id, total: total}"}},
            {"id": "notify", "component": "chaos", "depends_on": ["shape"], "optional": true,
             "allowed_hosts": ["hooks.example.com"],
             "config": {"mode": "call", "request": {"method": "POST", "url": "https://hooks.example.com/done"}}}
        ]}),
    );
    let order = json!({"method": "GET", "url": "https://shop.example.com/orders/*", "status": 200,
                       "headers": {}, "body": {"id": 7, "total": 42.5}});
    let hook = json!({"method": "POST", "url": "https://hooks.example.com/*", "status": 202, "body": {"ok": true}});
    support::write_json(
        &dir,
        "orders.test.json",
        &json!({"pipeline": "orders.pipeline.json", "tests": [
            {"name": "shapes the order", "input": {"id": 7}, "secrets": {"SHOP_KEY": "k"},
             "mocks": {"http": [order, hook]},
             "assertions": [{"path": "output.order", "equals": 7},
                            {"path": "output.total", "greaterThan": 40, "lessThanOrEqual": 42.5},
                            {"path": "stages.notify.output.status", "equals": 202},
                            {"path": "stages.fetch.output.body.total", "type": "number"}]},
            {"name": "a wrong expectation", "input": {"id": 7}, "secrets": {"SHOP_KEY": "k"},
             "mocks": {"http": [order, hook]},
             "assertions": [{"path": "output.order", "equals": 8}]},
            {"name": "the plugin's call is not mocked", "input": {"id": 7}, "secrets": {"SHOP_KEY": "k"},
             "mocks": {"http": [order]},
             "assertions": [{"path": "output.order", "equals": 7}]},
            {"name": "a component mocked by name", "input": {"id": 1}, "secrets": {"SHOP_KEY": "k"},
             "mocks": {"json-transform": {"output": {"order": 99, "total": 0}},
                       "fetch": {"error": {"kind": "http-5xx"}}, "http": [hook]},
             "assertions": [{"path": "status", "equals": "failed"},
                            {"path": "stages.fetch.error.kind", "equals": "http-5xx"},
                            {"path": "stages.shape.status", "equals": "skipped"}]}
        ]}),
    );
    let junit = dir.join("orders.xml");
    let out = support::output({
        let mut c = support::fmhost();
        c.arg("test")
            .arg(dir.join("orders.test.json"))
            .arg("--plugins")
            .arg(&plugins)
            .arg("--junit")
            .arg(&junit);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("PASS  orders › shapes the order"), "{text}");
    assert!(
        text.contains("PASS  orders › a component mocked by name"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  orders › a wrong expectation"),
        "{text}"
    );
    assert!(
        text.contains("output.order: expected equals 8, got 7"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  orders › the plugin's call is not mocked"),
        "{text}"
    );
    assert!(
        text.contains("unmocked call: POST https://hooks.example.com/done"),
        "{text}"
    );
    assert!(text.ends_with("2 passed, 2 failed\n"), "{text}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"4\" failures=\"2\""), "{xml}");
    assert!(
        xml.contains("<failure message=\"assertions[0] output.order: expected equals 8, got 7\""),
        "{xml}"
    );
}

/// Retention: `fmhost runs prune` removes old finished runs with their stages and
/// attempts, and keeps a failed run whose dead letter is still open (its retry needs it).
#[tokio::test]
async fn prune_removes_old_runs_and_keeps_what_a_retry_needs() {
    let fake = crate::support::Fake::start().await;
    fake.route("/ok", vec![crate::support::Reply::json(200, json!({}))]);
    fake.route("/bad", vec![crate::support::Reply::json(500, json!({}))]);
    let dir = support::scratch("prune");
    let state = dir.join("state");
    let doc = |path: &str| {
        json!({"name": "p", "stages": [{"id": "a", "component": "http-request",
                                         "config": {"url": fake.url(path)}}]})
    };
    let ok = support::write_json(&dir, "ok.pipeline.json", &doc("/ok"));
    let bad = support::write_json(&dir, "bad.pipeline.json", &doc("/bad"));
    let fmhost = |args: Vec<String>| {
        let mut c = support::fmhost();
        c.arg("--state").arg(&state).args(args);
        support::output(c)
    };
    for p in [&ok, &ok, &bad] {
        fmhost(vec!["run".into(), p.display().to_string()]).await;
    }
    let list = |out: std::process::Output| -> Vec<serde_json::Value> {
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        list(fmhost(vec!["runs".into(), "list".into(), "--json".into()]).await).len(),
        3
    );
    let dry = fmhost(
        ["runs", "prune", "--older-than", "0s", "--dry-run"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(text.starts_with("would remove 2 run(s)"), "{text}");
    assert_eq!(
        list(fmhost(vec!["runs".into(), "list".into(), "--json".into()]).await).len(),
        3
    );
    let done = fmhost(
        ["runs", "prune", "--older-than", "0s"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(
        text.starts_with("removed 2 run(s)") && text.contains("kept 1"),
        "{text}"
    );
    let left = list(fmhost(vec!["runs".into(), "list".into(), "--json".into()]).await);
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0]["status"], "failed",
        "the failed run with an open dead letter stays"
    );
    let dlq = fmhost(vec!["dlq".into(), "list".into(), "--json".into()]).await;
    assert_eq!(list(dlq).len(), 1);
}

/// A production run becomes a regression test in one command: with `"record": true`
/// every exchange (a retried one, a plugin's) is journaled with secrets as references;
/// `fmhost record` turns them into mocks and the run's output into assertions, and
/// `fmhost test` passes it offline, the vendor gone.
#[tokio::test]
async fn a_recorded_run_becomes_a_test_that_passes_offline() {
    let fake = crate::support::Fake::start().await;
    fake.route(
        "/api/orders/7",
        vec![
            crate::support::Reply::json(503, json!({"error": "busy"})),
            crate::support::Reply::json(
                200,
                json!({"id": 7, "total": 42.5, "owner": "sk-live-abcdef123456"}),
            ),
        ],
    );
    let hooks = crate::support::Fake::start().await;
    hooks.route(
        "/hooks/done",
        vec![crate::support::Reply::json(202, json!({"ok": true}))],
    );
    let dir = support::scratch("record");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        plugin_file("target/test-plugins", "chaos"),
        plugins.join("chaos.wasm"),
    )
    .unwrap();
    let doc = json!({"name": "orders", "record": true, "output_stage": "shape", "stages": [
        {"id": "fetch", "component": "http-request",
         "config": {"url": "{{secrets.SHOP_URL}}/api/orders/{{input.id}}",
                    "headers": {"Authorization": "Bearer {{secrets.SHOP_KEY}}"}},
         "retry": {"max_attempts": 2, "delay_seconds": 0.01}},
        {"id": "shape", "component": "json_transform", "depends_on": ["fetch"],
         "config": {"data": "{{stages.fetch.output.body}}", "expression": "{order: id, total: total, owner: owner}"}},
        {"id": "notify", "component": "chaos", "depends_on": ["shape"],
         "allowed_hosts": [format!("127.0.0.1:{}", hooks.addr.port())],
         "config": {"mode": "call", "request": {"method": "POST", "url": hooks.url("/hooks/done")}}}
    ]});
    let pipeline = support::write_json(&dir, "orders.pipeline.json", &doc);
    let secrets = support::write_json(
        &dir,
        "secrets.json",
        &json!({"SHOP_URL": fake.url(""), "SHOP_KEY": "sk-live-abcdef123456"}),
    );
    let state = dir.join("state");
    let ran: support::Ran = support::output({
        let mut c = support::fmhost();
        c.arg("--state")
            .arg(&state)
            .arg("run")
            .arg(&pipeline)
            .args(["--input-json", "{\"id\": 7}"])
            .arg("--secrets")
            .arg(&secrets)
            .arg("--plugins")
            .arg(&plugins)
            .arg("--report")
            .arg(dir.join("report.json"));
        c
    })
    .await
    .into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let run_id = report["run_id"].as_str().unwrap().to_string();

    let out = dir.join("recorded");
    let rec: support::Ran = support::output({
        let mut c = support::fmhost();
        c.arg("--state")
            .arg(&state)
            .args(["record", &run_id, "--out"])
            .arg(&out);
        c
    })
    .await
    .into();
    assert_eq!(rec.code, 0, "{}", rec.stderr);
    let test_text = std::fs::read_to_string(out.join("orders.test.json")).unwrap();
    assert!(
        !test_text.contains("sk-live-abcdef123456"),
        "secrets stay references:\n{test_text}"
    );
    assert!(
        test_text.contains("{{secrets.SHOP_URL}}/api/orders/7"),
        "{test_text}"
    );
    assert!(
        !test_text.contains(&fake.url("")),
        "no live address:\n{test_text}"
    );

    // Nothing is sent during a test: the recording answers.
    drop((fake, hooks));
    let passed: support::Ran = support::output({
        let mut c = support::fmhost();
        c.arg("test").arg(&out).arg("--plugins").arg(&plugins);
        c
    })
    .await
    .into();
    assert_eq!(
        passed.code, 0,
        "{}\n{}\n{test_text}",
        passed.stdout, passed.stderr
    );
    assert!(
        passed.stdout.ends_with("1 passed, 0 failed\n"),
        "{}",
        passed.stdout
    );
}

/// The Intercom API change, seen before a mapping breaks: recorded answers teach the
/// host each endpoint's shape; an answer with a field gone or a type changed is flagged
/// on its run (the API and `runs show`) and counted in `/metrics`, also after a restart
/// (the shapes are learned again from the journal's recordings).
#[tokio::test]
async fn schema_drift_is_flagged_on_the_run_and_counted() {
    let fake = crate::support::Fake::start().await;
    let v210 = json!({"type": "contact", "id": "c1", "custom_attributes": {"health_score": 78},
                      "tags": {"data": [{"name": "enterprise"}]}});
    let v211 = json!({"type": "contact", "id": "c1", "custom_attributes": {"health": {"score": 78}},
                      "tags": [{"name": "enterprise"}]});
    fake.route(
        "/contacts/cust_1",
        vec![crate::support::Reply::json(200, v210)],
    );
    let dir = support::scratch("drift");
    let pipelines = crate::serve::pipelines_dir(
        &dir,
        &[(
            "contact.pipeline.json",
            json!({"name": "contact", "record": true,
                   "services": {"intercom": {"base_url": fake.url("")}},
                   "stages": [{"id": "fetch", "component": "http-request",
                               "config": {"service": "intercom", "url": "/contacts/cust_1"}}]}),
        )],
    );
    let server = crate::serve::Server::start(&dir, &pipelines, &dir.join("plugins"), &json!({}));
    let client = support::api_client();
    let run = |url: String| async move {
        let client = support::api_client();
        let r: serde_json::Value = client
            .post(format!("{url}/v1/pipelines/contact/runs"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["run_id"].as_str().unwrap().to_string();
        let detail: serde_json::Value = client
            .get(format!("{url}/v1/runs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (id, detail)
    };
    let (_, first) = run(server.url.clone()).await;
    assert!(
        first["stages"][0]["calls"][0]["recorded"]["drift"].is_null(),
        "{first}"
    );
    run(server.url.clone()).await;
    // A restart in between: the server learns the shapes again from the journal.
    drop(server);
    let server = crate::serve::Server::start(&dir, &pipelines, &dir.join("plugins"), &json!({}));
    fake.route(
        "/contacts/cust_1",
        vec![crate::support::Reply::json(200, v211)],
    );
    let (id, changed) = run(server.url.clone()).await;
    assert_eq!(
        changed["status"], "succeeded",
        "the run itself still succeeds: {changed}"
    );
    assert_eq!(
        changed["stages"][0]["calls"][0]["recorded"]["drift"],
        json!([
            "custom_attributes.health_score: missing",
            "tags: was object, now array"
        ]),
        "{changed}"
    );
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fmhost_schema_drift_total{service=\"intercom\"} 2"),
        "{metrics}"
    );
    let shown: support::Ran = support::output({
        let mut c = support::fmhost();
        c.arg("--state")
            .arg(dir.join("state"))
            .args(["runs", "show", &id]);
        c
    })
    .await
    .into();
    assert!(
        shown.stdout.contains("schema drift: stage fetch GET")
            && shown.stdout.contains("health_score: missing"),
        "{}",
        shown.stdout
    );
}

/// The journal keeps the pipeline document each run ran (by content): a replay runs it
/// as it ran though the file has changed since, or today's with `--current-pipeline`.
#[tokio::test]
async fn a_replay_runs_the_pipeline_as_it_ran_unless_asked_for_todays() {
    let fake = crate::support::Fake::start().await;
    fake.route("/v1", vec![crate::support::Reply::json(500, json!({}))]);
    fake.route("/v2", vec![crate::support::Reply::json(200, json!({}))]);
    let dir = support::scratch("replay-as-ran");
    let state = dir.join("state");
    let doc = |path: &str| {
        json!({"name": "p", "stages": [{"id": "a", "component": "http-request",
                                         "config": {"url": fake.url(path)}}]})
    };
    let file = support::write_json(&dir, "p.pipeline.json", &doc("/v1"));
    let fmhost = |args: Vec<String>| {
        let mut c = support::fmhost();
        c.arg("--state").arg(&state).args(args);
        support::output(c)
    };
    let first: support::Ran = fmhost(vec![
        "run".into(),
        file.display().to_string(),
        "--report".into(),
        dir.join("r.json").display().to_string(),
    ])
    .await
    .into();
    assert_eq!(first.code, 1, "{}", first.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap();
    let run_id = report["run_id"].as_str().unwrap().to_string();
    // The file changes after the run.
    support::write_json(&dir, "p.pipeline.json", &doc("/v2"));
    let again: support::Ran = fmhost(vec!["replay".into(), run_id.clone()]).await.into();
    assert_eq!(again.code, 1, "as it ran: {}", again.stderr);
    assert_eq!(fake.seen("/v1").len(), 2);
    assert_eq!(fake.seen("/v2").len(), 0);
    let today: support::Ran = fmhost(vec![
        "replay".into(),
        run_id.clone(),
        "--current-pipeline".into(),
    ])
    .await
    .into();
    assert_eq!(today.code, 0, "today's: {}", today.stderr);
    assert_eq!(fake.seen("/v2").len(), 1);
}
