//! What one probe does, and the one contract every protocol follows.
//!
//! A probe gets an IP address to connect to (the environment's pinned address, or
//! what `live` resolved) and keeps the production hostname for SNI, `Host` and
//! certificate checks. It times its steps as phases on a [`Run`] and ends with
//! `Ok(())` or a [`Failure`] whose [`FailureReason`] comes from a closed set, so
//! dashboards and alerts can rely on the label values.
//!
//! Adding a protocol: one file here implementing [`Probe`], its spec in
//! `config.rs`, and one arm in [`build`].

pub mod dav;
pub mod dns;
pub mod hosted_domains;
pub mod http;
pub mod imap;
pub mod mail_auth;
pub mod mailbox_parity;
pub mod mailflow;
pub mod smtp;
pub mod tcp;
pub mod tls;
pub mod webmail_login;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

pub use crate::config::FieldError;
use crate::config::{Check, ConfigErrors, Credentials, KindSpec};
pub use tls::CertFacts;

/// One protocol's probe, built once per check from its validated spec.
pub trait Probe: Send + Sync + 'static {
    /// The production hostname: what `live` resolves, and the name TLS and HTTP
    /// present everywhere, so pinned environments are tested as users see them.
    fn hostname(&self) -> &str;

    /// Probe `ip` once. Time each step with [`Run::phase`]; the scheduler adds
    /// the overall timeout, so a probe never needs its own deadline.
    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>>;

    /// For probes that ask their own servers (DNS resolvers) instead of an
    /// environment's addresses: `(name, address)` of each. The scheduler then
    /// runs one instance per server, named by `env`, instead of per environment.
    fn own_targets(&self) -> Option<Vec<(String, IpAddr)>> {
        None
    }

    /// Whether the first run starts at once instead of at the instance's slot
    /// in its interval, when the instance has no result from the last interval:
    /// for long intervals (an hourly audit), where waiting for the slot after
    /// a start or reload would leave the operator without data for an hour.
    fn eager(&self) -> bool {
        false
    }

    /// The environments whose readiness this check's result speaks for when
    /// they are not its instances' own: `mail_auth` judges the environments
    /// that must pass SPF, `dns` judges `new` when its records name new's
    /// values. Go/no-go counts a failure against each of them.
    fn judges(&self) -> Vec<String> {
        Vec::new()
    }

    /// Long-lived tasks a probe needs besides its runs (mailflow's mailbox
    /// watchers). The daemon spawns them when it applies a config, restarts
    /// one that panics, and aborts them on reload and stop; `check` and
    /// `validate` never call this.
    fn background(&self, _ctx: &BackgroundContext) -> Vec<BackgroundTask> {
        Vec::new()
    }

    /// A measurement the daemon kept from this check's last run before a
    /// restart or reload, for probes whose runs build on the last one
    /// (`mailbox_parity` compares old's INBOX with the last audit).
    fn resume(&self, _kept: &Measurement) {}
}

/// One long-lived task of a probe. A future cannot be resumed after a
/// panic, so the task is a way to start it, called again for each restart.
pub struct BackgroundTask {
    /// Names the task in logs and in `cutover_task_restarts_total{task}`:
    /// a fixed prefix and names from the check file (check, environment,
    /// mailbox), never anything a server sent, so the label values are
    /// bounded by the configuration.
    pub name: String,
    /// Starts the task afresh.
    pub start: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
}

/// What the daemon hands to [`Probe::background`]: state that outlives one
/// config, opened once per daemon.
#[derive(Clone)]
pub struct BackgroundContext {
    /// The mail ledger under `--storage.path`, with this daemon's identity.
    pub ledger: Arc<crate::ledger::Ledger>,
}

