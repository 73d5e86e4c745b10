//! `kind: mailflow` — end-to-end mail flow. Each environment of the check (the
//! route) sends one probe mail per interval, and long-lived watchers find it
//! again in the watched mailboxes (old AND new, where it may land during the
//! switch). The [`Ledger`] accounts for every mail: delivered (where, how
//! fast), late, lost, duplicated.
//!
//! A probe mail proves it is ours: its `X-Cutover-Probe` header carries this
//! daemon's instance id, the mail's id and an HMAC-SHA256 over both. Watchers
//! count and delete only mails whose marker verifies and that the ledger has
//! recorded; anything else — ordinary mail, forged markers, another daemon's
//! probes — is never touched.
//!
//! Sending reuses the `smtp` probe's session ([`SmtpProbe::send`]), watching
//! reuses the `imap` probe's login ([`ImapProbe::open`]); watchers wait with
//! IMAP IDLE, or poll when a server lacks it, and reconnect after any error.
//! Under `check` (no daemon, no [`BackgroundContext`]) a run sends one mail and
//! polls the mailboxes for it until the timeout, with a ledger in memory.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_imap::types::Fetch;
use futures::TryStreamExt;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Message};
use sha2::Sha256;

use super::imap::{ImapProbe, ImapSession};
use super::smtp::{Outgoing, SmtpProbe};
use super::{BackgroundContext, BackgroundTask, Failure, FailureReason, FieldError, Probe, Run};
use crate::config::{Check, Credentials, ImapAuth, ImapExpect, ImapSpec, MailflowSpec, SmtpExpect, SmtpMode, SmtpSpec};
use crate::ledger::{Ages, Found, Ledger, Losses, Sighting, random_hex};

/// The marker header.
pub const MARKER: &str = "X-Cutover-Probe";
/// Version tag at the start of every marker.
const MARKER_VERSION: &str = "v1";
/// Default `late_after`.
pub const DEFAULT_LATE_AFTER: Duration = Duration::from_secs(120);
/// Default `lost_after`.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(15 * 60);
/// Default `retention`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// What one watcher session may read before it reconnects (the probe's
/// 1 MiB is per run; a watcher session lives for hours).
const WATCH_SESSION_BYTES: u64 = 64 * 1024 * 1024;
/// IDLE is re-issued this often (RFC 2177: before 29 minutes), which also
/// notices a connection that died silently.
const IDLE_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Poll interval for servers without IDLE, and for the one-shot `check`.
const POLL: Duration = Duration::from_secs(2);
/// Longest wait before reconnecting a failed watcher.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

type HmacSha256 = Hmac<Sha256>;

/// One watched mailbox.
struct Watch {
    env: String,
    ip: IpAddr,
    imap: ImapProbe,
    /// Whether its watcher has searched the whole mailbox since the watchers
    /// started: until every watcher has, a missing mail may be in one not
    /// searched yet (it arrived while the daemon was down).
    searched: AtomicBool,
}

struct Inner {
    check: String,
    host: String,
    smtp: SmtpProbe,
    from: lettre::Address,
    to: lettre::Address,
    watches: Vec<Watch>,
    ages: Ages,
    timeout: Duration,
    /// The check's own marker key; the ledger's generated one otherwise.
    key: Option<Vec<u8>>,
    /// Set by [`Probe::background`]: the daemon's ledger.
    ledger: Mutex<Option<Arc<Ledger>>>,
    /// When [`Probe::background`] started the watchers: a reload builds a
    /// new probe, so this is the daemon's start or the last reload.
    watching_since: OnceLock<Instant>,
    /// Set once the sweep may declare losses, so it is decided and logged once.
    settled: AtomicBool,
}

/// A built `mailflow` check.
pub struct MailflowProbe {
    inner: Arc<Inner>,
}

