//! The `nats` trigger: a JetStream durable pull consumer whose messages become
//! deliveries, with the guarantees webhooks have.
//!
//! A message's key is its `Nats-Msg-Id`, else its stream sequence. It is acknowledged
//! only once its run is journaled: as succeeded (ack), as failed for a reason that
//! retrying cannot mend (terminated, dead-lettered), or as failed for a transient one
//! (negatively acknowledged with a growing delay, so the stream delivers it again). A
//! redelivery of a message that already ran does not run it again: one whose run
//! succeeded is acknowledged, one whose run failed transiently is run again in place
//! (the same run id and idempotency keys, its succeeded stages kept, as a resume),
//! and after `max_deliver` deliveries it is terminated and stays in the dead-letter
//! queue. A message found while its run is under way (resumed after a crash) waits for
//! that run. While a run goes on, the host tells the server it is still working, so
//! `ack_wait` bounds only a silent consumer.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use sha2::Digest;

use super::App;
use super::triggers::{TriggerState, delivery, run_delivery};
use crate::error::ErrorKind;
use crate::journal::{DeadLetter, DlqFilter, rfc3339, unix_ms};
use crate::metrics::TriggerCount;
use crate::pipeline::triggers::Nats;

/// How a message is answered once its run is journaled.
#[derive(Debug)]
enum Verdict {
    /// Its run succeeded (or its dead letter was settled by hand): acknowledge.
    Done,
    /// Its run failed transiently: deliver again later, up to `max_deliver`; the open
    /// dead letter says which run and why.
    Retry(Box<DeadLetter>),
    /// It cannot run, or failed for a reason a retry cannot mend: terminate.
    Fatal(String),
    /// The journal could not say; deliver again later.
    Unknown(String),
}

impl Verdict {
    /// The error kind a failed run's answer is for.
    fn kind(&self) -> &str {
        match self {
            Verdict::Retry(dl) => dl.error_kind.as_deref().unwrap_or("failed"),
            Verdict::Fatal(kind) => kind,
            Verdict::Done | Verdict::Unknown(_) => "",
        }
    }
}

/// The longest `Nats-Msg-Id` used as it is in a delivery's key.
const MAX_MSG_ID: usize = 256;

/// Most of a non-JSON payload kept in its dead letter.
const MAX_KEPT_RAW: usize = 64 * 1024;

