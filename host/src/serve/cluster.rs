//! `fmhost serve --cluster nats://...`: workers that share one PostgreSQL journal and
//! one NATS JetStream work queue, and behave as one server.
//!
//! - **Work.** An accepted webhook delivery or asynchronous API run is journaled as
//!   *queued* (running, no worker) and its id put on the work-queue stream. Any worker
//!   pulls it, takes it in the journal (one compare-and-set: only a queued run can be
//!   taken), and only then acknowledges the message. A worker pulls only as many as it
//!   has room for.
//! - **Leases.** Every run a worker runs (taken from the queue, or started here: a
//!   synchronous API run, a trigger's) is leased to it in the journal; a heartbeat
//!   renews its leases every third of the lease. When a worker dies, its leases run out
//!   and the leader puts those runs back in the queue: another worker resumes each from
//!   its last completed stage, under the same run id and so the same idempotency keys.
//! - **The leader** is whichever worker holds a PostgreSQL advisory lock: it fires the
//!   schedules and polls the cursors (once for the cluster), and sweeps expired leases
//!   and deliveries whose run was never queued. When it dies, its connection closes, the
//!   lock is free and another worker takes it within a tick.
//! - **Quotas.** A service's rate limit is one GCRA row in the journal, taken on the
//!   database's clock (see `journal::postgres::cluster`), so N workers spend one quota.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{App, execute};
use crate::journal::postgres::Leadership;
use crate::journal::{OWNER_SERVE, QUEUED_LEASES, Record, RunJournal, RunStart, unix_ms};

/// `--cluster`, `--lease`, `--worker-id`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub url: String,
    pub lease: Duration,
    pub worker_id: Option<String>,
}

const STREAM: &str = "FMHOST_WORK";
const SUBJECT: &str = "fmhost.work";
const CONSUMER: &str = "fmhost-workers";

/// How many times a run goes back in the queue after its worker died during it; beyond
/// that it is dead-lettered, in case it is what kills workers.
const MAX_RESUMES: u32 = 3;

/// Most runs one worker pulls and runs at once.
const MAX_PULLED: usize = 256;

pub(super) struct Cluster {
    pub worker: String,
    pub lease: Duration,
    js: jetstream::Context,
    journal_url: String,
    leading: AtomicBool,
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

impl Cluster {
    /// Connects to the cluster's NATS server, creates its stream and consumer if they do
    /// not exist, and makes this process worker `id` in the journal.
    pub(super) async fn join(
        opts: &ClusterOptions,
        secrets: &crate::secrets::Secrets,
        journal_url: Option<String>,
    ) -> anyhow::Result<Cluster> {
        let Some(journal_url) = journal_url else {
            anyhow::bail!(
                "--cluster needs the journal the workers share: a PostgreSQL one (--journal postgres://... or FMHOST_JOURNAL)"
            );
        };
        if opts.lease < Duration::from_millis(300) {
            anyhow::bail!("--lease must be at least 300ms (a heartbeat goes every third of it)");
        }
        let worker = opts
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", crate::journal::hostname(), std::process::id()));
        if worker.is_empty()
            || worker.len() > 128
            || !worker
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            anyhow::bail!("--worker-id {worker:?}: use 1 to 128 letters, digits, '-', '_' or '.'");
        }
        let client =
            crate::nats::connect(secrets, &opts.url, None, &format!("fmhost worker {worker}"))
                .await
                .map_err(anyhow::Error::msg)?;
        let js = jetstream::new(client);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![SUBJECT.into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("NATS stream {STREAM}: {e}"))?;
        stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("NATS consumer {CONSUMER} of {STREAM}: {e}"))?;
        crate::journal::set_worker(crate::journal::Worker {
            id: worker.clone(),
            lease_ms: opts.lease.as_millis() as i64,
        });
        tracing::info!(target: "fmhost::cluster", %worker, "worker {worker} joined the cluster at {}", secrets.redact(&opts.url));
        Ok(Cluster {
            worker,
            lease: opts.lease,
            js,
            journal_url,
            leading: AtomicBool::new(false),
        })
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }

    pub(super) fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    pub(super) fn describe(&self) -> Value {
        json!({
            "worker": self.worker,
            "leader": self.leading(),
            "lease_ms": self.lease_ms(),
        })
    }

    /// Puts journaled run `run_id` in the work queue, for the `generation`-th time (the
    /// stream drops a repeat of the same message id within two minutes).
    pub(super) async fn dispatch(&self, run_id: &str, generation: i64) -> Result<(), String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{run_id}/{generation}").as_str());
        let ack = self
            .js
            .publish_with_headers(SUBJECT, headers, run_id.to_string().into())
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Journals `start` as queued for any worker, then puts it in the queue. Once the
    /// journal has it, the run is not lost if publishing fails: the leader queues it
    /// again when its wait runs out.
    pub(super) async fn enqueue(&self, app: &App, mut start: RunStart) -> Result<(), String> {
        start.queued = true;
        let run_id = start.run_id.clone();
        app.journal.record(Record::RunStarted(start));
        app.journal
            .commit(false)
            .await
            .map_err(|e| format!("journal: {e}"))?;
        if let Err(e) = self.dispatch(&run_id, 0).await {
            tracing::warn!(target: "fmhost::cluster", %run_id, "run {run_id} is journaled but not yet queued ({e}); the leader queues it again");
        }
        Ok(())
    }
}

