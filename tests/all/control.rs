//! Control flow through the real binary: the example pipelines of `pipelines/` against
//! fake vendors, journaled and replayed, and `fmhost validate` on every misuse.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Fake, Reply};

fn pipeline(name: &str) -> std::path::PathBuf {
    support::root().join("pipelines").join(name)
}

fn plugins() -> String {
    support::root().join("target/plugins").display().to_string()
}

fn read_report(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn stage<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no stage {id} in {report:#}"))
}

#[tokio::test]
async fn shipping_quotes_rank_the_carriers_that_answered() {
    let fake = Fake::start().await;
    fake.route(
        "/carriers/ups/quote",
        vec![
            Reply::json(200, json!({"carrier": "ups", "price": 12.5}))
                .delay(Duration::from_millis(200)),
        ],
    );
    fake.route(
        "/carriers/fedex/quote",
        vec![
            Reply::json(200, json!({"carrier": "fedex", "price": 7.0}))
                .delay(Duration::from_secs(4)),
        ],
    );
    fake.route(
        "/carriers/dhl/quote",
        vec![
            Reply::json(200, json!({"carrier": "dhl", "price": 9.9}))
                .delay(Duration::from_millis(200)),
        ],
    );
    fake.route(
        "/carriers/usps/quote",
        vec![Reply::status(503).delay(Duration::from_millis(200))],
    );
    let dir = support::scratch("control-shipping");
    let report_file = dir.join("report.json");
    let ran = support::run_pipeline(
        &pipeline("shipping-quotes.pipeline.json"),
        &json!({"carriers": ["ups", "fedex", "dhl", "usps"], "carriers_api": fake.url(""), "weight_kg": 2.5}),
        &["--plugins", &plugins(), "--report", report_file.to_str().unwrap()],
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(
        ran.json(),
        json!({
            "quotes": [{"carrier": "dhl", "price": 9.9}, {"carrier": "ups", "price": 12.5}],
            "unavailable": [{"carrier": "fedex", "error": "timeout"}, {"carrier": "usps", "error": "http-5xx"}]
        })
    );
    // All four carriers were asked at once.
    assert_eq!(fake.max_in_flight(), 4);
    assert_eq!(fake.seen("/carriers/ups/quote")[0].query, "weight_kg=2.5");
    let report = read_report(&report_file);
    assert_eq!(stage(&report, "quote[0]")["status"], "succeeded");
    assert_eq!(stage(&report, "quote[1]")["error"]["kind"], "timeout");
    assert_eq!(stage(&report, "quote[3]")["error"]["kind"], "http-5xx");
    assert_eq!(stage(&report, "quotes")["output"]["failed_count"], 2);
}

#[tokio::test]
async fn inventory_sync_batches_a_thousand_records_and_a_replay_sends_only_what_is_missing() {
    let fake = Fake::start().await;
    // Six batches are accepted, then the warehouse refuses (400 is not retried).
    let mut script: Vec<Reply> = (0..6)
        .map(|_| Reply::json(200, json!({"ok": true})))
        .collect();
    script.push(Reply::status(400));
    fake.route("/inventory/batch", script);
    let state = support::scratch("control-inventory");
    let records: Vec<Value> = (0..1000)
        .map(|i| json!({"sku": format!("SKU-{i:04}"), "qty": i % 7}))
        .collect();
    let input = json!({"records": records, "warehouse_api": fake.url("")});
    let ran = support::run_pipeline(
        &pipeline("inventory-sync.pipeline.json"),
        &input,
        &["--state", state.to_str().unwrap()],
    )
    .await;
    assert_eq!(ran.code, 1, "stderr:\n{}", ran.stderr);
    let first = fake.seen("/inventory/batch");
    assert!(fake.max_in_flight() <= 4, "{}", fake.max_in_flight());
    let ok: Vec<&support::fake::Seen> = first.iter().take(6).collect();
    for s in &ok {
        let body: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(body["records"].as_array().unwrap().len(), 100);
    }
    let keys: std::collections::HashSet<&str> = first
        .iter()
        .filter_map(|s| s.header("idempotency-key"))
        .collect();
    let batches: std::collections::HashSet<i64> = first
        .iter()
        .map(|s| {
            serde_json::from_slice::<Value>(&s.body).unwrap()["batch"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        keys.len(),
        batches.len(),
        "one key per batch, the same key on a retry"
    );

    // The journal shows each iteration; a replay reuses the six accepted batches.
    let mut show = support::fmhost();
    show.args(["--state", state.to_str().unwrap(), "runs", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&support::output(show).await.stdout).unwrap();
    let run_id = listed[0]["run_id"].as_str().unwrap().to_string();
    let mut show = support::fmhost();
    show.args([
        "--state",
        state.to_str().unwrap(),
        "runs",
        "show",
        &run_id,
        "--json",
    ]);
    let detail: Value = serde_json::from_slice(&support::output(show).await.stdout).unwrap();
    let accepted: Vec<&str> = detail["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["id"].as_str().unwrap().starts_with("upsert[") && s["status"] == "succeeded")
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(accepted.len(), 6, "{detail:#}");

    fake.route(
        "/inventory/batch",
        vec![Reply::json(200, json!({"ok": true}))],
    );
    let before = fake.seen("/inventory/batch").len();
    let mut replay = support::fmhost();
    replay.args(["--state", state.to_str().unwrap(), "replay", &run_id]);
    let replayed: support::Ran = support::output(replay).await.into();
    assert_eq!(replayed.code, 0, "stderr:\n{}", replayed.stderr);
    assert_eq!(
        fake.seen("/inventory/batch").len() - before,
        4,
        "only the four missing batches are sent again"
    );
    assert!(
        replayed
            .stderr
            .contains("synced 1000 records in 10 batches"),
        "{}",
        replayed.stderr
    );
}

#[tokio::test]
async fn rates_fall_back_to_defaults_when_the_vendor_is_down() {
    let fake = Fake::start().await;
    fake.route("/rates/latest", vec![Reply::status(503)]);
    let dir = support::scratch("control-rates");
    let report_file = dir.join("report.json");
    let args = [
        "--plugins",
        &plugins(),
        "--report",
        report_file.to_str().unwrap(),
    ];
    let ran = support::run_pipeline(
        &pipeline("rates-fallback.pipeline.json"),
        &json!({"rates_api": fake.url("")}),
        &args,
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    let out = ran.json();
    assert_eq!(out["fallback"], true);
    assert_eq!(out["rates"]["source"], "default");
    // Three failures open the breaker; the remaining attempts are refused without a call.
    assert_eq!(out["why"], "circuit-open", "{out:#}");
    assert_eq!(fake.seen("/rates/latest").len(), 3);
    let report = read_report(&report_file);
    assert_eq!(stage(&report, "guard")["output"]["status"], "caught");
    assert_eq!(stage(&report, "fetch-rates")["status"], "failed");
    assert_eq!(stage(&report, "default-rates")["status"], "succeeded");

    let fake = Fake::start().await;
    fake.route(
        "/rates/latest",
        vec![Reply::json(200, json!({"base": "USD", "EUR": 0.93}))],
    );
    let ran = support::run_pipeline(
        &pipeline("rates-fallback.pipeline.json"),
        &json!({"rates_api": fake.url("")}),
        &args,
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(
        ran.json(),
        json!({"rates": {"base": "USD", "EUR": 0.93}, "fallback": false, "why": null})
    );
    let report = read_report(&report_file);
    assert_eq!(stage(&report, "default-rates")["status"], "skipped");
}

#[tokio::test]
async fn webhooks_are_routed_by_event_type() {
    let fake = Fake::start().await;
    fake.route(
        "/ledger/payments",
        vec![Reply::json(201, json!({"recorded": true}))],
    );
    fake.route("/crm/churn", vec![Reply::json(202, json!({}))]);
    let dir = support::scratch("control-router");
    let report_file = dir.join("report.json");
    let args = ["--report", report_file.to_str().unwrap()];
    let event = |id: &str, kind: &str| json!({"id": id, "type": kind, "data": {"ledger_api": fake.url(""), "object": {"amount_paid": 4990, "customer": "cus_1"}}});

    let ran = support::run_pipeline(
        &pipeline("webhook-router.pipeline.json"),
        &event("evt_1", "invoice.paid"),
        &args,
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(
        ran.json()["variables"],
        json!({"event": "evt_1", "route": "invoice.paid", "recorded": true, "churn_notified": false})
    );
    let paid = fake.seen("/ledger/payments");
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].header("idempotency-key"), Some("evt_1"));
    assert!(fake.seen("/crm/churn").is_empty());
    let report = read_report(&report_file);
    assert_eq!(stage(&report, "notify-churn")["status"], "skipped");
    assert_eq!(
        stage(&report, "notify-churn")["skipped_because"],
        "branch not taken by \"route\""
    );

    let ran = support::run_pipeline(
        &pipeline("webhook-router.pipeline.json"),
        &event("evt_2", "charge.refunded"),
        &args,
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(ran.json()["variables"]["route"], "default");
    assert!(
        ran.stderr
            .contains("unhandled event type charge.refunded (evt_2)"),
        "{}",
        ran.stderr
    );
    assert_eq!(fake.seen("/ledger/payments").len(), 1);
}

fn enrich_routes(fake: &Fake) {
    for (id, name, plan) in [
        ("c1", "Acme", "Pro"),
        ("c2", "Globex", "Starter"),
        ("c3", "Initech", "Enterprise"),
    ] {
        fake.route(
            &format!("/crm/accounts/{id}"),
            vec![Reply::json(200, json!({"Name": name}))],
        );
        fake.route(
            &format!("/billing/customers/{id}"),
            vec![Reply::json(
                200,
                json!({"subscriptions": {"data": [{"plan": {"nickname": plan}}]}}),
            )],
        );
    }
}

#[tokio::test]
async fn one_sub_pipeline_serves_two_pipelines() {
    let fake = Fake::start().await;
    enrich_routes(&fake);
    let dir = support::scratch("control-subpipeline");
    let report_file = dir.join("report.json");
    let ran = support::run_pipeline(
        &pipeline("customer-sync.pipeline.json"),
        &json!({"customer_ids": ["c1", "c2", "c3"], "api": fake.url("")}),
        &[
            "--plugins",
            &plugins(),
            "--report",
            report_file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(
        ran.json(),
        json!([
            {"customer_id": "c1", "company": "Acme", "plan": "Pro"},
            {"customer_id": "c2", "company": "Globex", "plan": "Starter"},
            {"customer_id": "c3", "company": "Initech", "plan": "Enterprise"}
        ])
    );
    assert!(fake.max_in_flight() <= 4);
    let report = read_report(&report_file);
    assert_eq!(stage(&report, "enrich[1]/crm")["status"], "succeeded");
    assert_eq!(stage(&report, "enrich[2]/result")["status"], "succeeded");

    let ran = support::run_pipeline(
        &pipeline("order-intake.pipeline.json"),
        &json!({"order_id": "ord_9", "customer_id": "c2", "api": fake.url("")}),
        &["--report", report_file.to_str().unwrap()],
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(
        ran.json()["variables"],
        json!({"order_id": "ord_9", "company": "Globex", "lane": "standard"})
    );
    let report = read_report(&report_file);
    assert_eq!(stage(&report, "priority")["status"], "skipped");
    assert_eq!(stage(&report, "customer/billing")["status"], "succeeded");
}

#[tokio::test]
async fn return_ends_the_run_early_and_loops_keep_their_own_variables() {
    let dir = support::scratch("control-return");
    let doc = json!({
        "name": "early",
        "stages": [
            {"id": "each", "component": "foreach", "config": {
                "items": "{{input.items}}", "loop_stages": ["double", "check"], "parallel": true, "max_parallel": 3}},
            {"id": "double", "component": "variable_set", "depends_on": ["each"],
             "config": {"name": "twice", "value": "{{context.item}}"}},
            {"id": "check", "component": "filter", "depends_on": ["double"],
             "config": {"data": {"item": "{{context.item}}", "index": "{{context.index}}", "seen": "{{upstream.each.current_item}}"},
                        "condition": "data.item == data.seen"}},
            {"id": "stop", "component": "return", "depends_on": ["each"],
             "config": {"condition": "{{len(stages.each.output.results) == 3 and input.stop}}",
                        "return_value": {"checked": "{{stages.each.output.results}}"}}},
            {"id": "after", "component": "logger", "depends_on": ["stop"], "config": {"message": "not reached"}}
        ]
    });
    let file = support::write_json(&dir, "early.pipeline.json", &doc);
    let report_file = dir.join("report.json");
    let args = ["--report", report_file.to_str().unwrap()];
    let ran = support::run_pipeline(
        &file,
        &json!({"items": ["a", "b", "c"], "stop": true}),
        &args,
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    let out = ran.json();
    let checked = out["checked"].as_array().unwrap();
    assert_eq!(checked.len(), 3);
    for (i, c) in checked.iter().enumerate() {
        // Each iteration saw its own item, however the iterations interleaved.
        assert_eq!(c["passed"], true, "{out:#}");
        assert_eq!(c["data"]["index"], i);
    }
    let report = read_report(&report_file);
    assert_eq!(stage(&report, "after")["status"], "skipped");
    assert_eq!(stage(&report, "check[2]")["status"], "succeeded");

    let ran = support::run_pipeline(&file, &json!({"items": ["a"], "stop": false}), &args).await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(
        stage(&read_report(&report_file), "after")["status"],
        "succeeded"
    );
}

#[tokio::test]
async fn validate_names_every_misuse_of_control_flow() {
    let dir = support::scratch("control-validate");
    support::write_json(
        &dir,
        "a.pipeline.json",
        &json!({"name": "a", "stages": [
        {"id": "call-b", "component": "subpipeline", "config": {"pipeline_id": "b"}}]}),
    );
    support::write_json(
        &dir,
        "b.pipeline.json",
        &json!({"name": "b", "stages": [
        {"id": "call-a", "component": "subpipeline", "config": {"pipeline_id": "a"}}]}),
    );
    let bad = support::write_json(
        &dir,
        "bad.pipeline.json",
        &json!({"name": "bad", "stages": [
            {"id": "cond", "component": "conditional", "config": {"condition": "{{input.x}}", "true_branch": "yes", "false_branch": "nope"}},
            {"id": "yes", "component": "logger", "config": {"message": "no depends_on"}},
            {"id": "each", "component": "foreach", "config": {"items": [1, 2], "loop_stages": ["body"], "max_parallel": 0}},
            {"id": "body", "component": "logger", "depends_on": ["each"], "config": {"message": "{{context.itm}}"}},
            {"id": "outside", "component": "logger", "depends_on": ["body"], "config": {"message": "{{stages.body.output}}"}},
            {"id": "try", "component": "trycatch", "config": {"try_stages": ["body"], "catch_error_types": ["KaboomError"]}},
            {"id": "sub", "component": "subpipeline", "config": {"pipeline_id": "missing-one"}},
            {"id": "loop", "component": "subpipeline", "config": {"pipeline_id": "a"}},
            {"id": "plain", "component": "conditional", "config": {"condition": "input.x > 1"}}
        ]}),
    );
    let mut cmd = support::fmhost();
    cmd.arg("validate").arg(&bad);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    for expected in [
        "config.false_branch: unknown stage \"nope\"",
        "stage \"yes\": depends_on: stage \"yes\" is governed by \"cond\" (true_branch) but does not depend on it",
        "stage \"each\": config.max_parallel: expected an integer of at least 1",
        "`context.itm`: nothing sets `itm`",
        "stage \"outside\": depends_on: stage \"body\" runs once per item inside \"each\"",
        "stage \"body\" is listed in \"each\"'s loop_stages and \"try\"'s try_stages; a stage belongs to one block",
        "config.catch_error_types[0]: unknown error type \"KaboomError\"",
        "sub-pipeline \"missing-one\" not found",
        "sub-pipelines call each other in a cycle: a.pipeline.json -> b.pipeline.json -> a.pipeline.json",
        "stage \"plain\": config.condition: \"input.x > 1\" is plain text, so it is always true",
    ] {
        assert!(
            ran.stderr.contains(expected),
            "missing {expected:?} in:\n{}",
            ran.stderr
        );
    }
}

/// A server killed with SIGKILL in the middle of a loop resumes it at the next start:
/// the iterations that finished are not sent again, the one in flight is re-sent with
/// the same idempotency key, and the run succeeds.
#[tokio::test]
async fn a_loop_interrupted_by_a_crash_resumes_where_it_stopped() {
    let fake = Fake::start().await;
    fake.route(
        "/upsert",
        vec![Reply::json(200, json!({"ok": true})).delay(Duration::from_millis(400))],
    );
    let dir = support::scratch("control-crash-resume");
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    support::write_json(
        &pipelines,
        "upserts.json",
        &json!({"name": "upserts", "stages": [
            {"id": "each", "component": "foreach", "config": {"items": "{{input.ids}}", "loop_stages": ["upsert"]}},
            {"id": "upsert", "component": "http-request", "depends_on": ["each"], "config": {
                "url": fake.url("/upsert"), "method": "POST", "body": {"id": "{{context.item}}"},
                "retry": {"max_attempts": 2, "delay_seconds": 0.1}}}
        ]}),
    );
    let plugins = dir.join("no-plugins");
    let client = support::api_client();
    let mut server = crate::serve::Server::start(&dir, &pipelines, &plugins, &json!({}));
    let accepted: Value = client
        .post(format!(
            "{}/v1/pipelines/upserts/runs?mode=async",
            server.url
        ))
        .json(&json!({"ids": ["a", "b", "c", "d", "e"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = accepted["run_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fake.seen("/upsert").len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop never got to its third item"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.child.kill().unwrap(); // SIGKILL, with item "c" in flight
    let _ = server.child.wait();

    let server = crate::serve::Server::start(&dir, &pipelines, &plugins, &json!({}));
    let run = loop {
        let run: Value = client
            .get(format!("{}/v1/runs/{run_id}", server.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if run["status"] != "running" {
            break run;
        }
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(20),
            "{run:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", server.log());
    let seen = fake.seen("/upsert");
    let ids: Vec<String> = seen
        .iter()
        .map(|s| {
            serde_json::from_slice::<Value>(&s.body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        ids,
        ["a", "b", "c", "c", "d", "e"],
        "a and b are not sent again"
    );
    assert_eq!(
        seen[2].header("idempotency-key"),
        seen[3].header("idempotency-key")
    );
    assert_ne!(
        seen[3].header("idempotency-key"),
        seen[4].header("idempotency-key")
    );
    let results = &stage(&run, "each")["output"]["results"];
    assert_eq!(results.as_array().unwrap().len(), 5, "{run:#}");
}

/// Controllers nest: a conditional and a loop inside a loop body, and a trycatch inside
/// the inner loop that lists stages the loop lists too (they belong to the trycatch).
#[tokio::test]
async fn controllers_nest_inside_loops() {
    let dir = support::scratch("control-nested");
    let doc: Value = serde_json::from_str(r#"{"name": "nested", "stages": [{"id": "outer", "component": "foreach", "config": {"items": "{{input.groups}}", "item_variable": "group", "loop_stages": ["check", "inner", "big", "small"], "parallel": true}}, {"id": "check", "component": "conditional", "depends_on": ["outer"], "config": {"condition": "{{len(context.group.members) > 1}}", "true_branch": "big", "false_branch": ["small"]}}, {"id": "big", "component": "variable_set", "depends_on": ["check"], "config": {"name": "size", "value": "big"}}, {"id": "small", "component": "variable_set", "depends_on": ["check"], "config": {"name": "size", "value": "small"}}, {"id": "inner", "component": "foreach", "depends_on": ["big", "small"], "config": {"items": "{{context.group.members}}", "item_variable": "m", "loop_stages": ["guard", "work", "fallback"]}}, {"id": "guard", "component": "trycatch", "depends_on": ["inner"], "config": {"try_stages": ["work"], "catch_stages": ["fallback"], "error_scope": "continue", "catch_error_types": ["validation"]}}, {"id": "work", "component": "filter", "depends_on": ["guard"], "config": {"data": "{{context.m}}", "filter_mode": "filter_array", "condition": "item > 0"}}, {"id": "fallback", "component": "variable_set", "depends_on": ["guard"], "config": {"variables": {"caught": "{{stages.guard.output.error_type}}", "m": "{{context.m}}", "group": "{{context.group.name}}", "size": "{{context.size}}"}}}, {"id": "done", "component": "return", "depends_on": ["outer"], "config": {"return_value": {"groups": "{{stages.outer.output.results}}", "n": "{{stages.outer.output.processed_items}}"}}}]}"#).unwrap();
    let file = support::write_json(&dir, "nested.pipeline.json", &doc);
    let report_file = dir.join("report.json");
    let ran = support::run_pipeline(
        &file,
        &json!({"groups": [{"name": "a", "members": [[1, 2], 5]}, {"name": "b", "members": [[0, 3]]}, {"name": "c", "members": []}]}),
        &["--report", report_file.to_str().unwrap()],
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(ran.json()["n"], 3);
    let report = read_report(&report_file);
    let status = |id: &str| stage(&report, id)["status"].as_str().unwrap().to_string();
    assert_eq!(status("big[0]"), "succeeded");
    assert_eq!(status("small[0]"), "skipped");
    assert_eq!(status("big[1]"), "skipped");
    assert_eq!(status("work[0][0]"), "succeeded");
    // 5 is not a list: the filter fails with a validation error, which the trycatch catches.
    assert_eq!(status("work[0][1]"), "failed");
    assert_eq!(status("guard[0][1]"), "succeeded");
    assert_eq!(status("fallback[0][1]"), "succeeded");
    assert_eq!(status("inner[2]"), "succeeded");
}

/// A replay decides nothing twice: a reused conditional skips the same branch again and a
/// reused variable_set sets the same variable, so only the stages asked for run again.
#[tokio::test]
async fn a_replay_keeps_the_branches_and_variables_of_the_run_it_replays() {
    let fake = Fake::start().await;
    enrich_routes(&fake);
    let state = support::scratch("control-replay-branches");
    let state_arg = state.to_str().unwrap();
    let ran = support::run_pipeline(
        &pipeline("order-intake.pipeline.json"),
        &json!({"order_id": "ord_1", "customer_id": "c1", "api": fake.url("")}),
        &["--state", state_arg],
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(ran.json()["variables"]["lane"], "priority");
    let mut list = support::fmhost();
    list.args(["--state", state_arg, "runs", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&support::output(list).await.stdout).unwrap();
    let run_id = listed[0]["run_id"].as_str().unwrap().to_string();
    let calls = fake.all_seen().len();

    let mut replay = support::fmhost();
    replay.args([
        "--state", state_arg, "replay", &run_id, "--from", "accepted",
    ]);
    let replayed: support::Ran = support::output(replay).await.into();
    assert_eq!(replayed.code, 0, "stderr:\n{}", replayed.stderr);
    assert_eq!(
        replayed.json()["variables"],
        json!({"order_id": "ord_1", "company": "Acme", "lane": "priority"})
    );
    assert_eq!(
        fake.all_seen().len(),
        calls,
        "nothing upstream is called again"
    );
    let mut list = support::fmhost();
    list.args(["--state", state_arg, "runs", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&support::output(list).await.stdout).unwrap();
    let replay_id = listed[0]["run_id"].as_str().unwrap().to_string();
    assert_ne!(replay_id, run_id);
    let mut show = support::fmhost();
    show.args(["--state", state_arg, "runs", "show", &replay_id, "--json"]);
    let report: Value = serde_json::from_slice(&support::output(show).await.stdout).unwrap();
    assert_eq!(
        stage(&report, "standard")["status"],
        "skipped",
        "{report:#}"
    );
    assert_eq!(stage(&report, "priority")["reused_from"], run_id.as_str());
}

/// FlowMason's loader spellings run unchanged: `$schema`, `input_schema`,
/// `output_stage_id`, `component_type`, `input_mapping` over `config`, `position`,
/// `llm_settings`, `{{upstream.ID}}`; and what fmhost does not run is named.
#[tokio::test]
async fn flowmason_loader_spellings_run_unchanged() {
    let dir = support::scratch("control-spellings");
    let file = support::write_json(
        &dir,
        "im.pipeline.json",
        &json!({
        "name": "im", "$schema": "https://flowmason.dev/schemas/pipeline.schema.json",
        "input_schema": {"type": "object", "required": ["x"]}, "output_stage_id": "set",
        "stages": [
            {"id": "log", "component_type": "logger", "config": {"message": "overridden"},
             "input_mapping": {"message": "x is {{input.x}}"}, "position": {"x": 1, "y": 2}, "llm_settings": {"model": "m"}},
            {"id": "set", "component_type": "variable_set", "depends_on": ["log"],
             "config": {"name": "x", "value": "{{upstream.log}}"}}
        ]}),
    );
    let ran = support::run_pipeline(&file, &json!({"x": 5}), &["--no-journal"]).await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert!(ran.stderr.contains("x is 5"), "{}", ran.stderr);
    assert_eq!(ran.json()["value"], json!({"x": 5}));
    let ran = support::run_pipeline(&file, &json!({}), &["--no-journal"]).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);

    let file = support::write_json(
        &dir,
        "c.pipeline.json",
        &json!({
        "name": "c", "compositions": [{"id": "x", "pipeline": "y"}], "stages": [
            {"id": "a", "component": "logger", "config": {"message": "hi"}}]}),
    );
    let mut cmd = support::fmhost();
    cmd.arg("validate").arg(&file);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 2);
    assert!(ran.stderr.contains("compositions: compositions are not supported; run the pipeline with a subpipeline stage"), "{}", ran.stderr);
}

/// A failure a trycatch recovered is not why the run failed: the run's error kind is
/// that of the stage that failed it.
#[tokio::test]
async fn a_recovered_failure_does_not_name_the_runs_error() {
    let fake = Fake::start().await;
    fake.route("/flaky", vec![Reply::status(503)]);
    fake.route("/gone", vec![Reply::status(404)]);
    let state = support::scratch("control-recovered");
    let file = support::write_json(
        &state,
        "p.pipeline.json",
        &json!({"name": "recovered", "stages": [
            {"id": "guard", "component": "trycatch", "config": {"try_stages": ["flaky"], "error_scope": "continue"}},
            {"id": "flaky", "component": "http-request", "depends_on": ["guard"], "config": {"url": fake.url("/flaky")}},
            {"id": "gone", "component": "http-request", "depends_on": ["guard"], "config": {"url": fake.url("/gone")}}
        ]}),
    );
    let report_file = state.join("report.json");
    let ran = support::run_pipeline(
        &file,
        &json!({}),
        &[
            "--state",
            state.to_str().unwrap(),
            "--report",
            report_file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let report = read_report(&report_file);
    assert_eq!(report["failed_stage"], "gone");
    assert_eq!(stage(&report, "flaky")["error"]["kind"], "http-5xx");
    assert_eq!(stage(&report, "guard")["output"]["status"], "caught");
    let mut list = support::fmhost();
    list.args(["--state", state.to_str().unwrap(), "runs", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&support::output(list).await.stdout).unwrap();
    assert_eq!(listed[0]["error_kind"], "http-4xx", "{listed:#}");
}

/// Nesting is bounded, and controllers that govern each other are one cycle, not a hang.
#[tokio::test]
async fn nesting_is_bounded_and_mutual_controllers_are_a_cycle() {
    let dir = support::scratch("control-bounds");
    let mut stages: Vec<Value> = (0..40)
        .map(|i| {
            let body = if i < 39 {
                format!("f{}", i + 1)
            } else {
                "leaf".into()
            };
            let deps: Vec<String> = if i > 0 {
                vec![format!("f{}", i - 1)]
            } else {
                vec![]
            };
            json!({"id": format!("f{i}"), "component": "foreach", "depends_on": deps,
                   "config": {"items": [1], "loop_stages": [body]}})
        })
        .collect();
    stages.push(json!({"id": "leaf", "component": "logger", "depends_on": ["f39"], "config": {"message": "x"}}));
    let deep = support::write_json(
        &dir,
        "deep.pipeline.json",
        &json!({"name": "deep", "stages": stages}),
    );
    let cyc = support::write_json(
        &dir,
        "cyc.pipeline.json",
        &json!({"name": "cyc", "stages": [
            {"id": "a", "component": "foreach", "depends_on": ["b"], "config": {"items": [1], "loop_stages": ["b"]}},
            {"id": "b", "component": "foreach", "depends_on": ["a"], "config": {"items": [1], "loop_stages": ["a"], "max_parallel": 5000}}
        ]}),
    );
    for (file, expected) in [
        (deep, "controllers are nested more than 32 deep"),
        (cyc, "cycle: a -> b -> a"),
    ] {
        let mut cmd = support::fmhost();
        cmd.arg("validate").arg(&file);
        let ran: support::Ran = support::output(cmd).await.into();
        assert_eq!(ran.code, 2, "{}", ran.stderr);
        assert!(ran.stderr.contains(expected), "{}", ran.stderr);
    }
}