/// The longest redelivery delay.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub(super) async fn consume(app: Arc<App>, st: Arc<TriggerState>, n: Nats) {
    let durable = n
        .durable
        .clone()
        .unwrap_or_else(|| default_durable(&st.pipeline, &st.trigger.name));
    let slots = Arc::new(tokio::sync::Semaphore::new(n.max_in_flight));
    let busy = Busy::default();
    let mut wait = Duration::from_millis(500);
    let client = loop {
        st.set_state("connecting");
        match crate::nats::connect(
            &app.engine.secrets(),
            &n.url,
            n.token.as_deref(),
            &format!("fmhost {}/{}", st.pipeline, st.trigger.name),
        )
        .await
        {
            Ok(c) => break c,
            Err(why) => {
                st.set_problem(Some(why.clone()));
                tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "{why}; trying again in {} ms", wait.as_millis());
                if !pause(&app, wait).await {
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    };
    let js = jetstream::new(client);
    wait = Duration::from_millis(500);
    loop {
        let messages = match open(&js, &n, &durable).await {
            Ok(m) => m,
            Err(why) => {
                st.set_problem(Some(why.clone()));
                tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "{why}; trying again in {} ms", wait.as_millis());
                if !pause(&app, wait).await {
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        wait = Duration::from_millis(500);
        st.set_problem(None);
        st.set_state("consuming");
        tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "consuming {} on stream {} as {durable}", n.subject, n.stream);
        if !pump(&app, &st, &n, &slots, &busy, messages).await {
            return;
        }
        st.set_state("reconnecting");
        if !pause(&app, wait).await {
            return;
        }
    }
}

/// `fmhost-PIPELINE-TRIGGER`, with what a consumer name cannot hold replaced.
fn default_durable(pipeline: &str, trigger: &str) -> String {
    format!("fmhost-{pipeline}-{trigger}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Sleeps `d`; false when the server is closing.
async fn pause(app: &App, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => !app.closing.is_cancelled(),
        _ = app.closing.cancelled() => false,
    }
}

/// The stream (created when missing, taking `subject`), the durable consumer (created,
/// or updated to this config), and its message flow.
async fn open(js: &jetstream::Context, n: &Nats, durable: &str) -> Result<pull::Stream, String> {
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: n.stream.clone(),
            subjects: vec![n.subject.clone()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", n.stream))?;
    let config = pull::Config {
        durable_name: Some(durable.to_string()),
        filter_subject: n.subject.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: n.ack_wait,
        max_deliver: i64::from(n.max_deliver),
        max_ack_pending: n.max_in_flight as i64,
        ..Default::default()
    };
    let consumer: jetstream::consumer::PullConsumer = match stream.create_consumer(config).await {
        Ok(c) => c,
        // An older server that cannot update a consumer in place keeps its own.
        Err(create) => stream
            .get_consumer(durable)
            .await
            .map_err(|e| format!("consumer {durable} on stream {}: {create}; {e}", n.stream))?,
    };
    consumer
        .messages()
        .await
        .map_err(|e| format!("consumer {durable} on stream {}: {e}", n.stream))
}

/// Takes messages while there is room, each handled on its own task; false when the
/// server is closing, true when the flow broke and should be opened again.
async fn pump(
    app: &Arc<App>,
    st: &Arc<TriggerState>,
    n: &Nats,
    slots: &Arc<tokio::sync::Semaphore>,
    busy: &Busy,
    mut messages: pull::Stream,
) -> bool {
    let mut errors = 0;
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            _ = app.closing.cancelled() => return false,
        };
        let next = tokio::select! {
            m = messages.next() => m,
            _ = app.closing.cancelled() => return false,
        };
        match next {
            None => return true,
            Some(Err(e)) => {
                errors += 1;
                tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "consumer: {e}");
                st.set_problem(Some(e.to_string()));
                if errors >= 5 {
                    return true;
                }
            }
            Some(Ok(msg)) => {
                if errors > 0 {
                    errors = 0;
                    st.set_problem(None);
                }
                let (app, st, n, busy) = (app.clone(), st.clone(), n.clone(), busy.clone());
                app.clone().tracker.spawn(async move {
                    let _slot = slot;
                    handle(&app, &st, &n, &busy, msg).await;
                });
            }
        }
    }
}

/// Messages being handled by this consumer, by event id: a second delivery of one
/// (the server redelivers when an acknowledgement or a progress note was lost) waits
/// for the first and answers with its outcome, so it never runs or retries it again.
#[derive(Clone, Default)]
struct Busy(Arc<std::sync::Mutex<HashSet<String>>>);

/// Held while a message is handled.
struct Claim(Busy, String);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

impl Busy {
    /// Claims `event_id`; `None` while another delivery of it holds it.
    fn claim(&self, event_id: &str) -> Option<Claim> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(event_id.to_string())
            .then(|| Claim(self.clone(), event_id.to_string()))
    }
}

/// One message, from its delivery to its acknowledgement.
async fn handle(
    app: &Arc<App>,
    st: &Arc<TriggerState>,
    n: &Nats,
    busy: &Busy,
    msg: jetstream::Message,
) {
    let (seq, delivered, pending) = match msg.info() {
        Ok(i) => (i.stream_sequence, i.delivered.max(1) as u32, i.pending),
        Err(e) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, "a message without JetStream metadata on {}: {e}", msg.subject);
            return;
        }
    };
    st.set_lag(pending);
    let headers: Map<String, Value> = msg
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(k, v)| {
            let v = v.first().map(ToString::to_string).unwrap_or_default();
            (k.to_string(), Value::String(v))
        })
        .collect();
    let key = match headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Nats-Msg-Id"))
        .and_then(|(_, v)| v.as_str())
    {
        None | Some("") => format!("seq:{}:{seq}", n.stream),
        Some(id) if id.len() <= MAX_MSG_ID => format!("msg:{id}"),
        // A key stays a key: a longer id is known by its digest.
        Some(id) => format!("msg:sha256:{}", hex::encode(sha2::Sha256::digest(id))),
    };
    let event_id = format!("{}:{key}", st.trigger.name);
    let message = Incoming {
        event_id: event_id.clone(),
        subject: msg.subject.to_string(),
        headers,
        payload: msg.payload.clone(),
        seq,
    };
    // The server is told the message is being worked on, so it is not redelivered
    // while its run goes on, however long.
    let keep_alive = async {
        loop {
            tokio::time::sleep((n.ack_wait / 3).max(Duration::from_millis(100))).await;
            let _ = msg.ack_with(AckKind::Progress).await;
        }
    };
    let work = async {
        let mut waited = false;
        loop {
            match busy.claim(&message.event_id) {
                Some(_claim) if !waited => return settle(app, st, n, &message).await,
                // The other delivery has answered: this one gets the same answer.
                Some(_claim) => return outcome(app, st, &message.event_id).await,
                None if app.closing.is_cancelled() => {
                    return Verdict::Unknown("the server is closing".into());
                }
                None => {
                    waited = true;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let verdict = tokio::select! {
        v = work => v,
        _ = keep_alive => unreachable!("the keep-alive loop never ends"),
    };
    let count = |what| {
        app.engine
            .outbound
            .metrics
            .record_trigger(what, &st.pipeline, &st.trigger.name, 1)
    };
    let answer = match &verdict {
        Verdict::Done => {
            count(TriggerCount::NatsAcked);
            msg.double_ack().await
        }
        Verdict::Retry(_) if delivered < n.max_deliver => {
            let kind = verdict.kind();
            let delay = backoff(n.backoff, delivered);
            tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "{event_id}: run failed ({kind}) on delivery {delivered} of {}; delivered again in {} ms", n.max_deliver, delay.as_millis());
            count(TriggerCount::NatsNacked);
            msg.ack_with(AckKind::Nak(Some(delay))).await
        }
        Verdict::Retry(_) | Verdict::Fatal(_) => {
            let kind = verdict.kind();
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "{event_id}: failed ({kind}) on delivery {delivered} of {}; terminated, it stays in the dead-letter queue", n.max_deliver);
            count(TriggerCount::NatsTerminated);
            msg.double_ack_with(AckKind::Term).await
        }
        Verdict::Unknown(why) if app.closing.is_cancelled() => {
            // Its run was left for the next start; the server delivers it again then.
            tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, "{event_id}: left unacknowledged at shutdown ({why})");
            return;
        }
        Verdict::Unknown(why) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, "{event_id}: {why}; delivered again later");
            count(TriggerCount::NatsNacked);
            msg.ack_with(AckKind::Nak(Some(backoff(n.backoff, delivered))))
                .await
        }
    };
    if let Err(e) = answer {
        // The journal holds the outcome: a redelivery is answered from it.
        tracing::warn!(target: "fmhost::triggers", pipeline = %st.pipeline, "{event_id}: the answer ({verdict:?}) did not reach the server: {e}");
    }
}

