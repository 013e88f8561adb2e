//! Fresh instances. Every invocation runs in an instance no code has run in before;
//! what changes is when that instance is made. A plugin that has been invoked keeps a
//! few *spares*, instantiated ahead of time on the plugin threads, so a stage only binds
//! its call to one and calls it. A spare has never run guest code (Rust and C
//! components run constructors on their first export call, not at instantiation) and
//! holds no run's data: the run's ids, secrets handle, HTTP grant and deadline are set
//! by [`PluginState::bind`] just before the call, and the instance is dropped after it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

use super::bindings::{self, fmhost::plugin::types::PluginError};
use super::state::{Call, PluginState};
use super::{PluginRuntime, executor};

/// Spares kept per plugin once it has been invoked, unless `FMHOST_PLUGIN_SPARES` says
/// otherwise (0 turns them off: every invocation instantiates on its own path).
pub const DEFAULT_SPARES: usize = 2;

/// An instantiated, never-called instance and the pool place it occupies. Fields drop
/// in order: the instance goes back to the pool before the place is offered again.
pub(crate) struct Fresh {
    pub store: wasmtime::Store<PluginState>,
    bindings: bindings::Connector,
    _slot: OwnedSemaphorePermit,
}

/// What a call left behind, read from the instance before it is dropped: what the
/// host imports recorded (refusals, retries, the last upstream error, stderr, a refused
/// memory growth) and the guest's answer.
pub(crate) struct Outcome {
    pub result: wasmtime::Result<Result<String, PluginError>>,
    pub retries: u32,
    /// Why the host refused a call (a sandbox rule, a spent budget): the stage fails.
    pub refusal: Option<(crate::error::ErrorKind, String)>,
    pub last_call_error: Option<crate::error::ErrorKind>,
    pub memory_limit: usize,
    pub memory_exceeded: Option<usize>,
    /// The plugin's stderr, secrets masked.
    pub stderr: String,
}

impl Outcome {
    fn of(state: &PluginState, result: wasmtime::Result<Result<String, PluginError>>) -> Outcome {
        Outcome {
            retries: state.retries.load(Ordering::Relaxed),
            refusal: state.refusal.clone(),
            last_call_error: state.last_call_error,
            memory_limit: state.limits.memory,
            memory_exceeded: state.limits.exceeded,
            // Read only for a trap, the one place it is shown.
            stderr: if result.is_err() {
                state
                    .secrets
                    .redact(state.stderr.text().trim())
                    .into_owned()
            } else {
                String::new()
            },
            result,
        }
    }
}

/// A plugin version's spare instances, and its record of finishing fast.
pub(crate) struct Spares {
    queue: Mutex<Vec<Fresh>>,
    /// Called instances waiting to be dropped, off the stage's path.
    retired: Mutex<Vec<Fresh>>,
    /// A plugin thread is dropping the retired and making spares: another call's
    /// leftovers join its queue instead of waking a second thread.
    tending: AtomicBool,
    want: usize,
    /// Calls in a row that finished within [`FAST`] on the plugin threads.
    streak: AtomicU32,
    /// Times an inline call overran its first poll; each doubles the streak it takes
    /// to be called inline again, and past [`MAX_DEMOTIONS`] it never is.
    demotions: AtomicU32,
    /// Inline calls allowed at all (`FMHOST_PLUGIN_INLINE=0` turns them off).
    inline: bool,
}

/// A call this quick on the plugin threads counts towards being called inline.
const FAST: std::time::Duration = std::time::Duration::from_micros(500);
/// Fast calls in a row before a transform is first called inline.
const TRUST_AFTER: u32 = 16;
/// Overruns after which a plugin version is never called inline again.
const MAX_DEMOTIONS: u32 = 6;