/// What one run measured beyond success, phases and the certificate, typed
/// by the kind that measured it. Probes only describe; the metrics layer
/// (`metrics/<kind>.rs`) decides which series each becomes, and `check` and
/// the status page read the same values.
#[derive(Debug, Clone, PartialEq)]
pub enum Measurement {
    /// The selected mailbox's size.
    Imap(imap::Measured),
    /// The last reply code of one SMTP step.
    Smtp(smtp::Measured),
    /// One resolver's answer for a record, or a record's summary across resolvers.
    Dns(dns::Measured),
    /// SPF, PTR, DKIM and DMARC facts of the outbound side.
    MailAuth(mail_auth::Measured),
    /// A finished customer-domain audit (counts to metrics, rows to the API).
    HostedDomains(Arc<hosted_domains::AuditReport>),
    /// A webmail session's mailbox size, application facts and old/new parity.
    WebmailLogin(webmail_login::Measured),
    /// A DAV home's collections and objects, a write round trip, old/new parity.
    Dav(dav::Measured),
    /// A finished mailbox-parity audit (counts to metrics, rows to the API).
    MailboxParity(Arc<mailbox_parity::ParityReport>),
}

/// A check file with every check's probe built: what the daemon and `check` run.
pub type Config = crate::config::Config<Arc<dyn Probe>>;

/// Reads a check file and builds each check's probe, reporting every problem
/// (the spec's and the probes') at its position in the file.
pub fn load(path: &std::path::Path) -> Result<Config, ConfigErrors> {
    crate::config::load(path, &build)
}

/// [`load`] for text already read; `path` names it in messages.
pub fn parse(path: &std::path::Path, text: &str) -> Result<Config, ConfigErrors> {
    crate::config::parse(path, text, &build)
}

/// The named credential of a check (its `credentials` field), or the field
/// error the loader reports at that field.
pub fn credential(credentials: &Credentials, name: &str) -> Result<Arc<crate::config::Credential>, FieldError> {
    credentials.get(name).cloned().ok_or_else(|| {
        FieldError::new(
            "credentials",
            format!("unknown credential `{name}`: define it under the `credentials` section"),
        )
    })
}

/// Builds the probe for a check. Errors name the field (relative to the check)
/// and are reported with the check's position by the config loader.
pub fn build(check: &Check, credentials: &Credentials) -> Result<Arc<dyn Probe>, FieldError> {
    Ok(match &check.kind {
        KindSpec::Http(spec) => Arc::new(http::HttpProbe::new(spec, check)?),
        KindSpec::Tcp(spec) => Arc::new(tcp::TcpProbe::new(spec, check)?),
        KindSpec::Imap(spec) => Arc::new(imap::ImapProbe::new(spec, check, credentials)?),
        KindSpec::Smtp(spec) => Arc::new(smtp::SmtpProbe::new(spec, check, credentials)?),
        KindSpec::Dns(spec) => Arc::new(dns::DnsProbe::new(spec, check)?),
        KindSpec::MailAuth(spec) => Arc::new(mail_auth::MailAuthProbe::new(spec, check)?),
        KindSpec::Mailflow(spec) => Arc::new(mailflow::MailflowProbe::new(spec, check, credentials)?),
        KindSpec::HostedDomains(spec) => Arc::new(hosted_domains::HostedDomainsProbe::new(spec, check)?),
        KindSpec::WebmailLogin(spec) => Arc::new(webmail_login::WebmailLoginProbe::new(spec, check, credentials)?),
        KindSpec::Dav(spec) => Arc::new(dav::DavProbe::new(spec, check, credentials)?),
        KindSpec::MailboxParity(spec) => Arc::new(mailbox_parity::MailboxParityProbe::new(spec, check, credentials)?),
    })
}

