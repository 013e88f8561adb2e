//! Per-service policies: a token-bucket rate limit (`governor`), a bulkhead (a semaphore)
//! and a circuit breaker. A service is a stage's `service` or the URL's `host:port`;
//! its state lives as long as the process, shared by every run in it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::Semaphore;

/// A service's policies, as declared in a pipeline's top-level `services`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// Where the service is (`https://api.stripe.com`, or `{{secrets.STRIPE_URL}}`): a
    /// stage naming the service may give a path relative to it, and calls to its origin
    /// from any stage or plugin belong to this service (its policies and its auth).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Credentials the host attaches to every call to `base_url`'s origin.
    #[serde(default)]
    pub auth: Option<super::auth::AuthSpec>,
    /// Answers kept and reused, revalidated, and stood in when the service fails.
    #[serde(default)]
    pub cache: Option<super::cache::CachePolicy>,
    /// Record every exchange with this service in the journal (`fmhost record`).
    #[serde(default)]
    pub record: bool,
    /// A token bucket; callers wait for a token rather than fail.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// At most this many calls in flight at once (a bulkhead); others wait.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub circuit_breaker: Option<BreakerPolicy>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate; fractions such as 0.5 are allowed.
    pub requests_per_second: f64,
    /// Calls allowed at once after a quiet period.
    #[serde(default = "one")]
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Consecutive failures (timeouts, broken connections, 5xx) that open the circuit.
    #[serde(default = "five")]
    pub failure_threshold: u32,
    /// How long the circuit stays open before probes are let through.
    #[serde(default = "thirty")]
    pub open_seconds: f64,
    /// Probes allowed at once while half-open.
    #[serde(default = "one")]
    pub half_open_max_calls: u32,
}

fn one() -> u32 {
    1
}
fn five() -> u32 {
    5
}
fn thirty() -> f64 {
    30.0
}

impl ServicePolicy {
    /// Problems with the numbers, as `(field, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        if let Some(b) = &self.base_url {
            match crate::secrets::secret_refs(b) {
                Err(e) => out.push(("base_url".into(), e)),
                Ok(refs) if refs.is_empty() => match reqwest::Url::parse(b) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                    _ => out.push((
                        "base_url".into(),
                        format!("{b:?} is not an absolute http(s) URL"),
                    )),
                },
                Ok(_) => {}
            }
        }
        if let Some(a) = &self.auth {
            if self.base_url.is_none() {
                out.push((
                    "auth".into(),
                    "auth needs base_url: credentials are bound to that origin and sent nowhere else".into(),
                ));
            }
            out.extend(a.problems());
        }
        if let Some(c) = &self.cache {
            out.extend(c.problems());
        }
        if let Some(r) = &self.rate_limit {
            if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
                out.push((
                    "rate_limit.requests_per_second".into(),
                    "must be a positive number".into(),
                ));
            }
            if r.burst == 0 {
                out.push(("rate_limit.burst".into(), "must be at least 1".into()));
            }
        }
        if self.max_concurrency == Some(0) {
            out.push(("max_concurrency".into(), "must be at least 1".into()));
        }
        if let Some(b) = &self.circuit_breaker {
            if b.failure_threshold == 0 {
                out.push((
                    "circuit_breaker.failure_threshold".into(),
                    "must be at least 1".into(),
                ));
            }
            if !(b.open_seconds.is_finite() && b.open_seconds >= 0.0) {
                out.push((
                    "circuit_breaker.open_seconds".into(),
                    "must be a non-negative number".into(),
                ));
            }
            if b.half_open_max_calls == 0 {
                out.push((
                    "circuit_breaker.half_open_max_calls".into(),
                    "must be at least 1".into(),
                ));
            }
        }
        out
    }
}

/// The live state of one service.
pub struct Service {
    pub name: String,
    policy: ServicePolicy,
    /// The pipeline whose declaration this is.
    owner: Option<String>,
    pub auth: Option<super::auth::Credentials>,
    /// What the service last said is left of its rate limit.
    pub headroom: super::headroom::Pacer,
    limiter: Option<DefaultDirectRateLimiter>,
    bulkhead: Option<Arc<Semaphore>>,
    pub breaker: Option<Breaker>,
}

impl Service {
    fn new(name: &str, policy: ServicePolicy) -> Service {
        let limiter = policy.rate_limit.as_ref().and_then(|r| {
            let period = Duration::from_secs_f64(1.0 / r.requests_per_second);
            Quota::with_period(period).map(|q| {
                RateLimiter::direct(
                    q.allow_burst(NonZeroU32::new(r.burst).unwrap_or(NonZeroU32::MIN)),
                )
            })
        });
        let bulkhead = policy
            .max_concurrency
            .map(|n| Arc::new(Semaphore::new(n as usize)));
        let breaker = policy.circuit_breaker.clone().map(Breaker::new);
        Service {
            name: name.to_string(),
            owner: None,
            auth: policy.auth.clone().map(super::auth::Credentials::new),
            headroom: Default::default(),
            policy,
            limiter,
            bulkhead,
            breaker,
        }
    }

