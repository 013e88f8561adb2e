//! The response cache a service opts into with `services.NAME.cache`: safe methods only,
//! fresh answers for `ttl_seconds`, then revalidated with `If-None-Match` /
//! `If-Modified-Since` (a 304 refreshes the entry), and, with `stale_if_error_seconds`,
//! the last good answer when a call fails after its retries or the breaker is open.
//!
//! One cache per process, bounded in entries and bytes (least recently used go first);
//! the key is the service, method, URL and the request headers that change an answer
//! (`Accept`, `Accept-Language`, and a digest of any `Authorization` the stage set);
//! an answer kept is used only for requests that agree on the headers its `Vary` names
//! (one variant per key: another replaces it; `Vary: *` is not kept). The answer's
//! `Cache-Control` can only shorten the service's `ttl_seconds`: `max-age=N` caps it,
//! `no-cache` makes every use a revalidation, `no-store` keeps nothing.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{HttpRequest, HttpResponse};

/// Entries kept at most.
const MAX_ENTRIES: usize = 4096;
/// Bytes of bodies kept at most.
const MAX_BYTES: usize = 64 << 20;
/// A larger body is not cached.
const MAX_ENTRY_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePolicy {
    /// How long an answer is used without asking the service.
    pub ttl_seconds: f64,
    /// How long past that the last good answer stands in when the service fails.
    #[serde(default)]
    pub stale_if_error_seconds: f64,
}

impl CachePolicy {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(self.ttl_seconds.is_finite() && self.ttl_seconds >= 0.0) {
            out.push((
                "cache.ttl_seconds".into(),
                "must be a non-negative number".into(),
            ));
        }
        if !(self.stale_if_error_seconds.is_finite() && self.stale_if_error_seconds >= 0.0) {
            out.push((
                "cache.stale_if_error_seconds".into(),
                "must be a non-negative number".into(),
            ));
        }
        out
    }
}

/// How an answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Fresh: the service was not asked.
    Hit,
    /// The service said 304: unchanged.
    Revalidated,
    /// The service failed; the last good answer stood in.
    Stale,
}

impl Served {
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Revalidated => "revalidated",
            Served::Stale => "stale",
        }
    }
}

#[derive(Clone)]
struct Entry {
    response: HttpResponse,
    stored: Instant,
    /// The headers the answer's `Vary` names, with the request's values when it was kept.
    variant: Vec<(String, Option<String>)>,
}

/// What an entry says about a request: the answer, its age, and how long the answer
/// itself allows it to be used without asking (`max-age`, `no-cache`).
pub struct Cached {
    pub response: HttpResponse,
    pub age: Duration,
    pub max_age: Option<Duration>,
}

fn header_value(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// The header names an answer's `Vary` lists, lowercased (`*` among them if it says so).
fn vary(resp: &HttpResponse) -> Vec<String> {
    resp.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("vary"))
        .flat_map(|(_, v)| v.split(','))
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect()
}

/// How long the answer allows itself to be used without revalidation.
fn max_age(resp: &HttpResponse) -> Option<Duration> {
    let cc = resp.header("cache-control")?.to_ascii_lowercase();
    let mut limit = None;
    for d in cc.split(',').map(str::trim) {
        if d == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(n) = d.strip_prefix("max-age=")
            && let Ok(n) = n.trim_matches('"').parse::<u64>()
        {
            limit = Some(Duration::from_secs(n));
        }
    }
    limit
}

pub struct ResponseCache {
    inner: Mutex<(lru::LruCache<[u8; 32], Entry>, usize)>,
}

impl Default for ResponseCache {
    fn default() -> Self {
        ResponseCache {
            inner: Mutex::new((
                lru::LruCache::new(NonZeroUsize::new(MAX_ENTRIES).unwrap_or(NonZeroUsize::MIN)),
                0,
            )),
        }
    }
}

/// The cache key of a request to `service`.
pub fn key(service: &str, req: &HttpRequest) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [service, req.method.as_str(), req.url.as_str()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let mut varying: Vec<(String, &str)> = req
        .headers
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.to_ascii_lowercase().as_str(),
                "accept" | "accept-language" | "authorization"
            )
        })
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    varying.sort();
    for (k, v) in varying {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// Whether a response may be kept: a success, not `Cache-Control: no-store`, not
/// `Vary: *`, not huge.
fn storable(resp: &HttpResponse) -> bool {
    resp.is_success()
        && resp.body.len() <= MAX_ENTRY_BYTES
        && !resp
            .header("cache-control")
            .is_some_and(|c| c.to_ascii_lowercase().contains("no-store"))
        && !vary(resp).iter().any(|h| h == "*")
}

impl ResponseCache {
    /// The entry for `req`, if its `Vary` headers agree with the request's.
    pub fn get(&self, key: &[u8; 32], req: &HttpRequest) -> Option<Cached> {
        let mut inner = self.inner.lock().expect("cache lock");
        let e = inner.0.get(key)?;
        if e.variant
            .iter()
            .any(|(name, value)| header_value(req, name) != *value)
        {
            return None;
        }
        Some(Cached {
            response: e.response.clone(),
            age: e.stored.elapsed(),
            max_age: max_age(&e.response),
        })
    }

    pub fn put(&self, key: [u8; 32], req: &HttpRequest, response: &HttpResponse) {
        if !storable(response) {
            return;
        }
        let variant = vary(response)
            .into_iter()
            .map(|name| {
                let value = header_value(req, &name);
                (name, value)
            })
            .collect();
        let mut guard = self.inner.lock().expect("cache lock");
        let (map, bytes) = &mut *guard;
        let size = response.body.len();
        if let Some((_, old)) = map.push(
            key,
            Entry {
                response: response.clone(),
                stored: Instant::now(),
                variant,
            },
        ) {
            *bytes -= old.response.body.len();
        }
        *bytes += size;
        while *bytes > MAX_BYTES {
            match map.pop_lru() {
                Some((_, e)) => *bytes -= e.response.body.len(),
                None => break,
            }
        }
    }

    /// A 304 confirmed the entry: it is fresh again.
    pub fn touch(&self, key: &[u8; 32]) {
        if let Some(e) = self.inner.lock().expect("cache lock").0.get_mut(key) {
            e.stored = Instant::now();
        }
    }
}

/// The conditional headers that revalidate `cached`.
pub fn conditional(cached: &HttpResponse) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(etag) = cached.header("etag") {
        out.push(("if-none-match".into(), etag.to_string()));
    }
    if let Some(lm) = cached.header("last-modified") {
        out.push(("if-modified-since".into(), lm.to_string()));
    }
    out
}
