//! `kind: mailbox_parity` — did every mailbox arrive on new whole? For every
//! account of a file, an admin (a Dovecot master user: `account*admin`, or
//! SASL PLAIN with the account as authorization identity) opens the account
//! on old and on new, pinned to each environment's address, lists its folders
//! (`LIST "" "*" RETURN (SPECIAL-USE)`) and asks `STATUS (MESSAGES UIDNEXT
//! UIDVALIDITY UNSEEN)` of each; never SELECT. Where message counts differ
//! it EXAMINEs (read-only) the folder on both sides to add up RFC822.SIZE:
//! imap-proto cannot parse `STATUS SIZE` (RFC 8438) or LIST-STATUS, so the
//! sizes of equal folders stay unknown.
//!
//! Folder names are compared normalised: hierarchy separator as `/`, a
//! personal namespace prefix (`INBOX.` on Courier-style servers) removed,
//! `INBOX` in any case; special folders are matched by their SPECIAL-USE
//! attribute, so `Sent` on old matches `Sent Items` on new.
//!
//! Every account gets each [`Finding`] that applies, with the numbers; the
//! check publishes counts (`cutover_mailbox_parity_accounts`), the rows go to
//! `/api/v1/parity` and the `parity` command. An admin credential that a
//! server rejects fails the audit once, before any account is counted; a
//! server that stops answering mid-audit fails it too, and the last audit
//! stays in force.
//!
//! Sessions: an admin login opens one account, so each account costs one
//! session per side (two at most, run side by side); `concurrency` accounts
//! are audited at once, so no server sees more than `concurrency` sessions
//! from the audit, and logins start at most `rate_limit` a second per server.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_imap::imap_proto::NameAttribute;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::hosted_domains::{InputSummary, Progress};
use super::imap::{ImapProbe, ImapSession, OnBehalf, Step};
use super::{Failure, FailureReason, FieldError, Measurement, Probe, Run};
use crate::config::{
    AdminLogin, Check, Credentials, EnvKind, ImapAuth, ImapExpect, ImapSpec, MailboxParitySpec, Phase,
};

/// What a session may read: a FETCH of RFC822.SIZE for a big folder is
/// about 40 bytes a message.
const SESSION_BYTES: u64 = 32 << 20;

/// Accounts tried before a rejected admin login is taken as a wrong
/// credential rather than missing accounts.
const PREFLIGHT_ACCOUNTS: usize = 3;

/// What an audit found about an account. A closed set: each value is a label
/// value of `cutover_mailbox_parity_accounts` and a filter of `/api/v1/parity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    /// Every folder of old is on new with at least its messages.
    Ok,
    /// A folder of old (by name or special use) does not exist on new. Critical.
    FolderMissing,
    /// A folder holds fewer messages on new than on old. Critical.
    FewerMessages,
    /// Same UIDVALIDITY but a lower UIDNEXT on new: clients that cached UIDs
    /// will show the wrong messages. Critical.
    UidRegressed,
    /// UIDVALIDITY differs: every client downloads the folder again. Warning.
    UidvalidityChanged,
    /// Total size differs though new holds at least as many messages.
    SizeDiffers,
    /// A different number of unseen messages: read state was lost. Warning.
    UnseenDiffers,
    /// The admin could not open the account on one side (see the row's side).
    LoginFailed,
    /// Old's INBOX UIDNEXT rose after the switch: mail still lands on old.
    OldStillReceiving,
}

impl Finding {
    /// Every finding, in report order.
    pub const ALL: [Finding; 9] = [
        Self::Ok,
        Self::FolderMissing,
        Self::FewerMessages,
        Self::UidRegressed,
        Self::UidvalidityChanged,
        Self::SizeDiffers,
        Self::UnseenDiffers,
        Self::LoginFailed,
        Self::OldStillReceiving,
    ];