impl Spares {
    pub fn new() -> Arc<Spares> {
        let want = std::env::var("FMHOST_PLUGIN_SPARES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_SPARES)
            .min(64);
        Arc::new(Spares {
            queue: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            tending: AtomicBool::new(false),
            want,
            streak: AtomicU32::new(0),
            demotions: AtomicU32::new(0),
            inline: std::env::var("FMHOST_PLUGIN_INLINE").map_or(true, |v| v != "0"),
        })
    }

    /// Whether this version has earned an inline call: a transform (no HTTP, so its
    /// only pause is an epoch yield) with a long enough run of fast calls.
    fn trusted(&self) -> bool {
        let demotions = self.demotions.load(Ordering::Relaxed);
        self.inline
            && demotions < MAX_DEMOTIONS
            && self.streak.load(Ordering::Relaxed) >= TRUST_AFTER << demotions
    }

    fn timed(&self, took: std::time::Duration) {
        if took <= FAST {
            self.streak.fetch_add(1, Ordering::Relaxed);
        } else {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    fn demote(&self) {
        self.streak.store(0, Ordering::Relaxed);
        self.demotions.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> Option<Fresh> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Hands a called instance over for teardown, and has the spares topped up, on a
    /// plugin thread: one already at it takes this one too, so back-to-back calls wake
    /// a thread once rather than once each.
    fn retire(self: &Arc<Self>, fresh: Fresh, maker: &Maker) {
        if self.claim(fresh) {
            let (spares, maker) = (self.clone(), maker.clone());
            executor().spawn(async move { spares.tend(&maker).await });
        }
    }

    /// Queues `fresh` for teardown; true when the caller is to [`tend`](Self::tend)
    /// (no plugin thread is at it already).
    fn claim(&self, fresh: Fresh) -> bool {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fresh);
        !self.tending.swap(true, Ordering::AcqRel)
    }

    /// Drops what is retired and makes spares until neither is wanted. A spare takes a
    /// pool place only if one is free: spares never make a stage wait.
    async fn tend(&self, maker: &Maker) {
        loop {
            loop {
                let done =
                    std::mem::take(&mut *self.retired.lock().unwrap_or_else(|e| e.into_inner()));
                if done.is_empty() {
                    break;
                }
                drop(done);
            }
            while self.want > self.len() && self.retired_is_empty() {
                let Ok(slot) = maker.runtime.slots.clone().try_acquire_owned() else {
                    break;
                };
                match maker.make(slot).await {
                    Ok(f) => self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(f),
                    Err(e) => {
                        tracing::debug!(target: "fmhost::plugin", plugin = &*maker.plugin, "a spare instance could not be made: {}", super::chain(&e));
                        break;
                    }
                }
            }
            self.tending.store(false, Ordering::Release);
            // A call that retired an instance after the last look, and saw this
            // thread still tending, left it here: take it, unless another thread has.
            if self.retired_is_empty() || self.tending.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }

    fn retired_is_empty(&self) -> bool {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// Everything it takes to instantiate a plugin version, without holding the [`Plugin`]
/// (a swapped-out version is dropped while its spares are still being made).
///
/// [`Plugin`]: super::Plugin
#[derive(Clone)]
pub(crate) struct Maker {
    pub plugin: Arc<str>,
    /// A transform: it cannot call out, so it may earn inline calls.
    pub transform: bool,
    pub pre: bindings::ConnectorPre<PluginState>,
    pub runtime: Arc<PluginRuntime>,
}

impl Maker {
    async fn make(&self, slot: OwnedSemaphorePermit) -> wasmtime::Result<Fresh> {
        let mut store = self.runtime.store(PluginState::new(
            self.plugin.clone(),
            self.runtime.memory_limit,
        ));
        let bindings = self.pre.instantiate_async(&mut store).await?;
        Ok(Fresh {
            store,
            bindings,
            _slot: slot,
        })
    }

    /// Calls `invoke` in a fresh instance (a spare when there is one): inline for a
    /// transform that has earned it, else on the plugin threads.
    pub async fn invoke(
        &self,
        spares: &Arc<Spares>,
        call: Call,
        config: String,
        input: String,
    ) -> Result<Outcome, String> {
        let mut spare = spares.take();
        // A spare, else a free pool place to instantiate in on this thread.
        let inline = match (self.transform && spares.trusted(), spare.take()) {
            (false, s) => {
                spare = s;
                None
            }
            (true, Some(f)) => Some(Ok(f)),
            (true, None) => self.runtime.slots.clone().try_acquire_owned().ok().map(Err),
        };
        if let Some(source) = inline {
            // Called inline, on the stage's own thread: no hand-off there and back. The
            // guest (and its instantiation, when there was no spare: a component may
            // run start functions then) keeps the thread at most until its first epoch
            // yield (one tick); if it has not finished by then it goes on on the plugin
            // threads, and this version must earn its inline calls again, twice as long
            // as before.
            let maker = self.clone();
            let mut run = Box::pin(async move {
                let mut fresh = match source {
                    Ok(f) => f,
                    Err(slot) => maker
                        .make(slot)
                        .await
                        .map_err(|e| format!("cannot be instantiated: {}", super::chain(&e)))?,
                };
                fresh.store.data_mut().bind(call);
                fresh.store.set_epoch_deadline(1);
                let result = fresh
                    .bindings
                    .fmhost_plugin_plugin()
                    .call_invoke(&mut fresh.store, &config, &input)
                    .await;
                Ok((fresh, result))
            });
            let started = std::time::Instant::now();
            let first = futures::poll!(run.as_mut());
            let (maker, spares) = (self.clone(), spares.clone());
            return match first {
                std::task::Poll::Ready(Ok((fresh, result))) => {
                    let outcome = Outcome::of(fresh.store.data(), result);
                    // The instance's teardown and the next spare are the plugin
                    // threads' work, not this stage's.
                    spares.retire(fresh, &maker);
                    Ok(outcome)
                }
                std::task::Poll::Ready(Err(why)) => Err(why),
                std::task::Poll::Pending => {
                    // The tick is a global clock: a quick call can meet it a moment
                    // after it began. One that met it within `FAST` must only earn its
                    // inline calls again; one that was slow as well is demoted.
                    if started.elapsed() > FAST {
                        spares.demote();
                        tracing::info!(target: "fmhost::plugin", plugin = &*maker.plugin,
                            "{}: an inline call did not finish within one epoch tick; it runs on the plugin threads from now on", maker.plugin);
                    } else {
                        spares.streak.store(0, Ordering::Relaxed);
                    }
                    on_plugin_threads(spares, maker, run).await
                }
            };
        }
        let slot = match spare {
            Some(_) => None,
            None => Some(self.runtime.instance_slot().await),
        };
        let (maker, timed) = (self.clone(), spares.clone());
        on_plugin_threads(spares.clone(), self.clone(), async move {
            let mut fresh = match (spare, slot) {
                (Some(f), _) => f,
                (None, Some(slot)) => maker
                    .make(slot)
                    .await
                    .map_err(|e| format!("cannot be instantiated: {}", super::chain(&e)))?,
                (None, None) => unreachable!("a slot is taken when there is no spare"),
            };
            fresh.store.data_mut().bind(call);
            // Epoch deadlines count from now, not from when the spare was made.
            fresh.store.set_epoch_deadline(1);
            let started = std::time::Instant::now();
            let result = fresh
                .bindings
                .fmhost_plugin_plugin()
                .call_invoke(&mut fresh.store, &config, &input)
                .await;
            if maker.transform {
                timed.timed(started.elapsed());
            }
            Ok((fresh, result))
        })
        .await
    }
}

/// A finished call: the instance (to read what it recorded, then drop) and the guest's
/// answer.
type Called = (Fresh, wasmtime::Result<Result<String, PluginError>>);

/// Runs `call` on the plugin threads, never on the threads that serve requests. Its
/// outcome comes back as soon as the guest returns; the same plugin thread then drops
/// the instance (its memory goes back to the pool) and makes the next spare, off the
/// stage's path and without waking another thread. Dropping the returned future (a
/// stage or run deadline) aborts the call at the guest's next epoch yield.
async fn on_plugin_threads(
    spares: Arc<Spares>,
    maker: Maker,
    call: impl std::future::Future<Output = Result<Called, String>> + Send + 'static,
) -> Result<Outcome, String> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let task = executor().spawn(async move {
        match call.await {
            Ok((fresh, result)) => {
                let _ = answer.send(Ok(Outcome::of(fresh.store.data(), result)));
                // Already on a plugin thread: tend here, unless another thread is.
                if spares.claim(fresh) {
                    spares.tend(&maker).await;
                }
            }
            Err(why) => {
                let _ = answer.send(Err(why));
            }
        }
    });
    let mut guard = AbortOnDrop(Some(task.abort_handle()));
    let outcome = answered
        .await
        .map_err(|_| "its task ended before it answered".to_string())?;
    // Answered: what the task still does (dropping the instance, making a spare) must
    // not be cut short when this stage moves on.
    guard.0 = None;
    outcome
}

/// Aborts a task when dropped, unless disarmed.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}
