//! The `nats` trigger and the `nats-publish` built-in against a real `nats-server`
//! with JetStream (Debian's package; `.ci/run` installs it). The test owns the server
//! process, because it kills it mid-stream and starts it again on the same port and
//! store. Without the binary it skips, unless FMHOST_REQUIRE_TOOLCHAINS is set (CI).

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::{Value, json};

use crate::serve::{Server, get_json, pipelines_dir};
use crate::support::{self, Fake, Reply};

pub(crate) fn nats_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    candidates
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A `nats-server -js` on a fixed loopback port with its store in `dir`.
pub(crate) struct NatsServer {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub(crate) fn start(bin: PathBuf, dir: &Path) -> NatsServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = NatsServer {
            bin,
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        s.up();
        s
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats-server.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("jetstream"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_until(
    what: &str,
    server: &Server,
    timeout: Duration,
    mut ok: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !ok().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Order id -> the idempotency keys its requests carried.
fn orders(fake: &Fake) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for s in fake.seen("/ok") {
        let body: Value = serde_json::from_slice(&s.body).unwrap();
        out.entry(body["id"].as_str().unwrap().to_string())
            .or_default()
            .insert(s.header("idempotency-key").unwrap_or("").to_string());
    }
    out
}

/// 1,000 messages through a real JetStream stream, with `fmhost serve` killed with
/// SIGKILL and then `nats-server` killed and restarted mid-stream: every message runs
/// exactly once per its id (the vendor sees one idempotency key per order, the
/// published events are 1,000), none is lost, a message whose run keeps failing is
/// dead-lettered after `max_deliver` deliveries and a message that is not JSON at once,
/// one that fails once is retried on its redelivery and its dead letter resolved,
/// and the consumer is left with nothing pending.
#[tokio::test]
async fn a_thousand_messages_run_once_each_across_kills_of_both_servers() {
    let Some(bin) = nats_binary() else {
        assert!(
            std::env::var_os("FMHOST_REQUIRE_TOOLCHAINS").is_none(),
            "nats-server is required (FMHOST_REQUIRE_TOOLCHAINS is set): apt-get install nats-server"
        );
        eprintln!("skipped: no nats-server (apt-get install nats-server)");
        return;
    };
    let dir = support::scratch("queue-nats");
    let mut nats = NatsServer::start(bin, &dir);
    let fake = Fake::start().await;
    fake.route(
        "/ok",
        vec![Reply::json(200, json!({"ok": true})).delay(Duration::from_millis(3))],
    );
    fake.route("/down", vec![Reply::status(503)]);
    // Down for the first delivery, up for the next.
    fake.route(
        "/flaky",
        vec![Reply::status(503), Reply::json(200, json!({"ok": true}))],
    );
    fake.route(
        "/fulfilment/shipments",
        vec![Reply::json(201, json!({"shipment_id": "sh-1"}))],
    );
    fake.route("/slack", vec![Reply::json(200, json!({"ok": true}))]);

    // The events the pipeline publishes land in a stream of their own.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: "PROCESSED".into(),
        subjects: vec!["processed.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_stream(jetstream::stream::Config {
        name: "SHOP_SHIPMENTS".into(),
        subjects: vec!["shop.shipments.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();

    let pipelines = pipelines_dir(
        &dir,
        &[(
            "orders.pipeline.json",
            json!({
                "name": "orders",
                "input_schema": {"type": "object", "required": ["id", "route"]},
                "triggers": [{"type": "nats", "url": "{{secrets.NATS_URL}}", "stream": "ORDERS",
                              "subject": "orders.>", "max_deliver": 3, "ack_wait": "2s",
                              "backoff": "200ms", "max_in_flight": 16}],
                "stages": [
                    {"id": "book", "component": "http-request",
                     "retry": {"max_attempts": 1},
                     "config": {"url": format!("http://{}/{{{{input.route}}}}", fake.addr), "method": "POST",
                                "body": {"id": "{{input.id}}", "subject": "{{trigger.subject}}",
                                         "message": "{{trigger.id}}", "type": "{{trigger.type}}"}}},
                    {"id": "emit", "component": "nats-publish", "depends_on": ["book"],
                     "config": {"url": "{{secrets.NATS_URL}}", "subject": "processed.{{input.id}}",
                                "payload": {"id": "{{input.id}}", "message": "{{trigger.id}}"}}}
                ]
            }),
        )],
    );
    // The example, as written, served beside it.
    std::fs::copy(
        support::root().join("pipelines/order-events.pipeline.json"),
        pipelines.join("order-events.pipeline.json"),
    )
    .unwrap();
    let plugins = dir.join("no-plugins");
    let secrets = json!({"NATS_URL": nats.url(), "FULFILMENT_API": fake.url("/fulfilment"),
                         "SLACK_WEBHOOK": fake.url("/slack")});
    let mut server = Server::start(&dir, &pipelines, &plugins, &secrets);

    // 1,000 orders, two that always fail upstream, one that is not JSON; each with its
    // own message id. The stream is created by the trigger when it first connects.
    wait_until(
        "the triggers' streams",
        &server,
        Duration::from_secs(20),
        async || {
            js.get_stream("ORDERS").await.is_ok() && js.get_stream("SHOP_ORDERS").await.is_ok()
        },
    )
    .await;
    for (id, order) in [
        (
            "shop-1",
            json!({"order_id": "A-1", "items": [{"sku": "X", "qty": 1}]}),
        ),
        (
            "shop-2",
            json!({"order_id": "A-2", "items": [{"sku": "Y", "qty": 2}]}),
        ),
        ("shop-3", json!({"order": "not an order"})),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        js.publish_with_headers("shop.orders.created", headers, order.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let publish = |i: usize, route: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("order-{i}").as_str());
        let body = json!({"id": format!("o{i}"), "route": route}).to_string();
        (headers, body)
    };
    for i in 0..1000 {
        let (headers, body) = publish(i, "ok");
        js.publish_with_headers(format!("orders.eu.{}", i % 7), headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for (i, body) in [(1000, None), (1001, None), (1002, Some("{not json"))] {
        let (headers, good) = publish(i, "down");
        let body = body.map(str::to_string).unwrap_or(good);
        js.publish_with_headers("orders.poison", headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (headers, body) = publish(1003, "flaky");
    js.publish_with_headers("orders.flaky", headers, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    drop(js);

    // fmhost is killed with SIGKILL a third of the way through.
    wait_until("300 orders", &server, Duration::from_secs(60), async || {
        orders(&fake).len() >= 300
    })
    .await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let at_kill = orders(&fake).len();
    let mut server = Server::start(&dir, &pipelines, &plugins, &secrets);

    // Then nats-server, with SIGKILL, and started again on the same port and store.
    wait_until("600 orders", &server, Duration::from_secs(60), async || {
        orders(&fake).len() >= 600
    })
    .await;
    nats.kill();
    let at_nats_kill = orders(&fake).len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.up();

    let api = support::api_client();
    let url = server.url.clone();
    wait_until(
        "every order, and the poison dead-lettered",
        &server,
        Duration::from_secs(120),
        async || {
            let dlq = get_json(&api, format!("{url}/v1/dlq?pipeline=orders")).await;
            let healed = get_json(
                &api,
                format!(
                    "{url}/v1/dlq?pipeline=orders&status=resolved&event_id=nats:msg:order-1003"
                ),
            )
            .await;
            orders(&fake).len() == 1000
                && healed.as_array().is_some_and(|h| h.len() == 1)
                && dlq.as_array().is_some_and(|d| {
                    d.len() == 3
                        && d.iter()
                            .all(|e| e["error_kind"] != "http-5xx" || e["retries"] == 2)
                })
        },
    )
    .await;

    // Exactly once per id: one idempotency key per order however often it was sent.
    let seen = orders(&fake);
    for i in 0..1000 {
        let keys = &seen[&format!("o{i}")];
        assert_eq!(
            keys.len(),
            1,
            "order o{i} was run as {} runs: {keys:?}",
            keys.len()
        );
    }
    let bodies: Vec<Value> = fake
        .seen("/ok")
        .iter()
        .map(|s| serde_json::from_slice(&s.body).unwrap())
        .collect();
    assert!(bodies.iter().all(|b| b["type"] == "nats"
        && b["subject"].as_str().unwrap().starts_with("orders.eu.")
        && b["message"].as_str().unwrap()
            == format!("nats:msg:order-{}", &b["id"].as_str().unwrap()[1..])));

    // The two that always failed: three deliveries each, then terminated; the one
    // that is not JSON: dead-lettered at once, naming where the JSON broke.
    let dlq = get_json(&api, format!("{url}/v1/dlq?pipeline=orders")).await;
    let dlq = dlq.as_array().unwrap();
    let by_kind = |k: &str| dlq.iter().filter(|e| e["error_kind"] == k).count();
    assert_eq!(by_kind("http-5xx"), 2, "{dlq:?}");
    assert_eq!(by_kind("validation"), 1, "{dlq:?}");
    let bad = dlq
        .iter()
        .find(|e| e["error_kind"] == "validation")
        .unwrap();
    assert_eq!(bad["event_id"], "nats:msg:order-1002");
    assert!(
        bad["reason"]
            .as_str()
            .unwrap()
            .contains("not JSON (line 1 column"),
        "{bad}"
    );
    assert!(
        fake.seen("/down").len() >= 6,
        "{}",
        fake.seen("/down").len()
    );
    // The one that failed once: nacked, delivered again, retried from its failed stage
    // under the same key, and its dead letter resolved by that retry.
    let flaky = fake.seen("/flaky");
    assert_eq!(flaky.len(), 2, "{flaky:?}");
    assert_eq!(
        flaky[0].header("idempotency-key"),
        flaky[1].header("idempotency-key")
    );

    // The events: one per order (and the healed one), whatever was resent (the stream
    // drops a duplicate id).
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let mut processed = js.get_stream("PROCESSED").await.unwrap();
    assert_eq!(processed.info().await.unwrap().state.messages, 1001);

    // Nothing left for the consumer: all acknowledged or terminated.
    let mut orders_stream = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(orders_stream.info().await.unwrap().state.messages, 1004);
    let mut consumer: jetstream::consumer::PullConsumer = orders_stream
        .get_consumer("fmhost-orders-nats")
        .await
        .unwrap();
    wait_until(
        "the consumer to drain",
        &server,
        Duration::from_secs(20),
        async || {
            let info = consumer.info().await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        },
    )
    .await;

    // The example: two orders booked and announced once each, the third dead-lettered
    // for its shape, and the alert sent.
    let booked: Vec<String> = fake
        .seen("/fulfilment/shipments")
        .iter()
        .map(|s| s.header("idempotency-key").unwrap().to_string())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(booked.len(), 2, "{booked:?}");
    assert!(
        booked.contains(&"shipment-nats:msg:shop-1".to_string()),
        "{booked:?}"
    );
    let mut shipments = js.get_stream("SHOP_SHIPMENTS").await.unwrap();
    assert_eq!(shipments.info().await.unwrap().state.messages, 2);
    let example_dlq = get_json(&api, format!("{url}/v1/dlq?pipeline=order-events")).await;
    assert_eq!(example_dlq.as_array().unwrap().len(), 1, "{example_dlq}");
    assert!(
        example_dlq[0]["reason"]
            .as_str()
            .unwrap()
            .contains("order_id"),
        "{example_dlq}"
    );
    wait_until(
        "the dead-letter alert",
        &server,
        Duration::from_secs(10),
        async || !fake.seen("/slack").is_empty(),
    )
    .await;

    let listed = get_json(&api, format!("{url}/v1/triggers")).await;
    let t = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["pipeline"] == "orders")
        .unwrap();
    assert_eq!(t["type"], "nats", "{listed}");
    assert_eq!(t["state"], "consuming", "{listed}");
    assert_eq!(t["stream"], "ORDERS");
    let metrics = crate::triggers::metrics(&server).await;
    assert!(
        metrics.contains("fmhost_nats_terminated_total{pipeline=\"orders\",trigger=\"nats\"}"),
        "{metrics}"
    );
    eprintln!(
        "nats: 1000 orders, {at_kill} before fmhost was killed, {at_nats_kill} before nats-server was; {} requests to the vendor, {} to the failing route",
        fake.seen("/ok").len(),
        fake.seen("/down").len()
    );
    let _ = orders_stream;
    server.terminate();
}
