//! Accepting and serving the daemon's HTTP connections, plain or TLS, so that
//! whoever can reach the port cannot take the file descriptors the probes need
//! (issue 14.2: 1,136 half-sent requests made every probe fail with "Too many
//! open files"). Knows no routes: it serves the router `server` hands it.
//!
//! Three limits, each in one place:
//! - a cap on open connections ([`Limits::max_connections`]), at most half the
//!   soft limit on open files at start, so the other half stays for probes,
//!   the ledger and logs whatever clients do;
//! - at the cap a new connection is still accepted, and the oldest connection
//!   with no request in progress (idle, still sending its head, or still in its
//!   TLS handshake) is closed for it. Refusing the newcomer, or leaving it in
//!   the backlog, would let a flood of half-sent requests lock the scrape out
//!   until their timeout; evicting a silent one admits a scrape at once. Only
//!   when every slot has a request in progress is the newcomer closed;
//! - a read-header timeout: the TLS handshake and then the request head must
//!   each arrive within it. hyper starts that timer whenever a connection waits
//!   for a head, after each response too, so it is also the keep-alive idle
//!   timeout.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;

use crate::metrics::{HttpMetrics, Rejection};

/// Default of `--web.max-connections` (Prometheus's own default).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default of `--web.read-header-timeout`.
pub const DEFAULT_READ_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How the listener protects itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, TLS handshakes included.
    pub max_connections: usize,
    /// For the TLS handshake, then for each request head (and between requests).
    pub read_header_timeout: Duration,
}

impl Limits {
    /// `requested` connections, but at most half of `fd_soft_limit` (the
    /// other half is the probes'); at least 1.
    pub fn new(requested: usize, fd_soft_limit: Option<u64>, read_header_timeout: Duration) -> Limits {
        let share = fd_soft_limit.map_or(usize::MAX, |soft| usize::try_from(soft / 2).unwrap_or(usize::MAX));
        Limits {
            max_connections: requested.min(share).max(1),
            read_header_timeout,
        }
    }
}

/// The soft limit on open files (`RLIMIT_NOFILE`), if it is finite.
pub fn fd_soft_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into memory we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Where a TLS connection's server config comes from: asked at each
/// handshake, so certificates rotated by a reload apply to new connections.
pub type TlsSource = Arc<dyn Fn() -> Option<Arc<ServerConfig>> + Send + Sync>;

/// Serves `app` on `listener` until `stop` completes, then stops accepting,
/// closes connections without a request in progress and lets the others
/// finish their response (the caller bounds how long it waits).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsSource>,
    limits: Limits,
    metrics: HttpMetrics,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    metrics.set_max(limits.max_connections);
    let (stopping, stopped) = watch::channel(false);
    let slots = Slots::new(limits.max_connections, metrics.clone());
    let serving = Serving {
        app,
        tls,
        timeout: limits.read_header_timeout,
        stopping: stopped,
        metrics,
    };
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        slots.admit(|activity, release| {
            let serving = serving.clone();
            tokio::spawn(async move {
                let _release = release;
                serving.connection(tcp, activity).await;
            })
            .abort_handle()
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    slots.close_quiet();
    let mut open = slots.count.subscribe();
    let _ = open.wait_for(|n| *n == 0).await;
    Ok(())
}

/// What one connection's task needs.
#[derive(Clone)]
struct Serving {
    app: Router,
    tls: Option<TlsSource>,
    timeout: Duration,
    stopping: watch::Receiver<bool>,
    metrics: HttpMetrics,
}

impl Serving {
    async fn connection(self, tcp: tokio::net::TcpStream, activity: Arc<Activity>) {
        let Some(tls) = &self.tls else {
            return self.http(tcp, activity).await;
        };
        // TLS was on at start and a reload cannot turn it off; be safe anyway.
        let Some(config) = tls() else { return };
        match tokio::time::timeout(self.timeout, TlsAcceptor::from(config).accept(tcp)).await {
            Ok(Ok(stream)) => self.http(stream, activity).await,
            Ok(Err(e)) => {
                tracing::debug!(error = %crate::probe::sanitize(&e.to_string()), "TLS handshake with a client failed")
            }
            Err(_) => {
                self.metrics.rejected(Rejection::HeaderTimeout);
                tracing::debug!("TLS handshake with a client timed out");
            }
        }
    }

    async fn http<I>(mut self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // HTTP/1 only (as before), and without auto's version sniffing: it
        // reads the first bytes before hyper's header timer starts, with no
        // deadline of its own.
        let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.timeout)
            .keep_alive(true);
        let service = Tracked {
            inner: TowerToHyperService::new(self.app.clone()),
            activity: activity.clone(),
        };
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = stopping(&mut self.stopping) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        let Err(e) = result else { return };
        let timed_out = e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
        // A keep-alive connection that served requests and then idled out is
        // the timeout doing its everyday job, not a rejection.
        if timed_out && activity.served.load(Ordering::Relaxed) == 0 {
            self.metrics.rejected(Rejection::HeaderTimeout);
        }
        tracing::debug!(error = %crate::probe::sanitize(&e.to_string()), timed_out, "HTTP connection ended with an error");
    }
}