    /// The findings that must be zero before users get access to new.
    pub const CRITICAL: [Finding; 3] = [Self::FolderMissing, Self::FewerMessages, Self::UidRegressed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::FolderMissing => "folder_missing",
            Self::FewerMessages => "fewer_messages",
            Self::UidRegressed => "uid_regressed",
            Self::UidvalidityChanged => "uidvalidity_changed",
            Self::SizeDiffers => "size_differs",
            Self::UnseenDiffers => "unseen_differs",
            Self::LoginFailed => "login_failed",
            Self::OldStillReceiving => "old_still_receiving",
        }
    }

    /// The finding named `text`, for filters given by users.
    pub fn parse(text: &str) -> Result<Finding, String> {
        Finding::ALL.into_iter().find(|f| f.as_str() == text).ok_or_else(|| {
            let names: Vec<&str> = Finding::ALL.iter().map(|f| f.as_str()).collect();
            format!("unknown finding `{text}`; one of {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The environment being left.
    Old,
    /// The environment being moved to.
    New,
}

impl Side {
    /// `old` or `new`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Old => "old",
            Side::New => "new",
        }
    }
}

/// One account's result. `ok` rows carry no details, so a report of 100,000
/// mostly fine accounts stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountRow {
    /// The account, lower case.
    pub account: String,
    /// Every finding that applies, in [`Finding::ALL`] order; `[ok]` when none.
    pub findings: Vec<Finding>,
    /// One line per problem, with the folder and the numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// The sides whose login failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub login_failed: Vec<Side>,
    /// Messages on old that new lacks (missing folders and fewer messages).
    #[serde(default)]
    pub messages_missing: u64,
    /// Old's INBOX UIDNEXT in this audit, when old answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_inbox_uidnext: Option<u32>,
    /// Old's INBOX UIDNEXT when the switch was first seen: what
    /// `old_still_receiving` compares with; none before the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_uidnext: Option<u32>,
}

impl AccountRow {
    /// Whether the row has `finding`.
    pub fn has(&self, finding: Finding) -> bool {
        self.findings.contains(&finding)
    }
}

/// One finished audit; the daemon keeps the last one under `--storage.path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParityReport {
    /// The check's name.
    pub check: String,
    /// When the audit started, Unix seconds.
    pub started_at: f64,
    /// How long it took, seconds.
    pub duration_seconds: f64,
    /// The migration phase it judged `old_still_receiving` in.
    pub phase: Option<Phase>,
    /// One row per listed account, in file order.
    pub accounts: Vec<AccountRow>,
    /// What was skipped from the file.
    pub input: InputSummary,
    /// Accounts whose session failed because a server did not answer
    /// (refused, timeout, network) after retries: such an audit is not kept.
    #[serde(default)]
    pub unreachable: BTreeMap<String, usize>,
}

impl ParityReport {
    /// Accounts per finding, every finding present (0 when none).
    pub fn counts(&self) -> BTreeMap<Finding, usize> {
        let mut counts: BTreeMap<Finding, usize> = Finding::ALL.iter().map(|f| (*f, 0)).collect();
        for row in &self.accounts {
            for f in &row.findings {
                *counts.entry(*f).or_default() += 1;
            }
        }
        counts
    }

    /// Messages missing on new over every account.
    pub fn messages_missing(&self) -> u64 {
        self.accounts.iter().map(|r| r.messages_missing).sum()
    }

    /// One line for people: `1000 accounts in 12.3 s: ok=650 folder_missing=50 …`.
    pub fn summary(&self) -> String {
        let counts: Vec<String> = self
            .counts()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(f, n)| format!("{f}={n}"))
            .collect();
        format!(
            "{}: {} accounts in {:.1} s: {}; {} messages missing on new; {} lines skipped ({} invalid, {} duplicates)",
            self.check,
            self.accounts.len(),
            self.duration_seconds,
            counts.join(" "),
            self.messages_missing(),
            self.input.invalid + self.input.duplicates,
            self.input.invalid,
            self.input.duplicates,
        )
    }
}

/// One folder as a side shows it.
#[derive(Debug, Clone, PartialEq)]
struct Folder {
    /// The name the server uses (for STATUS/EXAMINE).
    name: String,
    /// Normalised name: `/` as separator, no namespace prefix.
    shown: String,
    /// `\Sent`, `\Trash`, … when the server marks it.
    special_use: Option<&'static str>,
    messages: u32,
    uidnext: Option<u32>,
    uidvalidity: Option<u32>,
    unseen: Option<u32>,
    /// Total RFC822.SIZE, when fetched.
    size: Option<u64>,
}

/// A built `mailbox_parity` check.
pub struct MailboxParityProbe {
    name: String,
    accounts: Arc<Vec<String>>,
    input: InputSummary,
    /// Per side: the IMAP client (admin credential) and the pinned address.
    old: (ImapProbe, IpAddr),
    new: (ImapProbe, IpAddr),
    admin_login: AdminLogin,
    separator: String,
    concurrency: usize,
    rate_limit: f64,
    attempts: usize,
    session_timeout: Duration,
    fetch_sizes: bool,
    /// Whether the skipped lines of the file were logged (once per load).
    warned: std::sync::atomic::AtomicBool,
    /// The last finished audit: the base of `old_still_receiving`.
    last: Mutex<Option<Arc<ParityReport>>>,
}

