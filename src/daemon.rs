//! `cutover-monitor run`: load the config, schedule the instances, serve HTTP,
//! and apply reloads (SIGHUP or `/-/reload`) until SIGTERM/SIGINT.
//!
//! A reload that fails keeps the previous config running: on migration night a
//! typo in the check file must not blind the monitoring.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, Shared};
use crate::server::{self, AppState};
use crate::shutdown::{Request, Signals};

/// How long in-flight HTTP requests get after a stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);

/// Runs the daemon until a stop signal.
pub async fn run(config_path: PathBuf, listen: SocketAddr) -> anyhow::Result<()> {
    let mut signals = Signals::install().context("installing signal handlers")?;
    let config = Arc::new(config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?);
    let shared = Shared::new(Metrics::new().with_process_metrics());
    shared.metrics.config_loaded(true);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--web.listen-address {listen}: cannot listen"))?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<server::ReloadRequest>(4);
    let current = Arc::new(RwLock::new(config.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let app = server::router(AppState {
        shared: shared.clone(),
        config: current.clone(),
        ready: ready.clone(),
        reload: reload_tx,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    let mut scheduler = Scheduler::new(shared.clone());
    scheduler.apply(config.clone());
    ready.store(true, Ordering::Release);
    tracing::info!(
        config = %config_path.display(), listen = %listen, checks = config.checks.len(),
        "cutover-monitor started"
    );

    loop {
        let reply = tokio::select! {
            request = signals.next() => match request {
                Request::Shutdown => break,
                Request::Reload => None,
            },
            Some(reply) = reload_rx.recv() => Some(reply),
        };
        let result = reload(&config_path, &shared, &mut scheduler, &current);
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    tracing::info!("stopping");
    scheduler.stop();
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
    Ok(())
}

fn reload(
    path: &Path,
    shared: &Shared,
    scheduler: &mut Scheduler,
    current: &RwLock<Arc<Config>>,
) -> Result<(), String> {
    match config::load(path) {
        Ok(config) => {
            let config = Arc::new(config);
            scheduler.apply(config.clone());
            *current.write().expect("config lock") = config.clone();
            shared.metrics.config_loaded(true);
            tracing::info!(config = %path.display(), checks = config.checks.len(), "config reloaded");
            Ok(())
        }
        Err(errors) => {
            shared.metrics.config_loaded(false);
            for e in &errors.0 {
                tracing::error!(error = %e, "config reload failed; keeping the previous config");
            }
            Err(errors.to_string())
        }
    }
}
