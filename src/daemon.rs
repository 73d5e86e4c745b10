//! `cutover-monitor run`: load the config, schedule the instances, serve HTTP,
//! and apply reloads (SIGHUP or `/-/reload`) until SIGTERM/SIGINT.
//!
//! A reload re-reads the check file and the web config file together and
//! applies both or neither: on migration night a typo in either must not blind
//! the monitoring or drop its protection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config;
use crate::listener::{self, Limits};
use crate::metrics::Metrics;
use crate::metrics::MigrationMetrics;
use crate::migration::Control;
use crate::probe::{self, Config};
use crate::scheduler::{Scheduler, Shared};
use crate::server::{self, AppState, Web};
use crate::shutdown::{Request, Signals};
use crate::web_config::{self, WebConfig};

/// How long in-flight HTTP requests get after a stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);

/// What `run` is told on the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--config.file`.
    pub config_file: PathBuf,
    /// `--web.listen-address`.
    pub listen: SocketAddr,
    /// `--web.config.file`: TLS and basic auth; plain open HTTP without it.
    pub web_config_file: Option<PathBuf>,
    /// `--web.enable-lifecycle`: serve state-changing routes such as `/-/reload`.
    pub enable_lifecycle: bool,
    /// `--storage.path`: where the mail ledger lives.
    pub storage_path: PathBuf,
    /// `--web.max-connections`: the cap asked for (lowered to half the soft
    /// limit on open files, see [`crate::listener::Limits`]).
    pub max_connections: usize,
    /// `--web.read-header-timeout`.
    pub read_header_timeout: Duration,
}

/// How often the daemon re-reads the clock for phase boundaries.
const PUBLISH_PHASE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps the phase series current as the clock passes phase boundaries and
/// reloads change the phases; runs until aborted.
async fn publish_phase(control: Arc<Control>, config: Arc<RwLock<Arc<Config>>>, metrics: MigrationMetrics) {
    loop {
        let current = config.read().expect("config lock").clone();
        metrics.show(&control.publish(&current.migration));
        tokio::time::sleep(PUBLISH_PHASE_EVERY).await;
    }
}

/// Runs the daemon until a stop signal.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let Options {
        config_file: config_path,
        listen,
        web_config_file,
        enable_lifecycle,
        storage_path,
        max_connections,
        read_header_timeout,
    } = options;
    let mut signals = Signals::install().context("installing signal handlers")?;
    let config = Arc::new(probe::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?);
    let web = Web::new(load_web(web_config_file.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?);
    let shared = Shared::new(Metrics::new().with_process_metrics());
    shared.metrics.config_loaded(true);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--web.listen-address {listen}: cannot listen"))?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<server::ReloadRequest>(4);
    let current = Arc::new(RwLock::new(config.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let tls = web.current().tls.is_some();
    // The phase override is kept in memory only: it survives reloads, not restarts.
    let phase = shared.phase.clone();
    let phase_metrics = tokio::spawn(publish_phase(
        phase.clone(),
        current.clone(),
        shared.metrics.migration(),
    ));
    let app = server::router(
        AppState {
            shared: shared.clone(),
            config: current.clone(),
            ready: ready.clone(),
            reload: reload_tx,
            lifecycle: enable_lifecycle,
            phase: phase.clone(),
        },
        web.clone(),
    );
    let fd_limit = listener::fd_soft_limit();
    let limits = Limits::new(max_connections, fd_limit, read_header_timeout);
    if limits.max_connections < max_connections {
        tracing::warn!(
            requested = max_connections,
            max_connections = limits.max_connections,
            fd_soft_limit = fd_limit,
            "--web.max-connections lowered to half the soft limit on open files, the rest is kept for the probes; raise the limit (LimitNOFILE= in the systemd unit) to allow more"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        listener,
        app,
        web.clone(),
        limits,
        shared.metrics.http(),
        async {
            let _ = stop_rx.await;
        },
    ));

    let mut scheduler = Scheduler::new(shared.clone()).with_storage(storage_path);
    scheduler.prepare(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    scheduler.apply(config.clone());
    ready.store(true, Ordering::Release);
    tracing::info!(
        config = %config_path.display(), listen = %listen, checks = config.checks.len(),
        tls, lifecycle = enable_lifecycle, max_connections = limits.max_connections, fd_soft_limit = fd_limit,
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
        let result = reload(
            &config_path,
            web_config_file.as_deref(),
            &shared,
            &mut scheduler,
            &current,
            &web,
        );
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    tracing::info!("stopping");
    phase_metrics.abort();
    scheduler.stop();
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
    Ok(())
}

/// The web config from `--web.config.file`, or open plain HTTP without one.
pub fn load_web(path: Option<&Path>) -> Result<WebConfig, config::ConfigErrors> {
    match path {
        Some(path) => web_config::load(path),
        None => Ok(WebConfig::default()),
    }
}

fn reload(
    path: &Path,
    web_path: Option<&Path>,
    shared: &Shared,
    scheduler: &mut Scheduler,
    current: &RwLock<Arc<Config>>,
    web: &Web,
) -> Result<(), String> {
    let checks = probe::load(path);
    let web_config = load_web(web_path).and_then(|w| {
        if w.tls.is_some() == web.current().tls.is_some() {
            Ok(w)
        } else {
            Err(config::ConfigErrors(vec![config::ConfigError {
                file: web_path.map(Path::to_owned).unwrap_or_default(),
                line: 0,
                col: 0,
                field: "tls_server_config".into(),
                message: "switching TLS on or off takes a restart".into(),
            }]))
        }
    });
    match (checks, web_config) {
        (Ok(config), Ok(web_config)) => {
            let config = Arc::new(config);
            if let Err(e) = scheduler.prepare(&config) {
                shared.metrics.config_loaded(false);
                tracing::error!(error = %e, "config reload failed; keeping the previous config");
                return Err(e);
            }
            scheduler.apply(config.clone());
            *current.write().expect("config lock") = config.clone();
            web.replace(web_config);
            shared.metrics.config_loaded(true);
            tracing::info!(config = %path.display(), checks = config.checks.len(), "config reloaded");
            Ok(())
        }
        (checks, web_config) => {
            shared.metrics.config_loaded(false);
            let errors: Vec<config::ConfigError> = [checks.err(), web_config.err()]
                .into_iter()
                .flatten()
                .flat_map(|e| e.0)
                .collect();
            for e in &errors {
                tracing::error!(error = %e, "config reload failed; keeping the previous config");
            }
            Err(config::ConfigErrors(errors).to_string())
        }
    }
}
