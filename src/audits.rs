//! The audits the daemon keeps: the last finished audit of each
//! `hosted_domains` check and its change log, and of each `mailbox_parity`
//! check ([`ParityStore`]), saved under
//! `--storage.path` so a restart serves the last audit at once. State, like
//! the mail ledger beside it: it knows the audit report, not the metrics or
//! the scheduler; the layers above count and publish what it returns.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::probe::hosted_domains::{AuditReport, Change, Direction, changes};
use crate::probe::mailbox_parity::{Finding as ParityFinding, ParityReport};

/// What the daemon keeps of a `hosted_domains` check between audits.
#[derive(Debug, Clone)]
pub struct AuditState {
    /// The last finished audit; a failed one never replaces it.
    pub report: Arc<AuditReport>,
    /// The latest changes, newest last, at most [`MAX_CHANGES_KEPT`].
    pub changes: VecDeque<Change>,
}

/// Changes kept per check for `/api/v1/domains`.
pub const MAX_CHANGES_KEPT: usize = 1000;

/// Changes logged one line each per audit; beyond, one summary line, so an
/// outage of a big DNS host cannot flood the log.
const MAX_CHANGES_LOGGED: usize = 100;

/// Every check's kept audit, and where they are saved (the daemon only).
#[derive(Default)]
pub struct AuditStore {
    audits: Mutex<HashMap<String, AuditState>>,
    dir: OnceLock<PathBuf>,
}

impl AuditStore {
    /// Keeps audits in `dir` across restarts; set once, by the daemon.
    pub fn keep_in(&self, dir: PathBuf) {
        let _ = self.dir.set(dir);
    }

    /// The kept audits by check, for the API and the status page.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, AuditState>> {
        self.audits.lock().expect("audits lock")
    }

    /// Keeps a finished audit, saves it, and logs what changed since the
    /// previous one: one line per domain that moved to or from `ok` (or
    /// between problems). Returns how many moved each way.
    pub fn keep(&self, check: &str, report: Arc<AuditReport>) -> Vec<(Direction, u64)> {
        if let Some(dir) = self.dir.get() {
            let (path, report) = (audit_file(dir, check), report.clone());
            // Tens of thousands of rows: written off the runtime's workers.
            let save = move || {
                if let Err(e) = save_audit(&path, &report) {
                    tracing::warn!(file = %path.display(), error = %e, "could not keep the hosted-domain audit on disk; a restart will audit again at once");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(save)),
                Err(_) => save(),
            }
        }
        let mut audits = self.lock();
        let Some(state) = audits.get_mut(check) else {
            let summary: Vec<String> = report
                .counts()
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(f, n)| format!("{f}={n}"))
                .collect();
            tracing::info!(
                check, domains = report.domains.len(), findings = %summary.join(" "),
                duration_seconds = report.duration_seconds,
                "hosted-domain audit finished (first since start)"
            );
            audits.insert(
                check.to_string(),
                AuditState {
                    report,
                    changes: Default::default(),
                },
            );
            return Direction::ALL.iter().map(|d| (*d, 0)).collect();
        };
        let changed = changes(&state.report, &report);
        for (i, c) in changed.iter().enumerate() {
            if i == MAX_CHANGES_LOGGED {
                tracing::warn!(
                    check,
                    more = changed.len() - i,
                    "more hosted domains changed; see /api/v1/domains"
                );
                break;
            }
            let before = c.before.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(",");
            let after = c.after.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(",");
            match c.direction {
                Direction::Regressed => {
                    tracing::warn!(check, domain = %c.domain, before, after, "hosted domain regressed")
                }
                direction => {
                    tracing::info!(check, domain = %c.domain, before, after, "hosted domain {}", direction.as_str())
                }
            }
        }
        let counts = Direction::ALL
            .iter()
            .map(|d| (*d, changed.iter().filter(|c| c.direction == *d).count() as u64))
            .collect();
        state.changes.extend(changed);
        while state.changes.len() > MAX_CHANGES_KEPT {
            state.changes.pop_front();
        }
        state.report = report;
        counts
    }

    /// Restores the audit `check` last finished before a restart, unless one
    /// is already kept; returns it so the caller can publish it.
    pub fn restore(&self, check: &str) -> Option<Arc<AuditReport>> {
        let dir = self.dir.get()?;
        let mut audits = self.lock();
        if audits.contains_key(check) {
            return None;
        }
        let path = audit_file(dir, check);
        let report = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => Err(e.to_string()),
            Ok(bytes) => serde_json::from_slice::<AuditReport>(&bytes).map_err(|e| e.to_string()),
        };
        match report {
            Ok(report) if report.check == check => {
                tracing::info!(check = %check, file = %path.display(), domains = report.domains.len(), "restored the last hosted-domain audit");
                let report = Arc::new(report);
                audits.insert(
                    check.to_string(),
                    AuditState {
                        report: report.clone(),
                        changes: Default::default(),
                    },
                );
                Some(report)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(check = %check, file = %path.display(), error = %e, "ignoring an unreadable kept audit; auditing again");
                None
            }
        }
    }
}