/// Starts a worker's part: pulling work, renewing its leases, and taking the lead
/// when nobody has it. The handles stop them at the end.
pub(super) fn start(app: &Arc<App>, cluster: &Arc<Cluster>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(pull_work(app.clone(), cluster.clone())),
        tokio::spawn(heartbeat(app.clone(), cluster.clone())),
        tokio::spawn(lead(app.clone(), cluster.clone())),
        tokio::spawn(follow_plugins(app.clone(), cluster.clone())),
        tokio::spawn(share_circuits(app.clone(), cluster.clone())),
    ]
}

/// How often a worker looks for plugin changes made on the others.
const PLUGIN_POLL: Duration = Duration::from_millis(500);

impl Cluster {
    /// Tells the other workers about a plugin change made here over the API: a swap
    /// (the component kept in the journal by its SHA-256) or a rollback.
    pub(super) async fn announce_plugin(
        &self,
        app: &App,
        name: &str,
        action: &'static str,
        bytes: Option<Vec<u8>>,
        approve: bool,
    ) {
        let (name2, worker) = (name.to_string(), self.worker.clone());
        let blob = bytes.map(|b| (crate::plugin::content_hash(&b), b));
        let announced = app
            .journal
            .cluster(move |c| {
                c.announce_plugin(
                    &name2,
                    action,
                    blob.as_ref().map(|(sha, b)| (sha.as_str(), b.as_slice())),
                    approve,
                    &worker,
                )
            })
            .await;
        match announced {
            Ok(seq) => {
                tracing::info!(target: "fmhost::cluster", plugin = name, seq, "plugin {name}: {action} announced to the cluster (change {seq})")
            }
            Err(e) => {
                tracing::error!(target: "fmhost::cluster", plugin = name, "plugin {name}: the {action} was made here but the other workers cannot be told: {e}")
            }
        }
    }
}

/// The SHA-256 of the version of `name` serving here.
fn serving(app: &App, name: &str) -> Option<String> {
    app.plugins
        .list()
        .into_iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["sha256"].as_str().map(str::to_string))
}