/// Why a probe failed. A closed set: each value is a metric label value and an
/// alerting rule may match on it, so new reasons are added deliberately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The address actively refused the connection (nothing listening).
    Refused,
    /// The probe did not finish within the check's timeout.
    Timeout,
    /// The hostname could not be resolved (live environment).
    Dns,
    /// Other network errors: unreachable, reset, closed mid-conversation.
    Network,
    /// The TLS handshake failed for a reason other than the certificate.
    TlsHandshake,
    /// The certificate chain does not lead to a trusted CA.
    CertUntrusted,
    /// The certificate is expired or not yet valid.
    CertExpired,
    /// The certificate does not cover the production hostname.
    CertNameMismatch,
    /// An HTTP status outside the expected set.
    UnexpectedStatus,
    /// A body, banner or header did not match what the check expects.
    ContentMismatch,
    /// The server rejected the credentials.
    AuthFailed,
    /// The server's reply could not be understood.
    Protocol,
    /// A reply exceeded the size the probe is willing to read.
    Oversize,
    /// STARTTLS was required but not offered.
    StarttlsMissing,
    /// A mailbox that must exist does not.
    MailboxMissing,
    /// SMTP answered with a temporary (4xx) failure.
    Smtp4xx,
    /// SMTP answered with a permanent (5xx) failure.
    Smtp5xx,
    /// The server accepted mail it must refuse (relay without authentication).
    OpenRelay,
    /// A webmail accepted the login form but could not reach its mail store.
    StorageError,
    /// A webmail refused the request as invalid: a lost session, a stale
    /// token, cookies not kept (sessions not stored server-side).
    InvalidRequest,
    /// Too many failed logins: the account or client is blocked for a while.
    AccountLocked,
    /// The login asks for a second factor, which a probe cannot give.
    SecondFactor,
    /// A web application answered with a page that is none of the expected ones.
    UnexpectedPage,
    /// DAV discovery: `/.well-known/caldav|carddav` does not redirect.
    WellknownMissing,
    /// DAV discovery redirects to another host than the production one.
    WellknownWrongTarget,
    /// DAV: no current-user-principal, or the principal has no home set.
    PrincipalMissing,
    /// DAV: a collection that must exist is not in the home.
    CollectionMissing,
    /// DAV: a conditional write (If-None-Match / If-Match) answered 412.
    PreconditionFailed,
    /// DAV: the object read back is not the one just written.
    WriteMismatch,
}

impl FailureReason {
    /// Every reason, for documentation and tests of the label set.
    pub const ALL: &'static [FailureReason] = &[
        Self::Refused,
        Self::Timeout,
        Self::Dns,
        Self::Network,
        Self::TlsHandshake,
        Self::CertUntrusted,
        Self::CertExpired,
        Self::CertNameMismatch,
        Self::UnexpectedStatus,
        Self::ContentMismatch,
        Self::AuthFailed,
        Self::Protocol,
        Self::Oversize,
        Self::StarttlsMissing,
        Self::MailboxMissing,
        Self::Smtp4xx,
        Self::Smtp5xx,
        Self::OpenRelay,
        Self::StorageError,
        Self::InvalidRequest,
        Self::AccountLocked,
        Self::SecondFactor,
        Self::UnexpectedPage,
        Self::WellknownMissing,
        Self::WellknownWrongTarget,
        Self::PrincipalMissing,
        Self::CollectionMissing,
        Self::PreconditionFailed,
        Self::WriteMismatch,
    ];

    /// The label value used in metrics, logs and `check` output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Dns => "dns",
            Self::Network => "network",
            Self::TlsHandshake => "tls_handshake",
            Self::CertUntrusted => "cert_untrusted",
            Self::CertExpired => "cert_expired",
            Self::CertNameMismatch => "cert_name_mismatch",
            Self::UnexpectedStatus => "unexpected_status",
            Self::ContentMismatch => "content_mismatch",
            Self::AuthFailed => "auth_failed",
            Self::Protocol => "protocol",
            Self::Oversize => "oversize",
            Self::StarttlsMissing => "starttls_missing",
            Self::MailboxMissing => "mailbox_missing",
            Self::Smtp4xx => "smtp_4xx",
            Self::Smtp5xx => "smtp_5xx",
            Self::OpenRelay => "open_relay",
            Self::StorageError => "storage_error",
            Self::InvalidRequest => "invalid_request",
            Self::AccountLocked => "account_locked",
            Self::SecondFactor => "second_factor",
            Self::UnexpectedPage => "unexpected_page",
            Self::WellknownMissing => "wellknown_missing",
            Self::WellknownWrongTarget => "wellknown_wrong_target",
            Self::PrincipalMissing => "principal_missing",
            Self::CollectionMissing => "collection_missing",
            Self::PreconditionFailed => "precondition_failed",
            Self::WriteMismatch => "write_mismatch",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed probe: the reason (a label), the phase it happened in, and a