/// `base` doubled for each delivery after the first, at most 5 minutes, ±20%.
fn backoff(base: Duration, delivered: u32) -> Duration {
    let d = base
        .saturating_mul(1 << (delivered.saturating_sub(1)).min(16))
        .min(MAX_BACKOFF);
    d.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// What a handler needs of a message.
struct Incoming {
    event_id: String,
    subject: String,
    headers: Map<String, Value>,
    payload: bytes::Bytes,
    seq: u64,
}

/// Runs the message's delivery, or finds what became of it.
async fn settle(app: &Arc<App>, st: &Arc<TriggerState>, n: &Nats, m: &Incoming) -> Verdict {
    match app.journal.delivery(&st.pipeline, &m.event_id).await {
        Err(e) => Verdict::Unknown(format!("the journal cannot be read: {e}")),
        Ok(None) => {
            let now = unix_ms(std::time::SystemTime::now());
            let info = json!({
                "type": "nats",
                "name": st.trigger.name,
                "id": m.event_id,
                "fired_at": rfc3339(now),
                "subject": m.subject,
                "headers": m.headers,
                "stream": n.stream,
                "sequence": m.seq,
            });
            let size = m.payload.len()
                + m.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                    .sum::<usize>();
            let parsed = if size > app.max_delivery_bytes {
                Err(format!(
                    "message {} on {}: {size} bytes with its headers, over the {}-byte limit for deliveries (--max-webhook-bytes)",
                    m.event_id, m.subject, app.max_delivery_bytes
                ))
            } else {
                // serde_json's default depth limit (128) bounds the nesting.
                serde_json::from_slice::<Value>(&m.payload).map_err(|e| {
                    format!(
                        "message {} on {}: the payload is not JSON (line {} column {}: {e})",
                        m.event_id,
                        m.subject,
                        e.line(),
                        e.column()
                    )
                })
            };
            let (payload, problem) = match parsed {
                Ok(v) => (v, None),
                Err(why) => {
                    let raw =
                        String::from_utf8_lossy(&m.payload[..m.payload.len().min(MAX_KEPT_RAW)]);
                    (json!({"raw": raw}), Some(why))
                }
            };
            let d = delivery(app, st, m.event_id.clone(), &payload, info);
            match app.journal.accept_delivery(d.clone()).await {
                Ok(true) => {}
                // Taken by a redelivery handled at the same moment.
                Ok(false) => return finished(app, st, &m.event_id).await,
                Err(e) => return Verdict::Unknown(format!("the journal cannot keep it: {e}")),
            }
            match problem {
                None => {
                    let _ = run_delivery(app, st, d, payload).await;
                }
                Some(why) => super::reject_delivery(app, &d, &why, "validation").await,
            }
            outcome(app, st, &m.event_id).await
        }
        Ok(Some((_, false))) => finished(app, st, &m.event_id).await,
        Ok(Some((_, true))) => match outcome(app, st, &m.event_id).await {
            // Delivered again after a transient failure: its run runs again.
            Verdict::Retry(dl) => retry(app, st, &m.event_id, &dl).await,
            v => v,
        },
    }
}

/// Waits for the run of a delivery under way (resumed at start, or another delivery of
/// the same message), then its outcome.
async fn finished(app: &Arc<App>, st: &TriggerState, event_id: &str) -> Verdict {
    loop {
        match app.journal.delivery(&st.pipeline, event_id).await {
            Ok(Some((_, true))) => return outcome(app, st, event_id).await,
            Ok(_) if app.closing.is_cancelled() => {
                return Verdict::Unknown("the server is closing".into());
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Verdict::Unknown(format!("the journal cannot be read: {e}")),
        }
    }
}

/// What the journal says of a finished delivery: its open dead letter, if any, decides.
async fn outcome(app: &App, st: &TriggerState, event_id: &str) -> Verdict {
    const UNREADABLE: &str = "the journal cannot be read";
    match app.journal.delivery(&st.pipeline, event_id).await {
        Ok(Some((_, true))) => {}
        Ok(_) => return Verdict::Unknown("its run has not been journaled as finished".into()),
        Err(e) => return Verdict::Unknown(format!("{UNREADABLE}: {e}")),
    }
    let open = app
        .journal
        .dead_letters(DlqFilter {
            pipeline: Some(st.pipeline.clone()),
            status: Some("open".into()),
            event_id: Some(event_id.to_string()),
            limit: 1,
        })
        .await;
    match open.map(|entries| entries.into_iter().next()) {
        Err(e) => Verdict::Unknown(format!("{UNREADABLE}: {e}")),
        Ok(None) => Verdict::Done,
        Ok(Some(dl)) if ErrorKind::is_transient(dl.error_kind.as_deref().unwrap_or("")) => {
            Verdict::Retry(Box::new(dl))
        }
        Ok(Some(dl)) => Verdict::Fatal(dl.error_kind.unwrap_or_else(|| "failed".into())),
    }
}

/// Runs the failed run of `dl` again in place, as a resumed run: the same run id (so
/// the same idempotency keys), its succeeded stages kept, from its failed stage. Its
/// end resolves the dead letter, or counts one more retry on it.
async fn retry(app: &Arc<App>, st: &Arc<TriggerState>, event_id: &str, dl: &DeadLetter) -> Verdict {
    let mut waited = false;
    let run = loop {
        match app.journal.run(&dl.run_id).await {
            // Running again already (resumed at start after a crash during a retry):
            // its end decides.
            Ok(Some(run)) if run.summary.status == "running" => {
                if app.closing.is_cancelled() {
                    return Verdict::Unknown("the server is closing".into());
                }
                waited = true;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // That run was this delivery's attempt.
            Ok(Some(_)) if waited => return outcome(app, st, event_id).await,
            Ok(Some(run)) => break run,
            Ok(None) => return Verdict::Fatal(format!("run {} is not in the journal", dl.run_id)),
            Err(e) => return Verdict::Unknown(format!("the journal cannot be read: {e}")),
        }
    };
    let Some(plan) = app.pipelines.get(&run.summary.pipeline).cloned() else {
        return Verdict::Fatal("its pipeline is no longer served".into());
    };
    let (input, reuse) = match super::recover::again(app, &plan, &run) {
        Ok(parts) => parts,
        Err(why) => {
            tracing::error!(target: "fmhost::triggers", pipeline = %st.pipeline, "{event_id}: cannot run {} again: {why}", dl.run_id);
            return Verdict::Fatal("replay".into());
        }
    };
    tracing::info!(target: "fmhost::triggers", pipeline = %st.pipeline, trigger = %st.trigger.name, run_id = %dl.run_id, "{event_id}: delivered again; running {} again from its failed stage ({} completed stage(s) kept; dead letter {})", dl.run_id, reuse.outputs.len(), dl.id);
    let _guard = st.enter();
    app.engine.outbound.metrics.record_trigger(
        TriggerCount::Fired,
        &st.pipeline,
        &st.trigger.name,
        1,
    );
    let start = run.restart(crate::journal::OWNER_SERVE);
    let _ = super::execute(app, plan, input, start, Some(reuse)).await;
    outcome(app, st, event_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_delays_grow_and_are_capped() {
        let base = Duration::from_secs(1);
        let d1 = backoff(base, 1);
        let d3 = backoff(base, 3);
        assert!(d1 >= Duration::from_millis(800) && d1 <= Duration::from_millis(1200));
        assert!(d3 >= Duration::from_millis(3200) && d3 <= Duration::from_millis(4800));
        assert!(backoff(base, 40) <= MAX_BACKOFF.mul_f64(1.2));
        assert_eq!(default_durable("crm sync", "nats"), "fmhost-crm_sync-nats");
    }
}
