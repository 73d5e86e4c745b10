//! The daemon's HTTP surface, following Prometheus exporter conventions:
//! `/metrics`, `/-/healthy`, `/-/ready`, `/-/reload` and blackbox-style `/probe`,
//! plus the status page `/` with its data at `/api/v1/status`, and the migration
//! phase override `/api/v1/phase`. This is the only module that knows about routes.
//!
//! Protection follows Prometheus too: TLS and basic auth from `--web.config.file`
//! ([`crate::web_config`]) cover every route, and routes that change state
//! answer 403 unless `--web.enable-lifecycle` is given. GET never changes state.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::listener::{Limits, TlsSource};
use crate::metrics::{HttpMetrics, Metrics};
use crate::probe::{Config, sanitize};
use crate::scheduler::{self, Shared};
use crate::web_config::{Authenticator, WebConfig};

/// A reload request from `/-/reload`, answered with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// Metrics and last states.
    pub shared: Arc<Shared>,
    /// The config in force, for `/probe`.
    pub config: Arc<RwLock<Arc<Config>>>,
    /// Set once the config is loaded and the first round is scheduled.
    pub ready: Arc<AtomicBool>,
    /// Where `/-/reload` sends its requests.
    pub reload: mpsc::Sender<ReloadRequest>,
    /// `--web.enable-lifecycle`: whether state-changing routes are served.
    pub lifecycle: bool,
    /// The migration phase's manual override, for `/api/v1/phase` and the status page.
    pub phase: Arc<crate::migration::Control>,
}

/// The web config in force (swapped on reload) and the authenticator that
/// checks requests against it.
pub struct Web {
    config: RwLock<Arc<WebConfig>>,
    auth: Authenticator,
}

impl Web {
    /// Shares `config` between the TLS acceptor and the auth layer.
    pub fn new(config: WebConfig) -> Arc<Web> {
        Arc::new(Web {
            config: RwLock::new(Arc::new(config)),
            auth: Authenticator::default(),
        })
    }

    /// The config in force.
    pub fn current(&self) -> Arc<WebConfig> {
        self.config.read().expect("web config lock").clone()
    }

    /// Puts a reloaded config in force for new connections and requests.
    pub fn replace(&self, config: WebConfig) {
        *self.config.write().expect("web config lock") = Arc::new(config);
    }
}

const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// All routes, behind basic auth and the configured response headers.
pub fn router(state: AppState, web: Arc<Web>) -> Router {
    // Every route that changes state goes here, behind the lifecycle flag.
    let lifecycle = Router::new()
        .route("/-/reload", post(reload).put(reload))
        .route("/api/v1/phase", post(set_phase).delete(clear_phase))
        .route_layer(middleware::from_fn_with_state(state.lifecycle, require_lifecycle));
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/domains", get(domains))
        .route("/api/v1/parity", get(parity))
        .route("/probe", get(probe))
        .route("/-/healthy", get(|| async { "Healthy\n" }))
        .route("/-/ready", get(ready))
        .merge(lifecycle)
        .with_state(state)
        .layer(middleware::from_fn_with_state(web.clone(), authenticate))
        .layer(middleware::from_fn_with_state(web, add_headers))
}

async fn require_lifecycle(State(enabled): State<bool>, request: Request, next: Next) -> Response {
    // GET and HEAD change nothing; the route answers them with 405 itself.
    if enabled || request.method() == Method::GET || request.method() == Method::HEAD {
        next.run(request).await
    } else {
        (
            StatusCode::FORBIDDEN,
            "Lifecycle API is not enabled: start cutover-monitor with --web.enable-lifecycle to change state over HTTP (SIGHUP still reloads)\n",
        )
            .into_response()
    }
}

async fn authenticate(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    let config = web.current();
    if !config.requires_auth(request.uri().path())
        || web
            .auth
            .allows(&config, request.headers().get(header::AUTHORIZATION))
            .await
    {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic")],
        "Unauthorized\n",
    )
        .into_response()
}

async fn add_headers(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    let config = web.current();
    let mut response = next.run(request).await;
    for (name, value) in &config.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// The status page; it renders `/api/v1/status`.
async fn index() -> Html<&'static str> {
    Html(crate::status::PAGE)
}

/// The status page's data (phase, go/no-go, matrix, DNS, mail, certificates).
async fn status(State(state): State<AppState>) -> Response {
    let config = state.config.read().expect("config lock").clone();
    let current = publish_phase(&state, &config);
    axum::Json(crate::status::snapshot(&state.shared, &config, current)).into_response()
}

/// The last audit of each `hosted_domains` check with its rows, for support:
/// `?finding=spf_old_ip_literal` (comma-separated: any of them), `?check=NAME`.
async fn domains(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let config = state.config.read().expect("config lock").clone();
    let query = crate::status::domains(
        &state.shared,
        &config,
        q.get("finding").map(String::as_str),
        q.get("check").map(String::as_str),
    );
    audit_answer(query).await
}

/// The last audit of each `mailbox_parity` check with its rows:
/// `?finding=fewer_messages` (comma-separated: any of them), `?check=NAME`.
async fn parity(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let config = state.config.read().expect("config lock").clone();
    let query = crate::status::parity(
        &state.shared,
        &config,
        q.get("finding").map(String::as_str),
        q.get("check").map(String::as_str),
    );
    audit_answer(query).await
}