/// human-readable detail. The detail may contain server-supplied text, never
/// secrets: probes must not put credentials into it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The closed-set reason.
    pub reason: FailureReason,
    /// The phase that was running, when known.
    pub phase: Option<&'static str>,
    /// Detail for logs and the `check` table, already truncated and escaped.
    pub detail: String,
}

/// Longest server-supplied text we keep in a failure detail.
const MAX_DETAIL: usize = 300;

impl Failure {
    /// A failure with a detail; control characters are escaped and the text is
    /// truncated so a hostile server cannot inject terminal escapes or flood logs.
    pub fn new(reason: FailureReason, detail: impl AsRef<str>) -> Self {
        Failure {
            reason,
            phase: None,
            detail: sanitize(detail.as_ref()),
        }
    }

    /// Classifies an I/O error from connecting or talking to a server.
    pub fn io(err: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let reason = match err.kind() {
            ConnectionRefused => FailureReason::Refused,
            TimedOut => FailureReason::Timeout,
            InvalidData => tls::classify_io(err).map_or(FailureReason::Protocol, FailureReason::from),
            _ => tls::classify_io(err).map_or(FailureReason::Network, FailureReason::from),
        };
        Failure::new(reason, err.to_string())
    }
}

impl From<crate::resolve::LookupError> for Failure {
    fn from(e: crate::resolve::LookupError) -> Self {
        let reason = match e {
            crate::resolve::LookupError::Timeout(_) => FailureReason::Timeout,
            crate::resolve::LookupError::NoAddress(_) => FailureReason::Dns,
        };
        Failure::new(reason, e.to_string())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.phase {
            Some(phase) => write!(f, "{} in {}: {}", self.reason, phase, self.detail),
            None => write!(f, "{}: {}", self.reason, self.detail),
        }
    }
}