impl MailboxParityProbe {
    /// Validates the spec, resolves both admin credentials and reads the accounts file.
    pub fn new(spec: &MailboxParitySpec, check: &Check, credentials: &Credentials) -> Result<Self, FieldError> {
        if !(spec.rate_limit.is_finite() && spec.rate_limit > 0.0) {
            return Err(FieldError::new(
                "rate_limit",
                "expected logins per second above 0, e.g. `20`",
            ));
        }
        if spec.concurrency == 0 {
            return Err(FieldError::new("concurrency", "must be at least 1"));
        }
        if spec.admin_login == AdminLogin::MasterUser
            && (spec.master_separator.is_empty() || spec.master_separator.contains(['\r', '\n', ' ']))
        {
            return Err(FieldError::new(
                "master_separator",
                "expected Dovecot's auth_master_user_separator, e.g. `*`",
            ));
        }
        let pinned = |field: &str, name: &str| -> Result<IpAddr, FieldError> {
            match check.envs.iter().find(|e| e.name == name).map(|e| &e.kind) {
                Some(EnvKind::Pinned(addrs)) if !addrs.is_empty() => Ok(addrs[0]),
                Some(_) => Err(FieldError::new(
                    field,
                    format!("`{name}` follows DNS; the audit compares pinned addresses (`addresses`)"),
                )),
                None => Err(FieldError::new(field, format!("unknown environment `{name}`"))),
            }
        };
        let old_ip = pinned("old_env", &spec.old_env)?;
        let new_ip = pinned("new_env", &spec.new_env)?;
        let client = |field: &str, credential: &str| -> Result<ImapProbe, FieldError> {
            let imap = ImapSpec {
                host: spec.host.clone(),
                port: spec.port,
                tls: spec.tls,
                credentials: credential.to_string(),
                auth: match spec.admin_login {
                    AdminLogin::MasterUser => ImapAuth::Login,
                    AdminLogin::Authzid => ImapAuth::Plain,
                },
                mailbox: "INBOX".into(),
                expect: ImapExpect::default(),
            };
            ImapProbe::new(&imap, check, credentials)
                .map(|p| p.with_session_bytes(SESSION_BYTES))
                .map_err(|e| FieldError::new(if e.field == "credentials" { field } else { &e.field }, e.message))
        };
        let old = client("credentials", &spec.credentials)?;
        let new = client(
            "new_credentials",
            spec.new_credentials.as_deref().unwrap_or(&spec.credentials),
        )?;
        let (accounts, input) = super::hosted_domains::read_list(&spec.accounts_path, "account", account_name)
            .map_err(|e| FieldError::new("accounts_file", e))?;
        Ok(MailboxParityProbe {
            name: check.name.clone(),
            accounts: Arc::new(accounts),
            input,
            old: (old, old_ip),
            new: (new, new_ip),
            admin_login: spec.admin_login,
            separator: spec.master_separator.clone(),
            concurrency: spec.concurrency,
            rate_limit: spec.rate_limit,
            attempts: spec.retries as usize + 1,
            session_timeout: spec.session_timeout.map_or(Duration::from_secs(30), |d| d.0),
            fetch_sizes: spec.fetch_sizes,
            warned: Default::default(),
            last: Mutex::new(None),
        })
    }

    /// The accounts read from the file, in order.
    pub fn accounts(&self) -> &[String] {
        &self.accounts
    }

    /// What was skipped from the accounts file.
    pub fn input(&self) -> &InputSummary {
        &self.input
    }

    /// Takes `report` as the last audit (one kept across a restart or reload):
    /// the base `old_still_receiving` compares with.
    pub fn remember(&self, report: Arc<ParityReport>) {
        *self.last.lock().expect("last audit lock") = Some(report);
    }

    fn side(&self, side: Side) -> &(ImapProbe, IpAddr) {
        match side {
            Side::Old => &self.old,
            Side::New => &self.new,
        }
    }

    fn on_behalf<'a>(&'a self, account: &'a str) -> OnBehalf<'a> {
        match self.admin_login {
            AdminLogin::MasterUser => OnBehalf::Separator {
                account,
                separator: &self.separator,
            },
            AdminLogin::Authzid => OnBehalf::Authzid { account },
        }
    }