    pub fn records(&self) -> bool {
        self.policy.record
    }

    pub fn cache(&self) -> Option<&super::cache::CachePolicy> {
        self.policy.cache.as_ref()
    }

    /// `base_url`, its secrets expanded, when the service has one.
    pub fn base_url(&self, secrets: &crate::secrets::Secrets) -> Option<Result<String, String>> {
        self.policy.base_url.as_deref().map(|b| secrets.expand(b))
    }

    /// Waits for a rate-limit token, and longer when the service reports little headroom.
    /// With a `shared` quota (a cluster), the token comes from it, so all workers together
    /// keep the one limit; if it cannot answer, this process's own limit holds the call.
    pub async fn throttle(&self, shared: Option<&dyn SharedQuota>) {
        let hold = self.headroom.delay();
        if !hold.is_zero() {
            tracing::debug!(target: "fmhost::http", service = %self.name, hold_ms = hold.as_millis() as u64, "service {}: little rate-limit headroom left; holding a call {} ms", self.name, hold.as_millis());
            tokio::time::sleep(hold).await;
        }
        if let (Some(shared), Some(r)) = (shared, &self.policy.rate_limit) {
            let period = Duration::from_secs_f64(1.0 / r.requests_per_second);
            match shared.acquire(&self.name, period, r.burst).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(target: "fmhost::http", service = %self.name, "service {}: the shared rate limit cannot answer ({e}); this worker's own limit holds the call", self.name)
                }
            }
        }
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
    }

    /// Waits for a place in the bulkhead; the permit is held for one attempt.
    pub async fn enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match &self.bulkhead {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        }
    }
}

/// A rate limit kept outside this process: every worker of a cluster takes its calls'
/// places from the same one.
pub trait SharedQuota: Send + Sync {
    /// Waits for one call's place in `service`'s limit of one call per `period`, `burst`
    /// at once.
    fn acquire<'a>(
        &'a self,
        service: &'a str,
        period: Duration,
        burst: u32,
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

/// Services by name, created on first use.
#[derive(Default)]
pub struct Services {
    map: RwLock<HashMap<String, Arc<Service>>>,
    /// Conflicting declarations already reported, so each is logged once.
    reported: Mutex<std::collections::HashSet<(String, String)>>,
}

impl Services {
    pub fn get(&self, name: &str) -> Arc<Service> {
        if let Some(s) = self.map.read().expect("services lock").get(name) {
            return s.clone();
        }
        let mut map = self.map.write().expect("services lock");
        map.entry(name.to_string())
            .or_insert_with(|| Arc::new(Service::new(name, ServicePolicy::default())))
            .clone()
    }

    /// Applies a declared policy. A service has one live state and one owner: the
    /// first declaration (or the first use, which declares nothing). A later, different
    /// declaration changes nothing (open circuits stay open, calls in flight keep their
    /// bulkhead) and is reported, once; `by` names who declared it.
    pub fn configure(&self, name: &str, policy: &ServicePolicy, by: &str) -> Result<(), String> {
        let mut map = self.map.write().expect("services lock");
        match map.get(name) {
            Some(s) if &s.policy == policy => Ok(()),
            // Created by a call before anyone declared it: the declaration takes over.
            Some(s) if s.policy == ServicePolicy::default() && s.owner.is_none() => {
                let mut fresh = Service::new(name, policy.clone());
                fresh.owner = Some(by.to_string());
                map.insert(name.to_string(), Arc::new(fresh));
                Ok(())
            }
            Some(s) => {
                let why = format!(
                    "service {name} is declared differently by {by} than by {}; the first declaration stays in force",
                    s.owner.as_deref().unwrap_or("its first use")
                );
                let first = self
                    .reported
                    .lock()
                    .expect("services lock")
                    .insert((name.to_string(), by.to_string()));
                if first {
                    tracing::warn!(target: "fmhost::http", service = name, "{why}");
                }
                Err(why)
            }
            None => {
                let mut fresh = Service::new(name, policy.clone());
                fresh.owner = Some(by.to_string());
                map.insert(name.to_string(), Arc::new(fresh));
                Ok(())
            }
        }
    }