/// Makes the plugin changes of the other workers here: first the cluster's current
/// version of every plugin (a worker that starts late catches up), then each change as
/// it is announced.
async fn follow_plugins(app: Arc<App>, cluster: Arc<Cluster>) {
    let mut last = match app.journal.cluster(|c| c.plugin_events(0)).await {
        Ok(events) => {
            let mut current: std::collections::HashMap<String, Vec<(String, bool)>> =
                Default::default();
            for e in &events {
                let stack = current.entry(e.name.clone()).or_default();
                match (e.action.as_str(), &e.sha256) {
                    ("swap", Some(sha)) => stack.push((sha.clone(), e.approve)),
                    ("rollback", _) => {
                        stack.pop();
                    }
                    _ => {}
                }
            }
            for (name, stack) in current {
                if let Some((sha, approve)) = stack.last()
                    && serving(&app, &name).as_ref() != Some(sha)
                {
                    swap_to(&app, &name, sha, *approve, "the cluster's current version").await;
                }
            }
            events.last().map_or(0, |e| e.seq)
        }
        Err(e) => {
            tracing::error!(target: "fmhost::cluster", "cannot read the cluster's plugin versions: {e}");
            0
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PLUGIN_POLL) => {}
            _ = app.closing.cancelled() => return,
        }
        let events = match app.journal.cluster(move |c| c.plugin_events(last)).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(target: "fmhost::cluster", "cannot read plugin changes: {e}");
                continue;
            }
        };
        for e in events {
            last = e.seq;
            if e.worker == cluster.worker {
                continue;
            }
            match (e.action.as_str(), &e.sha256) {
                ("swap", Some(sha)) if serving(&app, &e.name).as_ref() != Some(sha) => {
                    swap_to(
                        &app,
                        &e.name,
                        sha,
                        e.approve,
                        &format!("worker {}", e.worker),
                    )
                    .await
                }
                ("rollback", _) => match app.plugins.rollback(&e.name) {
                    Ok((from, to)) => {
                        tracing::info!(target: "fmhost::cluster", plugin = %e.name, "plugin {}: rolled back {from} -> {to}, as worker {} did", e.name, e.worker);
                        app.announce(json!({"type": "plugin", "name": e.name, "version": to}));
                    }
                    Err(err) => {
                        tracing::warn!(target: "fmhost::cluster", plugin = %e.name, "plugin {}: cannot roll back as worker {} did: {err}", e.name, e.worker)
                    }
                },
                _ => {}
            }
        }
    }
}

/// Switches plugin `name` to the component the journal keeps as `sha`.
async fn swap_to(app: &App, name: &str, sha: &str, approve: bool, from: &str) {
    let key = sha.to_string();
    let bytes = match app.journal.cluster(move |c| c.plugin_blob(&key)).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            tracing::error!(target: "fmhost::cluster", plugin = name, "plugin {name}: version {sha} of {from} is not in the journal");
            return;
        }
        Err(e) => {
            tracing::error!(target: "fmhost::cluster", plugin = name, "plugin {name}: cannot fetch version {sha} of {from}: {e}");
            return;
        }
    };
    match app
        .plugins
        .swap(name, &bytes, &format!("cluster:{sha}"), approve, None)
        .await
    {
        Ok((old, new)) => {
            tracing::info!(target: "fmhost::cluster", plugin = name, "plugin {name}: {} -> {} ({from})", old.as_deref().unwrap_or("none"), new.version);
            app.announce(json!({"type": "plugin", "name": name, "version": new.version}));
        }
        Err(e) => {
            tracing::error!(target: "fmhost::cluster", plugin = name, "plugin {name}: cannot switch to {from}'s version {sha}: {e}; this worker keeps its own")
        }
    }
}

/// How often a worker looks for circuits the others opened.
const CIRCUIT_POLL: Duration = Duration::from_millis(250);

