//! The server's connections: how many it holds, how long a client may take to send its
//! headers, and who goes when the limit is reached, so clients that trickle header lines
//! cannot take every connection (or every file descriptor) and `/healthz` keeps answering.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

/// Connection limits (`--max-connections`, `--header-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most connections held at once; also kept below the file-descriptor limit.
    pub max: usize,
    /// How long a client may take to send a request's headers (also an idle
    /// keep-alive connection's wait for its next request).
    pub header_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max: 4096,
            header_timeout: Duration::from_secs(10),
        }
    }
}

struct Live {
    id: u64,
    started: Instant,
    /// Whether a complete request has arrived on it.
    served: Arc<AtomicBool>,
    kill: Arc<Notify>,
}

/// Raises the soft file-descriptor limit to the hard one (as Go's runtime does) and
/// returns how many connections fit under it, leaving room for the journal, plugins'
/// compile cache and outbound calls.
pub fn fit_under_fd_limit(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                if lim.rlim_cur < lim.rlim_max {
                    let raised = libc::rlimit {
                        rlim_cur: lim.rlim_max,
                        rlim_max: lim.rlim_max,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                        lim.rlim_cur = lim.rlim_max;
                    }
                }
                let room = (lim.rlim_cur as usize).saturating_sub(128).max(16);
                return wanted.min(room);
            }
        }
    }
    wanted
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the connections
/// finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let max = fit_under_fd_limit(limits.max);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let live: Arc<Mutex<Vec<Live>>> = Arc::default();
    let next_id = AtomicU64::new(0);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a reset in the backlog: wait, do not spin.
                    tracing::warn!(target: "fmhost::serve", "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let served = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(Notify::new());
        {
            let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
            if live.len() >= max {
                // The oldest connection that never sent a whole request makes room.
                let victim = live
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.served.load(Ordering::Relaxed))
                    .min_by_key(|(_, c)| c.started)
                    .map(|(i, _)| i);
                match victim {
                    Some(i) => {
                        let victim = live.swap_remove(i);
                        tracing::warn!(target: "fmhost::serve", "{max} connections open: closing one that has sent no request for {} ms", victim.started.elapsed().as_millis());
                        victim.kill.notify_one();
                    }
                    None => {
                        tracing::warn!(target: "fmhost::serve", "{max} connections open, all busy: refusing a new one");
                        continue;
                    }
                }
            }
            live.push(Live {
                id,
                started: Instant::now(),
                served: served.clone(),
                kill: kill.clone(),
            });
        }
        let router = router.clone();
        let flag = served.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                flag.store(true, Ordering::Relaxed);
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let live = live.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
            }
            live.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|c| c.id != id);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