impl MailflowProbe {
    /// Validates the spec, building the SMTP sender and IMAP watchers with the
    /// `smtp` and `imap` probes' own validation.
    pub fn new(spec: &MailflowSpec, check: &Check, credentials: &Credentials) -> Result<Self, FieldError> {
        let send = &spec.send;
        if send.mode == SmtpMode::RelayCheck {
            return Err(FieldError::new("send.mode", "expected `submission` or `mx`"));
        }
        let smtp_spec = SmtpSpec {
            host: send.host.clone(),
            port: send.port,
            mode: send.mode,
            tls: send.tls,
            helo: None,
            credentials: send.credentials.clone(),
            mail_from: send.from.clone(),
            rcpt_to: Some(send.to.clone()),
            expect: SmtpExpect::default(),
        };
        let prefix = |p: &str, e: FieldError| {
            let field = match e.field.as_str() {
                "mail_from" => "from".to_string(),
                "rcpt_to" => "to".to_string(),
                f => f.to_string(),
            };
            FieldError::new(format!("{p}.{field}"), e.message)
        };
        let smtp = SmtpProbe::new(&smtp_spec, check, credentials).map_err(|e| prefix("send", e))?;
        let address = |field: &str, text: &str| -> Result<lettre::Address, FieldError> {
            text.trim_matches(['<', '>'])
                .parse()
                .map_err(|e| FieldError::new(field, format!("expected an address like `probe@example.test`: {e}")))
        };
        let to = address("send.to", &send.to)?;
        let from = match (&send.from, &send.credentials) {
            (Some(f), _) => address("send.from", f)?,
            (None, Some(name)) => match credentials.get(name) {
                Some(c) => address("send.from", &c.username)?,
                None => to.clone(),
            },
            (None, None) => to.clone(),
        };
        if spec.watch.is_empty() {
            return Err(FieldError::new(
                "watch",
                "name at least one mailbox to find the probe mails in",
            ));
        }
        let mut watches = Vec::new();
        for (i, w) in spec.watch.iter().enumerate() {
            let imap_spec = ImapSpec {
                host: w.host.clone(),
                port: w.port,
                tls: w.tls,
                credentials: w.credentials.clone(),
                auth: ImapAuth::Login,
                mailbox: w.mailbox.clone(),
                expect: ImapExpect::default(),
            };
            let imap = ImapProbe::new(&imap_spec, check, credentials)
                .map_err(|e| prefix(&format!("watch[{i}]"), e))?
                .with_session_bytes(WATCH_SESSION_BYTES);
            // The loader reports an unknown or live environment itself.
            if let Some(ip) = w.addresses.first() {
                watches.push(Watch {
                    env: w.env.clone(),
                    ip: *ip,
                    imap,
                    searched: AtomicBool::new(false),
                });
            }
        }
        let ages = Ages {
            stale: check.timeout * 2,
            late_after: spec.late_after.map_or(DEFAULT_LATE_AFTER, |d| d.0),
            lost_after: spec.lost_after.map_or(DEFAULT_LOST_AFTER, |d| d.0),
            retention: spec.retention.map_or(DEFAULT_RETENTION, |d| d.0),
        };
        if ages.late_after >= ages.lost_after {
            return Err(FieldError::new("late_after", "must be below `lost_after`"));
        }
        if ages.retention < ages.lost_after {
            return Err(FieldError::new("retention", "must be at least `lost_after`"));
        }
        let key = match (&spec.hmac_key_file, &spec.hmac_key_env) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "hmac_key_file",
                    "set `hmac_key_file` or `hmac_key_env`, not both",
                ));
            }
            (Some(path), None) => Some(
                crate::config::read_small_file(path, crate::config::SECRET_FILE_LIMIT)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .map_err(|e| FieldError::new("hmac_key_file", format!("cannot read {}: {e}", path.display())))?,
            ),
            (None, Some(var)) => Some(
                std::env::var(var)
                    .map_err(|_| FieldError::new("hmac_key_env", format!("environment variable `{var}` is not set")))?,
            ),
            (None, None) => None,
        };
        let key = match key.map(|k| k.trim().to_string()) {
            Some(k) if k.len() < 16 => {
                return Err(FieldError::new(
                    "hmac_key_file",
                    "the marker key must be at least 16 characters",
                ));
            }
            k => k.map(String::into_bytes),
        };
        Ok(MailflowProbe {
            inner: Arc::new(Inner {
                check: check.name.clone(),
                host: send.host.clone(),
                smtp,
                from,
                to,
                watches,
                ages,
                timeout: check.timeout,
                key,
                ledger: Mutex::new(None),
                watching_since: OnceLock::new(),
                settled: AtomicBool::new(false),
            }),
        })
    }
}

