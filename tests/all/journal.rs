//! The run journal through the real binary: a failed run is found, understood,
//! dead-lettered, retried after the fault is fixed and replayed from a middle stage;
//! a corrupt or locked journal is refused with a clear error.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::{self, Fake, Ran, Reply};

const TOKEN: &str = "orders-token-7f3a9c2e";

/// fetch-order -> fetch-customer -> push-invoice (a POST, retried once).
fn orders_pipeline(dir: &Path) -> PathBuf {
    support::write_json(
        dir,
        "orders-sync.pipeline.json",
        &json!({
            "name": "orders-sync",
            "stages": [
                {"id": "fetch-order", "component": "http-request", "config": {
                    "url": "{{input.api}}/orders/{{input.order_id}}",
                    "headers": {"Authorization": "Bearer {{secrets.ORDERS_TOKEN}}"}}},
                {"id": "fetch-customer", "component": "http-request", "depends_on": ["fetch-order"], "config": {
                    "url": "{{input.api}}/customers/{{stages.fetch-order.output.body.customer}}"}},
                {"id": "push-invoice", "component": "http-request", "depends_on": ["fetch-customer"], "config": {
                    "url": "{{input.api}}/invoices", "method": "POST",
                    "body": {"order": "{{input.order_id}}", "email": "{{stages.fetch-customer.output.body.email}}"},
                    "retry": {"max_attempts": 2, "delay_seconds": 0.05}}}
            ]
        }),
    )
}

