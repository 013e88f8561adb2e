//! `fmhost serve` as a real child process: the API-change story with a hot swap under
//! load, refused uploads, file-drop swaps, webhooks, metrics and graceful shutdown.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::plugins::plugin_file;
use crate::support::{self, Fake, Ran, Reply};

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) url: String,
    stderr: PathBuf,
    /// The console's sign-in URL with its one-time code, as printed at start.
    pub(crate) console: Option<String>,
}

impl Server {
    pub(crate) fn start(dir: &Path, pipelines: &Path, plugins: &Path, secrets: &Value) -> Server {
        Self::start_with(dir, pipelines, plugins, secrets, &[])
    }

    pub(crate) fn start_with(
        dir: &Path,
        pipelines: &Path,
        plugins: &Path,
        secrets: &Value,
        extra: &[&str],
    ) -> Server {
        Self::start_env(dir, pipelines, plugins, secrets, extra, &[])
    }

    pub(crate) fn start_env(
        dir: &Path,
        pipelines: &Path,
        plugins: &Path,
        secrets: &Value,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Server {
        let secrets = support::write_json(dir, "secrets.json", secrets);
        std::fs::create_dir_all(plugins).unwrap();
        let stderr = dir.join("server.log");
        let mut cmd = support::fmhost();
        cmd.args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "10s",
        ])
        .arg("--pipelines")
        .arg(pipelines)
        .arg("--plugins")
        .arg(plugins)
        .arg("--secrets")
        .arg(&secrets)
        .arg("--state")
        .arg(dir.join("state"))
        .args(extra)
        .env(
            "FMHOST_CACHE_DIR",
            support::root().join("target/test-scratch/serve-cache"),
        )
        .env("FMHOST_API_TOKEN", support::API_TOKEN)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = cmd.spawn().expect("start fmhost serve");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // Then the token note and the console's one-time sign-in URL, in the same write.
        let mut console = None;
        for _ in 0..2 {
            let mut next = String::new();
            if out.read_line(&mut next).unwrap_or(0) == 0 {
                break;
            }
            if let Some(u) = next.trim().strip_prefix("console: ") {
                console = Some(u.to_string());
            }
        }
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "no address; log:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            })
            .to_string();
        Server {
            child,
            url,
            stderr,
            console,
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub(crate) fn terminate(&mut self) -> i32 {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn plugins_dir(dir: &Path) -> PathBuf {
    let p = dir.join("plugins");
    std::fs::create_dir_all(&p).unwrap();
    for name in [
        "json-transform",
        "generator",
        "stripe",
        "salesforce",
        "intercom",
    ] {
        std::fs::copy(
            plugin_file("target/plugins", name),
            p.join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    p
}

pub(crate) fn pipelines_dir(dir: &Path, files: &[(&str, Value)]) -> PathBuf {
    let p = dir.join("pipelines");
    std::fs::create_dir_all(&p).unwrap();
    for (name, doc) in files {
        support::write_json(&p, name, doc);
    }
    p
}

pub(crate) async fn post_run(
    client: &reqwest::Client,
    url: &str,
    pipeline: &str,
    input: &Value,
) -> (u16, Value) {
    let resp = client
        .post(format!("{url}/v1/pipelines/{pipeline}/runs"))
        .json(input)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

pub(crate) fn intercom_stage(run: &Value) -> &Value {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "fetch-intercom")
        .unwrap()
}

#[tokio::test]
async fn a_broken_connector_is_hot_swapped_under_load_with_no_failed_runs() {
    let sandbox = fmhost_sandbox::Sandbox::start(fmhost_sandbox::Options { latency_scale: 0.5 })
        .await
        .unwrap();
    let dir = support::scratch("serve-swap");
    let doc: Value = serde_json::from_slice(
        &std::fs::read(support::root().join("pipelines/customer-360-connectors.pipeline.json"))
            .unwrap(),
    )
    .unwrap();
    let server = Server::start(
        &dir,
        &pipelines_dir(&dir, &[("c360.pipeline.json", doc)]),
        &plugins_dir(&dir),
        &sandbox.secrets(),
    );
    let client = support::api_client();
    let input = sandbox.input();
    let name = "customer-360-connectors";

    // 1. v1 reads Intercom 2.10.
    let (code, run) = post_run(&client, &server.url, name, &input).await;
    assert_eq!(code, 200, "{run}");
    assert_eq!(
        run["output"]["customer"]["engagement"]["support_tickets"],
        2
    );
    assert_eq!(intercom_stage(&run)["version"], "1.0.0");

    // 2. Intercom moves to 2.11: runs fail loudly, naming the stage and the field.
    sandbox.set_intercom_version("2.11");
    let (code, run) = post_run(&client, &server.url, name, &input).await;
    assert_eq!(code, 502, "{run}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("stage \"fetch-intercom\"") && error.contains("`last_seen_at`"),
        "{error}"
    );
    assert_eq!(intercom_stage(&run)["error"]["kind"], "validation");
    let broken_run = run["run_id"].as_str().unwrap().to_string();

    // 3. Swap in v2 while a steady load of runs is in flight.
    let results: Arc<Mutex<Vec<(Instant, Instant, u16, Value)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url, input, results, stop) = (
            client.clone(),
            server.url.clone(),
            input.clone(),
            results.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t0 = Instant::now();
                let (code, run) = post_run(&client, &url, name, &input).await;
                results
                    .lock()
                    .unwrap()
                    .push((t0, Instant::now(), code, run));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let swap_started = Instant::now();
    let mut cmd = support::fmhost();
    cmd.args(["plugins", "swap", "intercom"])
        .arg(plugin_file("target/test-plugins", "intercom-v2"))
        .args(["--server", &server.url])
        .env("FMHOST_API_TOKEN", support::API_TOKEN);
    let swapped: support::Ran = support::output(cmd).await.into();
    let swap_done = Instant::now();
    assert_eq!(swapped.code, 0, "{}", swapped.stderr);
    assert_eq!(swapped.json()["version"], "2.0.0");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let results = results.lock().unwrap().clone();
    let (mut on_v1, mut on_v2) = (0, 0);
    for (t0, t1, code, run) in &results {
        let stage = intercom_stage(run);
        match stage["version"].as_str() {
            // Started before the swap: finished on v1, failing only on the API change.
            Some("1.0.0") => {
                on_v1 += 1;
                assert!(*t0 < swap_done, "a run that started after the swap used v1");
                assert_eq!(*code, 502);
                assert_eq!(stage["error"]["kind"], "validation", "{run}");
                assert!(
                    stage["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("`last_seen_at`"),
                    "{run}"
                );
            }
            Some("2.0.0") => {
                on_v2 += 1;
                assert!(
                    *t1 > swap_started,
                    "a run finished on v2 before the swap began"
                );
                assert_eq!(*code, 200, "a run on v2 failed: {run}");
                assert_eq!(
                    run["output"]["customer"]["engagement"]["support_tickets"],
                    2
                );
            }
            other => panic!("unexpected version {other:?}: {run}"),
        }
    }
    assert!(
        on_v1 > 0 && on_v2 > 0,
        "load covered both sides of the swap: v1={on_v1} v2={on_v2}"
    );
    eprintln!(
        "swap under load: {} runs, {on_v1} on v1 and {on_v2} on v2; `plugins swap` took {} ms",
        results.len(),
        (swap_done - swap_started).as_millis()
    );

    // 4. The run that failed on v1 is in the dead-letter queue; retried after the swap, it
    // runs fetch-intercom and what follows on v2, and takes the other fetches from the journal.
    let dlq = get_json(&client, format!("{}/v1/dlq?pipeline={name}", server.url)).await;
    let entry = dlq
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["run_id"] == broken_run.as_str())
        .unwrap_or_else(|| panic!("{broken_run} is not dead-lettered: {dlq}"));
    assert_eq!(entry["error_kind"], "validation", "{entry}");
    let (salesforce, intercom_hits) = (sandbox.hits("salesforce"), sandbox.hits("intercom"));
    let retried: Value = client
        .post(format!("{}/v1/dlq/{}/retry", server.url, entry["id"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retried["dead_letter"]["status"], "resolved", "{retried}");
    let rerun = &retried["run"];
    assert_eq!(intercom_stage(rerun)["version"], "2.0.0", "{rerun}");
    assert_eq!(
        rerun["output"]["customer"]["engagement"]["support_tickets"],
        2
    );
    let fetch_salesforce = rerun["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "fetch-salesforce")
        .unwrap();
    assert_eq!(fetch_salesforce["reused_from"], broken_run.as_str());
    assert_eq!(sandbox.hits("salesforce"), salesforce, "not fetched again");
    assert_eq!(sandbox.hits("intercom"), intercom_hits + 1);

    // 5. Later runs succeed on v2; rollback returns to v1.
    let plugins: Value = client
        .get(format!("{}/v1/plugins", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let intercom = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "intercom")
        .unwrap();
    assert_eq!(intercom["version"], "2.0.0");
    assert!(intercom["runs_served"].as_u64().unwrap() >= on_v2 as u64);
    assert_eq!(intercom["previous_versions"][0]["version"], "1.0.0");
    assert!(
        server.log().contains("swapped plugin intercom: 1.0.0"),
        "the swap is logged with both versions"
    );
    let rolled: Value = client
        .post(format!("{}/v1/plugins/intercom/rollback", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rolled["version"], "1.0.0");
    let (code, run) = post_run(&client, &server.url, name, &input).await;
    assert_eq!(
        (code, intercom_stage(&run)["version"].clone()),
        (502, json!("1.0.0"))
    );

    // Metrics carry the right labels.
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "fmhost_runs_total{{pipeline=\"{name}\",status=\"succeeded\"}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "fmhost_runs_total{{pipeline=\"{name}\",status=\"failed\"}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "fmhost_upstream_calls_total{{service=\"{}\",outcome=\"success\",kind=\"\"}}",
            sandbox.addr
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("fmhost_stage_duration_seconds_count{{pipeline=\"{name}\",stage=\"fetch-intercom\",status=\"failed\"}}")), "{metrics}");
}

#[tokio::test]
async fn broken_uploads_are_refused_and_file_drops_are_swapped_in() {
    let sandbox = fmhost_sandbox::Sandbox::start(fmhost_sandbox::Options { latency_scale: 0.0 })
        .await
        .unwrap();
    let dir = support::scratch("serve-upload");
    let plugins = plugins_dir(&dir);
    let doc: Value = serde_json::from_slice(
        &std::fs::read(support::root().join("pipelines/customer-360-connectors.pipeline.json"))
            .unwrap(),
    )
    .unwrap();
    let server = Server::start(
        &dir,
        &pipelines_dir(&dir, &[("c360.pipeline.json", doc)]),
        &plugins,
        &sandbox.secrets(),
    );
    let client = support::api_client();
    let put = |body: Vec<u8>| {
        client
            .put(format!("{}/v1/plugins/intercom", server.url))
            .body(body)
            .send()
    };

    let resp = put(b"not a component".to_vec()).await.unwrap();
    assert_eq!(resp.status(), 422);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not a valid WebAssembly component"),
        "{body}"
    );
    let resp = put(std::fs::read(plugin_file("target/plugins", "stripe")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("names itself \"stripe\", not \"intercom\""),
        "{body}"
    );
    let (code, _) = post_run(
        &client,
        &server.url,
        "customer-360-connectors",
        &sandbox.input(),
    )
    .await;
    assert_eq!(code, 200, "the old version keeps serving");

    // A complete file written into the watched directory is swapped in.
    sandbox.set_intercom_version("2.11");
    let tmp = plugins.join("intercom-v2.wasm.partial");
    std::fs::copy(plugin_file("target/test-plugins", "intercom-v2"), &tmp).unwrap();
    std::fs::rename(&tmp, plugins.join("intercom-v2.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let plugins: Value = client
            .get(format!("{}/v1/plugins", server.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if plugins
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "intercom" && p["version"] == "2.0.0")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped file was not swapped in:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, run) = post_run(
        &client,
        &server.url,
        "customer-360-connectors",
        &sandbox.input(),
    )
    .await;
    assert_eq!(code, 200, "{run}");

    let resp = client
        .post(format!(
            "{}/v1/pipelines/customer-360-connectors/runs",
            server.url
        ))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("line 1 column 2"),
        "{body}"
    );
}

fn webhook_pipeline(
    fake: &Fake,
    name: &str,
    path: &str,
    signature: &str,
    secret_name: &str,
) -> Value {
    json!({
        "name": name,
        "triggers": [{"type": "webhook", "path": path, "secret": format!("{{{{secrets.{secret_name}}}}}"), "signature": signature}],
        "stages": [{"id": "forward", "component": "http-request", "config": {
            "url": fake.url(&format!("/sink/{name}")), "method": "POST", "body": "{{input}}"}}]
    })
}

#[tokio::test]
async fn webhooks_verify_signatures_persist_and_run_once() {
    let fake = Fake::start().await;
    fake.route("/sink/stripe-events", vec![Reply::json(200, json!({}))]);
    fake.route("/sink/github-events", vec![Reply::json(200, json!({}))]);
    let dir = support::scratch("serve-webhooks");
    let pipelines = pipelines_dir(
        &dir,
        &[
            (
                "stripe.pipeline.json",
                webhook_pipeline(
                    &fake,
                    "stripe-events",
                    "/hooks/stripe",
                    "stripe",
                    "STRIPE_WEBHOOK_SECRET",
                ),
            ),
            (
                "github.pipeline.json",
                webhook_pipeline(
                    &fake,
                    "github-events",
                    "/hooks/github",
                    "github",
                    "GITHUB_WEBHOOK_SECRET",
                ),
            ),
        ],
    );
    let secrets = json!({"STRIPE_WEBHOOK_SECRET": "whsec_test_123456", "GITHUB_WEBHOOK_SECRET": "gh-secret-98765"});
    let server = Server::start(&dir, &pipelines, &dir.join("no-plugins"), &secrets);
    let client = support::api_client();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = json!({"id": "evt_1NqW", "type": "invoice.paid", "data": {"object": {"amount_paid": 4990}}}).to_string();
    let stripe = |sig: Option<String>, body: String| {
        let mut req = client
            .post(format!("{}/hooks/stripe", server.url))
            .body(body);
        if let Some(sig) = sig {
            req = req.header("Stripe-Signature", sig);
        }
        req.send()
    };
    let sign = |t: i64, body: &str| {
        fmhost::serve::webhooks::stripe_signature("whsec_test_123456", t, body.as_bytes())
    };

    assert_eq!(
        stripe(None, body.clone()).await.unwrap().status(),
        401,
        "unsigned"
    );
    assert_eq!(
        stripe(
            Some(fmhost::serve::webhooks::stripe_signature(
                "wrong",
                now,
                body.as_bytes()
            )),
            body.clone()
        )
        .await
        .unwrap()
        .status(),
        401,
        "wrong secret"
    );
    assert_eq!(
        stripe(Some(sign(now, &body)), body.replace("4990", "1"))
            .await
            .unwrap()
            .status(),
        401,
        "tampered body"
    );
    let old = stripe(Some(sign(now - 3600, &body)), body.clone())
        .await
        .unwrap();
    assert_eq!(old.status(), 401, "too old");
    assert!(
        old.text()
            .await
            .unwrap()
            .contains("outside the 300 s tolerance")
    );
    let ok = stripe(Some(sign(now, &body)), body.clone()).await.unwrap();
    assert_eq!(ok.status(), 202);
    let stripe_run = ok.json::<Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let dup = stripe(Some(sign(now, &body)), body.clone()).await.unwrap();
    assert_eq!(dup.status(), 200);
    assert_eq!(dup.json::<Value>().await.unwrap()["duplicate"], true);

    let gh_body = json!({"action": "opened", "number": 7}).to_string();
    let gh = |sig: &str, delivery: &str| {
        client
            .post(format!("{}/hooks/github", server.url))
            .header("X-GitHub-Delivery", delivery.to_string())
            .header("X-Hub-Signature-256", sig.to_string())
            .body(gh_body.clone())
            .send()
    };
    let gh_sig = fmhost::serve::webhooks::github_signature("gh-secret-98765", gh_body.as_bytes());
    assert_eq!(gh("sha256=00", "d-42").await.unwrap().status(), 401);
    assert_eq!(gh(&gh_sig, "d-42").await.unwrap().status(), 202);
    // The same signed body re-sent under a new delivery id is the same delivery.
    let again = gh(&gh_sig, "d-43").await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        (again["duplicate"].clone(), again["event_id"].clone()),
        (json!(true), json!("d-42")),
        "{again}"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.seen("/sink/stripe-events").is_empty() || fake.seen("/sink/github-events").is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "webhook runs did not happen:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = fake.seen("/sink/stripe-events");
    assert_eq!(
        runs.len(),
        1,
        "valid, duplicate and rejected deliveries ran exactly once"
    );
    let forwarded: Value = serde_json::from_slice(&runs[0].body).unwrap();
    assert_eq!(
        forwarded["id"], "evt_1NqW",
        "the payload is the run's input"
    );
    assert_eq!(fake.seen("/sink/github-events").len(), 1);
    let run: Value = client
        .get(format!("{}/v1/runs/{stripe_run}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["trigger"], "webhook", "{run}");
    assert_eq!(
        run["input"]["id"], "evt_1NqW",
        "the delivery is journaled: {run}"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_runs_and_loses_nothing() {
    let fake = Fake::start().await;
    fake.route(
        "/sink/slow-events",
        vec![Reply::json(200, json!({})).delay(Duration::from_millis(1500))],
    );
    let dir = support::scratch("serve-shutdown");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "slow.pipeline.json",
            webhook_pipeline(&fake, "slow-events", "/hooks/slow", "github", "HOOK_SECRET"),
        )],
    );
    let mut server = Server::start(
        &dir,
        &pipelines,
        &dir.join("no-plugins"),
        &json!({"HOOK_SECRET": "drain-secret-1"}),
    );
    let client = support::api_client();
    let body = json!({"n": 1}).to_string();
    let sig = fmhost::serve::webhooks::github_signature("drain-secret-1", body.as_bytes());
    let accepted = client
        .post(format!("{}/hooks/slow", server.url))
        .header("X-Hub-Signature-256", &sig)
        .header("X-GitHub-Delivery", "drain-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    // A synchronous run in flight too.
    let sync = tokio::spawn({
        let (client, url) = (client.clone(), server.url.clone());
        async move {
            client
                .post(format!("{url}/v1/pipelines/slow-events/runs"))
                .json(&json!({"n": 2}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    while fake.seen("/sink/slow-events").len() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let code = tokio::task::spawn_blocking(move || {
        let code = server.terminate();
        (code, server.log())
    })
    .await
    .unwrap();
    assert_eq!(code.0, 0, "{}", code.1);
    assert_eq!(
        sync.await.unwrap(),
        200,
        "the in-flight request got its answer"
    );
    let accepted: Value = accepted.json().await.unwrap();
    let mut show = support::fmhost();
    show.arg("--state")
        .arg(dir.join("state"))
        .args(["runs", "show", "--json"])
        .arg(accepted["run_id"].as_str().unwrap());
    let shown = Ran::from(support::output(show).await);
    assert_eq!(
        shown.json()["status"],
        "succeeded",
        "the accepted delivery finished before exit:\n{}",
        code.1
    );
}

/// A stream of signed webhooks; the server is killed with SIGKILL mid-stream and
/// restarted on the same state. Every acknowledged delivery is processed exactly once:
/// one effect per event at the vendor (one Idempotency-Key, however many requests).
#[tokio::test]
async fn sigkill_mid_stream_loses_no_acknowledged_delivery_and_runs_each_once() {
    const N: u64 = 24;
    const SECRET: &str = "kill-secret-31337";
    let fake = Fake::start().await;
    fake.route(
        "/enrich",
        vec![Reply::json(200, json!({"tier": "gold"})).delay(Duration::from_millis(150))],
    );
    fake.route(
        "/charge",
        vec![Reply::json(200, json!({"charged": true})).delay(Duration::from_millis(300))],
    );
    let dir = support::scratch("serve-sigkill");
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "charges.pipeline.json",
            json!({
                "name": "charges",
                "triggers": [{"type": "webhook", "path": "/hooks/charges", "secret": "{{secrets.HOOK_SECRET}}", "signature": "github"}],
                "stages": [
                    {"id": "enrich", "component": "http-request", "config": {"url": fake.url("/enrich")}},
                    {"id": "charge", "component": "http-request", "depends_on": ["enrich"], "config": {
                        "url": fake.url("/charge"), "method": "POST",
                        "body": {"n": "{{input.n}}", "tier": "{{stages.enrich.output.body.tier}}"}}}
                ]
            }),
        )],
    );
    let secrets = json!({"HOOK_SECRET": SECRET});
    let plugins = dir.join("no-plugins");
    let mut server = Server::start(&dir, &pipelines, &plugins, &secrets);
    let client = support::api_client();
    // n -> the run id from the 202 (None when acknowledged as a duplicate).
    let acked: Arc<Mutex<std::collections::HashMap<u64, Option<String>>>> = Arc::default();
    let send = {
        let (client, acked) = (client.clone(), acked.clone());
        move |url: String, n: u64| {
            let (client, acked) = (client.clone(), acked.clone());
            async move {
                let body = json!({"n": n}).to_string();
                let sig = fmhost::serve::webhooks::github_signature(SECRET, body.as_bytes());
                let resp = client
                    .post(format!("{url}/hooks/charges"))
                    .header("X-Hub-Signature-256", sig)
                    .header("X-GitHub-Delivery", format!("evt-{n}"))
                    .body(body)
                    .send()
                    .await
                    .ok()?;
                let status = resp.status().as_u16();
                let answer: Value = resp.json().await.ok()?;
                match status {
                    202 => acked
                        .lock()
                        .unwrap()
                        .insert(n, Some(answer["run_id"].as_str()?.to_string())),
                    200 if answer["duplicate"] == true => {
                        acked.lock().unwrap().entry(n).or_insert(None);
                        None
                    }
                    _ => None,
                };
                Some(())
            }
        }
    };

    // A stream (one every 40 ms, up to three in flight); SIGKILL once charges are in flight.
    let url = server.url.clone();
    let stream = tokio::spawn({
        let send = send.clone();
        async move {
            futures::stream::iter(0..N)
                .then(|n| async move {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    n
                })
                .map(|n| send(url.clone(), n))
                .buffer_unordered(3)
                .collect::<Vec<_>>()
                .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.seen("/charge").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "stream stalled:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    stream.await.unwrap();
    let acked_before_kill = acked.lock().unwrap().len();
    let charges_before_kill = fake.seen("/charge").len();

    // Restart on the same state; the sender retries whatever was not acknowledged.
    let server = Server::start(&dir, &pipelines, &plugins, &secrets);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing: Vec<u64> = (0..N)
            .filter(|n| !acked.lock().unwrap().contains_key(n))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not acknowledged: {missing:?}\n{}",
            server.log()
        );
        for n in missing {
            send(server.url.clone(), n).await;
        }
    }
    // Every delivery's run finishes, on the restarted server.
    let by_event = || {
        let mut keys: std::collections::HashMap<u64, std::collections::HashSet<String>> =
            Default::default();
        for c in fake.seen("/charge") {
            let body: Value = serde_json::from_slice(&c.body).unwrap();
            let n = body["n"].as_u64().unwrap();
            keys.entry(n)
                .or_default()
                .insert(c.header("idempotency-key").unwrap().to_string());
        }
        keys
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while by_event().len() < N as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} events charged:\n{}",
            by_event().len(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runs: Vec<String> = acked.lock().unwrap().values().flatten().cloned().collect();
    let mut resumed = 0;
    for run_id in &runs {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let run: Value = client
                .get(format!("{}/v1/runs/{run_id}", server.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if run["status"] == "succeeded" {
                resumed += usize::from(run["resumed"].as_u64().unwrap_or(0) > 0);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "run {run_id} did not finish: {run}\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keys = by_event();
    for n in 0..N {
        assert_eq!(
            keys[&n].len(),
            1,
            "event {n} was charged under more than one idempotency key: {:?}",
            keys[&n]
        );
    }
    assert!(resumed >= 1, "a run in flight at the kill was resumed");
    eprintln!(
        "sigkill: {acked_before_kill} of {N} acknowledged and {charges_before_kill} charge requests before the kill; \
         {resumed} run(s) resumed; {} charge requests for {N} events in all",
        fake.seen("/charge").len()
    );
}

pub(crate) async fn get_json(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// The journal over serve's API: a webhook whose run fails is dead-lettered, looked up,
/// and retried once the vendor is fixed; with `--on-interrupted dead-letter`, a run cut
/// short by SIGKILL is dead-lettered at restart instead of resumed.
#[tokio::test]
async fn failed_webhook_runs_are_dead_lettered_and_retried_over_the_api() {
    let fake = Fake::start().await;
    fake.route(
        "/sink/flaky",
        vec![Reply::json(500, json!({"error": "boom"}))],
    );
    fake.route(
        "/slow",
        vec![Reply::json(200, json!({})).delay(Duration::from_secs(5))],
    );
    let dir = support::scratch("serve-dlq");
    let pipelines = pipelines_dir(
        &dir,
        &[
            (
                "flaky.pipeline.json",
                webhook_pipeline(&fake, "flaky", "/hooks/flaky", "github", "HOOK_SECRET"),
            ),
            (
                "slow.pipeline.json",
                json!({"name": "slow", "stages": [{"id": "wait", "component": "http-request", "config": {"url": fake.url("/slow")}}]}),
            ),
        ],
    );
    let secrets = json!({"HOOK_SECRET": "dlq-secret-424242"});
    let plugins = dir.join("no-plugins");
    let mut server = Server::start(&dir, &pipelines, &plugins, &secrets);
    let client = support::api_client();
    let body = json!({"order": 7}).to_string();
    let accepted: Value = client
        .post(format!("{}/hooks/flaky", server.url))
        .header("X-GitHub-Delivery", "evt-flaky-1")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header(
            "X-Hub-Signature-256",
            fmhost::serve::webhooks::github_signature("dlq-secret-424242", body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = accepted["run_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let run = loop {
        let run = get_json(&client, format!("{}/v1/runs/{run_id}", server.url)).await;
        if run["status"] == "failed" {
            break run;
        }
        assert!(Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(run["error_kind"], "http-5xx", "{run}");
    assert_eq!(run["stages"][0]["calls"][0]["status"], 500, "{run}");
    // The delivery's run joined the sender's trace.
    assert_eq!(run["trace_id"], "0af7651916cd43dd8448eb211c80319c", "{run}");
    assert_eq!(run["trace"]["parent_span_id"], "b7ad6b7169203331", "{run}");

    let dlq = get_json(&client, format!("{}/v1/dlq", server.url)).await;
    assert_eq!(dlq.as_array().unwrap().len(), 1, "{dlq}");
    let entry = &dlq[0];
    assert_eq!(entry["kind"], "webhook");
    assert_eq!(entry["event_id"], "evt-flaky-1");
    assert_eq!(entry["run_id"], run_id.as_str());
    assert_eq!(entry["input"], json!({"order": 7}));
    let id = entry["id"].as_i64().unwrap();

    fake.route("/sink/flaky", vec![Reply::json(200, json!({"ok": true}))]);
    let retried = client
        .post(format!("{}/v1/dlq/{id}/retry", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(retried["run"]["status"], "succeeded", "{retried}");
    assert_eq!(retried["dead_letter"]["status"], "resolved", "{retried}");
    let forwarded: Value = serde_json::from_slice(&fake.seen("/sink/flaky")[1].body).unwrap();
    assert_eq!(
        forwarded,
        json!({"order": 7}),
        "the retry carries the delivery's payload"
    );
    let runs = get_json(&client, format!("{}/v1/runs?pipeline=flaky", server.url)).await;
    assert_eq!(run["resumed"], 0, "{run}");
    assert_eq!(runs.as_array().unwrap().len(), 2, "{runs}");
    assert_eq!(
        client
            .delete(format!("{}/v1/dlq/{id}", server.url))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "a resolved entry is not open"
    );

    // Interrupted, then dead-lettered by the setting rather than resumed.
    let started: Value = client
        .post(format!("{}/v1/pipelines/slow/runs?mode=async", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slow_run = started["run_id"].as_str().unwrap().to_string();
    let live = get_json(&client, format!("{}/v1/runs/{slow_run}", server.url)).await;
    assert_eq!(live["status"], "running", "{live}");
    assert_eq!(live["resumed"], 0, "{live}");
    while fake.seen("/slow").is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let server = Server::start_with(
        &dir,
        &pipelines,
        &plugins,
        &secrets,
        &["--on-interrupted", "dead-letter"],
    );
    let run = get_json(&client, format!("{}/v1/runs/{slow_run}", server.url)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error_kind"], "interrupted", "{run}");
    assert_eq!(run["stages"][0]["status"], "failed", "{run}");
    assert_eq!(run["stages"][0]["error"]["kind"], "cancelled", "{run}");
    let dlq = get_json(&client, format!("{}/v1/dlq", server.url)).await;
    assert_eq!(dlq.as_array().unwrap().len(), 1, "{dlq}");
    assert_eq!(dlq[0]["run_id"], slow_run.as_str());
    assert_eq!(fake.seen("/slow").len(), 1, "not resumed");
}
