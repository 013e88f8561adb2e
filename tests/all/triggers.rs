//! Triggers beyond webhooks, in a real `fmhost serve`: a schedule across `kill -9`, a
//! schedule whose runs outlast its period, a poll walking a paged API by cursor, file
//! drops (written in pieces, a bad row, the same content twice), and an alert when a
//! circuit opens.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::serve::{Server, get_json, pipelines_dir};
use crate::support::{self, Fake, Reply};

async fn wait_for(what: &str, server: &Server, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn triggers(server: &Server) -> Vec<Value> {
    let v = get_json(
        &support::api_client(),
        format!("{}/v1/triggers", server.url),
    )
    .await;
    v.as_array().cloned().unwrap_or_default()
}

pub(crate) async fn metrics(server: &Server) -> String {
    let url = format!("{}/metrics", server.url);
    let resp = support::api_client().get(url).send().await.unwrap();
    resp.text().await.unwrap()
}

fn unix_ms(rfc: &str) -> i64 {
    humantime::parse_rfc3339(rfc)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Scheduled time -> the idempotency keys its requests carried.
fn ticks(fake: &Fake) -> BTreeMap<i64, HashSet<String>> {
    let mut by_time: BTreeMap<i64, HashSet<String>> = BTreeMap::new();
    for s in fake.seen("/tick") {
        let body: Value = serde_json::from_slice(&s.body).unwrap();
        by_time
            .entry(unix_ms(body["at"].as_str().unwrap()))
            .or_default()
            .insert(s.header("idempotency-key").unwrap_or("").to_string());
    }
    by_time
}

/// A schedule firing every second, killed with SIGKILL and started again three seconds
/// later: every second from the first fire to the last is run exactly once (the fires
/// missed while it was down are caught up; none is fired twice by the restart).
#[tokio::test]
async fn a_schedule_fires_once_per_time_across_kill_9_and_catches_up_what_it_missed() {
    let fake = Fake::start().await;
    fake.route("/tick", vec![Reply::json(200, json!({"ok": true}))]);
    let dir = support::scratch("trigger-schedule-kill");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "ticks.pipeline.json",
            json!({
                "name": "ticks",
                "triggers": [{"type": "schedule", "cron": "* * * * * *", "timezone": "Europe/Berlin",
                              "catch_up": "all", "catch_up_window": "1h", "input": {"source": "cron"}}],
                "stages": [{"id": "tick", "component": "http-request", "config": {
                    "url": fake.url("/tick"), "method": "POST",
                    "body": {"at": "{{trigger.scheduled_at}}", "id": "{{trigger.id}}", "source": "{{input.source}}"}}}]
            }),
        )],
    );
    let plugins = dir.join("no-plugins");
    let mut server = Server::start(&dir, &pipelines, &plugins, &json!({}));
    wait_for("three fires", &server, Duration::from_secs(20), || {
        ticks(&fake).len() >= 3
    })
    .await;
    let listed = triggers(&server).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["type"], "schedule");
    assert!(listed[0]["next_fire_at"].is_string(), "{listed:?}");
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let before = ticks(&fake).len();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let server = Server::start(&dir, &pipelines, &plugins, &json!({}));
    let resumed_at = Instant::now();
    wait_for(
        "fires after the restart",
        &server,
        Duration::from_secs(20),
        || ticks(&fake).len() >= before + 6 && resumed_at.elapsed() > Duration::from_secs(2),
    )
    .await;
    let seen = ticks(&fake);
    let times: Vec<i64> = seen.keys().copied().collect();
    let (first, last) = (times[0], *times.last().unwrap());
    for t in (first..=last).step_by(1000) {
        assert!(
            seen.contains_key(&t),
            "the fire at {t} never ran (first {first}, last {last}): {times:?}\n{}",
            server.log()
        );
        // Sent again only by a resumed run, under its own key; never by a second run.
        assert_eq!(
            seen[&t].len(),
            1,
            "the fire at {t} ran as more than one run: {:?}",
            seen[&t]
        );
    }
    let bodies: Vec<Value> = fake
        .seen("/tick")
        .iter()
        .map(|s| serde_json::from_slice(&s.body).unwrap())
        .collect();
    assert!(
        bodies
            .iter()
            .all(|b| b["source"] == "cron" && b["id"].as_str().unwrap().starts_with("schedule@"))
    );
    let listed = triggers(&server).await;
    assert_eq!(
        listed[0]["missed"], 0,
        "every missed fire was inside the window: {listed:?}"
    );
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains("fmhost_trigger_fires_total{pipeline=\"ticks\",trigger=\"schedule\"}"),
        "{metrics}"
    );

    // `fmhost schedules list` reads the same journal and the pipeline files.
    let out = support::output({
        let mut c = support::fmhost();
        c.args(["schedules", "list", "--json", "--next", "3"])
            .arg("--pipelines")
            .arg(&pipelines)
            .arg("--state")
            .arg(dir.join("state"));
        c
    })
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["trigger"], "schedule");
    assert_eq!(listed[0]["next_fire_at"].as_array().unwrap().len(), 3);
    assert!(listed[0]["last_fire_at"].is_string(), "{listed}");
    eprintln!(
        "schedule: {} fires from {first} to {last}, {before} before the kill, each run once",
        seen.len()
    );
}