impl Probe for MailflowProbe {
    fn hostname(&self) -> &str {
        &self.inner.host
    }

    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let ledger = self.inner.ledger.lock().expect("ledger slot").clone();
            match ledger {
                Some(ledger) => self.inner.send_one(&ledger, ip, run).await.map(|_| ()),
                None => self.inner.one_shot(ip, run).await,
            }
        })
    }

    fn background(&self, ctx: &BackgroundContext) -> Vec<BackgroundTask> {
        *self.inner.ledger.lock().expect("ledger slot") = Some(ctx.ledger.clone());
        let _ = self.inner.watching_since.set(Instant::now());
        let check = &self.inner.check;
        let mut tasks: Vec<BackgroundTask> = (0..self.inner.watches.len())
            .map(|i| {
                let w = &self.inner.watches[i];
                let (inner, ledger) = (self.inner.clone(), ctx.ledger.clone());
                BackgroundTask {
                    name: format!("mailflow_watch:{check}:{}:{}", w.env, w.imap.mailbox_name()),
                    start: Box::new(move || Box::pin(watch_loop(inner.clone(), i, ledger.clone()))),
                }
            })
            .collect();
        let (inner, ledger) = (self.inner.clone(), ctx.ledger.clone());
        tasks.push(BackgroundTask {
            name: format!("mailflow_sweep:{check}"),
            start: Box::new(move || {
                let (inner, ledger) = (inner.clone(), ledger.clone());
                Box::pin(async move {
                    let mut tick = tokio::time::interval(inner.sweep_every());
                    loop {
                        tick.tick().await;
                        inner.sweep(&ledger);
                    }
                })
            }),
        });
        tasks
    }
}

impl Inner {
    fn key<'a>(&'a self, ledger: &'a Ledger) -> &'a [u8] {
        self.key.as_deref().unwrap_or(ledger.identity.key())
    }

