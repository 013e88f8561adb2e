//! `fmhost serve --cluster`: three real workers on one PostgreSQL journal and one real
//! `nats-server` (both started by `.ci/run`; the PostgreSQL pass of `cargo xtask test`
//! runs these). Without FMHOST_TEST_POSTGRES they skip, saying so.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::plugins::plugin_file;
use crate::queue::{NatsServer, nats_binary};
use crate::serve::{Server, get_json, pipelines_dir, plugins_dir};
use crate::support::{self, Fake, Reply};

/// The PostgreSQL journal and a nats-server binary, or why the test cannot run.
fn prerequisites() -> Option<std::path::PathBuf> {
    if support::postgres_journal().is_none() {
        eprintln!(
            "skipped: a cluster needs PostgreSQL (set FMHOST_TEST_POSTGRES; cargo xtask test does in CI)"
        );
        return None;
    }
    let bin = nats_binary();
    assert!(
        bin.is_some() || std::env::var_os("FMHOST_REQUIRE_TOOLCHAINS").is_none(),
        "nats-server is required (FMHOST_REQUIRE_TOOLCHAINS is set): apt-get install nats-server"
    );
    if bin.is_none() {
        eprintln!("skipped: no nats-server (apt-get install nats-server)");
    }
    bin
}

/// Worker `name` of the cluster at `nats`, with a state directory of its own.
fn worker(dir: &Path, name: &str, pipelines: &Path, secrets: &Value, nats: &str) -> Server {
    worker_with(dir, name, pipelines, &dir.join("no-plugins"), secrets, nats)
}

fn worker_with(
    dir: &Path,
    name: &str,
    pipelines: &Path,
    plugins: &Path,
    secrets: &Value,
    nats: &str,
) -> Server {
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    Server::start_with(
        &own,
        pipelines,
        plugins,
        secrets,
        &["--cluster", nats, "--lease", "2s", "--worker-id", name],
    )
}

async fn leader(client: &reqwest::Client, workers: &[&Server]) -> Option<String> {
    for w in workers {
        let state = get_json(client, format!("{}/v1/cluster", w.url)).await;
        if state["leader"] == true {
            return state["worker"].as_str().map(str::to_string);
        }
    }
    None
}