/// Where the last audit of `check` is kept: one JSON file per check, named
/// after it (characters other than letters, digits, `.`, `_`, `-` as `_`).
fn audit_file(dir: &Path, check: &str) -> PathBuf {
    let name: String = check
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{name}.json"))
}

/// Writes `report` atomically (temporary file, then rename), readable by the
/// daemon's user only: it lists every customer domain.
fn save_audit(path: &Path, report: &AuditReport) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    crate::write_private(path, &serde_json::to_vec(report)?)
}

/// Every `mailbox_parity` check's last finished audit, saved as JSON beside
/// the domain audits (`--storage.path`/mailbox-parity/CHECK.json), so a
/// restart serves it at once and its next audit still knows old's INBOX
/// before the switch. The same JSON store as the domain audits: one document
/// per check, replaced whole after each audit (1,000 accounts are ~150 KB;
/// rows of accounts that are `ok` carry no details).
#[derive(Default)]
pub struct ParityStore {
    audits: Mutex<HashMap<String, Arc<ParityReport>>>,
    dir: OnceLock<PathBuf>,
}

impl ParityStore {
    /// Keeps audits in `dir` across restarts; set once, by the daemon.
    pub fn keep_in(&self, dir: PathBuf) {
        let _ = self.dir.set(dir);
    }

    /// The kept audits by check, for the API and the status page.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<ParityReport>>> {
        self.audits.lock().expect("parity audits lock")
    }

    /// Keeps a finished audit, saves it, and logs how many accounts moved
    /// to or from `ok` since the previous one.
    pub fn keep(&self, check: &str, report: Arc<ParityReport>) {
        if let Some(dir) = self.dir.get() {
            let (path, report) = (audit_file(dir, check), report.clone());
            let save = move || {
                if let Err(e) = save_json(&path, &*report) {
                    tracing::warn!(file = %path.display(), error = %e, "could not keep the mailbox-parity audit on disk; a restart will audit again at once");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(save)),
                Err(_) => save(),
            }
        }
        let mut audits = self.lock();
        let ok = |r: &ParityReport| -> std::collections::HashSet<String> {
            r.accounts
                .iter()
                .filter(|a| a.findings == [ParityFinding::Ok])
                .map(|a| a.account.clone())
                .collect()
        };
        let (fixed, regressed) = match audits.get(check) {
            Some(before) => {
                let (was, now) = (ok(before), ok(&report));
                let listed: std::collections::HashSet<&str> =
                    before.accounts.iter().map(|a| a.account.as_str()).collect();
                (
                    now.iter()
                        .filter(|a| !was.contains(*a) && listed.contains(a.as_str()))
                        .count(),
                    was.iter().filter(|a| !now.contains(*a)).count(),
                )
            }
            None => (0, 0),
        };
        tracing::info!(check, summary = %report.summary(), fixed, regressed, "mailbox-parity audit finished");
        audits.insert(check.to_string(), report);
    }

    /// Restores the audit `check` last finished before a restart, unless one
    /// is already kept; returns it so the caller can publish it.
    pub fn restore(&self, check: &str) -> Option<Arc<ParityReport>> {
        let dir = self.dir.get()?;
        let mut audits = self.lock();
        if let Some(kept) = audits.get(check) {
            return Some(kept.clone());
        }
        let path = audit_file(dir, check);
        let report = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => Err(e.to_string()),
            Ok(bytes) => serde_json::from_slice::<ParityReport>(&bytes).map_err(|e| e.to_string()),
        };
        match report {
            Ok(report) if report.check == check => {
                tracing::info!(check = %check, file = %path.display(), accounts = report.accounts.len(), "restored the last mailbox-parity audit");
                let report = Arc::new(report);
                audits.insert(check.to_string(), report.clone());
                Some(report)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(check = %check, file = %path.display(), error = %e, "ignoring an unreadable kept mailbox-parity audit; auditing again");
                None
            }
        }
    }
}

fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    crate::write_private(path, &serde_json::to_vec(value)?)
}