    /// Sends one probe mail on route `run.env`: ages the route's mails first,
    /// writes the intent, sends, records the reply. Returns the mail's id.
    async fn send_one(&self, ledger: &Ledger, ip: IpAddr, run: &mut Run) -> Result<String, Failure> {
        let route = run.env.clone();
        self.sweep(ledger);
        let id = random_hex(12).map_err(|e| Failure::new(FailureReason::Protocol, format!("no random id: {e}")))?;
        let mut out = Outgoing {
            message: self.message(ledger, &id, &route)?,
            ..Outgoing::default()
        };
        ledger
            .intent(&id, &self.check, &route)
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("not sending: {e}")))?;
        // Leave a tenth of the timeout to record the outcome before the
        // scheduler's deadline cancels the run.
        let limit = self.timeout - self.timeout / 10;
        let result = match tokio::time::timeout(limit, self.smtp.send(ip, run, &mut out)).await {
            Ok(result) => result,
            Err(_) => Err(Failure {
                reason: FailureReason::Timeout,
                phase: run.current_phase(),
                detail: format!("no reply within {}", humantime::format_duration(limit)),
            }),
        };
        let recorded = match (&out.accepted, &result) {
            (Some((reply, at)), _) => ledger.accepted(&id, *at, &reply.summary()),
            (None, Err(f)) => ledger.send_failed(&id, f.reason.as_str(), !out.data_sent),
            (None, Ok(())) => ledger.send_failed(&id, FailureReason::Protocol.as_str(), false),
        };
        if let Err(e) = recorded {
            tracing::error!(check = %self.check, route = %route, id = %id, error = %e, "mailflow: recording a send failed");
        }
        match (out.accepted.is_some(), result) {
            // Accepted: a failing QUIT does not make the mail unsent.
            (true, _) => Ok(id),
            (false, Err(f)) => Err(f),
            (false, Ok(())) => Err(Failure::new(
                FailureReason::Protocol,
                "the session ended without a reply to the message",
            )),
        }
    }

    fn sweep(&self, ledger: &Ledger) {
        if let Err(e) = ledger.sweep(&self.check, &self.ages, self.losses()) {
            tracing::error!(check = %self.check, error = %e, "mailflow: ageing mails failed");
        }
    }

    /// Whether mails not found in time may be declared lost: once every
    /// watcher has searched its whole mailbox since the watchers started, or
    /// `lost_after` after that start when one could not (its server down).
    /// Before, a mail that arrived while the daemon was down would be counted
    /// lost at start-up and found the same second.
    fn losses(&self) -> Losses {
        if self.settled.load(Ordering::Acquire) {
            return Losses::Declare;
        }
        // `check`'s one-shot ledger is fresh: nothing to hold.
        let Some(since) = self.watching_since.get() else {
            return Losses::Declare;
        };
        let unsearched: Vec<&str> = self
            .watches
            .iter()
            .filter(|w| !w.searched.load(Ordering::Acquire))
            .map(|w| w.env.as_str())
            .collect();
        if unsearched.is_empty() {
            tracing::info!(check = %self.check, "mailflow: every watched mailbox searched since start; mails not found in time now count lost");
        } else if since.elapsed() >= self.ages.lost_after {
            tracing::warn!(
                check = %self.check, unsearched = ?unsearched,
                "mailflow: not every watched mailbox could be searched within lost_after of start; mails not found in time count lost anyway"
            );
        } else {
            return Losses::Hold;
        }
        self.settled.store(true, Ordering::Release);
        Losses::Declare
    }

    /// How often mails are aged besides each send: late and lost must be
    /// declared on time even when sending stopped.
    fn sweep_every(&self) -> Duration {
        (self.ages.late_after / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// The probe message: small, plain, saying what it is, with the marker.
    fn message(&self, ledger: &Ledger, id: &str, route: &str) -> Result<Vec<u8>, Failure> {
        let instance = &ledger.identity.instance;
        let mut message = Message::builder()
            .from(Mailbox::new(Some("cutover-monitor".into()), self.from.clone()))
            .to(Mailbox::new(None, self.to.clone()))
            .message_id(Some(format!("<{id}@{instance}.cutover-monitor.invalid>")))
            .subject(format!("cutover-monitor mail flow probe {} via {route}", self.check))
            .header(ContentType::TEXT_PLAIN)
            .body(format!(
                "Mail flow probe from cutover-monitor, check `{}`, route `{route}`.\r\nIt is deleted automatically once found.\r\n",
                self.check
            ))
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("building the probe message: {e}")))?;
        message.headers_mut().insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str(MARKER),
            marker(self.key(ledger), instance, id),
        ));
        Ok(message.formatted())
    }

    /// `check`: send one mail and wait for it in the watched mailboxes, with
    /// a throwaway ledger. The wait is phase `delivery`.
    async fn one_shot(&self, ip: IpAddr, run: &mut Run) -> Result<(), Failure> {
        let ledger = Ledger::in_memory(Arc::new(crate::ledger::NoSink))
            .map_err(|e| Failure::new(FailureReason::Protocol, e.to_string()))?;
        let id = self.send_one(&ledger, ip, run).await?;
        let wait = async {
            loop {
                for watch in &self.watches {
                    let mut imap_run = Run::default();
                    match watch.imap.open(watch.ip, &mut imap_run).await {
                        Ok(mut session) => {
                            let scanned = self.scan_mailbox(&ledger, watch, &mut session).await;
                            let _ = session.logout().await;
                            if let Err(f) = scanned {
                                tracing::debug!(check = %self.check, env = %watch.env, error = %f, "mailflow: scan failed");
                            }
                        }
                        Err(f) => {
                            tracing::debug!(check = %self.check, env = %watch.env, error = %f, "mailflow: login failed")
                        }
                    }
                }
                if let Ok(Some(e)) = ledger.entry(&id) {
                    if e.state == "delivered" {
                        return e;
                    }
                }
                tokio::time::sleep(POLL / 4).await;
            }
        };
        let entry = run.phase("delivery", wait).await;
        tracing::info!(
            check = %self.check, id = %id, delivered_env = ?entry.delivered_env, latency_seconds = ?entry.latency,
            "mailflow: probe mail delivered"
        );
        Ok(())
    }

    /// Selects the watched mailbox and handles what is there.
    async fn scan_mailbox(&self, ledger: &Ledger, watch: &Watch, session: &mut ImapSession) -> Result<(), Failure> {
        let mailbox = session
            .select(watch.imap.mailbox_name())
            .await
            .map_err(|e| watch.imap.imap_failure(e, super::imap::Step::Select))?;
        let uidplus = session
            .capabilities()
            .await
            .map(|c| c.has_str("UIDPLUS"))
            .unwrap_or(false);
        let mut warned = HashSet::new();
        scan(
            self,
            ledger,
            watch,
            session,
            mailbox.uid_validity.unwrap_or(0),
            uidplus,
            crate::unix_now(),
            &mut warned,
        )
        .await
    }
}