/// Three workers, 500 signed webhook deliveries spread over them, and `kill -9` of the
/// leader mid-stream: every acknowledged delivery runs exactly once per its id (one
/// idempotency key per event at the vendor, one succeeded run), the dead worker's runs
/// in flight finish on the others, and another worker takes the lead.
#[tokio::test]
async fn three_workers_run_each_delivery_once_when_one_is_killed() {
    const N: u64 = 500;
    const SECRET: &str = "cluster-secret-2718";
    let Some(bin) = prerequisites() else {
        return;
    };
    let dir = support::scratch("cluster-kill");
    let nats = NatsServer::start(bin, &dir);
    let fake = Fake::start().await;
    fake.route(
        "/enrich",
        vec![Reply::json(200, json!({"tier": "gold"})).delay(Duration::from_millis(20))],
    );
    fake.route(
        "/charge",
        vec![Reply::json(200, json!({"charged": true})).delay(Duration::from_millis(60))],
    );
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
    let mut w1 = worker(&dir, "w1", &pipelines, &secrets, &nats.url());
    let w2 = worker(&dir, "w2", &pipelines, &secrets, &nats.url());
    let w3 = worker(&dir, "w3", &pipelines, &secrets, &nats.url());
    let client = support::api_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader(&client, &[&w1]).await.is_none() {
        assert!(Instant::now() < deadline, "w1 never led:\n{}", w1.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let urls = [w1.url.clone(), w2.url.clone(), w3.url.clone()];

    // n -> its run id, once a worker acknowledged it (202, or 200 as a duplicate).
    let acked: Arc<Mutex<HashMap<u64, Option<String>>>> = Arc::default();
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
                    .timeout(Duration::from_secs(10))
                    .body(body)
                    .send()
                    .await
                    .ok()?;
                let status = resp.status().as_u16();
                let answer: Value = resp.json().await.ok()?;
                match status {
                    202 => {
                        let run = answer["run_id"].as_str()?.to_string();
                        acked.lock().unwrap().insert(n, Some(run));
                    }
                    200 if answer["duplicate"] == true => {
                        acked.lock().unwrap().entry(n).or_insert(None);
                    }
                    _ => {}
                }
                Some(())
            }
        }
    };
    let stream = tokio::spawn({
        let (send, urls) = (send.clone(), urls.clone());
        async move {
            futures::stream::iter(0..N)
                .map(|n| send(urls[n as usize % 3].clone(), n))
                .buffer_unordered(12)
                .collect::<Vec<_>>()
                .await
        }
    });
    // The leader dies with runs of its own in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fake.seen("/charge").len() < 100 {
        assert!(Instant::now() < deadline, "stream stalled:\n{}", w1.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    w1.child.kill().unwrap();
    w1.child.wait().unwrap();
    let killed_at = Instant::now();
    let killed_on_fake = fake.now();
    stream.await.unwrap();

    // The sender retries what was not acknowledged, at the workers left.
    let alive = [w2.url.clone(), w3.url.clone()];
    let deadline = Instant::now() + Duration::from_secs(60);
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
            w2.log()
        );
        for n in missing {
            send(alive[n as usize % 2].clone(), n).await;
        }
    }
    let by_event = || {
        let mut keys: HashMap<u64, HashSet<String>> = HashMap::new();
        for c in fake.seen("/charge") {
            let body: Value = serde_json::from_slice(&c.body).unwrap();
            keys.entry(body["n"].as_u64().unwrap())
                .or_default()
                .insert(c.header("idempotency-key").unwrap().to_string());
        }
        keys
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while by_event().len() < N as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} events charged:\n{}\n{}",
            by_event().len(),
            w2.log(),
            w3.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_charged = killed_at.elapsed();
    assert!(
        leader(&client, &[&w2, &w3]).await.is_some(),
        "nobody took the lead"
    );

    // Every run is journaled as succeeded, whichever worker is asked.
    let runs: Vec<String> = acked.lock().unwrap().values().flatten().cloned().collect();
    let mut resumed = 0;
    // Failover: from the kill to the first stage a resumed run ran elsewhere.
    let mut resumed_events = HashSet::new();
    for (i, run_id) in runs.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let run = get_json(&client, format!("{}/v1/runs/{run_id}", alive[i % 2])).await;
            if run["status"] == "succeeded" {
                if run["resumed"].as_u64().unwrap_or(0) > 0 {
                    resumed += 1;
                    resumed_events.insert(run["input"]["n"].as_u64().unwrap());
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "run {run_id} did not finish: {run}\n{}",
                w2.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let listed = get_json(
        &client,
        format!("{}/v1/runs?pipeline=charges&limit=2000", alive[0]),
    )
    .await;
    let listed = listed.as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), N as usize, "one run per delivery");
    let keys = by_event();
    for n in 0..N {
        assert_eq!(
            keys[&n].len(),
            1,
            "event {n} was charged under more than one idempotency key: {:?}",
            keys[&n]
        );
    }
    assert!(
        resumed >= 1,
        "a run in flight on the killed worker was resumed"
    );
    let failover = fake
        .seen("/charge")
        .iter()
        .filter(|c| c.at > killed_on_fake)
        .filter(|c| {
            let body: Value = serde_json::from_slice(&c.body).unwrap();
            resumed_events.contains(&body["n"].as_u64().unwrap())
        })
        .map(|c| c.at - killed_on_fake)
        .min()
        .expect("a resumed run charged after the kill");
    eprintln!(
        "cluster: {N} deliveries over 3 workers, w1 (the leader) killed after 100 charges; {resumed} run(s) resumed elsewhere, \
         the first resumed stage {:.2} s after the kill (lease 2 s); every event charged {:.1} s after the kill; {} charge requests in all",
        failover.as_secs_f64(),
        all_charged.as_secs_f64(),
        fake.seen("/charge").len()
    );
}

