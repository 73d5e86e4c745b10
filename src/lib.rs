//! cutover-monitor watches a mail service's old and new environments side by
//! side while it moves, plus a `live` view that follows DNS, and exports what it
//! sees as Prometheus metrics.
//!
//! Layout: [`config`] (schema, validation, secrets), [`scheduler`] (when probes
//! run), [`probe`] (what one probe does, one file per protocol), [`resolve`]
//! (asking DNS servers directly), [`lookup`] (rate-limited, cached lookups for domain audits), [`metrics`] (every metric name), [`ledger`] (mail accounting that survives restarts), [`audits`] (the kept customer-domain audits), [`server`]
//! (the HTTP surface), [`listener`] (its connections: limits and timeouts), [`web_config`] (its TLS and basic auth), [`daemon`] (wiring for `run`), [`report`] (the `check`
//! command's output), [`shutdown`] (signals), [`migration`] (phases and go/no-go),
//! [`status`] (the status page and `/api/v1/status`), [`client`] (the `phase` command's API calls).

pub mod audits;
pub mod client;
pub mod config;
pub mod daemon;
pub mod ledger;
pub mod listener;
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

/// RFC 3339 in UTC, to the second, for people: logs, `check`, the status page.
pub fn timestamp(unix: f64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(unix.max(0.0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Writes `bytes` to `path` readable by the daemon's user only (0600), through
/// a temporary file renamed into place, so a crash never leaves half a file:
/// the ledger's key and identity, the kept customer-domain audits.
pub(crate) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    // `mode` applies only when the file is created; an old one keeps its own.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)
}