    /// Audits every account. `phase` is the migration phase in force (for
    /// `old_still_receiving`); `progress` counts finished accounts. Fails
    /// without rows when a server rejects the admin credential itself.
    pub async fn audit(&self, progress: &Progress, phase: Option<Phase>) -> Result<ParityReport, Failure> {
        let started_at = crate::unix_now();
        let start = Instant::now();
        progress.total.store(self.accounts.len(), Ordering::Relaxed);
        let limits = [RateLimit::new(self.rate_limit), RateLimit::new(self.rate_limit)];
        for side in [Side::Old, Side::New] {
            self.preflight(side, &limits).await?;
        }
        let previous: HashMap<String, AccountRow> = self
            .last
            .lock()
            .expect("last audit lock")
            .as_ref()
            .map(|r| r.accounts.iter().map(|a| (a.account.clone(), a.clone())).collect())
            .unwrap_or_default();
        let unreachable = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let mut rows: Vec<Option<AccountRow>> = vec![None; self.accounts.len()];
        let mut done = futures::stream::iter(0..self.accounts.len())
            .map(|i| {
                let (limits, previous, unreachable) = (&limits, &previous, &unreachable);
                async move {
                    let account = &self.accounts[i];
                    let row = self
                        .audit_account(account, limits, phase, previous.get(account), unreachable)
                        .await;
                    (i, row)
                }
            })
            .buffer_unordered(self.concurrency);
        while let Some((i, row)) = done.next().await {
            rows[i] = Some(row);
            progress.done.fetch_add(1, Ordering::Relaxed);
        }
        drop(done);
        let mut down = BTreeMap::new();
        for (side, n) in [Side::Old, Side::New].into_iter().zip(&unreachable) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                down.insert(side.as_str().to_string(), n);
            }
        }
        Ok(ParityReport {
            check: self.name.clone(),
            started_at,
            duration_seconds: start.elapsed().as_secs_f64(),
            phase,
            accounts: rows.into_iter().map(|r| r.expect("every account audited")).collect(),
            input: self.input.clone(),
            unreachable: down,
        })
    }

    /// Logs in as the first accounts until one works: when every one is
    /// rejected, the admin credential is what is wrong, one error instead of
    /// an audit of N `login_failed`.
    async fn preflight(&self, side: Side, limits: &[RateLimit; 2]) -> Result<(), Failure> {
        let (imap, ip) = self.side(side);
        let tried: Vec<&String> = self.accounts.iter().take(PREFLIGHT_ACCOUNTS).collect();
        let mut last = None;
        for account in &tried {
            limits[side as usize].wait().await;
            let mut run = Run::default();
            let attempt = tokio::time::timeout(
                self.session_timeout,
                imap.open_as(*ip, &mut run, Some(self.on_behalf(account))),
            )
            .await;
            match attempt {
                Ok(Ok(mut session)) => {
                    let _ = session.logout().await;
                    return Ok(());
                }
                Ok(Err(f)) if f.reason == FailureReason::AuthFailed => last = Some(f),
                Ok(Err(f)) => {
                    return Err(Failure::new(
                        f.reason,
                        format!("{} ({ip}): {}; keeping the last audit", side.as_str(), f.detail),
                    ));
                }
                Err(_) => {
                    return Err(Failure::new(
                        FailureReason::Timeout,
                        format!(
                            "{} ({ip}): no login within {}; keeping the last audit",
                            side.as_str(),
                            humantime::format_duration(self.session_timeout)
                        ),
                    ));
                }
            }
        }
        let detail = last.map(|f| f.detail).unwrap_or_default();
        Err(Failure::new(
            FailureReason::AuthFailed,
            format!(
                "{} ({ip}) rejects the admin login for each of the first {} accounts ({}): check the admin credential (and that it is a master user there); {detail}",
                side.as_str(),
                tried.len(),
                tried.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "),
            ),
        ))
    }

    async fn audit_account(
        &self,
        account: &str,
        limits: &[RateLimit; 2],
        phase: Option<Phase>,
        previous: Option<&AccountRow>,
        unreachable: &[AtomicUsize; 2],
    ) -> AccountRow {
        let (old, new) = tokio::join!(
            self.open_side(Side::Old, account, limits),
            self.open_side(Side::New, account, limits),
        );
        let mut row = Row::default();
        let mut sessions = Vec::new();
        let mut folders: [Option<Vec<Folder>>; 2] = [None, None];
        for (side, result) in [(Side::Old, old), (Side::New, new)] {
            match result {
                Ok((session, list)) => {
                    sessions.push((side, session));
                    folders[side as usize] = Some(list);
                }
                Err(f) => {
                    if f.reason != FailureReason::AuthFailed {
                        unreachable[side as usize].fetch_add(1, Ordering::Relaxed);
                    }
                    row.login_failed.push(side);
                    row.add(Finding::LoginFailed, format!("{}: {}", side.as_str(), f.detail));
                }
            }
        }
        let old_inbox_uidnext = folders[0]
            .as_ref()
            .and_then(|l| l.iter().find(|f| f.shown == "INBOX"))
            .and_then(|f| f.uidnext);
        if let [Some(old), Some(new)] = &mut folders {
            let pairs = pair(old, new);
            if self.fetch_sizes {
                let differ: Vec<(String, String)> = pairs
                    .iter()
                    .filter_map(|(o, n)| n.map(|n| (&old[*o], &new[n])))
                    .filter(|(o, n)| o.messages != n.messages)
                    .map(|(o, n)| (o.name.clone(), n.name.clone()))
                    .collect();
                if !differ.is_empty() {
                    self.fetch_sizes(&mut sessions, &differ, old, new).await;
                }
            }
            compare(old, new, &pairs, &mut row);
        }
        for (_, mut session) in sessions {
            let _ = tokio::time::timeout(Duration::from_secs(5), session.logout()).await;
        }
        // Mail still landing on old after the switch: its INBOX UIDNEXT rose
        // since the last audit before the switch (or the first after it).
        let mut switch_uidnext = None;
        if matches!(phase, Some(Phase::Switched | Phase::Decommission)) {
            if let Some(now) = old_inbox_uidnext {
                let base = previous
                    .and_then(|p| p.switch_uidnext.or(p.old_inbox_uidnext))
                    .unwrap_or(now);
                switch_uidnext = Some(base);
                if now > base {
                    row.add(
                        Finding::OldStillReceiving,
                        format!(
                            "old INBOX: UIDNEXT {now}, {base} at the switch: {} message(s) delivered to old since",
                            now - base
                        ),
                    );
                }
            }
        }
        row.finish(account, old_inbox_uidnext, switch_uidnext)
    }

    /// One side's session for `account`, logged in, with its folders and
    /// their STATUS. Network failures are retried; a rejected login is not.
    async fn open_side(
        &self,
        side: Side,
        account: &str,
        limits: &[RateLimit; 2],
    ) -> Result<(ImapSession, Vec<Folder>), Failure> {
        let (imap, ip) = self.side(side);
        let mut last = None;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await;
            }
            limits[side as usize].wait().await;
            let once = async {
                let mut run = Run::default();
                let mut session = imap.open_as(*ip, &mut run, Some(self.on_behalf(account))).await?;
                let folders = list_folders(imap, &mut session).await?;
                Ok::<_, Failure>((session, folders))
            };
            match tokio::time::timeout(self.session_timeout, once).await {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(f)) if matches!(f.reason, FailureReason::AuthFailed | FailureReason::MailboxMissing) => {
                    return Err(f);
                }
                Ok(Err(f)) => last = Some(f),
                Err(_) => {
                    last = Some(Failure::new(
                        FailureReason::Timeout,
                        format!("no answer within {}", humantime::format_duration(self.session_timeout)),
                    ))
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Adds up RFC822.SIZE of the folders whose counts differ, on both
    /// sides (EXAMINE: read-only). A failure leaves the size unknown.
    async fn fetch_sizes(
        &self,
        sessions: &mut [(Side, ImapSession)],
        differ: &[(String, String)],
        old: &mut [Folder],
        new: &mut [Folder],
    ) {
        for (side, session) in sessions.iter_mut() {
            let folders: &mut [Folder] = match side {
                Side::Old => old,
                Side::New => new,
            };
            for (o, n) in differ {
                let name = if *side == Side::Old { o } else { n };
                let Some(folder) = folders.iter_mut().find(|f| &f.name == name) else {
                    continue;
                };
                let sized = tokio::time::timeout(self.session_timeout, folder_size(session, name)).await;
                if let Ok(Ok(size)) = sized {
                    folder.size = Some(size);
                }
            }
        }
    }
}