/// Three workers share one rate limit of 10 calls a second (burst 1), each running
/// fifteen runs that call the vendor at once: the vendor's own clock sees them spread
/// out as one limit allows, not three. A circuit that opens on one worker is open on
/// the others (their runs fail fast, sending nothing). A schedule served by all three
/// fires once per second, not three times.
#[tokio::test]
async fn a_rate_limit_a_circuit_and_a_schedule_hold_for_the_cluster_as_a_whole() {
    const PER_WORKER: usize = 15;
    let Some(bin) = prerequisites() else {
        return;
    };
    let dir = support::scratch("cluster-quota");
    let nats = NatsServer::start(bin, &dir);
    let fake = Fake::start().await;
    fake.route("/limited", vec![Reply::json(200, json!({"ok": true}))]);
    fake.route("/tick", vec![Reply::json(200, json!({"ok": true}))]);
    fake.route("/down", vec![Reply::json(503, json!({"error": "down"}))]);
    let pipelines = pipelines_dir(
        &dir,
        &[
            (
                "fragile.pipeline.json",
                json!({
                    "name": "fragile",
                    "services": {"fragile": {"circuit_breaker": {"failure_threshold": 2, "open_seconds": 60}}},
                    "stages": [{"id": "call", "component": "http-request", "retry": {"max_attempts": 1},
                                "config": {"url": fake.url("/down"), "service": "fragile"}}]
                }),
            ),
            (
                "limited.pipeline.json",
                json!({
                    "name": "limited",
                    "services": {"vendor": {"rate_limit": {"requests_per_second": 10, "burst": 1}}},
                    "stages": [{"id": "call", "component": "http-request", "config": {
                        "url": fake.url("/limited"), "service": "vendor"}}]
                }),
            ),
            (
                "ticks.pipeline.json",
                json!({
                    "name": "ticks",
                    "triggers": [{"type": "schedule", "cron": "* * * * * *", "input": {}}],
                    "stages": [{"id": "tick", "component": "http-request", "config": {
                        "url": fake.url("/tick"), "method": "POST",
                        "body": {"at": "{{trigger.scheduled_at}}"}}}]
                }),
            ),
        ],
    );
    let workers: Vec<Server> = ["q1", "q2", "q3"]
        .iter()
        .map(|name| worker(&dir, name, &pipelines, &json!({}), &nats.url()))
        .collect();
    let client = support::api_client();
    // Synchronous runs run where they are asked: each worker calls on its own.
    let calls = futures::future::join_all(workers.iter().flat_map(|w| {
        (0..PER_WORKER).map(|_| {
            let (client, url) = (client.clone(), w.url.clone());
            async move {
                client
                    .post(format!("{url}/v1/pipelines/limited/runs"))
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        })
    }))
    .await;
    assert!(
        calls.iter().all(|s| *s == 200),
        "{calls:?}\n{}",
        workers[0].log()
    );
    let seen = fake.seen("/limited");
    let n = 3 * PER_WORKER;
    assert_eq!(seen.len(), n);
    let at: Vec<Duration> = seen.iter().map(|s| s.at).collect();
    let span = at[n - 1] - at[0];
    // 45 calls at 10 a second with a burst of 1: at least 44 intervals of 100 ms (a
    // little less for the time a call takes to reach the vendor).
    assert!(
        span >= Duration::from_millis(4000),
        "three workers spent more than one quota: 45 calls in {span:?}"
    );
    let busiest = (0..n)
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| **t - at[i] < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    // One more or two for the time calls take to reach the vendor, not three quotas.
    assert!(busiest <= 12, "{busiest} calls within one second");

    // Two failures open the circuit on the first worker; the others follow.
    let run_on = |url: String| {
        let client = client.clone();
        async move {
            let run: Value = client
                .post(format!("{url}/v1/pipelines/fragile/runs"))
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            run["stages"][0]["error"]["kind"]
                .as_str()
                .unwrap_or("")
                .to_string()
        }
    };
    for _ in 0..2 {
        run_on(workers[0].url.clone()).await;
    }
    assert_eq!(fake.seen("/down").len(), 2);
    assert_eq!(run_on(workers[0].url.clone()).await, "circuit-open");
    let deadline = Instant::now() + Duration::from_secs(10);
    for w in &workers[1..] {
        loop {
            let kind = run_on(w.url.clone()).await;
            if kind == "circuit-open" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the circuit stayed closed on {} ({kind}):\n{}",
                w.url,
                w.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let sent_down = fake.seen("/down").len();

    // The schedule ran meanwhile: once per second, by whichever worker leads.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.seen("/tick").len() < 3 {
        assert!(Instant::now() < deadline, "no ticks:\n{}", workers[0].log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut fires: HashMap<String, usize> = HashMap::new();
    for t in fake.seen("/tick") {
        let body: Value = serde_json::from_slice(&t.body).unwrap();
        *fires
            .entry(body["at"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        fires.values().all(|n| *n == 1),
        "a fire ran more than once: {fires:?}"
    );
    let leaders: Vec<bool> = futures::future::join_all(
        workers
            .iter()
            .map(|w| get_json(&client, format!("{}/v1/cluster", w.url))),
    )
    .await
    .iter()
    .map(|s| s["leader"] == true)
    .collect();
    assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");
    eprintln!(
        "cluster quota: {n} calls from 3 workers in {:.2} s (10/s allowed), at most {busiest} in one second; the circuit opened on all three after {sent_down} calls; {} schedule fires, each once",
        span.as_secs_f64(),
        fires.len()
    );
}

/// The version of `plugin` each worker serves.
async fn versions(client: &reqwest::Client, workers: &[&Server], plugin: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in workers {
        let listed = get_json(client, format!("{}/v1/plugins", w.url)).await;
        let v = listed
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == plugin)
            .map(|p| p["version"].as_str().unwrap_or("").to_string())
            .unwrap_or_default();
        out.push(v);
    }
    out
}

async fn wait_versions(client: &reqwest::Client, workers: &[&Server], want: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let now = versions(client, workers, "intercom").await;
        if now.iter().all(|v| v == want) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "intercom versions {now:?}, not all {want}:\n{}",
            workers.last().unwrap().log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A swap uploaded to one worker reaches the others, a worker that starts later serves
/// the cluster's version, and a rollback on another worker takes them all back.
#[tokio::test]
async fn a_swap_on_one_worker_reaches_every_worker_and_so_does_a_rollback() {
    let Some(bin) = prerequisites() else {
        return;
    };
    let dir = support::scratch("cluster-swap");
    let nats = NatsServer::start(bin, &dir);
    let plugins = plugins_dir(&dir);
    let pipelines = pipelines_dir(
        &dir,
        &[(
            "hello.pipeline.json",
            json!({"name": "hello", "stages": [{"id": "t", "component": "json-transform",
                   "config": {"template": {"hi": "{{input.name}}"}}}]}),
        )],
    );
    let s1 = worker_with(&dir, "s1", &pipelines, &plugins, &json!({}), &nats.url());
    let s2 = worker_with(&dir, "s2", &pipelines, &plugins, &json!({}), &nats.url());
    let s3 = worker_with(&dir, "s3", &pipelines, &plugins, &json!({}), &nats.url());
    let client = support::api_client();
    assert_eq!(
        versions(&client, &[&s1, &s2, &s3], "intercom").await,
        ["1.0.0"; 3]
    );

    let v2 = std::fs::read(plugin_file("target/test-plugins", "intercom-v2")).unwrap();
    let resp = client
        .put(format!("{}/v1/plugins/intercom", s1.url))
        .body(v2)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let reached = wait_versions(&client, &[&s1, &s2, &s3], "2.0.0").await;

    let s4 = worker_with(&dir, "s4", &pipelines, &plugins, &json!({}), &nats.url());
    wait_versions(&client, &[&s4], "2.0.0").await;

    let resp = client
        .post(format!("{}/v1/plugins/intercom/rollback", s2.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let back = wait_versions(&client, &[&s1, &s2, &s3, &s4], "1.0.0").await;
    eprintln!(
        "cluster swap: version 2.0.0 on all three workers {:.2} s after the upload; the rollback on all four {:.2} s after",
        reached.as_secs_f64(),
        back.as_secs_f64()
    );
}