/// Shares circuit breakers: a circuit that opens here is opened for the cluster in the
/// journal, and one opened elsewhere is opened here, within [`CIRCUIT_POLL`]. Each
/// worker then probes on its own when the open time is up.
async fn share_circuits(app: Arc<App>, cluster: Arc<Cluster>) {
    let mut opened = app.engine.outbound.breaker_events.subscribe();
    loop {
        tokio::select! {
            event = opened.recv() => {
                let event = match event {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                if event.state != crate::http::service::BreakerState::Open {
                    continue;
                }
                let service = app.engine.outbound.services.get(&event.service);
                let Some(open_ms) = service.breaker.as_ref().map(|b| b.open_for().as_millis() as i64) else {
                    continue;
                };
                let (name, worker) = (event.service.clone(), cluster.worker.clone());
                match app.journal.cluster(move |c| c.open_circuit(&name, open_ms, &worker)).await {
                    Ok(()) => tracing::warn!(target: "fmhost::cluster", service = %event.service, "the circuit for service {} opened here; opened for the cluster", event.service),
                    Err(e) => tracing::error!(target: "fmhost::cluster", service = %event.service, "the circuit for service {} opened here, but the other workers cannot be told: {e}", event.service),
                }
            }
            _ = tokio::time::sleep(CIRCUIT_POLL) => {
                let open = match app.journal.cluster(|c| c.open_circuits()).await {
                    Ok(open) => open,
                    Err(e) => {
                        tracing::debug!(target: "fmhost::cluster", "cannot read the cluster's circuits: {e}");
                        continue;
                    }
                };
                for (name, left_ms, by) in open {
                    if by == cluster.worker {
                        continue;
                    }
                    let service = app.engine.outbound.services.get(&name);
                    if let Some(b) = &service.breaker
                        && b.open_elsewhere(Duration::from_millis(left_ms.max(0) as u64))
                    {
                        tracing::warn!(target: "fmhost::cluster", service = %name, "the circuit for service {name} is open: worker {by} opened it ({left_ms} ms left)");
                    }
                }
            }
            _ = app.closing.cancelled() => return,
        }
    }
}

/// Renews this worker's leases every third of a lease, until the process ends (a
/// draining worker still holds what it is finishing).
async fn heartbeat(app: Arc<App>, cluster: Arc<Cluster>) {
    loop {
        tokio::time::sleep(cluster.lease / 3).await;
        app.journal.record(Record::RenewLeases {
            worker: cluster.worker.clone(),
            until: now_ms() + cluster.lease_ms(),
        });
    }
}

/// Gives up this worker's leases at once (a stop that did not finish its runs), so the
/// leader queues them again without waiting for them to run out.
pub(super) async fn release(app: &App, cluster: &Cluster) {
    app.journal.record(Record::RenewLeases {
        worker: cluster.worker.clone(),
        until: 0,
    });
    if let Err(e) = app.journal.commit(true).await {
        tracing::error!(target: "fmhost::cluster", "cannot give up this worker's leases: {e}");
    }
}

async fn pull_work(app: Arc<App>, cluster: Arc<Cluster>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        app.max_runs.clamp(1, MAX_PULLED),
    ));
    let mut wait = Duration::from_millis(200);
    while !app.closing.is_cancelled() {
        let consumer: Result<jetstream::consumer::Consumer<pull::Config>, String> = async {
            cluster
                .js
                .get_stream(STREAM)
                .await
                .map_err(|e| e.to_string())?
                .get_consumer(CONSUMER)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        let consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target: "fmhost::cluster", "cannot reach the work queue: {e}; trying again in {} ms", wait.as_millis());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = app.closing.cancelled() => return,
                }
                wait = (wait * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        wait = Duration::from_millis(200);
        loop {
            // Pull only what there is room for: the rest stays for the other workers.
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = app.closing.cancelled() => return,
            };
            let room = 1 + slots.available_permits();
            let batch = consumer
                .batch()
                .max_messages(room)
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(target: "fmhost::cluster", "pulling from the work queue: {e}");
                    break;
                }
            };
            let mut first = Some(first);
            loop {
                let next = tokio::select! {
                    m = batch.next() => m,
                    _ = app.closing.cancelled() => return,
                };
                let msg = match next {
                    None => break,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(target: "fmhost::cluster", "work queue: {e}");
                        break;
                    }
                };
                let slot = match first.take() {
                    Some(s) => s,
                    None => slots.clone().acquire_owned().await.expect("never closed"),
                };
                let (app2, cluster2) = (app.clone(), cluster.clone());
                app.tracker.spawn(async move {
                    let _slot = slot;
                    take(&app2, &cluster2, msg).await;
                });
            }
        }
    }
}

