//! Plugins written by a third party in another language, built by that language's own
//! toolchain from this repository's examples, as `docs/writing-a-plugin.md` tells an
//! author to: a Python connector (componentize-py) and a JavaScript transform
//! (componentize-js). Skipped, saying so, when a toolchain is absent, unless
//! FMHOST_REQUIRE_TOOLCHAINS is set (CI sets it and installs both).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::serve::{Server, pipelines_dir, post_run};
use crate::support::{self, Fake, Reply};

const TOKEN: &str = "crm-token-5f1c9a7e3b";

/// Whether `tool` runs; absent, the test is skipped unless toolchains are required.
fn toolchain(tool: &str, test: &str) -> bool {
    let present = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("FMHOST_REQUIRE_TOOLCHAINS").is_none(),
            "{tool} is required (FMHOST_REQUIRE_TOOLCHAINS is set)"
        );
        eprintln!("SKIPPED {test}: {tool} is not installed (see docs/writing-a-plugin.md)");
    }
    present
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Version 2 of an example: its source copied into `dir` with `edits` applied, built
/// by the same toolchain against the repository's WIT.
fn build_v2(example: &str, source: &str, edits: &[(&str, &str)], dir: &Path, out: &Path) {
    let from = support::root().join("examples").join(example);
    std::fs::create_dir_all(dir).unwrap();
    let mut text = std::fs::read_to_string(from.join(source)).unwrap();
    for (old, new) in edits {
        assert!(text.contains(old), "{example}/{source} has no `{old}`");
        text = text.replace(old, new);
    }
    std::fs::write(dir.join(source), text).unwrap();
    let wit = support::root().join("wit");
    let mut cmd = if source.ends_with(".py") {
        let mut c = Command::new("componentize-py");
        c.arg("--wit-path")
            .arg(&wit)
            .args(["--world", "connector", "componentize", "app", "-o"])
            .arg(out);
        c
    } else {
        let mut c = Command::new("componentize-js");
        c.arg(source)
            .arg("--wit")
            .arg(&wit)
            .args([
                "--world-name",
                "transform",
                "--disable",
                "http",
                "fetch-event",
            ])
            .arg("-o")
            .arg(out);
        c
    };
    cmd.current_dir(dir);
    run(cmd, &format!("building {example} v2"));
}

fn build_v1(example: &str, out: &Path) {
    let mut cmd = Command::new(
        support::root()
            .join("examples")
            .join(example)
            .join("build.sh"),
    );
    cmd.arg(out);
    run(cmd, &format!("examples/{example}/build.sh"));
}

fn stage<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no stage {id} in {run}"))
}

/// The pipeline: the connector fetches a contact from a declared service (whose auth the
/// host attaches), the transform renames its keys. `service: false` leaves the grant out.
fn pipeline(crm: &Fake, service: bool) -> Value {
    let mut contact = json!({"id": "contact", "component": "crm-contact",
        "config": {"url": format!("{}/api/contacts/{{{{input.id}}}}", crm.url(""))}});
    if service {
        contact["service"] = json!("crm");
    }
    json!({"name": "crm", "output_stage": "map",
        "services": {"crm": {"base_url": crm.url(""),
                             "auth": {"type": "bearer", "token": "{{secrets.CRM_TOKEN}}"}}},
        "stages": [contact,
            {"id": "map", "component": "rename-keys", "depends_on": ["contact"],
             "config": {"renames": {"email": "email_address", "name": "display_name"}}}]})
}