/// An audit model as HTTP: 400 for an unknown finding, 404 for an unknown
/// check, else its JSON, serialized off the runtime's workers (tens of
/// thousands of rows).
async fn audit_answer<T: serde::Serialize + Send + 'static>(query: Result<T, crate::status::DomainsError>) -> Response {
    let answer = match query {
        Ok(answer) => answer,
        Err(crate::status::DomainsError::BadFinding(e)) => {
            return (StatusCode::BAD_REQUEST, format!("{}\n", sanitize(&e))).into_response();
        }
        Err(e @ crate::status::DomainsError::UnknownCheck { .. }) => {
            return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response();
        }
    };
    match tokio::task::spawn_blocking(move || serde_json::to_vec(&answer)).await {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "could not render the audits\n").into_response(),
    }
}

/// `{"phase": "switched"}` or `phase=switched`.
#[derive(serde::Deserialize)]
struct PhaseBody {
    phase: String,
}

/// Sets the migration phase by hand; it wins over the clock until cleared.
async fn set_phase(State(state): State<AppState>, headers: axum::http::HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(refused) = cross_origin(&headers) {
        return refused;
    }
    let json = body.trim_ascii_start().starts_with(b"{");
    let parsed: Result<PhaseBody, String> = if json {
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    } else {
        // A POST: for GET, axum's Form reads the query string instead.
        let request = Request::builder()
            .method(Method::POST)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(axum::body::Body::from(body))
            .expect("static request parts");
        <axum::Form<PhaseBody> as axum::extract::FromRequest<()>>::from_request(request, &())
            .await
            .map(|f| f.0)
            .map_err(|e| e.body_text())
    };
    let phase = match parsed.and_then(|b| b.phase.parse::<crate::migration::Phase>()) {
        Ok(phase) => phase,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "expected {{\"phase\": \"preparation|window|switched|decommission\"}} or phase=NAME: {}\n",
                    sanitize(&e)
                ),
            )
                .into_response();
        }
    };
    state.phase.set(phase);
    phase_answer(&state)
}

/// Removes the manual phase: the clock rules again.
async fn clear_phase(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(refused) = cross_origin(&headers) {
        return refused;
    }
    state.phase.clear();
    phase_answer(&state)
}

fn phase_answer(state: &AppState) -> Response {
    let config = state.config.read().expect("config lock").clone();
    axum::Json(publish_phase(state, &config)).into_response()
}

/// The phase in force, written to the phase series at once (a change by hand
/// shows on `/metrics` before the daemon's next tick).
fn publish_phase(state: &AppState, config: &Config) -> crate::migration::Current {
    let current = state.phase.publish(&config.migration);
    state.shared.metrics.migration().show(&current);
    current
}

/// Refuses a state change a browser sent on behalf of another site's page
/// (a form post needs no CORS preflight): its `Origin` names another host.
fn cross_origin(headers: &axum::http::HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?.to_str().unwrap_or("?");
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    (origin_host != host).then(|| {
        (
            StatusCode::FORBIDDEN,
            "cross-origin request refused: change the phase with `cutover-monitor phase` or curl\n",
        )
            .into_response()
    })
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Rendering 10,000 instances takes ~0.3 s; on a runtime worker that
    // stalled the scheduler's timers for as long (BENCHMARKS.md, scenario 3).
    let shared = state.shared.clone();
    match tokio::task::spawn_blocking(move || shared.metrics.encode()).await {
        Ok(body) => ([(header::CONTENT_TYPE, EXPOSITION)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn ready(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "Ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "Not ready\n").into_response()
    }
}

async fn reload(State(state): State<AppState>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.reload.send(tx).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match rx.await {
        Ok(Ok(())) => (StatusCode::OK, "config reloaded\n").into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("config reload failed, keeping the previous config:\n{e}\n"),
        )
            .into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
    }
}

/// Runs one check now (all its instances, or those of `env`) and returns only
/// their metrics, like blackbox_exporter's `/probe`.
async fn probe(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(check) = q.get("check") else {
        return (StatusCode::BAD_REQUEST, "missing parameter `check`\n").into_response();
    };
    let config = state.config.read().expect("config lock").clone();
    let specs: Vec<_> = scheduler::instances(&config)
        .into_iter()
        .filter(|s| &s.inst.check == check && q.get("env").is_none_or(|e| *e == s.inst.env))
        .collect();
    if specs.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            format!("no check `{}` in that environment\n", sanitize(check)),
        )
            .into_response();
    }
    let outcomes = scheduler::run_all(&specs, &config).await;
    let metrics = Metrics::new();
    for (spec, outcome) in specs.iter().zip(&outcomes) {
        metrics.record(&spec.inst, outcome);
    }
    ([(header::CONTENT_TYPE, EXPOSITION)], metrics.encode_instances()).into_response()
}

/// Serves `app` on `listener` until `stop` completes: over TLS when the web
/// config has `tls_server_config`, plain HTTP otherwise, within `limits`
/// ([`crate::listener`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    web: Arc<Web>,
    limits: Limits,
    metrics: HttpMetrics,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Each handshake uses the web config in force when it starts, so rotated
    // certificates apply to new connections after a reload.
    let tls: Option<TlsSource> = web
        .current()
        .tls
        .is_some()
        .then(|| Arc::new(move || web.current().tls.clone()) as TlsSource);
    crate::listener::serve(listener, app, tls, limits, metrics, stop).await
}