/// One message of the work queue: the run is taken in the journal, the message
/// acknowledged, the run run (or resumed, with its completed stages kept).
async fn take(app: &Arc<App>, cluster: &Cluster, msg: jetstream::Message) {
    let run_id = String::from_utf8_lossy(&msg.payload).into_owned();
    if super::checked_name("run id", &run_id).is_err() {
        tracing::warn!(target: "fmhost::cluster", "the work queue held {:?}, which is not a run id; dropped", run_id.chars().take(64).collect::<String>());
        let _ = msg.ack_with(jetstream::AckKind::Term).await;
        return;
    }
    let (id, worker, until) = (
        run_id.clone(),
        cluster.worker.clone(),
        now_ms() + cluster.lease_ms(),
    );
    match app
        .journal
        .cluster(move |c| c.claim(&id, &worker, until))
        .await
    {
        Ok(true) => {
            if let Err(e) = msg.ack().await {
                tracing::debug!(target: "fmhost::cluster", %run_id, "acknowledging run {run_id}: {e} (its lease holds it)");
            }
        }
        Ok(false) => {
            // Another worker has it, or it ended: a repeat of a message.
            let _ = msg.ack().await;
            return;
        }
        Err(e) => {
            tracing::warn!(target: "fmhost::cluster", %run_id, "cannot take run {run_id}: {e}; left in the queue");
            let _ = msg
                .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    }
    run_taken(app, cluster, &run_id).await;
}

/// Runs a run this worker has just taken, from what the journal holds of it.
async fn run_taken(app: &Arc<App>, cluster: &Cluster, run_id: &str) {
    let run = match app.journal.run(run_id).await {
        Ok(Some(run)) => run,
        Ok(None) => return,
        Err(e) => {
            // Its lease runs out and the leader queues it again.
            tracing::error!(target: "fmhost::cluster", %run_id, "cannot read run {run_id} from the journal: {e}");
            return;
        }
    };
    let start = run.restart(OWNER_SERVE);
    let plan = app.pipelines.get(&run.summary.pipeline).cloned();
    let ready = match plan {
        Some(plan) => super::recover::again(app, &plan, &run)
            .map_err(|e| (e, "config"))
            .and_then(
                |(input, reuse)| match crate::engine::Engine::check_input(&plan, &input) {
                    Ok(()) => Ok((plan, input, reuse)),
                    Err(e) => Err((e.to_string(), "validation")),
                },
            ),
        None => Err((
            format!(
                "pipeline \"{}\" is not served by worker {}",
                run.summary.pipeline, cluster.worker
            ),
            "config",
        )),
    };
    match ready {
        Ok((plan, input, reuse)) => {
            if !reuse.outputs.is_empty() {
                tracing::info!(target: "fmhost::cluster", %run_id, "resuming run {run_id} of {} ({} completed stage(s) kept)", plan.name, reuse.outputs.len());
            }
            let _guard = app.trigger_guard(&start);
            let _ = execute(app, plan, input, start, Some(reuse)).await;
        }
        Err((why, kind)) => fail(app, start, &why, kind).await,
    }
}

/// Fails a run that cannot go on, into the dead-letter queue, as every run's end is.
async fn fail(app: &App, start: RunStart, why: &str, kind: &str) {
    tracing::error!(target: "fmhost::cluster", run_id = %start.run_id, "run {} cannot run, dead-lettered: {why}", start.run_id);
    let watcher = RunJournal::following(app.journal.clone(), start, &app.engine);
    if let Err(e) = watcher.reject(why, kind, false).await {
        tracing::error!(target: "fmhost::cluster", "journal: {e}");
    }
    super::after_run(
        app,
        watcher.start(),
        crate::engine::RunStatus::Failed,
        Some(why),
        Some(kind),
        None,
    );
}

/// Takes the lead whenever nobody has it; while leading, fires the schedules and polls
/// and sweeps the journal every tick.
async fn lead(app: Arc<App>, cluster: Arc<Cluster>) {
    let tick = (cluster.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut leadership: Option<Leadership> = None;
    let mut loops: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        leadership = match leadership.take() {
            Some(mut held) => {
                let (held, still) = tokio::task::spawn_blocking(move || {
                    let still = held.held();
                    (held, still)
                })
                .await
                .expect("no panic");
                if still {
                    Some(held)
                } else {
                    tracing::warn!(target: "fmhost::cluster", worker = %cluster.worker, "worker {} lost the lead (its journal connection closed); schedules and polls stop here", cluster.worker);
                    cluster.leading.store(false, Ordering::SeqCst);
                    loops.drain(..).for_each(|l| l.abort());
                    None
                }
            }
            None => {
                let url = cluster.journal_url.clone();
                match tokio::task::spawn_blocking(move || Leadership::try_take(&url))
                    .await
                    .expect("no panic")
                {
                    Ok(Some(l)) => {
                        tracing::info!(target: "fmhost::cluster", worker = %cluster.worker, "worker {} leads the cluster: it fires schedules, polls cursors and requeues dead workers' runs", cluster.worker);
                        cluster.leading.store(true, Ordering::SeqCst);
                        loops = super::triggers::start(&app, super::triggers::Part::Leader);
                        Some(l)
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(target: "fmhost::cluster", "cannot ask for the lead: {e}");
                        None
                    }
                }
            }
        };
        if leadership.is_some()
            && let Err(e) = sweep(&app, &cluster).await
        {
            tracing::warn!(target: "fmhost::cluster", "sweeping leases: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = app.closing.cancelled() => break,
        }
    }
    loops.into_iter().for_each(|l| l.abort());
}

/// The leader's sweep: runs whose worker stopped renewing its lease, and queued runs
/// nobody took, go back in the queue; accepted deliveries whose run was never
/// journaled get one.
async fn sweep(app: &Arc<App>, cluster: &Cluster) -> Result<(), crate::journal::JournalError> {
    let now = now_ms();
    let until = now + QUEUED_LEASES * cluster.lease_ms();
    let expired = app.journal.cluster(move |c| c.expired(now, 256)).await?;
    for (run_id, worker) in expired {
        let (id, w) = (run_id.clone(), worker.clone());
        let requeued = app
            .journal
            .cluster(move |c| c.requeue(&id, w.as_deref(), now, until))
            .await?;
        if !requeued {
            continue;
        }
        if let Some(worker) = &worker {
            let Some(run) = app.journal.run(&run_id).await? else {
                continue;
            };
            if run.resumed >= MAX_RESUMES {
                let why = format!(
                    "its workers stopped during it {} times (the last was {worker}); not run again, in case it is what stops them (fmhost dlq retry runs it again)",
                    run.resumed + 1
                );
                fail(app, run.restart(OWNER_SERVE), &why, "interrupted").await;
                continue;
            }
            app.journal.record(Record::RunResumed {
                run_id: run_id.clone(),
            });
            tracing::warn!(target: "fmhost::cluster", %run_id, %worker, "worker {worker} stopped renewing its lease on run {run_id}; queued again, to resume from its completed stages");
        }
        if let Err(e) = cluster.dispatch(&run_id, until).await {
            tracing::warn!(target: "fmhost::cluster", %run_id, "cannot queue run {run_id} again: {e}");
        }
    }
    let before = now - cluster.lease_ms();
    for d in app.journal.cluster(move |c| c.orphaned(before)).await? {
        tracing::info!(target: "fmhost::cluster", event_id = %d.event_id, run_id = %d.run_id, "delivery {} was accepted but never queued; queued now", d.event_id);
        if let Err(e) = cluster.enqueue(app, super::delivery_start(app, &d)).await {
            tracing::warn!(target: "fmhost::cluster", "{e}");
        }
    }
    Ok(())
}

/// A shared rate limit kept in the journal (see [`crate::journal::ClusterBackend::take_token`]).
pub(super) struct JournalQuota(pub crate::journal::Journal);

impl crate::http::service::SharedQuota for JournalQuota {
    fn acquire<'a>(
        &'a self,
        service: &'a str,
        period: Duration,
        burst: u32,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let period_us = (period.as_micros() as i64).max(1);
            loop {
                let name = service.to_string();
                let wait = self
                    .0
                    .cluster(move |c| c.take_token(&name, period_us, burst))
                    .await
                    .map_err(|e| e.to_string())?;
                if wait <= 0 {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_micros(wait as u64)).await;
            }
        })
    }
}
