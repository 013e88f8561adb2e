//! A scriptable fake vendor API on 127.0.0.1: each path plays back a list of replies
//! (status, headers, body, delay) and the server records what it saw, so tests assert
//! on server-side facts (attempts, gaps, headers, concurrency), never on client clocks.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
    /// Send the headers, then stall the body this long.
    pub stall_body: Option<Duration>,
    /// Answer with the request itself: `{method, path, query, headers, body}` as JSON.
    pub echo: bool,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            delay: Duration::ZERO,
            stall_body: None,
            echo: false,
        }
    }
    /// 200 with the request echoed back (an upstream that reflects what it was sent).
    pub fn echo() -> Reply {
        Reply {
            echo: true,
            ..Reply::json(200, Value::Null)
        }
    }
    pub fn status(status: u16) -> Reply {
        Reply::json(
            status,
            serde_json::json!({"error": format!("status {status}")}),
        )
    }
    pub fn raw(status: u16, content_type: &str, body: &str) -> Reply {
        Reply {
            headers: vec![("content-type".into(), content_type.into())],
            body: body.as_bytes().to_vec(),
            ..Reply::status(status)
        }
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn stall_body(mut self, d: Duration) -> Reply {
        self.stall_body = Some(d);
        self
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Duration,
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Route {
    script: VecDeque<Reply>,
    /// Played once the script is used up.
    then: Option<Reply>,
}

struct Inner {
    start: Instant,
    routes: Mutex<HashMap<String, Route>>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Fake {
    /// Starts a server on an ephemeral loopback port, on the current tokio runtime.
    pub async fn start() -> Fake {
        let inner = Arc::new(Inner {
            start: Instant::now(),
            routes: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("fake server") });
        Fake { addr, inner }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Now, on the clock requests are seen by ([`Seen::at`]).
    pub fn now(&self) -> Duration {
        self.inner.start.elapsed()
    }

    /// Replies to `path` with `script` in order, then with the last reply forever.
    pub fn route(&self, path: &str, script: Vec<Reply>) -> &Self {
        let then = script.last().cloned();
        self.inner.routes.lock().unwrap().insert(
            path.to_string(),
            Route {
                script: script.into(),
                then,
            },
        );
        self
    }

    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.inner
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    /// Every request, whatever its path.
    pub fn all_seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// Gaps between consecutive requests to `path`, by server clock.
    pub fn gaps(&self, path: &str) -> Vec<Duration> {
        let seen = self.seen(path);
        seen.windows(2).map(|w| w[1].at - w[0].at).collect()
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let at = inner.start.elapsed();
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let echoed = serde_json::json!({
        "method": parts.method.as_str(),
        "path": &path,
        "query": parts.uri.query().unwrap_or(""),
        "headers": parts.headers.iter()
            .map(|(k, v)| (k.to_string(), Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned())))
            .collect::<serde_json::Map<_, _>>(),
        "body": String::from_utf8_lossy(&body),
    });
    inner.seen.lock().unwrap().push(Seen {
        at,
        method: parts.method.clone(),
        path: path.clone(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers.clone(),
        body,
    });
    let reply = {
        let mut routes = inner.routes.lock().unwrap();
        match routes.get_mut(&path) {
            Some(route) => route.script.pop_front().or_else(|| route.then.clone()),
            None => None,
        }
    };
    let mut reply = reply.unwrap_or_else(|| {
        Reply::json(
            404,
            serde_json::json!({"error": format!("no route {path}")}),
        )
    });
    if reply.echo {
        reply.body = echoed.to_string().into_bytes();
    }
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(reply.delay).await;
    inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut builder = Response::builder().status(StatusCode::from_u16(reply.status).unwrap());
    for (k, v) in &reply.headers {
        builder = builder.header(k, v);
    }
    let body = match reply.stall_body {
        None => Body::from(reply.body),
        Some(stall) => {
            let first = reply.body[..reply.body.len() / 2].to_vec();
            let rest = reply.body[reply.body.len() / 2..].to_vec();
            let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(first))])
                .chain(futures::stream::once(async move {
                    tokio::time::sleep(stall).await;
                    Ok(Bytes::from(rest))
                }));
            Body::from_stream(stream)
        }
    };
    builder.body(body).unwrap()
}

use futures::StreamExt;