/// A run that takes 2.5 s on a one-second schedule with `overlap: skip`: the fires it
/// covers do not run, and every one of them is journaled, counted and shown, so runs
/// plus skips account for every second.
#[tokio::test]
async fn a_schedule_slower_than_its_period_skips_fires_and_accounts_for_every_one() {
    let fake = Fake::start().await;
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({"ok": true})).delay(Duration::from_millis(2500))],
    );
    let dir = support::scratch("trigger-schedule-overlap");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "slow.pipeline.json",
            json!({
                "name": "slow",
                "triggers": [{"type": "schedule", "name": "every-second", "cron": "* * * * * *", "overlap": "skip"}],
                "stages": [{"id": "work", "component": "http-request", "config": {
                    "url": fake.url("/slow"), "method": "POST", "body": {"at": "{{trigger.scheduled_at}}"}}}]
            }),
        )],
    );
    let server = Server::start(&dir, &pipelines, &dir.join("no-plugins"), &json!({}));
    wait_for("three slow runs", &server, Duration::from_secs(30), || {
        fake.seen("/slow").len() >= 3
    })
    .await;
    // Let the third run finish, so what follows is settled.
    tokio::time::sleep(Duration::from_millis(2700)).await;
    let listed = triggers(&server).await;
    let t = &listed[0];
    assert_eq!(t["name"], "every-second");
    let runs: Vec<i64> = fake
        .seen("/slow")
        .iter()
        .map(|s| {
            unix_ms(
                serde_json::from_slice::<Value>(&s.body).unwrap()["at"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    let skipped = t["skipped"].as_u64().unwrap();
    let last = unix_ms(t["last_fire_at"].as_str().unwrap());
    let seconds = ((last - runs[0]) / 1000 + 1) as u64;
    assert!(skipped >= 3, "fires were skipped: {t}");
    assert_eq!(
        runs.len() as u64 + skipped,
        seconds,
        "every second from the first fire to the last is a run or a skip: {runs:?}, {t}"
    );
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains(&format!(
            "fmhost_schedule_skipped_total{{pipeline=\"slow\",trigger=\"every-second\"}} {skipped}"
        )),
        "{metrics}"
    );
    assert!(
        server
            .log()
            .contains("skipped: the previous run is still running")
    );
}

/// A poll trigger walks a paged API by cursor; a failed run leaves the cursor, so the next
/// poll asks for the same page; `fmhost cursors set` rewinds it while the server runs.
#[tokio::test]
async fn a_poll_walks_pages_by_cursor_and_a_failed_run_does_not_move_it() {
    let fake = Fake::start().await;
    fake.route(
        "/items/start",
        vec![Reply::json(200, json!({"items": [1, 2], "next": "c2"}))],
    );
    fake.route(
        "/items/c2",
        vec![
            Reply::status(500),
            Reply::json(200, json!({"items": [3], "next": "c3"})),
        ],
    );
    fake.route(
        "/items/c3",
        vec![Reply::json(200, json!({"items": [], "next": "c3"}))],
    );
    let dir = support::scratch("trigger-poll");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "sync.pipeline.json",
            json!({
                "name": "sync",
                "triggers": [{"type": "poll", "every": "200ms",
                              "cursor": {"initial": "start", "from_output": "body.next"}}],
                "stages": [{"id": "page", "component": "http-request", "config": {
                    "url": format!("{}/items/{{{{trigger.cursor}}}}", fake.url(""))}}]
            }),
        )],
    );
    let server = Server::start(&dir, &pipelines, &dir.join("no-plugins"), &json!({}));
    let paths = || -> Vec<String> {
        fake.all_seen()
            .into_iter()
            .map(|s| s.path)
            .filter(|p| p.starts_with("/items/"))
            .collect()
    };
    wait_for(
        "the last page twice",
        &server,
        Duration::from_secs(20),
        || paths().iter().filter(|p| *p == "/items/c3").count() >= 2,
    )
    .await;
    let walked = paths();
    assert_eq!(
        &walked[..4],
        ["/items/start", "/items/c2", "/items/c2", "/items/c3"],
        "the failed run left the cursor at c2: {walked:?}"
    );
    let listed = triggers(&server).await;
    assert_eq!(listed[0]["cursor"], "c3", "{listed:?}");

    let cli = |args: &[&str]| {
        let mut c = support::fmhost();
        c.args(args).arg("--state").arg(dir.join("state"));
        c
    };
    let out = support::output(cli(&["cursors", "show", "sync", "--json"])).await;
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["cursor"], "c3");
    let out = support::output(cli(&["cursors", "set", "sync", "start"])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = paths().len();
    wait_for(
        "a poll from the rewound cursor",
        &server,
        Duration::from_secs(10),
        || paths()[n..].iter().any(|p| p == "/items/start"),
    )
    .await;
    // The failed poll's run is dead-lettered like any other.
    let dlq = get_json(&support::api_client(), format!("{}/v1/dlq", server.url)).await;
    assert_eq!(dlq.as_array().unwrap().len(), 1, "{dlq}");
}

