//! Every example pipeline is exercised by a test, and this file keeps that list honest.

use serde_json::json;

use crate::support::{self, Fake, Reply};

/// Example pipelines and the test that runs each one.
const EXERCISED: &[(&str, &str)] = &[
    (
        "order-events.pipeline.json",
        "queue::a_thousand_messages_run_once_each_across_kills_of_both_servers",
    ),
    (
        "customer-360-connectors.pipeline.json",
        "plugins::customer_360_with_connector_plugins_gives_the_same_output",
    ),
    (
        "customer-360.pipeline.json",
        "plugins::customer_360_runs_with_wasm_transforms_and_generator",
    ),
    (
        "parallel-fetch.pipeline.json",
        "examples::parallel_fetch_runs_stages_concurrently",
    ),
    (
        "shipping-quotes.pipeline.json",
        "control::shipping_quotes_rank_the_carriers_that_answered",
    ),
    (
        "inventory-sync.pipeline.json",
        "control::inventory_sync_batches_a_thousand_records_and_a_replay_sends_only_what_is_missing",
    ),
    (
        "rates-fallback.pipeline.json",
        "control::rates_fall_back_to_defaults_when_the_vendor_is_down",
    ),
    (
        "webhook-router.pipeline.json",
        "control::webhooks_are_routed_by_event_type",
    ),
    (
        "enrich-customer.pipeline.json",
        "control::one_sub_pipeline_serves_two_pipelines",
    ),
    (
        "customer-sync.pipeline.json",
        "control::one_sub_pipeline_serves_two_pipelines",
    ),
    (
        "scheduled-inventory.pipeline.json",
        "triggers::the_triggered_examples_run_as_written",
    ),
    (
        "incremental-sync.pipeline.json",
        "triggers::the_triggered_examples_run_as_written",
    ),
    (
        "partner-files.pipeline.json",
        "triggers::the_triggered_examples_run_as_written",
    ),
    (
        "order-intake.pipeline.json",
        "control::one_sub_pipeline_serves_two_pipelines",
    ),
];

#[test]
fn every_example_pipeline_is_exercised() {
    let mut found: Vec<String> = std::fs::read_dir(support::root().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pipeline.json"))
        .collect();
    found.sort();
    let mut listed: Vec<String> = EXERCISED.iter().map(|(f, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "pipelines/ and the EXERCISED list differ: add a test for each new example"
    );
}

pub fn sources(fake: &Fake, delay: std::time::Duration) {
    fake.route(
        "/crm/accounts/cust_abc123def456gh",
        vec![Reply::json(200, json!({"Name": "Acme Corp", "Industry": "Technology"})).delay(delay)],
    );
    fake.route(
        "/billing/customers/cust_abc123def456gh",
        vec![
            Reply::json(
                200,
                json!({"subscriptions": {"data": [{"plan": {"nickname": "Pro"}}]}}),
            )
            .delay(delay),
        ],
    );
    fake.route(
        "/support/contacts/cust_abc123def456gh",
        vec![Reply::json(200, json!({"statistics": {"open_tickets": 2}})).delay(delay)],
    );
    fake.route(
        "/usage/cust_abc123def456gh",
        vec![Reply::json(200, json!({"usage": {"active_days_30d": 22}})).delay(delay)],
    );
}

#[tokio::test]
async fn parallel_fetch_runs_stages_concurrently() {
    let fake = Fake::start().await;
    sources(&fake, std::time::Duration::from_millis(200));
    let dir = support::scratch("parallel-fetch");
    let report = dir.join("report.json");
    let secrets = support::write_json(
        &dir,
        "secrets.json",
        &json!({"CRM_TOKEN": "crm-token-5f2a9c"}),
    );
    let ran = support::run_pipeline(
        &support::root().join("pipelines/parallel-fetch.pipeline.json"),
        &json!({"customer_id": "cust_abc123def456gh", "api": fake.url("")}),
        &[
            "--report",
            report.to_str().unwrap(),
            "--secrets",
            secrets.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(ran.code, 0, "stderr:\n{}", ran.stderr);
    assert_eq!(
        ran.json(),
        json!({"customer_id": "cust_abc123def456gh", "company": "Acme Corp", "plan": "Pro", "open_tickets": 2, "active_days": 22})
    );
    // The server saw all four 200 ms requests in flight at once.
    assert_eq!(fake.max_in_flight(), 4);
    let billing = fake.seen("/billing/customers/cust_abc123def456gh");
    assert_eq!(
        billing[0].query,
        "expand%5B%5D=subscriptions&expand%5B%5D=invoice_settings"
    );
    assert_eq!(
        fake.seen("/crm/accounts/cust_abc123def456gh")[0].header("authorization"),
        Some("Bearer crm-token-5f2a9c")
    );
    assert!(!ran.stderr.contains("crm-token-5f2a9c"));
    assert_eq!(
        fake.seen("/support/contacts/cust_abc123def456gh")[0].header("intercom-version"),
        Some("2.10")
    );
    // Progress names every stage; the logger's message is there too.
    for stage in [
        "validate-input",
        "fetch-crm",
        "fetch-billing",
        "fetch-support",
        "fetch-usage",
        "combine",
        "log-completion",
    ] {
        assert!(
            ran.stderr.contains(&format!("{stage}: done in")),
            "no progress for {stage}:\n{}",
            ran.stderr
        );
    }
    assert!(
        ran.stderr
            .contains("customer cust_abc123def456gh (Acme Corp): 2 open tickets"),
        "{}",
        ran.stderr
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["stages"].as_array().unwrap().len(), 7);
}