/// Built, inspected, run by the CLI and by a server, and both swapped in under load
/// by an upload: no run fails, each finishes wholly on one version of each plugin.
#[tokio::test]
async fn a_python_connector_and_a_javascript_transform_run_and_are_hot_swapped() {
    let test = "a_python_connector_and_a_javascript_transform_run_and_are_hot_swapped";
    if !toolchain("componentize-py", test) || !toolchain("componentize-js", test) {
        return;
    }
    // The code docs/writing-a-plugin.md walks through is the example built here.
    let guide = std::fs::read_to_string(support::root().join("docs/writing-a-plugin.md")).unwrap();
    let shown = guide
        .split("```python\n")
        .nth(1)
        .and_then(|b| b.split("```").next());
    let example =
        std::fs::read_to_string(support::root().join("examples/python-connector/app.py")).unwrap();
    assert!(
        shown.is_some_and(|code| example.ends_with(code)),
        "the guide's app.py and examples/python-connector/app.py differ"
    );
    let dir = support::scratch("polyglot");
    let plugins = dir.join("plugins");
    let v2 = dir.join("v2");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&v2).unwrap();
    let py = plugins.join("crm-contact.wasm");
    let js = plugins.join("rename-keys.wasm");
    let (py2, js2) = (v2.join("crm-contact.wasm"), v2.join("rename-keys.wasm"));

    // 1. Build: v1 with each example's build.sh, v2 from an edited copy (the vendor
    // renamed `full_name` to `display_name`). Two at a time, so about 15 s in all.
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| build_v1("python-connector", &py));
        s.spawn(|| build_v1("js-plugin", &js));
    });
    std::thread::scope(|s| {
        s.spawn(|| {
            build_v2(
                "python-connector",
                "app.py",
                &[
                    ("VERSION = \"0.1.0\"", "VERSION = \"0.2.0\""),
                    ("\"name\": \"full_name\"", "\"name\": \"display_name\""),
                ],
                &dir.join("py-src"),
                &py2,
            )
        });
        s.spawn(|| {
            build_v2(
                "js-plugin",
                "plugin.js",
                &[("version: \"0.1.0\"", "version: \"0.2.0\"")],
                &dir.join("js-src"),
                &js2,
            )
        });
    });
    eprintln!("built 4 components in {} ms", t0.elapsed().as_millis());
    let t0 = Instant::now();

    // 2. Inspect each: one pooled instance is enough for a component of any language.
    // (Inspecting compiles into the cache the server shares, as `fmhost serve` on the
    // same machine would: the uploads below then take milliseconds, not a compile each.)
    let cache = dir.join("cache");
    for (file, name, world) in [
        (&py, "crm-contact", "connector"),
        (&js, "rename-keys", "transform"),
        (&py2, "crm-contact", "connector"),
        (&js2, "rename-keys", "transform"),
    ] {
        let mut cmd = support::fmhost();
        cmd.env("FMHOST_CACHE_DIR", &cache)
            .args(["plugins", "inspect"])
            .arg(file);
        let ran: support::Ran = support::output(cmd).await.into();
        assert_eq!(ran.code, 0, "inspect {name}: {}", ran.stderr);
        for line in [
            format!("name:           {name}"),
            format!("world:          {world}"),
        ] {
            assert!(
                ran.stdout.contains(&line),
                "inspect {name}:\n{}",
                ran.stdout
            );
        }
    }

    eprintln!(
        "inspected (compiled) 4 components in {} ms",
        t0.elapsed().as_millis()
    );

    // 3. Run with the CLI. The vendor answers both spellings of the name; the service's
    // bearer token reaches it, and appears in no output.
    let crm = Fake::start().await;
    crm.route(
        "/api/contacts/42",
        vec![Reply::json(
            200,
            json!({"id": 42, "email": "ada@acme.com", "full_name": "Ada Lovelace", "display_name": "Ada"}),
        )],
    );
    let secrets = json!({"CRM_TOKEN": TOKEN});
    let secrets_file = support::write_json(&dir, "secrets.json", &secrets);
    let cli_run = |doc: Value, name: &str| {
        let p = support::write_json(&dir, name, &doc);
        let mut cmd = support::fmhost();
        cmd.env("FMHOST_CACHE_DIR", &cache)
            .arg("run")
            .arg(p)
            .args(["--input-json", r#"{"id": 42}"#])
            .arg("--plugins")
            .arg(&plugins)
            .arg("--secrets")
            .arg(&secrets_file);
        support::output(cmd)
    };
    let ran: support::Ran = cli_run(pipeline(&crm, true), "crm.json").await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let v1_output = json!({"source": "crm-contact 0.1.0", "id": 42,
                           "email_address": "ada@acme.com", "display_name": "Ada Lovelace"});
    assert_eq!(ran.json(), v1_output);
    assert!(
        ran.stderr.contains("rename-keys: renamed 2 key(s)"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("crm-contact: contact 42 fetched"),
        "{}",
        ran.stderr
    );
    let seen = crm.seen("/api/contacts/42");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert!(!ran.stdout.contains(TOKEN) && !ran.stderr.contains(TOKEN));

    // Without naming the service, the connector's call to its origin is refused.
    let ran: support::Ran = cli_run(pipeline(&crm, false), "ungranted.json")
        .await
        .into();
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains("plugin crm-contact in stage contact: refused: host 127.0.0.1")
            && ran.stderr.contains("is not granted"),
        "{}",
        ran.stderr
    );
    assert_eq!(
        crm.seen("/api/contacts/42").len(),
        1,
        "the refused call was sent"
    );

    // 4. A server, and both plugins uploaded while runs are in flight.
    std::fs::create_dir_all(dir.join("server")).unwrap();
    let server = Server::start_env(
        &dir.join("server"),
        &pipelines_dir(&dir, &[("crm.pipeline.json", pipeline(&crm, true))]),
        &plugins,
        &secrets,
        &[],
        &[("FMHOST_CACHE_DIR", cache.to_str().unwrap())],
    );
    let client = support::api_client();
    let input = json!({"id": 42});
    let (code, first) = post_run(&client, &server.url, "crm", &input).await;
    assert_eq!(code, 200, "{first}\n{}", server.log());
    assert_eq!(first["output"], v1_output);

    type Done = (Instant, Instant, u16, Value);
    let results: Arc<Mutex<Vec<Done>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, input, results, stop) = (
                client.clone(),
                server.url.clone(),
                input.clone(),
                results.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let t0 = Instant::now();
                    let (code, run) = post_run(&client, &url, "crm", &input).await;
                    results
                        .lock()
                        .unwrap()
                        .push((t0, Instant::now(), code, run));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let swap_started = Instant::now();
    for (name, file, version) in [
        ("crm-contact", &py2, "0.2.0"),
        ("rename-keys", &js2, "0.2.0"),
    ] {
        let resp = client
            .put(format!("{}/v1/plugins/{name}", server.url))
            .body(std::fs::read(file).unwrap())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "upload {name}: {body}\n{}", server.log());
        assert_eq!(body["previous_version"], "0.1.0", "{body}");
        assert_eq!(body["version"], version, "{body}");
    }
    let swap_done = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let results = results.lock().unwrap().clone();
    let (mut before, mut after) = (0, 0);
    for (t0, t1, code, run) in &results {
        assert_eq!(*code, 200, "a run failed during the swap: {run}");
        let (contact, map) = (stage(run, "contact"), stage(run, "map"));
        match contact["version"].as_str() {
            Some("0.1.0") => {
                before += 1;
                assert!(*t0 < swap_done, "a run that started after the swap used v1");
                assert_eq!(run["output"], v1_output);
            }
            Some("0.2.0") => {
                after += 1;
                assert!(*t1 > swap_started, "a run finished on v2 before the swap");
                assert_eq!(run["output"]["source"], "crm-contact 0.2.0", "{run}");
                assert_eq!(run["output"]["display_name"], "Ada", "{run}");
            }
            other => panic!("unexpected version {other:?}: {run}"),
        }
        if *t0 > swap_done {
            assert_eq!(map["version"], "0.2.0", "{run}");
        }
        assert!(!run.to_string().contains(TOKEN), "{run}");
    }
    assert!(
        before > 0 && after > 0,
        "load covered both sides of the swap: {before} before, {after} after"
    );
    eprintln!(
        "swap under load: {} runs, {before} on v1 and {after} on v2; uploads took {} ms",
        results.len(),
        (swap_done - swap_started).as_millis()
    );
}