/// The marker value: version, instance, id and the HMAC over them.
pub fn marker(key: &[u8], instance: &str, id: &str) -> String {
    let signed = format!("{MARKER_VERSION} instance={instance} id={id}");
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    let tag: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("{signed} mac={tag}")
}

/// The probe id in a marker, if the marker is this instance's and its HMAC
/// verifies (compared in constant time).
pub fn verify(key: &[u8], instance: &str, value: &str) -> Option<String> {
    let words: Vec<&str> = value.split_whitespace().collect();
    let [version, inst, id, tag] = words.as_slice() else {
        return None;
    };
    let inst = inst.strip_prefix("instance=")?;
    let id = id.strip_prefix("id=")?;
    let tag = unhex(tag.strip_prefix("mac=")?)?;
    if *version != MARKER_VERSION || inst != instance || id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{MARKER_VERSION} instance={inst} id={id}").as_bytes());
    mac.verify_slice(&tag).ok()?;
    Some(id.to_string())
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Unfolded header fields named `name` (case-insensitive) from a header block.
fn header_fields(header: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(header);
    let mut fields: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.starts_with([' ', '\t']) {
            if let Some(c) = current.as_mut() {
                c.push(' ');
                c.push_str(line.trim());
            }
            continue;
        }
        if let Some(done) = current.take() {
            fields.push(done);
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.trim().eq_ignore_ascii_case(name) {
                current = Some(v.trim().to_string());
            }
        }
    }
    fields.extend(current);
    fields
}