/// Sum of RFC822.SIZE of every message of `name`, read-only.
async fn folder_size(session: &mut ImapSession, name: &str) -> Result<u64, async_imap::error::Error> {
    let mailbox = session.examine(name).await?;
    if mailbox.exists == 0 {
        return Ok(0);
    }
    let sizes: Vec<_> = session.fetch("1:*", "RFC822.SIZE").await?.try_collect().await?;
    Ok(sizes.iter().filter_map(|f| f.size).map(u64::from).sum())
}

/// LIST with special use, then STATUS of each selectable folder.
async fn list_folders(imap: &ImapProbe, session: &mut ImapSession) -> Result<Vec<Folder>, Failure> {
    let names: Vec<_> = session
        .list(Some(""), Some("\"*\" RETURN (SPECIAL-USE)"))
        .await
        .map_err(|e| imap.imap_failure(e, Step::List))?
        .try_collect()
        .await
        .map_err(|e| imap.imap_failure(e, Step::List))?;
    let listed: Vec<(String, Option<String>, Option<&'static str>, bool)> = names
        .iter()
        .map(|n| {
            let attrs = n.attributes();
            let selectable = !attrs.iter().any(|a| {
                matches!(a, NameAttribute::NoSelect)
                    || matches!(a, NameAttribute::Extension(e) if e.eq_ignore_ascii_case("\\NonExistent"))
            });
            let special = attrs.iter().find_map(special_use);
            (
                n.name().to_string(),
                n.delimiter().map(str::to_string),
                special,
                selectable,
            )
        })
        .collect();
    drop(names);
    let prefix = namespace_prefix(&listed);
    let mut folders = Vec::new();
    for (name, delimiter, special_use, selectable) in listed {
        if !selectable {
            continue;
        }
        let status = session
            .status(&name, "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
            .await
            .map_err(|e| imap.imap_failure(e, Step::List))?;
        folders.push(Folder {
            shown: normalise(&name, delimiter.as_deref(), prefix.as_deref()),
            name,
            special_use,
            messages: status.exists,
            uidnext: status.uid_next,
            uidvalidity: status.uid_validity,
            unseen: status.unseen,
            size: None,
        });
    }
    Ok(folders)
}

fn special_use(a: &NameAttribute<'_>) -> Option<&'static str> {
    Some(match a {
        NameAttribute::All => "\\All",
        NameAttribute::Archive => "\\Archive",
        NameAttribute::Drafts => "\\Drafts",
        NameAttribute::Flagged => "\\Flagged",
        NameAttribute::Junk => "\\Junk",
        NameAttribute::Sent => "\\Sent",
        NameAttribute::Trash => "\\Trash",
        _ => return None,
    })
}

/// `INBOX` plus the separator when every other folder sits below it: the
/// personal namespace prefix of Courier-style servers, which the other side
/// may not have.
fn namespace_prefix(listed: &[(String, Option<String>, Option<&'static str>, bool)]) -> Option<String> {
    let others: Vec<_> = listed
        .iter()
        .filter(|(n, ..)| !n.eq_ignore_ascii_case("INBOX"))
        .collect();
    let (_, delimiter, ..) = others.first()?;
    let prefix = format!("INBOX{}", delimiter.as_deref()?);
    others
        .iter()
        .all(|(n, ..)| n.len() > prefix.len() && n[..prefix.len()].eq_ignore_ascii_case(&prefix))
        .then_some(prefix)
}

/// A folder name as compared: prefix removed, separator `/`, `INBOX` upper case.
fn normalise(name: &str, delimiter: Option<&str>, prefix: Option<&str>) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        return "INBOX".into();
    }
    let rest = match prefix {
        Some(p) if name.len() > p.len() && name[..p.len()].eq_ignore_ascii_case(p) => &name[p.len()..],
        _ => name,
    };
    match delimiter {
        Some(d) if !d.is_empty() && d != "/" => rest.split(d).collect::<Vec<_>>().join("/"),
        _ => rest.to_string(),
    }
}

/// For each old folder, the new folder it is compared with: the one with the
/// same special use, else the same normalised name.
fn pair(old: &[Folder], new: &[Folder]) -> Vec<(usize, Option<usize>)> {
    old.iter()
        .enumerate()
        .map(|(i, o)| {
            let by_use = o
                .special_use
                .and_then(|u| new.iter().position(|n| n.special_use == Some(u)));
            (i, by_use.or_else(|| new.iter().position(|n| n.shown == o.shown)))
        })
        .collect()
}

fn compare(old: &[Folder], new: &[Folder], pairs: &[(usize, Option<usize>)], row: &mut Row) {
    for (o, n) in pairs {
        let o = &old[*o];
        let Some(n) = n.map(|n| &new[n]) else {
            row.messages_missing += u64::from(o.messages);
            row.add(
                Finding::FolderMissing,
                format!(
                    "{}: missing on new ({} messages on old)",
                    folder_label(o, None),
                    o.messages
                ),
            );
            continue;
        };
        let label = folder_label(o, Some(n));
        if n.messages < o.messages {
            let missing = o.messages - n.messages;
            row.messages_missing += u64::from(missing);
            let bytes = match (o.size, n.size) {
                (Some(a), Some(b)) if a > b => format!(", {} bytes", a - b),
                _ => String::new(),
            };
            row.add(
                Finding::FewerMessages,
                format!(
                    "{label}: {} messages on new, {} on old ({missing} missing{bytes})",
                    n.messages, o.messages
                ),
            );
        } else if let (Some(a), Some(b)) = (o.size, n.size)
            && a != b
        {
            row.add(
                Finding::SizeDiffers,
                format!(
                    "{label}: {b} bytes in {} messages on new, {a} bytes in {} on old",
                    n.messages, o.messages
                ),
            );
        }
        match (o.uidvalidity, n.uidvalidity) {
            (Some(a), Some(b)) if a == b => {
                if let (Some(x), Some(y)) = (o.uidnext, n.uidnext)
                    && y < x
                {
                    row.add(
                        Finding::UidRegressed,
                        format!("{label}: UIDNEXT {y} on new, {x} on old with the same UIDVALIDITY {a}"),
                    );
                }
            }
            (Some(a), Some(b)) => row.add(
                Finding::UidvalidityChanged,
                format!("{label}: UIDVALIDITY {b} on new, {a} on old: clients download the folder again"),
            ),
            _ => {}
        }
        if let (Some(a), Some(b)) = (o.unseen, n.unseen)
            && a != b
        {
            row.add(
                Finding::UnseenDiffers,
                format!("{label}: {b} unseen on new, {a} on old"),
            );
        }
    }
}

/// `Sent` or `Sent -> Sent Items (\Sent)` when the names differ.
fn folder_label(o: &Folder, n: Option<&Folder>) -> String {
    let name = crate::probe::sanitize(&o.shown);
    match n {
        Some(n) if n.shown != o.shown => format!(
            "{name} -> {} ({})",
            crate::probe::sanitize(&n.shown),
            o.special_use.unwrap_or("")
        ),
        _ => name,
    }
}

#[derive(Default)]
struct Row {
    findings: Vec<Finding>,
    details: Vec<String>,
    login_failed: Vec<Side>,
    messages_missing: u64,
}

impl Row {
    fn add(&mut self, finding: Finding, detail: String) {
        if !self.findings.contains(&finding) {
            self.findings.push(finding);
        }
        self.details.push(detail);
    }

    fn finish(mut self, account: &str, old_inbox_uidnext: Option<u32>, switch_uidnext: Option<u32>) -> AccountRow {
        self.findings.sort();
        if self.findings.is_empty() {
            self.findings.push(Finding::Ok);
        }
        AccountRow {
            account: account.to_string(),
            findings: self.findings,
            details: self.details,
            login_failed: self.login_failed,
            messages_missing: self.messages_missing,
            old_inbox_uidnext,
            switch_uidnext,
        }
    }
}

/// Login starts per server, at most `per_second`, spaced evenly.
struct RateLimit {
    gap: Duration,
    next: Mutex<Instant>,
}

impl RateLimit {
    fn new(per_second: f64) -> RateLimit {
        RateLimit {
            gap: Duration::from_secs_f64(1.0 / per_second),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().expect("rate limit lock");
            let at = (*next).max(Instant::now());
            *next = at + self.gap;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

impl Probe for MailboxParityProbe {
    fn hostname(&self) -> &str {
        &self.name
    }

    fn own_targets(&self) -> Option<Vec<(String, IpAddr)>> {
        Some(vec![("audit".to_string(), self.old.1)])
    }

    fn eager(&self) -> bool {
        true
    }

    fn resume(&self, kept: &Measurement) {
        if let Measurement::MailboxParity(report) = kept {
            self.remember(report.clone());
        }
    }

    fn run<'a>(&'a self, _ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let input = &self.input;
            if !input.problems.is_empty() && !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    check = %self.name,
                    file = %input.file.display(),
                    invalid = input.invalid,
                    duplicates = input.duplicates,
                    first = %input.problems[0],
                    "accounts file has lines that are skipped"
                );
            }
            let progress = Progress::default();
            let phase = run.migration_phase;
            let report = run.phase("audit", self.audit(&progress, phase)).await?;
            if !report.unreachable.is_empty() {
                let sides: Vec<String> = report
                    .unreachable
                    .iter()
                    .map(|(side, n)| format!("{side} did not answer for {n} accounts"))
                    .collect();
                return Err(Failure::new(
                    FailureReason::Network,
                    format!("{}; keeping the last audit", sides.join(", ")),
                ));
            }
            let report = Arc::new(report);
            self.remember(report.clone());
            run.measurements.push(Measurement::MailboxParity(report));
            Ok(())
        })
    }
}

/// A mail account as written in the file, checked and made canonical (lower case).
pub fn account_name(text: &str) -> Result<String, String> {
    let shown = crate::probe::sanitize(text);
    if text.chars().any(char::is_whitespace) {
        return Err(format!("`{shown}` is not one account (one address per line)"));
    }
    let Some((local, domain)) = text.rsplit_once('@') else {
        return Err(format!("`{shown}` is not a mail address (expected `user@example.com`)"));
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'"' | b'\\' | b'@' | b'(' | b')' | b'%'));
    if !local_ok {
        return Err(format!(
            "`{shown}` is not a mail address: local part `{}` (ASCII without `*`, quotes, `%`, parentheses)",
            crate::probe::sanitize(local)
        ));
    }
    let domain = super::hosted_domains::domain_name(domain).map_err(|e| format!("`{shown}`: {e}"))?;
    Ok(format!("{}@{domain}", local.to_ascii_lowercase()))
}