async fn fmhost(state: &Path, args: &[&str]) -> Ran {
    let mut cmd = support::fmhost();
    cmd.arg("--state").arg(state).args(args);
    support::output(cmd).await.into()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_failed_run_is_dead_lettered_retried_once_fixed_and_replayed_from_a_middle_stage() {
    let fake = Fake::start().await;
    // The vendor echoes the token back: the journal must still not hold it.
    fake.route(
        "/orders/o-1",
        vec![Reply::json(
            200,
            json!({"customer": "c-9", "seen_token": TOKEN}),
        )],
    );
    fake.route(
        "/orders/o-2",
        vec![Reply::json(200, json!({"customer": "c-9"}))],
    );
    fake.route(
        "/customers/c-9",
        vec![Reply::json(200, json!({"email": "ada@example.com"}))],
    );
    fake.route(
        "/invoices",
        vec![Reply::json(503, json!({"error": "down"}))],
    );
    let dir = support::scratch("journal-replay");
    let state = dir.join("state");
    let pipeline = orders_pipeline(&dir);
    let secrets = support::write_json(&dir, "secrets.json", &json!({"ORDERS_TOKEN": TOKEN}));
    let secrets = secrets.to_str().unwrap();
    let input = |order: &str| json!({"api": fake.url(""), "order_id": order}).to_string();
    let p = pipeline.to_str().unwrap();

    // Two runs fail on the invoice API, after their retries.
    let first = fmhost(
        &state,
        &[
            "run",
            p,
            "--input-json",
            &input("o-1"),
            "--secrets",
            secrets,
        ],
    )
    .await;
    assert_eq!(first.code, 1, "{}", first.stderr);
    let second = fmhost(
        &state,
        &[
            "run",
            p,
            "--input-json",
            &input("o-2"),
            "--secrets",
            secrets,
        ],
    )
    .await;
    assert_eq!(second.code, 1, "{}", second.stderr);

    // Found: by pipeline and status.
    let listed = fmhost(
        &state,
        &[
            "runs",
            "list",
            "--pipeline",
            "orders-sync",
            "--status",
            "failed",
            "--since",
            "1h",
            "--json",
        ],
    )
    .await;
    let listed = listed.json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    let (run1, run2) = (ids[1].to_string(), ids[0].to_string());
    assert_eq!(listed[0]["error_kind"], "http-5xx");

    // Understood: stages, attempts, error kinds and outputs.
    let shown = fmhost(&state, &["runs", "show", &run1, "--json"])
        .await
        .json();
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["error_kind"], "http-5xx");
    let stage = |run: &Value, id: &str| -> Value {
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()
            .clone()
    };
    let push = stage(&shown, "push-invoice");
    assert_eq!(push["status"], "failed");
    assert_eq!(push["attempts"], 2);
    assert_eq!(push["error"]["kind"], "http-5xx");
    let calls = push["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{push}");
    assert!(calls.iter().all(|c| c["status"] == 503));
    assert_eq!(
        calls[0]["idempotency_key"], calls[1]["idempotency_key"],
        "one key for all attempts"
    );
    assert_eq!(
        stage(&shown, "fetch-customer")["output"]["body"]["email"],
        "ada@example.com"
    );
    let text = fmhost(&state, &["runs", "show", &run1]).await;
    assert!(
        text.stdout.contains("push-invoice") && text.stdout.contains("[http-5xx]"),
        "{}",
        text.stdout
    );

    // Secrets are never written, even when a vendor echoes one back.
    assert!(
        !contains(&support::journal_text(&state), TOKEN),
        "the token is in the journal"
    );
    assert_eq!(
        stage(&shown, "fetch-order")["output"]["body"]["seen_token"],
        "{{secrets.ORDERS_TOKEN}}"
    );

    // Dead-lettered, with what it takes to retry.
    let dlq = fmhost(&state, &["dlq", "list", "--json"]).await.json();
    let entries = dlq.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{dlq}");
    let entry = entries
        .iter()
        .find(|e| e["run_id"] == run1.as_str())
        .unwrap();
    assert_eq!(entry["error_kind"], "http-5xx");
    assert!(
        entry["reason"].as_str().unwrap().contains("push-invoice"),
        "{entry}"
    );
    assert_eq!(entry["correlation_id"], run1.as_str());
    assert_eq!(entry["input"]["order_id"], "o-1");
    let invoices = fake.seen("/invoices");
    assert_eq!(
        invoices[0].header("x-correlation-id"),
        Some(run1.as_str()),
        "the id upstream logs carry"
    );
    let id = entry["id"].to_string();

    // Fixed upstream; the retry reuses what succeeded and resolves the entry.
    fake.route(
        "/invoices",
        vec![Reply::json(201, json!({"invoice": "in_1"}))],
    );
    // One command: the secrets file and plugin directories the run used are in the journal.
    let retried = fmhost(&state, &["dlq", "retry", &id]).await;
    assert_eq!(retried.code, 0, "{}\n{}", retried.stdout, retried.stderr);
    assert!(retried.stdout.contains("resolved"), "{}", retried.stdout);
    assert_eq!(
        fake.seen("/orders/o-1").len(),
        1,
        "fetch-order came from the journal"
    );
    assert_eq!(
        fake.seen("/customers/c-9").len(),
        2,
        "once per failed run, not again"
    );
    let sent: Value = serde_json::from_slice(&fake.seen("/invoices").last().unwrap().body).unwrap();
    assert_eq!(sent, json!({"order": "o-1", "email": "ada@example.com"}));
    let all = fmhost(&state, &["dlq", "show", &id, "--json"]).await.json();
    assert_eq!(all["status"], "resolved", "{all}");
    let retry_run = all["resolved_by"].as_str().unwrap().to_string();
    let original = fmhost(&state, &["runs", "show", &run1, "--json"])
        .await
        .json();
    assert_eq!(original["replayed_by"], json!([retry_run]));

    // Replay from the middle: upstream of fetch-customer comes from the journal.
    let before = fake.seen("/orders/o-1").len();
    let replayed = fmhost(
        &state,
        &[
            "replay",
            &retry_run,
            "--from",
            "fetch-customer",
            "--secrets",
            secrets,
        ],
    )
    .await;
    assert_eq!(replayed.code, 0, "{}", replayed.stderr);
    assert_eq!(replayed.json()["body"]["invoice"], "in_1");
    assert_eq!(
        fake.seen("/orders/o-1").len(),
        before,
        "no second request upstream of --from"
    );
    assert_eq!(fake.seen("/customers/c-9").len(), 3);
    let newest = fmhost(&state, &["runs", "list", "--limit", "1", "--json"])
        .await
        .json();
    let replay_run = fmhost(
        &state,
        &[
            "runs",
            "show",
            newest[0]["run_id"].as_str().unwrap(),
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(replay_run["replay_of"], retry_run.as_str());
    assert_eq!(replay_run["replay_from"], "fetch-customer");
    let reused = stage(&replay_run, "fetch-order");
    assert_eq!(reused["reused_from"], retry_run.as_str());
    assert_eq!(reused["calls"], json!([]));

    // Many at once: the failed runs since an hour ago that nothing has replayed yet (run2).
    let many = fmhost(
        &state,
        &[
            "replay",
            "--pipeline",
            "orders-sync",
            "--since",
            "1h",
            "--status",
            "failed",
            "--secrets",
            secrets,
        ],
    )
    .await;
    assert_eq!(many.code, 0, "{}\n{}", many.stdout, many.stderr);
    assert!(
        many.stdout.contains(&run2) && !many.stdout.contains(&run1),
        "{}",
        many.stdout
    );
    let open = fmhost(&state, &["dlq", "list", "--json"]).await.json();
    assert_eq!(open, json!([]), "both entries resolved");
    assert!(!contains(&support::journal_text(&state), TOKEN));
}

#[tokio::test]
async fn a_corrupt_or_locked_journal_is_refused_with_a_clear_error() {
    let fake = Fake::start().await;
    fake.route(
        "/orders/o-1",
        vec![Reply::json(200, json!({"customer": "c-1"}))],
    );
    fake.route(
        "/customers/c-1",
        vec![Reply::json(200, json!({"email": "x@example.com"}))],
    );
    fake.route("/invoices", vec![Reply::json(200, json!({}))]);
    let dir = support::scratch("journal-errors");
    let pipeline = orders_pipeline(&dir);
    let p = pipeline.to_str().unwrap();
    let input = json!({"api": fake.url(""), "order_id": "o-1"}).to_string();

    let secrets = support::write_json(&dir, "secrets.json", &json!({"ORDERS_TOKEN": TOKEN}));
    let secrets = secrets.to_str().unwrap();

    // A PostgreSQL journal that cannot be reached, or a journal URL of another kind:
    // named (its password masked), and nothing runs.
    for (url, says) in [
        (
            "postgres://fmhost:hunter2@127.0.0.1:1/journal",
            "cannot connect",
        ),
        ("mysql://127.0.0.1/journal", "must be a postgres://"),
    ] {
        for args in [
            vec![
                "--journal",
                url,
                "run",
                p,
                "--input-json",
                &input,
                "--secrets",
                secrets,
            ],
            vec!["--journal", url, "runs", "list"],
        ] {
            let ran = fmhost(&dir.join("unreachable"), &args).await;
            assert_eq!(ran.code, 1, "{args:?}: {}", ran.stderr);
            assert!(ran.stderr.contains("127.0.0.1"), "{}", ran.stderr);
            assert!(ran.stderr.contains(says), "{}", ran.stderr);
            assert!(!ran.stderr.contains("hunter2"), "{}", ran.stderr);
            assert!(!ran.stderr.contains("panicked"), "{}", ran.stderr);
        }
    }
    assert!(fake.seen("/orders/o-1").is_empty());
    if support::postgres_journal().is_some() {
        // What follows is about the SQLite file in the state directory.
        return;
    }

    // Corrupt: named, with what to do, and nothing runs.
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(
        corrupt.join("journal.db"),
        "this is not a database ".repeat(200),
    )
    .unwrap();
    for args in [
        vec!["run", p, "--input-json", &input, "--secrets", secrets],
        vec!["runs", "list"],
        vec!["dlq", "list"],
    ] {
        let ran = fmhost(&corrupt, &args).await;
        assert_eq!(ran.code, 1, "{args:?}: {}", ran.stderr);
        assert!(
            ran.stderr
                .contains(&corrupt.join("journal.db").display().to_string()),
            "{}",
            ran.stderr
        );
        assert!(
            ran.stderr.contains("not a usable fmhost journal"),
            "{}",
            ran.stderr
        );
        assert!(!ran.stderr.contains("panicked"), "{}", ran.stderr);
    }
    assert!(
        fake.seen("/orders/o-1").is_empty(),
        "a run that cannot be journaled does not start"
    );
    let opted_out = fmhost(
        &corrupt,
        &[
            "run",
            p,
            "--input-json",
            &input,
            "--secrets",
            secrets,
            "--no-journal",
        ],
    )
    .await;
    assert_eq!(opted_out.code, 0, "{}", opted_out.stderr);

    // Locked by another process: runs refuse after the busy timeout; reading still works.
    let locked = dir.join("locked");
    let ok = fmhost(
        &locked,
        &["run", p, "--input-json", &input, "--secrets", secrets],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let holder = rusqlite::Connection::open(locked.join("journal.db")).unwrap();
    holder
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO schema_migrations VALUES (99, 'held', 0);")
        .unwrap();
    let mut cmd = support::fmhost();
    cmd.arg("--state")
        .arg(&locked)
        .args(["run", p, "--input-json", &input, "--secrets", secrets]);
    cmd.env("FMHOST_JOURNAL_BUSY_TIMEOUT", "300ms")
        .env("FMHOST_SECRET_ORDERS_TOKEN", TOKEN);
    let refused = Ran::from(support::output(cmd).await);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("is locked by another process"),
        "{}",
        refused.stderr
    );
    let listed = fmhost(&locked, &["runs", "list", "--json"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert_eq!(listed.json().as_array().unwrap().len(), 1);
    holder.execute_batch("ROLLBACK").unwrap();
}

#[tokio::test]
async fn a_cli_run_killed_midway_is_dead_lettered_not_left_running() {
    let fake = Fake::start().await;
    fake.route(
        "/orders/o-1",
        vec![
            Reply::json(200, json!({"customer": "c-1"})).delay(std::time::Duration::from_secs(30)),
        ],
    );
    let dir = support::scratch("journal-killed-cli");
    let state = dir.join("state");
    let pipeline = orders_pipeline(&dir);
    let secrets = support::write_json(&dir, "secrets.json", &json!({"ORDERS_TOKEN": TOKEN}));
    let mut cmd = support::fmhost();
    cmd.arg("--state")
        .arg(&state)
        .arg("run")
        .arg(&pipeline)
        .arg("--secrets")
        .arg(&secrets)
        .arg("--input-json")
        .arg(json!({"api": fake.url(""), "order_id": "o-1"}).to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    while fake.seen("/orders/o-1").is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The next command that opens the journal finds the run's process gone.
    let runs = fmhost(&state, &["runs", "list", "--json"]).await.json();
    assert_eq!(runs[0]["status"], "failed", "{runs}");
    assert_eq!(runs[0]["error_kind"], "interrupted", "{runs}");
    let run_id = runs[0]["run_id"].as_str().unwrap();
    let shown = fmhost(&state, &["runs", "show", run_id, "--json"])
        .await
        .json();
    assert_eq!(shown["stages"][0]["status"], "failed", "{shown}");
    assert_eq!(shown["stages"][1]["status"], "skipped", "{shown}");
    let dlq = fmhost(&state, &["dlq", "list", "--json"]).await.json();
    assert_eq!(dlq[0]["run_id"], run_id, "{dlq}");
    assert_eq!(dlq[0]["kind"], "run");
}

#[tokio::test]
async fn processes_starting_together_share_a_new_journal() {
    let dir = support::scratch("journal-concurrent");
    let state = dir.join("state");
    let pipeline = support::write_json(
        &dir,
        "p.json",
        &json!({"name": "tiny", "stages": [{"id": "log", "component": "logger", "config": {"message": "hi"}}]}),
    );
    // SQLite answers some of these races with SQLITE_BUSY at once, without calling its
    // busy handler: the journal must wait and retry, not fail the run.
    // Staggered, so some open it while others are closing it (the last connection to
    // close checkpoints and removes the WAL) as well as all at once.
    let mut runs = Vec::new();
    for i in 0..32u64 {
        let mut cmd = support::fmhost();
        cmd.arg("--state").arg(&state).arg("run").arg(&pipeline);
        runs.push(tokio::spawn(support::output(cmd)));
        if i % 4 == 3 {
            tokio::time::sleep(std::time::Duration::from_millis(7)).await;
        }
    }
    for r in runs {
        let ran = Ran::from(r.await.unwrap());
        assert_eq!(ran.code, 0, "{}", ran.stderr);
    }
    let listed = fmhost(&state, &["runs", "list", "--json"]).await.json();
    assert_eq!(listed.as_array().unwrap().len(), 32, "{listed}");
}