/// Escapes control characters and truncates, for any text a server sent us.
pub fn sanitize(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= MAX_DETAIL {
            out.push('…');
            break;
        }
        // Control characters (terminal escapes) and bidirectional overrides
        // (text that displays reordered) are shown as escapes.
        if c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One probe execution: phase timings and the facts a probe gathers. Lives
/// outside the probe's future so a timeout can still say which phase hung.
#[derive(Debug, Default)]
pub struct Run {
    phases: Vec<(&'static str, Duration)>,
    current: Option<(&'static str, Instant)>,
    /// Certificate facts from the last TLS handshake, if any.
    pub cert: Option<CertFacts>,
    /// What the probe measured beyond success and phases.
    pub measurements: Vec<Measurement>,
    /// What people should read that is no failure of this run: what differs
    /// between old and new (webmail plugins, DAV collections). `check` prints
    /// them under the table, the status page beside the instance.
    pub notes: Vec<String>,
    /// The instance's environment name, set by the scheduler: mailflow labels
    /// its mails with it (`route`), which the address alone cannot tell for `live`.
    pub env: String,
    /// The migration phase in force when the run started, set by the
    /// scheduler: `mailbox_parity` judges `old_still_receiving` only once switched.
    pub migration_phase: Option<crate::config::Phase>,
}

impl Run {
    /// Times `fut` as phase `name`. If the run is cancelled by the timeout
    /// while `fut` is pending, [`Run::current_phase`] names it.
    pub async fn phase<T>(&mut self, name: &'static str, fut: impl Future<Output = T>) -> T {
        let start = Instant::now();
        self.current = Some((name, start));
        let out = fut.await;
        self.current = None;
        self.record_phase(name, start.elapsed());
        out
    }

    /// Records a phase measured elsewhere. A phase that repeats (one connect
    /// per redirect hop) adds up, as blackbox_exporter does.
    pub fn record_phase(&mut self, name: &'static str, took: Duration) {
        match self.phases.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += took,
            None => self.phases.push((name, took)),
        }
    }

    /// The phase that was running when the run was cut short.
    pub fn current_phase(&self) -> Option<&'static str> {
        self.current.map(|(name, _)| name)
    }

    /// The finished phases in order.
    pub fn phases(&self) -> &[(&'static str, Duration)] {
        &self.phases
    }
}

/// The result of one probe execution as the scheduler publishes it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `Ok` or the failure.
    pub result: Result<(), Failure>,
    /// Wall time from start (including resolution) to end or timeout.
    pub duration: Duration,
    /// Finished phases with their durations.
    pub phases: Vec<(&'static str, Duration)>,
    /// Certificate facts, when a TLS handshake got as far as a certificate.
    pub cert: Option<CertFacts>,
    /// What the probe measured beyond success and phases.
    pub measurements: Vec<Measurement>,
    /// Findings for people that are no failure (see [`Run::notes`]).
    pub notes: Vec<String>,
    /// For `live`: the address DNS handed out and the environment it belongs to.
    pub resolved: Option<(IpAddr, String)>,
    /// When the run started, Unix seconds.
    pub started_at: f64,
}

impl Outcome {
    /// Whether the probe succeeded.
    pub fn success(&self) -> bool {
        self.result.is_ok()
    }
}

impl From<tls::TlsFailure> for FailureReason {
    fn from(kind: tls::TlsFailure) -> Self {
        match kind {
            tls::TlsFailure::Handshake => FailureReason::TlsHandshake,
            tls::TlsFailure::Untrusted => FailureReason::CertUntrusted,
            tls::TlsFailure::Expired => FailureReason::CertExpired,
            tls::TlsFailure::NameMismatch => FailureReason::CertNameMismatch,
        }
    }
}

/// A TLS handshake over `stream` as phase `tls`, verifying the certificate
/// for `hostname` against `roots`; the certificate's facts land in
/// `run.cert` whether or not the verification succeeds.
pub async fn tls_handshake<S>(
    stream: S,
    hostname: &str,
    roots: &Arc<rustls::RootCertStore>,
    alpn: &[&[u8]],
    run: &mut Run,
) -> Result<tokio_rustls::client::TlsStream<S>, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (result, facts) = run.phase("tls", tls::handshake(stream, hostname, roots, alpn)).await;
    if facts.is_some() {
        run.cert = facts;
    }
    result.map_err(|e| Failure::new(e.kind.into(), e.detail))
}

/// Opens a TCP connection to `ip:port` as phase `connect`.
pub async fn connect(ip: IpAddr, port: u16, run: &mut Run) -> Result<tokio::net::TcpStream, Failure> {
    run.phase("connect", tokio::net::TcpStream::connect((ip, port)))
        .await
        .map_err(|e| Failure::io(&e))
        .in_phase("connect")
}

/// Maps a phase-timed failure onto [`Failure`], keeping the first phase set.
pub trait InPhase<T> {
    /// Tags the failure with the phase it happened in.
    fn in_phase(self, phase: &'static str) -> Result<T, Failure>;
}

impl<T> InPhase<T> for Result<T, Failure> {
    fn in_phase(self, phase: &'static str) -> Result<T, Failure> {
        self.map_err(|mut f| {
            f.phase.get_or_insert(phase);
            f
        })
    }
}