fn wait_file(path: &Path) -> bool {
    path.exists()
}

/// CSV dropped in pieces is read once whole, after its size and mtime settle; a file with
/// a bad row fails its run naming file, line and column and lands in `failed/`; the same
/// content dropped again under another name is not run again. Raw files are kept.
#[tokio::test]
async fn files_are_read_whole_once_per_content_and_a_bad_row_is_named() {
    let fake = Fake::start().await;
    fake.route("/import", vec![Reply::json(200, json!({"ok": true}))]);
    let dir = support::scratch("trigger-file");
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "import.pipeline.json",
            json!({
                "name": "import",
                "triggers": [{"type": "file", "dir": inbox.display().to_string(), "pattern": "*.csv", "settle": "1s"}],
                "stages": [{"id": "load", "component": "http-request", "config": {
                    "url": fake.url("/import"), "method": "POST",
                    "body": {"file": "{{input.file.name}}", "sha256": "{{input.file.sha256}}",
                             "records": "{{input.records}}", "id": "{{trigger.id}}"}}}]
            }),
        )],
    );
    let server = Server::start(&dir, &pipelines, &dir.join("no-plugins"), &json!({}));
    // Written in pieces, 300 ms apart: never read half-written.
    let good = inbox.join("orders.csv");
    let pieces = [
        "id,sku,qty\n1,A-1,2\n",
        "2,B-7,1\n",
        "3,C-",
        "9,5\n4,D-2,1\n",
    ];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&good).unwrap();
        for p in pieces {
            f.write_all(p.as_bytes()).unwrap();
            f.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let done = inbox.join("done/orders.csv");
    wait_for(
        "orders.csv in done/",
        &server,
        Duration::from_secs(20),
        || wait_file(&done),
    )
    .await;
    let imports = fake.seen("/import");
    assert_eq!(imports.len(), 1, "read once");
    let body: Value = serde_json::from_slice(&imports[0].body).unwrap();
    assert_eq!(body["file"], "orders.csv");
    assert_eq!(body["records"].as_array().unwrap().len(), 4, "{body}");
    assert_eq!(
        body["records"][2],
        json!({"id": "3", "sku": "C-9", "qty": "5"})
    );
    assert_eq!(
        std::fs::read_to_string(&done).unwrap(),
        pieces.concat(),
        "the raw file is kept"
    );

    // A bad row: the run fails naming the place, the file goes to failed/.
    std::fs::write(inbox.join("broken.csv"), "id,sku,qty\n1,A-1,2\n2,B-7\n").unwrap();
    let failed = inbox.join("failed/broken.csv");
    wait_for(
        "broken.csv in failed/",
        &server,
        Duration::from_secs(20),
        || wait_file(&failed),
    )
    .await;
    let client = support::api_client();
    let dlq = get_json(&client, format!("{}/v1/dlq", server.url)).await;
    let entries = dlq.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{dlq}");
    assert_eq!(
        entries[0]["reason"],
        "broken.csv line 3 column 3: the row has 2 field(s), the header row 3",
        "{dlq}"
    );

    // The same content again, under another name: settled by the first run, not run.
    std::fs::write(inbox.join("orders-again.csv"), pieces.concat()).unwrap();
    let again = inbox.join("done/orders-again.csv");
    wait_for(
        "orders-again.csv in done/",
        &server,
        Duration::from_secs(20),
        || wait_file(&again),
    )
    .await;
    assert_eq!(fake.seen("/import").len(), 1, "the same content ran once");
    let listed = triggers(&server).await;
    assert_eq!(listed[0]["type"], "file");
    assert!(listed[0]["last_file"].is_object(), "{listed:?}");
    let leftovers: Vec<_> = std::fs::read_dir(inbox.join(".processing"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "nothing is left claimed");
}

/// A breaker that opens sends one alert (its cool-down holds back the rest), through the
/// host's outbound machinery to a webhook named by a secret; repeated failures of the
/// same stage send one `run_failed` alert.
#[tokio::test]
async fn an_alert_webhook_gets_one_message_when_a_breaker_opens() {
    let fake = Fake::start().await;
    fake.route("/crm/accounts", vec![Reply::status(503)]);
    fake.route("/slack", vec![Reply::raw(200, "text/plain", "ok")]);
    let dir = support::scratch("trigger-alerts");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "accounts.pipeline.json",
            json!({
                "name": "accounts",
                "services": {"crm": {"base_url": fake.url("/crm"),
                                     "circuit_breaker": {"failure_threshold": 2, "open_seconds": 30}}},
                "alerts": [
                    {"on": "breaker_open", "webhook": "{{secrets.SLACK_WEBHOOK}}"},
                    {"on": "run_failed", "webhook": "{{secrets.SLACK_WEBHOOK}}", "cooldown": "10m"}
                ],
                "stages": [{"id": "fetch", "component": "http-request", "config": {
                    "url": fake.url("/crm/accounts"), "service": "crm"}}]
            }),
        )],
    );
    let secrets = json!({"SLACK_WEBHOOK": fake.url("/slack")});
    let server = Server::start(&dir, &pipelines, &dir.join("no-plugins"), &secrets);
    let client = support::api_client();
    for _ in 0..5 {
        let (status, _) =
            crate::serve::post_run(&client, &server.url, "accounts", &json!({})).await;
        assert_eq!(status, 502);
    }
    wait_for("two alerts", &server, Duration::from_secs(10), || {
        fake.seen("/slack").len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alerts: Vec<Value> = fake
        .seen("/slack")
        .iter()
        .map(|s| serde_json::from_slice(&s.body).unwrap())
        .collect();
    let by_kind: HashMap<String, Vec<&Value>> = alerts.iter().fold(HashMap::new(), |mut m, a| {
        m.entry(a["fmhost"]["on"].as_str().unwrap().to_string())
            .or_default()
            .push(a);
        m
    });
    assert_eq!(
        by_kind["breaker_open"].len(),
        1,
        "one alert per cool-down: {alerts:?}"
    );
    assert_eq!(
        by_kind["run_failed"].len(),
        1,
        "one alert per cool-down: {alerts:?}"
    );
    let open = by_kind["breaker_open"][0];
    assert_eq!(open["fmhost"]["service"], "crm");
    assert_eq!(open["fmhost"]["pipeline"], "accounts");
    assert!(
        open["text"]
            .as_str()
            .unwrap()
            .contains("circuit for service crm opened"),
        "{open}"
    );
    let failed = by_kind["run_failed"][0];
    assert_eq!(failed["fmhost"]["stage"], "fetch");
    assert!(
        failed["fmhost"]["run_id"].is_string()
            && failed["fmhost"]["correlation_id"] == failed["fmhost"]["run_id"]
    );
    // Idempotency key on the alert, so a retried post is one message.
    assert!(fake.seen("/slack")[0].header("idempotency-key").is_some());
}

/// The three triggered examples in `pipelines/`, served as written against fake vendors:
/// the partner's CSV is imported and kept in `done/`, the incremental sync's first poll
/// commits the CRM's cursor, and the inventory schedule fires on the quarter hour.
#[tokio::test]
async fn the_triggered_examples_run_as_written() {
    let fake = Fake::start().await;
    fake.route(
        "/orders/orders/import",
        vec![Reply::json(200, json!({"imported": true}))],
    );
    fake.route(
        "/crm/contacts",
        vec![Reply::json(
            200,
            json!({"contacts": [{"id": 1}], "next_cursor": "2026-12-07T06:00:00Z"}),
        )],
    );
    fake.route(
        "/warehouse/contacts/upsert",
        vec![Reply::json(200, json!({"ok": true}))],
    );
    fake.route(
        "/inventory/stock",
        vec![Reply::json(200, json!({"items": [{"sku": "A", "qty": 3}]}))],
    );
    fake.route(
        "/storefront/inventory/levels",
        vec![Reply::json(200, json!({"ok": true}))],
    );
    let dir = support::scratch("trigger-examples");
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    for name in ["scheduled-inventory", "incremental-sync", "partner-files"] {
        let file = format!("{name}.pipeline.json");
        std::fs::copy(
            support::root().join("pipelines").join(&file),
            pipelines.join(&file),
        )
        .unwrap();
    }
    let secrets = json!({
        "ORDERS_API": fake.url("/orders"), "CRM_API": fake.url("/crm"),
        "WAREHOUSE_API": fake.url("/warehouse"), "INVENTORY_API": fake.url("/inventory"),
        "STOREFRONT_API": fake.url("/storefront"), "SLACK_WEBHOOK": fake.url("/slack"),
    });
    let server = Server::start(&dir, &pipelines, &dir.join("no-plugins"), &secrets);

    let inbox = pipelines.join("inbox/partner-orders");
    wait_for("the inbox", &server, Duration::from_secs(10), || {
        inbox.join(".processing").exists()
    })
    .await;
    std::fs::write(
        inbox.join("2026-12-07.csv"),
        "order,sku,qty\n100,A,1\n101,B,2\n",
    )
    .unwrap();
    wait_for(
        "the file in done/",
        &server,
        Duration::from_secs(20),
        || inbox.join("done/2026-12-07.csv").exists(),
    )
    .await;
    let import: Value =
        serde_json::from_slice(&fake.seen("/orders/orders/import")[0].body).unwrap();
    assert_eq!(
        import["orders"][1],
        json!({"order": "101", "sku": "B", "qty": "2"})
    );

    wait_for(
        "the first poll's cursor",
        &server,
        Duration::from_secs(20),
        || !fake.seen("/warehouse/contacts/upsert").is_empty(),
    )
    .await;
    assert_eq!(
        fake.seen("/crm/contacts")[0].query,
        "updated_after=1970-01-01T00:00:00Z&limit=100"
    );
    let listed = triggers(&server).await;
    let poll = listed
        .iter()
        .find(|t| t["pipeline"] == "incremental-sync")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut poll = poll.clone();
    while poll["cursor"] != "2026-12-07T06:00:00Z" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        poll = triggers(&server)
            .await
            .into_iter()
            .find(|t| t["pipeline"] == "incremental-sync")
            .unwrap();
    }
    assert_eq!(poll["cursor"], "2026-12-07T06:00:00Z", "{poll}");

    let schedule = listed
        .iter()
        .find(|t| t["pipeline"] == "scheduled-inventory")
        .unwrap();
    let next = unix_ms(schedule["next_fire_at"].as_str().unwrap());
    assert_eq!(
        next % (15 * 60 * 1000),
        0,
        "fires on the quarter hour: {schedule}"
    );
    // Its stages as a fire runs them (started over the API here, not to wait 15 minutes).
    let (status, report) = crate::serve::post_run(
        &support::api_client(),
        &server.url,
        "scheduled-inventory",
        &json!({"window_minutes": 15}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    let push: Value =
        serde_json::from_slice(&fake.seen("/storefront/inventory/levels")[0].body).unwrap();
    assert_eq!(push["levels"], json!([{"sku": "A", "qty": 3}]));
    assert!(
        fake.seen("/storefront/inventory/levels")[0]
            .header("idempotency-key")
            .unwrap()
            .starts_with("inventory-run_")
    );
}
