//! cutover-monitor watches a mail service's old and new environments side by
//! side while it moves, plus a `live` view that follows DNS, and exports what it
//! sees as Prometheus metrics.
//!
//! Layout: [`config`] (schema, validation, secrets), [`scheduler`] (when probes
//! run), [`probe`] (what one probe does, one file per protocol), [`resolve`]
//! (asking DNS servers directly), [`lookup`] (rate-limited, cached lookups for domain audits), [`metrics`] (every metric name), [`ledger`] (mail accounting that survives restarts), [`server`]
//! (the HTTP surface), [`web_config`] (its TLS and basic auth), [`daemon`] (wiring for `run`), [`report`] (the `check`
//! command's output), [`shutdown`] (signals), [`migration`] (phases and go/no-go),
//! [`status`] (the status page and `/api/v1/status`), [`client`] (the `phase` command's API calls).

pub mod client;
pub mod config;
pub mod daemon;
pub mod ledger;
pub mod lookup;
pub mod metrics;
pub mod migration;
pub mod probe;
pub mod report;
pub mod resolve;
pub mod scheduler;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod web_config;

/// Seconds since the Unix epoch, as Prometheus timestamps want them.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