    /// The declared service whose `base_url` has this URL's origin, if any.
    pub fn by_origin(
        &self,
        url: &reqwest::Url,
        secrets: &crate::secrets::Secrets,
    ) -> Option<Arc<Service>> {
        let map = self.map.read().expect("services lock");
        map.values()
            .find(|s| {
                s.base_url(secrets)
                    .and_then(Result::ok)
                    .and_then(|b| reqwest::Url::parse(&b).ok())
                    .is_some_and(|b| b.origin() == url.origin())
            })
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Service>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .expect("services lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

pub use crate::metrics::BreakerState;

enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32 },
}

/// A circuit breaker: opens after N consecutive failures, fails fast while open, lets
/// a few probes through after `open_seconds`, and closes when a probe succeeds.
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

/// Permission for one call; report its outcome with [`Breaker::record`].
#[must_use]
pub struct Ticket {
    probe: bool,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.inner.lock().expect("breaker lock") {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// A ticket to call, or how long the circuit stays open.
    pub fn acquire(&self) -> Result<Ticket, Duration> {
        let mut inner = self.inner.lock().expect("breaker lock");
        let now = Instant::now();
        match &mut *inner {
            Inner::Closed { .. } => Ok(Ticket { probe: false }),
            Inner::Open { until } if now < *until => Err(*until - now),
            Inner::Open { .. } => {
                *inner = Inner::HalfOpen { in_flight: 1 };
                Ok(Ticket { probe: true })
            }
            Inner::HalfOpen { in_flight } if *in_flight < self.policy.half_open_max_calls => {
                *in_flight += 1;
                Ok(Ticket { probe: true })
            }
            Inner::HalfOpen { .. } => Err(Duration::ZERO),
        }
    }

    /// Records a call's outcome; returns the new state when it changed.
    pub fn record(&self, ticket: Ticket, failed: bool) -> Option<BreakerState> {
        let mut inner = self.inner.lock().expect("breaker lock");
        let open = || Inner::Open {
            until: Instant::now() + Duration::from_secs_f64(self.policy.open_seconds),
        };
        match (&mut *inner, ticket.probe, failed) {
            (Inner::Closed { failures }, false, true) => {
                *failures += 1;
                if *failures >= self.policy.failure_threshold {
                    *inner = open();
                    return Some(BreakerState::Open);
                }
                None
            }
            (Inner::Closed { failures }, false, false) => {
                *failures = 0;
                None
            }
            (Inner::HalfOpen { .. }, true, false) => {
                *inner = Inner::Closed { failures: 0 };
                Some(BreakerState::Closed)
            }
            (Inner::HalfOpen { .. }, true, true) => {
                *inner = open();
                Some(BreakerState::Open)
            }
            // A call that began before the state changed no longer decides anything.
            _ => None,
        }
    }

    /// How long the circuit stays open once it opens.
    pub fn open_for(&self) -> Duration {
        Duration::from_secs_f64(self.policy.open_seconds)
    }

    /// Opens the circuit for `remaining`, as another worker of a cluster found it must
    /// be; true if it was not open already. Probes follow as after any opening.
    pub fn open_elsewhere(&self, remaining: Duration) -> bool {
        let mut inner = self.inner.lock().expect("breaker lock");
        let until = Instant::now() + remaining;
        match &*inner {
            Inner::Open { until: now } if *now >= until => false,
            Inner::Open { .. } => {
                *inner = Inner::Open { until };
                false
            }
            _ => {
                *inner = Inner::Open { until };
                true
            }
        }
    }

    /// Gives back a probe that never completed (its caller was cancelled).
    pub fn abandon(&self, ticket: Ticket) {
        if ticket.probe
            && let Inner::HalfOpen { in_flight } = &mut *self.inner.lock().expect("breaker lock")
        {
            *in_flight = in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_fails_fast_and_recovers_through_half_open() {
        let b = Breaker::new(BreakerPolicy {
            failure_threshold: 2,
            open_seconds: 0.05,
            half_open_max_calls: 1,
        });
        let t = b.acquire().unwrap();
        assert_eq!(b.record(t, true), None);
        let t = b.acquire().unwrap();
        assert_eq!(b.record(t, true), Some(BreakerState::Open));
        assert!(b.acquire().is_err(), "fails fast while open");
        std::thread::sleep(Duration::from_millis(60));
        let probe = b.acquire().unwrap();
        assert!(b.acquire().is_err(), "one probe at a time");
        assert_eq!(
            b.record(probe, true),
            Some(BreakerState::Open),
            "a failed probe reopens"
        );
        std::thread::sleep(Duration::from_millis(60));
        let probe = b.acquire().unwrap();
        assert_eq!(b.record(probe, false), Some(BreakerState::Closed));
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
