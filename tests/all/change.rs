//! Safe change, end to end: the Intercom API-change story told with recordings, schema
//! drift, shadow replay, a canary promoted on its own, and a broken candidate rolled
//! back on its own, against a real `fmhost serve` and the sandbox vendors.

use std::path::Path;

use serde_json::{Value, json};

use crate::plugins::plugin_file;
use crate::serve::{Server, get_json, intercom_stage, pipelines_dir, plugins_dir, post_run};
use crate::support;

const NAME: &str = "customer-360-connectors";
/// `now()` pinned for the server and the shadow tests alike: the pipeline's output
/// carries it, and a second ticking over between a run and its shadow would show.
const NOW: &str = "2026-06-01T12:00:00Z";

async fn plugins_json(client: &reqwest::Client, url: &str) -> Value {
    let all = get_json(client, format!("{url}/v1/plugins")).await;
    all.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "intercom")
        .cloned()
        .unwrap()
}

/// `fmhost plugins test CANDIDATE` on the server's journal, run from elsewhere: the
/// other plugins are found where the runs found theirs.
async fn shadow_cli(dir: &Path, candidate: &Path, extra: &[&str]) -> support::Ran {
    let mut cmd = support::fmhost();
    cmd.current_dir(dir)
        .arg("--state")
        .arg(dir.join("state"))
        .args(["plugins", "test"])
        .arg(candidate)
        .args(["--pipeline", NAME])
        .args(extra)
        .env("FMHOST_NOW", NOW);
    support::output(cmd).await.into()
}

/// Runs the pipeline `n` times, one after another; returns (status code, intercom version) per run.
async fn runs(client: &reqwest::Client, url: &str, input: &Value, n: usize) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (code, run) = post_run(client, url, NAME, input).await;
        let version = intercom_stage(&run)["version"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        out.push((code, version));
    }
    out
}