/// The Received hops, newest first, one per line: `by <host>` and the date,
/// as far as they parse.
fn hops(header: &[u8]) -> String {
    header_fields(header, "Received")
        .iter()
        .map(|r| {
            let by = r
                .split_whitespace()
                .skip_while(|w| !w.eq_ignore_ascii_case("by"))
                .nth(1)
                .unwrap_or("?");
            let date = r.rsplit_once(';').map_or("", |(_, d)| d.trim());
            super::sanitize(&format!("by {by}; {date}"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One pass over a selected mailbox: finds this instance's probe mails,
/// verifies them, records them, then deletes and expunges (by UID, so no
/// other client's `\Deleted` mail goes with them) exactly those recorded.
#[allow(clippy::too_many_arguments)]
async fn scan(
    inner: &Inner,
    ledger: &Ledger,
    watch: &Watch,
    session: &mut ImapSession,
    uidvalidity: u32,
    uidplus: bool,
    visible_at: f64,
    warned: &mut HashSet<u32>,
) -> Result<(), Failure> {
    let host = watch.imap.hostname().to_string();
    let imap_err = |what: &str, e: async_imap::error::Error| {
        Failure::new(FailureReason::Protocol, format!("{host} ({}): {what}: {e}", watch.env))
    };
    let instance = &ledger.identity.instance;
    let uids = session
        .uid_search(format!("HEADER {MARKER} \"instance={instance}\""))
        .await
        .map_err(|e| imap_err("UID SEARCH", e))?;
    if uids.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<u32> = uids.into_iter().collect();
    sorted.sort_unstable();
    let set = uid_set(&sorted);
    let fetches: Vec<Fetch> = session
        .uid_fetch(&set, "(UID BODY.PEEK[HEADER])")
        .await
        .map_err(|e| imap_err("UID FETCH", e))?
        .try_collect()
        .await
        .map_err(|e| imap_err("UID FETCH", e))?;
    let key = inner.key(ledger);
    let mut recorded = Vec::new();
    for fetch in &fetches {
        let (Some(uid), Some(header)) = (fetch.uid, fetch.header()) else {
            continue;
        };
        let markers = header_fields(header, MARKER);
        let id = match markers.as_slice() {
            [one] => verify(key, instance, one),
            _ => None,
        };
        let Some(id) = id else {
            if warned.insert(uid) {
                tracing::warn!(
                    check = %inner.check, env = %watch.env, uid,
                    "mailflow: a message claims to be this instance's probe but its marker does not verify; leaving it alone"
                );
            }
            continue;
        };
        let found = Found {
            id: &id,
            env: &watch.env,
            mailbox: watch.imap.mailbox_name(),
            uidvalidity,
            uid,
            visible_at,
            hops: &hops(header),
            late_after: inner.ages.late_after,
        };
        match ledger.found(&found) {
            Ok(verdict) => {
                if verdict == Sighting::Recovered {
                    tracing::warn!(check = %inner.check, env = %watch.env, id = %id, "mailflow: probe mail found after it was counted lost; counted recovered");
                } else if verdict != Sighting::AlreadyRecorded {
                    tracing::debug!(check = %inner.check, env = %watch.env, id = %id, ?verdict, "mailflow: probe mail found");
                }
                recorded.push(uid);
            }
            Err(e) => tracing::error!(check = %inner.check, error = %e, "mailflow: recording a sighting failed"),
        }
    }
    if recorded.is_empty() {
        return Ok(());
    }
    let set = uid_set(&recorded);
    session
        .uid_store(&set, "+FLAGS.SILENT (\\Deleted)")
        .await
        .map_err(|e| imap_err("UID STORE", e))?
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| imap_err("UID STORE", e))?;
    if uidplus {
        session
            .uid_expunge(&set)
            .await
            .map_err(|e| imap_err("UID EXPUNGE", e))?
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| imap_err("UID EXPUNGE", e))?;
    }
    // Without UIDPLUS a plain EXPUNGE would also remove other clients'
    // `\Deleted` mail: the probe mails stay flagged for the user's client.
    Ok(())
}

fn uid_set(uids: &[u32]) -> String {
    uids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// One watcher's life: a session at a time, re-established after any error
/// with a backoff, logging only changes of state.
async fn watch_loop(inner: Arc<Inner>, index: usize, ledger: Arc<Ledger>) {
    let watch = &inner.watches[index];
    let mut backoff = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    loop {
        let started = tokio::time::Instant::now();
        let failure = watch_session(&inner, watch, &ledger, &mut last_error).await;
        let text = failure.to_string();
        if last_error.as_deref() != Some(text.as_str()) {
            tracing::warn!(
                check = %inner.check, env = %watch.env, mailbox = watch.imap.mailbox_name(), error = %text,
                "mailflow watcher lost its session; reconnecting"
            );
            last_error = Some(text);
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One watcher session: log in, select, scan, then IDLE (or poll) and scan
/// on every wakeup. Returns only with the failure that ended it.
async fn watch_session(inner: &Inner, watch: &Watch, ledger: &Ledger, last_error: &mut Option<String>) -> Failure {
    let mut run = Run::default();
    let opened = tokio::time::timeout(inner.timeout, watch.imap.open(watch.ip, &mut run)).await;
    let mut session = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(f)) => return f,
        Err(_) => {
            return Failure::new(
                FailureReason::Timeout,
                format!("{}: login timed out", watch.imap.hostname()),
            );
        }
    };
    let mailbox = match session.select(watch.imap.mailbox_name()).await {
        Ok(m) => m,
        Err(e) => return watch.imap.imap_failure(e, super::imap::Step::Select),
    };
    let uidvalidity = mailbox.uid_validity.unwrap_or(0);
    let caps = match session.capabilities().await {
        Ok(c) => c,
        Err(e) => {
            return Failure::new(
                FailureReason::Protocol,
                format!("{}: CAPABILITY: {e}", watch.imap.hostname()),
            );
        }
    };
    let (idle, uidplus) = (caps.has_str("IDLE"), caps.has_str("UIDPLUS"));
    tracing::info!(
        check = %inner.check, env = %watch.env, mailbox = watch.imap.mailbox_name(), idle, uidplus,
        "mailflow watcher connected"
    );
    *last_error = None;
    let mut warned = HashSet::new();
    let mut woke = crate::unix_now();
    loop {
        if let Err(f) = scan(
            inner,
            ledger,
            watch,
            &mut session,
            uidvalidity,
            uidplus,
            woke,
            &mut warned,
        )
        .await
        {
            return f;
        }
        watch.searched.store(true, Ordering::Release);
        if idle {
            let mut handle = session.idle();
            if let Err(e) = handle.init().await {
                return Failure::new(FailureReason::Protocol, format!("{}: IDLE: {e}", watch.imap.hostname()));
            }
            let (wait, _stop) = handle.wait_with_timeout(IDLE_REFRESH);
            let waited = wait.await;
            woke = crate::unix_now();
            if let Err(e) = waited {
                return Failure::new(FailureReason::Network, format!("{}: IDLE: {e}", watch.imap.hostname()));
            }
            session = match handle.done().await {
                Ok(s) => s,
                Err(e) => {
                    return Failure::new(
                        FailureReason::Network,
                        format!("{}: IDLE DONE: {e}", watch.imap.hostname()),
                    );
                }
            };
        } else {
            tokio::time::sleep(POLL).await;
            woke = crate::unix_now();
            if let Err(e) = session.noop().await {
                return Failure::new(FailureReason::Network, format!("{}: NOOP: {e}", watch.imap.hostname()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_verify_only_with_the_key_and_instance_they_were_made_with() {
        let m = marker(b"key-one-0123456789", "aa", "0123abcd");
        assert_eq!(verify(b"key-one-0123456789", "aa", &m), Some("0123abcd".into()));
        assert_eq!(verify(b"key-two-0123456789", "aa", &m), None);
        assert_eq!(verify(b"key-one-0123456789", "bb", &m), None);
        let forged = m.replace("id=0123abcd", "id=0123abce");
        assert_eq!(verify(b"key-one-0123456789", "aa", &forged), None);
        assert_eq!(verify(b"key-one-0123456789", "aa", "v1 instance=aa id=00 mac=zz"), None);
    }

    #[test]
    fn specs_that_cannot_work_are_refused_with_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret-value\n").unwrap();
        let errors = |check: &str| {
            let text = format!(
                "environments:\n  old: {{addresses: [127.0.0.10]}}\n  live: {{resolver: 127.0.0.30}}\ncredentials:\n  probe: {{username: probe@example.test, password_file: {}}}\nchecks:\n  - {{name: f, kind: mailflow, {check}}}\n",
                pw.display()
            );
            match crate::probe::parse(std::path::Path::new("c.yaml"), &text) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        let send = "send: {mode: submission, host: smtp.test, credentials: probe, to: probe@example.test}";
        let watch = "watch: [{env: old, host: imap.test, credentials: probe}]";
        let cases = [
            (
                format!("{send}, watch: []"),
                "`checks[0].watch`: name at least one mailbox",
            ),
            (
                format!("{send}, watch: [{{env: live, host: imap.test, credentials: probe}}]"),
                "`checks[0].watch[0].env`: `live` follows DNS",
            ),
            (
                format!("{send}, watch: [{{env: nope, host: imap.test, credentials: probe}}]"),
                "`checks[0].watch[0].env`: unknown environment `nope`",
            ),
            (
                format!("send: {{mode: relay_check, host: s.test, to: a@b.test}}, {watch}"),
                "`checks[0].send.mode`",
            ),
            (
                format!("send: {{mode: submission, host: s.test, to: a@b.test}}, {watch}"),
                "`checks[0].send.credentials`",
            ),
            (
                format!("{send}, {watch}, late_after: 20m"),
                "`checks[0].late_after`: must be below",
            ),
            (
                format!("{send}, {watch}, hmac_key_env: NO_SUCH_VAR_HERE"),
                "`checks[0].hmac_key_env`",
            ),
        ];
        for (check, want) in cases {
            let got = errors(&check);
            assert!(got.contains(want), "{check}: {got}");
            assert!(!got.contains("s3cret"), "{got}");
        }
        assert_eq!(errors(&format!("{send}, {watch}")), "");
    }

    #[test]
    fn headers_are_unfolded_and_hops_read() {
        let h = b"Received: from a.test (a.test [127.0.0.1])\r\n\tby mx-new.example.test (Postfix) with ESMTP id X;\r\n Sat, 28 Nov 2026 21:00:00 +0000\r\nX-Cutover-Probe: v1\r\n instance=aa\r\nSubject: x\r\n\r\n";
        assert_eq!(header_fields(h, "x-cutover-probe"), ["v1 instance=aa"]);
        assert_eq!(hops(h), "by mx-new.example.test; Sat, 28 Nov 2026 21:00:00 +0000");
    }
}