/// Completes once the listener stops (or is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Requests of one connection: in progress from the moment hyper has its
/// head until the response body is sent, and served so far.
#[derive(Default)]
struct Activity {
    in_progress: AtomicUsize,
    served: AtomicU64,
}

/// Ends one request's "in progress" when dropped.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
        self.0.served.fetch_add(1, Ordering::Relaxed);
    }
}

/// The router as a hyper service that marks its connection busy while a
/// request is in progress, so eviction never cuts an answer short.
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.in_progress.fetch_add(1, Ordering::AcqRel);
        let busy = InProgress(self.activity.clone());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // hyper drops the body once it has sent it: that ends the request.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &busy;
                    frame
                }))
            }))
        })
    }
}

/// The open connections, oldest first by id.
struct Slots {
    max: usize,
    open: Mutex<HashMap<u64, Slot>>,
    next: AtomicU64,
    /// How many are open, for the gauge and for shutdown to wait on.
    count: watch::Sender<usize>,
    metrics: HttpMetrics,
}

struct Slot {
    activity: Arc<Activity>,
    task: AbortHandle,
}

/// Frees a connection's slot when its task ends or is aborted.
struct Release {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("slots lock");
        open.remove(&self.id);
        self.slots.publish(open.len());
    }
}

impl Slots {
    fn new(max: usize, metrics: HttpMetrics) -> Arc<Slots> {
        metrics.set_open(0);
        Arc::new(Slots {
            max,
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            count: watch::channel(0).0,
            metrics,
        })
    }

    fn publish(&self, open: usize) {
        self.metrics.set_open(open);
        self.count.send_replace(open);
    }

    /// Makes room for a new connection (or refuses it: `spawn` is then not
    /// called and the connection is dropped) and registers the task `spawn`
    /// starts for it.
    fn admit(self: &Arc<Self>, spawn: impl FnOnce(Arc<Activity>, Release) -> AbortHandle) {
        let mut open = self.open.lock().expect("slots lock");
        let mut evicted = None;
        if open.len() >= self.max {
            let quiet = open
                .iter()
                .filter(|(_, slot)| slot.activity.in_progress.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)
                .min();
            let Some(id) = quiet else {
                drop(open);
                self.metrics.rejected(Rejection::Limit);
                return;
            };
            evicted = open.remove(&id).map(|slot| slot.task);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::default());
        // Spawned under the lock, so the task's Release cannot run before its slot exists.
        let task = spawn(
            activity.clone(),
            Release {
                slots: self.clone(),
                id,
            },
        );
        open.insert(id, Slot { activity, task });
        self.publish(open.len());
        drop(open);
        if let Some(task) = evicted {
            task.abort();
            self.metrics.rejected(Rejection::Evicted);
        }
    }

    /// At shutdown: closes every connection without a request in progress.
    fn close_quiet(&self) {
        let quiet: Vec<AbortHandle> = {
            let open = self.open.lock().expect("slots lock");
            open.values()
                .filter(|slot| slot.activity.in_progress.load(Ordering::Acquire) == 0)
                .map(|slot| slot.task.clone())
                .collect()
        };
        for task in quiet {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_half_the_soft_fd_limit_for_everything_else() {
        let t = DEFAULT_READ_HEADER_TIMEOUT;
        assert_eq!(Limits::new(512, Some(1024), t).max_connections, 512);
        assert_eq!(Limits::new(512, Some(600), t).max_connections, 300);
        assert_eq!(Limits::new(512, Some(65536), t).max_connections, 512);
        assert_eq!(Limits::new(512, None, t).max_connections, 512);
        assert_eq!(Limits::new(512, Some(1), t).max_connections, 1);
    }
}
