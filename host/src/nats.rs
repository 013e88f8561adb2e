//! Connections to NATS servers, for the `nats` trigger (`serve/nats.rs`) and the
//! `nats-publish` built-in. The host owns them: a plugin never sees a NATS connection.
//!
//! A URL setting is a literal (`nats://host:4222`, several separated by commas) or a
//! whole `{{secrets.NAME}}` holding it, so credentials in the URL stay in secrets.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::secrets::Secrets;

/// How long one attempt to reach a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `url` (secrets resolved), as client `name`. Once connected, the client
/// reconnects by itself for as long as it lives.
pub async fn connect(
    secrets: &Secrets,
    url: &str,
    token: Option<&str>,
    name: &str,
) -> Result<async_nats::Client, String> {
    let resolved = secrets.resolve(url, "the NATS URL")?;
    let addrs = resolved
        .split(',')
        .map(|u| {
            u.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("NATS URL {}: {e}", secrets.redact(u.trim())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None);
    if let Some(token) = token {
        options = options.token(secrets.resolve(token, "the NATS token")?);
    }
    options.connect(addrs).await.map_err(|e| {
        secrets
            .redact(&format!("cannot reach NATS at {url}: {e}"))
            .into_owned()
    })
}

/// A URL setting and a token setting, as written.
type Key = (String, Option<String>);

/// Most servers kept connected at once, and most failures remembered: settings rendered
/// from data cannot make the process hold a connection per value.
const MAX_CLIENTS: usize = 32;

/// Clients by URL and token setting, kept for the process's life (a stage publishing
/// once per run must not connect once per run); the least recently used goes first.
pub struct Clients {
    clients: tokio::sync::Mutex<lru::LruCache<Key, async_nats::Client>>,
    /// Failed settings and when they failed: a dead server is not dialled by every stage.
    failures: Mutex<lru::LruCache<Key, (Instant, String)>>,
}

impl Default for Clients {
    fn default() -> Self {
        let cap = NonZeroUsize::new(MAX_CLIENTS).unwrap_or(NonZeroUsize::MIN);
        Clients {
            clients: tokio::sync::Mutex::new(lru::LruCache::new(cap)),
            failures: Mutex::new(lru::LruCache::new(cap)),
        }
    }
}

impl Clients {
    pub async fn get(
        &self,
        secrets: &Secrets,
        url: &str,
        token: Option<&str>,
    ) -> Result<async_nats::Client, String> {
        let key = (url.to_string(), token.map(str::to_string));
        if let Some((at, why)) = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && at.elapsed() < Duration::from_secs(1)
        {
            return Err(why.clone());
        }
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        match connect(secrets, url, token, "fmhost-publish").await {
            Ok(c) => {
                clients.put(key, c.clone());
                Ok(c)
            }
            Err(why) => {
                self.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put(key, (Instant::now(), why.clone()));
                Err(why)
            }
        }
    }
}

/// Why `subject` cannot be published to (empty tokens, wildcards, whitespace), if it cannot.
pub fn publish_subject_problem(subject: &str) -> Option<String> {
    let bad = subject.is_empty()
        || subject.split('.').any(str::is_empty)
        || subject.contains(['*', '>'])
        || subject.chars().any(|c| c.is_whitespace() || c.is_control());
    bad.then(|| {
        format!("\"{subject}\": a published subject is dot-separated tokens, without wildcards")
    })
}