/// Reads an accounts file as the probe does (for tests and tools).
pub fn read_accounts(path: &Path) -> Result<(Vec<String>, InputSummary), String> {
    super::hosted_domains::read_list(path, "account", account_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str, delim: &str, special: Option<&'static str>, messages: u32) -> Folder {
        Folder {
            name: name.into(),
            shown: normalise(name, Some(delim), None),
            special_use: special,
            messages,
            uidnext: Some(messages + 1),
            uidvalidity: Some(7),
            unseen: Some(0),
            size: None,
        }
    }

    #[test]
    fn names_are_normalised_across_separators_and_prefixes() {
        assert_eq!(normalise("Archive.2024", Some("."), None), "Archive/2024");
        assert_eq!(normalise("Archive/2024", Some("/"), None), "Archive/2024");
        assert_eq!(normalise("inbox", Some("."), None), "INBOX");
        assert_eq!(
            normalise("INBOX.Archive.2024", Some("."), Some("INBOX.")),
            "Archive/2024"
        );
        let listed = vec![
            ("INBOX".to_string(), Some(".".to_string()), None, true),
            ("INBOX.Sent".to_string(), Some(".".to_string()), Some("\\Sent"), true),
            ("INBOX.Archive".to_string(), Some(".".to_string()), None, true),
        ];
        assert_eq!(namespace_prefix(&listed).as_deref(), Some("INBOX."));
        let flat = vec![
            ("INBOX".to_string(), Some("/".to_string()), None, true),
            ("Sent".to_string(), Some("/".to_string()), None, true),
        ];
        assert_eq!(namespace_prefix(&flat), None);
    }

    #[test]
    fn special_folders_pair_by_use_and_the_rest_by_name() {
        let old = vec![
            folder("INBOX", ".", None, 5),
            folder("Sent", ".", Some("\\Sent"), 2),
            folder("Projects", ".", None, 3),
        ];
        // Messages 4 and 5 were not copied; UIDNEXT was.
        let inbox = Folder {
            uidnext: Some(6),
            ..folder("INBOX", "/", None, 3)
        };
        let new = vec![inbox, folder("Sent Items", "/", Some("\\Sent"), 2)];
        let pairs = pair(&old, &new);
        assert_eq!(pairs, vec![(0, Some(0)), (1, Some(1)), (2, None)]);
        let mut row = Row::default();
        compare(&old, &new, &pairs, &mut row);
        let row = row.finish("a@x.test", None, None);
        assert_eq!(row.findings, [Finding::FolderMissing, Finding::FewerMessages]);
        assert_eq!(row.messages_missing, 5);
        assert!(
            row.details[0].contains("3 messages on new, 5 on old (2 missing)"),
            "{:?}",
            row.details
        );
        assert!(row.details[1].contains("Projects: missing on new (3 messages on old)"));
    }

    #[test]
    fn uid_findings_need_the_same_or_another_uidvalidity() {
        let old = vec![Folder {
            uidnext: Some(10),
            ..folder("INBOX", ".", None, 5)
        }];
        let same = vec![folder("INBOX", "/", None, 5)];
        let mut row = Row::default();
        compare(&old, &same, &pair(&old, &same), &mut row);
        assert_eq!(row.findings, [Finding::UidRegressed]);
        let other = vec![Folder {
            uidvalidity: Some(8),
            ..folder("INBOX", "/", None, 5)
        }];
        let mut row = Row::default();
        compare(&old, &other, &pair(&old, &other), &mut row);
        assert_eq!(row.findings, [Finding::UidvalidityChanged]);
    }

    #[test]
    fn accounts_are_checked_and_lower_cased() {
        assert_eq!(account_name("Alice@Example.COM").unwrap(), "alice@example.com");
        for bad in [
            "alice",
            "a b@x.test",
            "a*admin@x.test",
            "@x.test",
            "a@-x-.test",
            "a@com",
        ] {
            assert!(account_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn findings_parse_from_their_labels() {
        for f in Finding::ALL {
            assert_eq!(Finding::parse(f.as_str()), Ok(f));
        }
        assert!(
            Finding::parse("missing")
                .unwrap_err()
                .contains("one of ok, folder_missing")
        );
    }
}
