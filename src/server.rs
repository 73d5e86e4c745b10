//! The daemon's HTTP surface, following Prometheus exporter conventions:
//! `/metrics`, `/-/healthy`, `/-/ready`, `/-/reload` and blackbox-style `/probe`.
//! This is the only module that knows about routes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::scheduler::{self, Shared};

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
}

const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// All routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/probe", get(probe))
        .route("/-/healthy", get(|| async { "Healthy\n" }))
        .route("/-/ready", get(ready))
        .route("/-/reload", post(reload).put(reload))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(concat!(
        "<!doctype html><title>cutover-monitor</title><h1>cutover-monitor ",
        env!("CARGO_PKG_VERSION"),
        "</h1><ul><li><a href=\"metrics\">metrics</a></li><li><a href=\"-/ready\">ready</a></li></ul>"
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, EXPOSITION)], state.shared.metrics.encode()).into_response()
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
            format!("no check `{check}` in that environment\n"),
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