#[tokio::test]
async fn an_api_change_is_shadow_tested_canaried_and_promoted_and_a_broken_candidate_rolled_back() {
    let sandbox = fmhost_sandbox::Sandbox::start(fmhost_sandbox::Options { latency_scale: 0.0 })
        .await
        .unwrap();
    let dir = support::scratch("serve-change");
    let mut doc: Value = serde_json::from_slice(
        &std::fs::read(support::root().join("pipelines/customer-360-connectors.pipeline.json"))
            .unwrap(),
    )
    .unwrap();
    doc["record"] = json!(true);
    let server = Server::start_env(
        &dir,
        &pipelines_dir(&dir, &[("c360.pipeline.json", doc)]),
        &plugins_dir(&dir),
        &sandbox.secrets(),
        &[],
        &[("FMHOST_NOW", NOW)],
    );
    let client = support::api_client();
    let input = sandbox.input();
    let v1 = plugin_file("target/plugins", "intercom");
    let v2 = plugin_file("target/test-plugins", "intercom-v2");

    // 1. The shipped connector (v1) reads Intercom 2.10; its runs are journaled with
    // every upstream exchange.
    let first = runs(&client, &server.url, &input, 3).await;
    assert!(
        first.iter().all(|r| *r == (200, "1.0.0".into())),
        "{first:?}"
    );

    // The shadow machinery reproduces what it replays: v1 against its own runs.
    let same = shadow_cli(&dir, &v1, &[]).await;
    assert_eq!(same.code, 0, "{}\n{}", same.stdout, same.stderr);
    assert!(
        same.stdout.contains("3 identical, 0 changed"),
        "{}",
        same.stdout
    );

    // 2. A shadow test of v2 (written for 2.11) on those runs predicts it would break
    // them all, without sending a request.
    let hits = sandbox.hits("intercom");
    let shadow = shadow_cli(&dir, &v2, &["--json"]).await;
    assert_eq!(shadow.code, 1, "{}\n{}", shadow.stdout, shadow.stderr);
    let report = shadow.json();
    assert_eq!(report["counts"]["regressed"], 3, "{report}");
    assert_eq!(report["safe"], false);
    assert!(
        report["runs"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no field `last_seen`"),
        "{report}"
    );
    assert_eq!(
        sandbox.hits("intercom"),
        hits,
        "a shadow test sends nothing"
    );

    // 3. Intercom moves to 2.11: v1's runs fail, and the recorded answer is flagged as
    // drift (fields gone) on the attempt and in /metrics.
    sandbox.set_intercom_version("2.11");
    let (code, run) = post_run(&client, &server.url, NAME, &input).await;
    assert_eq!(code, 502, "{run}");
    let detail = get_json(
        &client,
        format!("{}/v1/runs/{}", server.url, run["run_id"].as_str().unwrap()),
    )
    .await;
    let stage = detail["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "fetch-intercom")
        .unwrap();
    let drift = stage["calls"][0]["recorded"]["drift"].to_string();
    assert!(drift.contains("last_seen_at"), "{stage}");
    let (code, _) = post_run(&client, &server.url, NAME, &input).await;
    assert_eq!(code, 502);
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("fmhost_schema_drift_total{"), "{metrics}");

    // 4. Shadowed over the API against the two failed runs, v2 fixes both: the
    // candidate's stage succeeds on the recorded 2.11 answers. Safe.
    let hits = sandbox.hits("intercom");
    let report: Value = client
        .post(format!(
            "{}/v1/plugins/intercom/shadow?pipeline={NAME}&runs=2",
            server.url
        ))
        .body(std::fs::read(&v2).unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["counts"]["fixed"], 2, "{report}");
    assert_eq!(report["safe"], true, "{report}");
    assert_eq!(report["candidate"]["version"], "2.0.0");
    assert_eq!(
        report["runs"][0]["stages"],
        json!(["fetch-intercom"]),
        "{report}"
    );
    assert_eq!(
        sandbox.hits("intercom"),
        hits,
        "a shadow test sends nothing"
    );
    let shadow = shadow_cli(&dir, &v2, &["--runs", "2"]).await;
    assert_eq!(shadow.code, 0, "{}\n{}", shadow.stdout, shadow.stderr);
    assert!(
        shadow.stdout.contains("2 fixed") && shadow.stdout.contains("safe"),
        "{}",
        shadow.stdout
    );

    // 5. v2 goes in as a 10% canary that decides for itself: one run in ten goes to it
    // (the first included); after two ok runs it is promoted and serves every run.
    let mut cmd = support::fmhost();
    cmd.args(["plugins", "swap", "intercom"])
        .arg(&v2)
        .args([
            "--server",
            &server.url,
            "--canary",
            "10",
            "--auto",
            "--promote-after",
            "2",
        ])
        .env("FMHOST_API_TOKEN", support::API_TOKEN);
    let swapped: support::Ran = support::output(cmd).await.into();
    assert_eq!(swapped.code, 0, "{}", swapped.stderr);
    assert_eq!(swapped.json()["canary"]["version"], "2.0.0");
    assert_eq!(swapped.json()["version"], "1.0.0");
    let canary = plugins_json(&client, &server.url).await;
    assert_eq!(canary["canary"]["percent"], 10, "{canary}");
    let during = runs(&client, &server.url, &input, 11).await;
    for (i, (code, version)) in during.iter().enumerate() {
        let expected = if i % 10 == 0 {
            (200, "2.0.0")
        } else {
            (502, "1.0.0")
        };
        assert_eq!((*code, version.as_str()), expected, "run {i}: {during:?}");
    }
    // The second ok run ends the canary; the promotion lands as that run lets go of it.
    let mut promoted = plugins_json(&client, &server.url).await;
    for _ in 0..50 {
        if promoted["canary"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        promoted = plugins_json(&client, &server.url).await;
    }
    assert_eq!(promoted["version"], "2.0.0", "{promoted}");
    assert!(promoted["canary"].is_null(), "{promoted}");
    assert_eq!(promoted["previous_versions"][0]["version"], "1.0.0");
    let after = runs(&client, &server.url, &input, 3).await;
    assert!(
        after.iter().all(|r| *r == (200, "2.0.0".into())),
        "{after:?}"
    );
    assert!(
        server.log().contains("canary of intercom promoted"),
        "{}",
        server.log()
    );

    // 6. A broken candidate (v1, which reads only 2.10) as an automatic 10% canary: its
    // first run fails, and it is rolled back at once; no other run fails.
    let resp = client
        .put(format!(
            "{}/v1/plugins/intercom?canary=10&auto=true",
            server.url
        ))
        .body(std::fs::read(&v1).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let last = runs(&client, &server.url, &input, 10).await;
    assert_eq!(last[0], (502, "1.0.0".into()), "{last:?}");
    assert!(
        last[1..].iter().all(|r| *r == (200, "2.0.0".into())),
        "{last:?}"
    );
    let rolled = plugins_json(&client, &server.url).await;
    assert_eq!(rolled["version"], "2.0.0", "{rolled}");
    assert!(rolled["canary"].is_null(), "{rolled}");
    assert!(
        server.log().contains("canary of intercom rolled back"),
        "{}",
        server.log()
    );

    // Each version's record, side by side in /metrics.
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "fmhost_plugin_canary_decisions_total{plugin=\"intercom\",decision=\"promoted\"} 1",
        "fmhost_plugin_canary_decisions_total{plugin=\"intercom\",decision=\"rolled_back\"} 1",
        "fmhost_plugin_canary_percent{plugin=\"intercom\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(
        metrics.contains("fmhost_plugin_runs_total{plugin=\"intercom\",version=\"2.0.0\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "fmhost_plugin_invocation_seconds_count{plugin=\"intercom\",version=\"1.0.0\""
        ),
        "{metrics}"
    );
}
