//! The check file: its schema, defaults, validation and secrets, in one place.
//!
//! Loading reports every problem at once, each as `file:line:col: field: message`,
//! because on migration night nobody wants to fix a config one error per restart.
//! Secrets are read from environment variables or files at load time and live
//! only inside [`Secret`], which never prints its value.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use schemars::JsonSchema;
use serde::de::{self, DeserializeOwned};
use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml::{Mapping, Value};

use crate::timestamp;

/// Default time between two runs of one check instance.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Default deadline for one run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Schema: what a user writes.
// ---------------------------------------------------------------------------

/// Values every check inherits unless it sets its own.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    /// Time between runs of each check instance, e.g. `30s`.
    pub interval: Option<Dur>,
    /// Deadline for one run; must be below the interval.
    pub timeout: Option<Dur>,
    /// PEM file of extra CAs trusted besides the system roots (relative paths are
    /// relative to the check file).
    pub ca_file: Option<PathBuf>,
    /// Most probe runs in flight at once, daemon-wide; 256 when omitted. Runs
    /// beyond it wait for a slot, and their timeout starts when they get one.
    pub max_concurrent_probes: Option<usize>,
}

/// Default for `defaults.max_concurrent_probes`: far above what a migration's
/// checks run at once (a run takes ~100 ms every 30 s), yet 256 runs of at most
/// a few sockets each stay well inside the usual 1024 file descriptor limit.
pub const DEFAULT_MAX_CONCURRENT_PROBES: usize = 256;

/// An environment: either pinned to addresses, or `live` through a resolver.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSpec {
    /// The environment's IPv4/IPv6 addresses; each is probed and labelled.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// For a live environment: the resolver to ask at probe time, `system` or
    /// `IP[:port]`. Mutually exclusive with `addresses`.
    pub resolver: Option<ResolverAddr>,
}

/// A credential referenced by checks by name. The password comes only from an
/// environment variable or a file, never from the check file itself.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// Login name.
    pub username: String,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
}

/// Fields every check has, whatever its kind.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommonSpec {
    /// Unique name; the `check` label.
    pub name: String,
    /// Environments to run in; all of them when omitted.
    #[serde(default)]
    pub envs: Vec<String>,
    /// Overrides `defaults.interval`.
    pub interval: Option<Dur>,
    /// Overrides `defaults.timeout`.
    pub timeout: Option<Dur>,
    /// Overrides `defaults.ca_file`.
    pub ca_file: Option<PathBuf>,
}

/// The protocol-specific part of a check, selected by its `kind` field.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KindSpec {
    /// An HTTP(S) request, e.g. the webmail page.
    Http(HttpSpec),
    /// A TCP connection, optionally with implicit TLS and a banner check.
    Tcp(TcpSpec),
    /// An IMAP login: greeting, capabilities, STARTTLS, LOGIN, EXAMINE, LOGOUT.
    Imap(ImapSpec),
    /// An SMTP session: MX acceptance, authenticated submission or a relay check.
    Smtp(SmtpSpec),
    /// What each resolver answers for the records that move, against old and new.
    Dns(DnsSpec),
    /// SPF, PTR/FCrDNS, DKIM and DMARC records, evaluated for every outbound address.
    MailAuth(MailAuthSpec),
    /// End-to-end mail flow: one probe mail per interval, found again over IMAP.
    Mailflow(MailflowSpec),
    /// Audit of the customers' own domains: which still point at old addresses.
    HostedDomains(HostedDomainsSpec),
    /// A real webmail session: login page, login, mail page, message list, logout.
    WebmailLogin(WebmailLoginSpec),
    /// CalDAV or CardDAV: discovery, principal, collections, a read, optionally a write.
    Dav(DavSpec),
    /// Audit of every listed mailbox: old and new compared folder by folder over IMAP.
    MailboxParity(MailboxParitySpec),
}

impl KindSpec {
    /// Which kind, without its spec.
    pub fn kind(&self) -> Kind {
        match self {
            KindSpec::Http(_) => Kind::Http,
            KindSpec::Tcp(_) => Kind::Tcp,
            KindSpec::Imap(_) => Kind::Imap,
            KindSpec::Smtp(_) => Kind::Smtp,
            KindSpec::Dns(_) => Kind::Dns,
            KindSpec::MailAuth(_) => Kind::MailAuth,
            KindSpec::Mailflow(_) => Kind::Mailflow,
            KindSpec::HostedDomains(_) => Kind::HostedDomains,
            KindSpec::WebmailLogin(_) => Kind::WebmailLogin,
            KindSpec::Dav(_) => Kind::Dav,
            KindSpec::MailboxParity(_) => Kind::MailboxParity,
        }
    }

    /// The `kind` label value.
    pub fn name(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// A check's kind, for code that asks what a check is (the `kind` label, the
/// kinds `check` leaves to other commands) without matching its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `http`.
    Http,
    /// `tcp`.
    Tcp,
    /// `imap`.
    Imap,
    /// `smtp`.
    Smtp,
    /// `dns`.
    Dns,
    /// `mail_auth`.
    MailAuth,
    /// `mailflow`.
    Mailflow,
    /// `hosted_domains`.
    HostedDomains,
    /// `webmail_login`.
    WebmailLogin,
    /// `dav`.
    Dav,
    /// `mailbox_parity`.
    MailboxParity,
}

impl Kind {
    /// Every kind, in the order the check-file reference lists them.
    pub const ALL: [Kind; 11] = [
        Kind::Http,
        Kind::Tcp,
        Kind::Smtp,
        Kind::Imap,
        Kind::Dns,
        Kind::MailAuth,
        Kind::Mailflow,
        Kind::HostedDomains,
        Kind::WebmailLogin,
        Kind::Dav,
        Kind::MailboxParity,
    ];

    /// The `kind` label value and the check file's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tcp => "tcp",
            Kind::Imap => "imap",
            Kind::Smtp => "smtp",
            Kind::Dns => "dns",
            Kind::MailAuth => "mail_auth",
            Kind::Mailflow => "mailflow",
            Kind::HostedDomains => "hosted_domains",
            Kind::WebmailLogin => "webmail_login",
            Kind::Dav => "dav",
            Kind::MailboxParity => "mailbox_parity",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// Hashed by name, so an instance's slot in its interval (a hash of its labels)
// does not move with the enum's layout.
impl std::hash::Hash for Kind {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `kind: http`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// The URL with the production hostname, e.g. `https://webmail.example.test/`.
    pub url: String,
    /// Request method; `GET` when omitted.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Redirects to follow before giving up; 5 when omitted, 0 disables.
    #[serde(default = "default_redirects")]
    pub max_redirects: u32,
    /// What the response must look like.
    #[serde(default)]
    pub expect: HttpExpect,
}

/// Expectations on an HTTP response.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpExpect {
    /// Accepted status codes; any 2xx when empty.
    #[serde(default)]
    pub status: Vec<u16>,
    /// A substring the body must contain.
    pub body_contains: Option<String>,
    /// A regular expression the body must match.
    pub body_regex: Option<Pattern>,
    /// Response headers (case-insensitive names) whose value must match.
    #[serde(default)]
    pub headers: BTreeMap<String, Pattern>,
}

/// `kind: webmail_login`: one real session per run, as a user's browser
/// would have it, so a webmail that serves its login page but cannot log in
/// (storage down, sessions not stored, password not migrated) is caught.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebmailLoginSpec {
    /// The login page with the production hostname, e.g.
    /// `https://webmail.example.com/roundcube/`.
    pub url: String,
    /// Which webmail answers there; each speaks its own login protocol.
    pub app: WebmailApp,
    /// Name of a `credentials` entry to log in with.
    pub credentials: String,
    /// The mailbox whose message list is fetched; `INBOX` when omitted.
    #[serde(default = "default_mailbox")]
    pub mailbox: String,
    /// After the server rejects the password, the runs of this long send
    /// nothing (and report `auth_failed`), so a wrong password never locks
    /// the account; `5m` when omitted.
    pub auth_backoff: Option<Dur>,
}

/// Default for `auth_backoff`: longer than the usual failed-login windows of
/// webmail and IMAP servers (Roundcube: 3 a minute), short enough that a
/// fixed password shows up within minutes.
pub const DEFAULT_AUTH_BACKOFF: Duration = Duration::from_secs(300);

/// The webmail applications `webmail_login` can log in to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebmailApp {
    /// Roundcube (1.5, 1.6): `_token` form login, `?_task=mail` AJAX list.
    Roundcube,
}

impl WebmailApp {
    /// The `app` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            WebmailApp::Roundcube => "roundcube",
        }
    }
}

/// `kind: tcp`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpSpec {
    /// Production hostname (resolved by `live`, used for TLS).
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// Wrap the connection in TLS right away (implicit TLS, e.g. 993/465).
    #[serde(default)]
    pub tls: bool,
    /// A regular expression the first line the server sends must match.
    pub expect_banner: Option<Pattern>,
}

/// `kind: smtp`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SmtpSpec {
    /// Production hostname (resolved by `live`, used for TLS).
    pub host: String,
    /// Port; 25 for `mx` and `relay_check`, 587 for `submission`, 465 with `tls: implicit`.
    pub port: Option<u16>,
    /// What the session proves.
    pub mode: SmtpMode,
    /// How the session is encrypted; `starttls` (required to be offered) when omitted.
    #[serde(default)]
    pub tls: SmtpTls,
    /// The name sent with EHLO; `cutover-monitor.invalid` when omitted.
    pub helo: Option<String>,
    /// Name of a `credentials` entry; required for `submission`.
    pub credentials: Option<String>,
    /// Envelope sender; the credential's username for `submission`, `<>` otherwise.
    pub mail_from: Option<String>,
    /// Envelope recipient: a local one that must be accepted (`mx`), an external
    /// one that must be rejected (`relay_check`), or where to send one probe
    /// message (`submission`, optional).
    pub rcpt_to: Option<String>,
    /// What the server must look like.
    #[serde(default)]
    pub expect: SmtpExpect,
}

/// What an `smtp` check proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SmtpMode {
    /// Inbound mail: a local recipient is accepted; nothing is sent.
    Mx,
    /// Users sending mail: AUTH succeeds, optionally one message is sent.
    Submission,
    /// An external recipient is rejected without AUTH (no open relay).
    #[serde(alias = "relay-check")]
    RelayCheck,
}

/// How an `smtp` session is encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain connect, then STARTTLS, which must be offered and work.
    #[default]
    Starttls,
    /// TLS from the first byte (465).
    Implicit,
    /// No TLS at all; only when the check says so.
    None,
}

/// Expectations on an SMTP server's greeting and capabilities.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SmtpExpect {
    /// Must match the text of the banner's first line (without the code).
    pub banner: Option<Pattern>,
    /// Must match the text of the EHLO reply's first line, the server's name.
    pub ehlo: Option<Pattern>,
    /// EHLO extensions that must be offered, e.g. `SIZE`, `8BITMIME`, `AUTH PLAIN`.
    #[serde(default)]
    pub extensions: Vec<String>,
}

/// `kind: imap`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImapSpec {
    /// Production hostname (resolved by `live`, used for TLS).
    pub host: String,
    /// Port; 993 with `tls: implicit`, 143 otherwise.
    pub port: Option<u16>,
    /// How the session is encrypted; `implicit` (993) when omitted.
    #[serde(default)]
    pub tls: ImapTls,
    /// Name of a `credentials` entry to log in with.
    pub credentials: String,
    /// How to log in; `login` when omitted.
    #[serde(default)]
    pub auth: ImapAuth,
    /// Mailbox opened read-only (EXAMINE); `INBOX` when omitted.
    #[serde(default = "default_mailbox")]
    pub mailbox: String,
    /// What the server and the mailbox must look like.
    #[serde(default)]
    pub expect: ImapExpect,
}

/// How an `imap` session is encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImapTls {
    /// TLS from the first byte (993).
    #[default]
    Implicit,
    /// Plain connect (143), then STARTTLS, which must be offered and work.
    Starttls,
    /// No TLS at all, password in clear; only when the check says so.
    None,
}

/// How an `imap` check logs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImapAuth {
    /// The LOGIN command.
    #[default]
    Login,
    /// AUTHENTICATE PLAIN (SASL).
    Plain,
}

/// Expectations on an IMAP server and mailbox.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImapExpect {
    /// Must match the greeting's text (after `* OK` and any `[...]` code),
    /// e.g. `Dovecot \(new\)` to prove which server answered.
    pub greeting: Option<Pattern>,
    /// Must match the capability list, space-separated, e.g. `AUTH=PLAIN`.
    pub capability: Option<Pattern>,
    /// Folders that must exist (LIST), e.g. `Sent`, `Trash`.
    #[serde(default)]
    pub folders: Vec<String>,
    /// The mailbox must hold at least this many messages.
    pub min_messages: Option<u64>,
}

fn default_mailbox() -> String {
    "INBOX".into()
}

fn default_method() -> String {
    "GET".into()
}

fn default_redirects() -> u32 {
    5
}

/// `kind: dav`: what a calendar or contacts client does, in one run per
/// environment: RFC 6764 discovery, the principal and its home, the home's
/// collections, one read, and (opt-in) a write round trip.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DavSpec {
    /// `caldav` or `carddav`: which well-known path, home set and query.
    pub service: DavService,
    /// The server's root with the production hostname, e.g. `https://dav.example.com/`;
    /// HTTPS only, since every request carries Basic credentials.
    pub url: String,
    /// Name of a `credentials` entry.
    pub credentials: String,
    /// The collection (name under the home, e.g. `calendar`) that is read and counted.
    pub collection: String,
    /// CalDAV only: the calendar-query's time range; wide (2000 to 2100) when omitted.
    pub time_range: Option<DavTimeRange>,
    /// PUT, GET and DELETE one probe object per run; off when omitted.
    #[serde(default)]
    pub write: bool,
    /// Where the round trip writes; `collection` when omitted.
    pub write_collection: Option<String>,
    /// Paths (e.g. `/SOGo/dav/`) that old clients still use: each must answer
    /// 2xx or a redirect.
    #[serde(default)]
    pub legacy_urls: Vec<String>,
    /// What the home must hold.
    #[serde(default)]
    pub expect: DavExpect,
}

/// Which DAV service a `dav` check speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DavService {
    /// Calendars (RFC 4791).
    Caldav,
    /// Address books (RFC 6352).
    Carddav,
}

/// A calendar-query time range, in iCalendar UTC form (`20300101T000000Z`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DavTimeRange {
    /// Inclusive start.
    pub start: String,
    /// Exclusive end.
    pub end: String,
}

/// Expectations on a DAV home.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DavExpect {
    /// Collection names (last path segment) that must exist in the home.
    #[serde(default)]
    pub collections: Vec<String>,
    /// The home must hold at least this many collections of the service's type.
    pub min_collections: Option<u64>,
}

/// `kind: dns`. Runs once per resolver, not per environment, so it takes no `envs`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsSpec {
    /// The resolvers to ask, by name (the `resolver` label), e.g. `authoritative: 192.0.2.53`.
    pub resolvers: BTreeMap<String, IpAddr>,
    /// The port every resolver listens on; 53 when omitted.
    #[serde(default = "default_dns_port")]
    pub port: u16,
    /// The records to watch.
    pub records: Vec<DnsRecordSpec>,
}

/// One record a `dns` check watches, with its values before and after the move.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsRecordSpec {
    /// The name to ask for (the `record` label); a PTR may name an IP address.
    pub name: String,
    /// The record type.
    #[serde(rename = "type")]
    pub rtype: DnsRecordType,
    /// Values before the move: an IP for A/AAAA, `10 mx.example.com` for MX, the
    /// text for TXT, a name for CNAME/PTR, `PRIORITY WEIGHT PORT TARGET` for SRV.
    #[serde(default)]
    pub old: Vec<String>,
    /// Values after the move, written like `old`.
    #[serde(default)]
    pub new: Vec<String>,
    /// For A/AAAA: `old` and `new` are the addresses of the `old` and `new`
    /// environments, written once in `environments`.
    #[serde(default)]
    pub expect_env_addresses: bool,
}

/// A record type a `dns` check can watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DnsRecordType {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
    /// Mail exchanger.
    Mx,
    /// Text (SPF, DKIM, verification tokens).
    Txt,
    /// Alias.
    Cname,
    /// Service location (e.g. `_imaps._tcp`).
    Srv,
    /// Reverse name.
    Ptr,
}

fn default_dns_port() -> u16 {
    53
}

/// `kind: mail_auth`. Runs once per check and evaluates every outbound
/// environment in that run, so it takes `outbound` instead of `envs`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MailAuthSpec {
    /// The mail domain whose records are checked, e.g. `example.com`.
    pub domain: String,
    /// The DNS server asked for every record: `IP` or `IP:port`.
    pub resolver: ResolverAddr,
    /// Environments whose addresses send mail; every pinned one when omitted.
    #[serde(default)]
    pub outbound: Vec<String>,
    /// Environments whose addresses must get SPF `pass`, or the check fails;
    /// `[new]` when omitted (and there is a `new` environment).
    pub require_pass: Option<Vec<String>>,
    /// DKIM selector whose key record (`<selector>._domainkey.<domain>`) must exist.
    pub dkim_selector: Option<String>,
    /// The outbound servers' HELO name, for SPF's `%{h}` macro; the domain when omitted.
    pub helo: Option<String>,
}

/// Where a live environment resolves names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolverAddr {
    /// The operating system's resolver, as ordinary clients use it.
    System,
    /// A specific DNS server, asked directly.
    Server(SocketAddr),
}

impl<'de> Deserialize<'de> for ResolverAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "system" {
            return Ok(ResolverAddr::System);
        }
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(ResolverAddr::Server(addr));
        }
        text.parse::<IpAddr>()
            .map(|ip| ResolverAddr::Server(SocketAddr::new(ip, 53)))
            .map_err(|_| de::Error::custom(format!("expected `system`, `IP` or `IP:port`, got `{text}`")))
    }
}

impl JsonSchema for ResolverAddr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ResolverAddr".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "description": "`system`, `IP` or `IP:port`"})
    }
}

/// Default time between two probe mails of a `mailflow` check: mail is heavier
/// than a login, so it does not inherit `defaults.interval`.
pub const DEFAULT_MAILFLOW_INTERVAL: Duration = Duration::from_secs(60);

/// `kind: mailflow`: a route. Each environment of the check sends one probe
/// mail per interval (`live` through whatever DNS hands out); the watched
/// mailboxes find it again.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MailflowSpec {
    /// How each probe mail is sent.
    pub send: MailflowSend,
    /// Mailboxes where probe mails may land; watch old AND new during the switch.
    pub watch: Vec<MailflowWatch>,
    /// A mail not seen after this long counts as late; `2m` when omitted.
    pub late_after: Option<Dur>,
    /// A mail not seen after this long counts as lost; `15m` when omitted.
    pub lost_after: Option<Dur>,
    /// Finished ledger entries older than this are pruned; `7d` when omitted.
    pub retention: Option<Dur>,
    /// File with the key that signs probe markers; generated into the storage
    /// directory when neither this nor `hmac_key_env` is set.
    pub hmac_key_file: Option<PathBuf>,
    /// Environment variable with the marker key.
    pub hmac_key_env: Option<String>,
}

/// How a `mailflow` check sends.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MailflowSend {
    /// `submission` (AUTH, 587/465) or `mx` (no AUTH, port 25, local recipient).
    pub mode: SmtpMode,
    /// Production hostname of the SMTP server (resolved by `live`, used for TLS).
    pub host: String,
    /// Port; 587 for `submission`, 25 for `mx`, 465 with `tls: implicit`.
    pub port: Option<u16>,
    /// How the session is encrypted; `starttls` when omitted.
    #[serde(default)]
    pub tls: SmtpTls,
    /// Name of a `credentials` entry; required for `submission`.
    pub credentials: Option<String>,
    /// Envelope and header sender; the credential's username when omitted.
    pub from: Option<String>,
    /// The recipient whose mailbox is watched.
    pub to: String,
}

/// One mailbox a `mailflow` check watches.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MailflowWatch {
    /// A pinned environment: its first address is where the watcher connects,
    /// and its name is the `delivered_env` label.
    pub env: String,
    /// Production hostname of the IMAP server (for TLS).
    pub host: String,
    /// Port; 993 with `tls: implicit`, 143 otherwise.
    pub port: Option<u16>,
    /// How the session is encrypted; `implicit` when omitted.
    #[serde(default)]
    pub tls: ImapTls,
    /// Name of a `credentials` entry to log in with.
    pub credentials: String,
    /// The mailbox probe mails land in; `INBOX` when omitted.
    #[serde(default = "default_mailbox")]
    pub mailbox: String,
    /// The environment's addresses, filled in by the loader.
    #[serde(skip)]
    #[schemars(skip)]
    pub addresses: Vec<IpAddr>,
}

/// Default time between two audits of a `hosted_domains` check: customers fix
/// their DNS in hours, and an audit asks thousands of questions.
pub const DEFAULT_AUDIT_INTERVAL: Duration = Duration::from_secs(3600);

/// `kind: hosted_domains`: the customers' own domains, read from a file, each
/// classified by what in its DNS still points at the old environment (MX host,
/// SPF literal, autoconfig) or will fail from the new one (SPF evaluation).
/// Runs once per check through its own resolvers, so it takes no `envs`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostedDomainsSpec {
    /// One domain per line; `#` starts a comment. Relative to the check file;
    /// read again on every reload.
    pub domains_file: PathBuf,
    /// The resolvers to ask, by name (the `resolver` label); queries are spread
    /// over them and a failed one is retried on the next.
    pub resolvers: BTreeMap<String, IpAddr>,
    /// The port every resolver listens on; 53 when omitted.
    #[serde(default = "default_dns_port")]
    pub port: u16,
    /// The provider's MX host names: an MX pointing at one of them is fine
    /// whatever its address.
    pub mx_hosts: Vec<String>,
    /// The SPF include the provider publishes for its outbound servers, e.g.
    /// `spf.example.com`; suggested fixes recommend it.
    pub spf_include: String,
    /// Names at or under these domains are the provider's (CNAME and SRV
    /// targets of autoconfig); the parents of `mx_hosts` and `spf_include` when omitted.
    #[serde(default)]
    pub provider_domains: Vec<String>,
    /// The environment being left; `old` when omitted.
    #[serde(default = "default_old_env")]
    pub old_env: String,
    /// The environment being moved to; `new` when omitted.
    #[serde(default = "default_new_env")]
    pub new_env: String,
    /// Outbound (sending) addresses per environment, when they differ from the
    /// environment's `addresses` (which are taken as inbound and outbound).
    #[serde(default)]
    pub outbound: BTreeMap<String, Vec<IpAddr>>,
    /// Queries per second allowed to each resolver; 50 when omitted.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: f64,
    /// Domains audited at the same time; 16 when omitted.
    #[serde(default = "default_audit_concurrency")]
    pub concurrency: usize,
    /// Deadline for one query; `2s` when omitted.
    pub query_timeout: Option<Dur>,
    /// Further attempts (on the next resolver) after a query times out or
    /// fails with SERVFAIL/REFUSED; 2 when omitted.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The HELO name of the new outbound servers, for SPF; the first of `mx_hosts` when omitted.
    pub helo: Option<String>,
    /// `domains_file` made absolute by the loader.
    #[serde(skip)]
    #[schemars(skip)]
    pub domains_path: PathBuf,
}

/// `kind: mailbox_parity`: every account of a file, compared between the old
/// and the new environment over IMAP with an admin login (a Dovecot master
/// user): folders by name or special use, then STATUS of each, never SELECT.
/// Runs once per check against the pinned addresses of `old_env` and
/// `new_env`, so it takes no `envs`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MailboxParitySpec {
    /// One address per line; `#` starts a comment. Relative to the check file;
    /// read again on every reload.
    pub accounts_file: PathBuf,
    /// Production hostname of the IMAP service, verified in each certificate.
    pub host: String,
    /// Port; 993 with `tls: implicit`, 143 otherwise.
    pub port: Option<u16>,
    /// How sessions are encrypted; `implicit` (993) when omitted.
    #[serde(default)]
    pub tls: ImapTls,
    /// Name of the `credentials` entry of the admin (master user) on old.
    pub credentials: String,
    /// The admin on new, when it differs from old's.
    pub new_credentials: Option<String>,
    /// How the admin opens an account's mailbox; `master_user` when omitted.
    #[serde(default)]
    pub admin_login: AdminLogin,
    /// Between account and admin in `master_user` logins; `*` when omitted
    /// (Dovecot's `auth_master_user_separator`).
    #[serde(default = "default_master_separator")]
    pub master_separator: String,
    /// The environment being left; `old` when omitted.
    #[serde(default = "default_old_env")]
    pub old_env: String,
    /// The environment being moved to; `new` when omitted.
    #[serde(default = "default_new_env")]
    pub new_env: String,
    /// IMAP sessions open at once per server; 4 when omitted. An account
    /// never has more than one per side.
    #[serde(default = "default_parity_concurrency")]
    pub concurrency: usize,
    /// Logins per second allowed to each server; 20 when omitted.
    #[serde(default = "default_parity_rate_limit")]
    pub rate_limit: f64,
    /// Further attempts after an account's session fails on the network
    /// (not after a rejected login); 2 when omitted.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Deadline for one account's session on one side; `30s` when omitted.
    pub session_timeout: Option<Dur>,
    /// Where message counts differ, EXAMINE the folder (read-only) on both
    /// sides and add up RFC822.SIZE, for `size_differs` and the bytes missing;
    /// true when omitted.
    #[serde(default = "default_true")]
    pub fetch_sizes: bool,
    /// `accounts_file` made absolute by the loader.
    #[serde(skip)]
    #[schemars(skip)]
    pub accounts_path: PathBuf,
}

/// How a `mailbox_parity` admin logs in as an account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdminLogin {
    /// LOGIN `account*admin` with the admin's password (Dovecot master user).
    #[default]
    MasterUser,
    /// AUTHENTICATE PLAIN with the account as authorization identity and
    /// the admin as authentication identity (RFC 4616).
    Authzid,
}

fn default_master_separator() -> String {
    "*".into()
}

fn default_parity_concurrency() -> usize {
    4
}

fn default_parity_rate_limit() -> f64 {
    20.0
}

fn default_true() -> bool {
    true
}

fn default_old_env() -> String {
    "old".into()
}

fn default_new_env() -> String {
    "new".into()
}

fn default_rate_limit() -> f64 {
    50.0
}

fn default_audit_concurrency() -> usize {
    16
}

fn default_retries() -> u32 {
    2
}

/// A duration written as `30s`, `2m` or `1h30m`; bare numbers are refused
/// because their unit would be a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration like `30s`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                humantime::parse_duration(s)
                    .map(Dur)
                    .map_err(|e| E::custom(format!("expected a duration like `30s`, got `{s}` ({e})")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
                Err(E::custom(format!("expected a duration like `30s`, got `{n}`")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!("expected a duration like `30s`, got `{n}`")))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Dur, E> {
                Err(E::custom(format!("expected a duration like `30s`, got `{n}`")))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^([0-9]+(ns|us|ms|s|m|h|d) *)+$", "examples": ["30s", "2m"]})
    }
}

/// A regular expression, compiled while the config loads so a typo is a
/// config error with a position, not a probe failure at 3 a.m.
#[derive(Debug, Clone)]
pub struct Pattern(pub Regex);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Regex::new(&text)
            .map(Pattern)
            .map_err(|e| de::Error::custom(format!("invalid regular expression: {e}")))
    }
}

impl JsonSchema for Pattern {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Regex".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "regex"})
    }
}

/// The whole check file, for the published JSON Schema only (loading walks the
/// sections one by one to collect every error).
#[derive(JsonSchema)]
#[allow(dead_code)]
struct FileSchema {
    defaults: Option<DefaultsSpec>,
    environments: BTreeMap<String, EnvironmentSpec>,
    credentials: Option<BTreeMap<String, CredentialSpec>>,
    migration: Option<MigrationSpec>,
    checks: Vec<CheckSchema>,
}

#[derive(JsonSchema)]
#[allow(dead_code)]
struct CheckSchema {
    #[serde(flatten)]
    common: CommonSpec,
    #[serde(flatten)]
    kind: KindSpec,
}

/// The JSON Schema of the check file, for editors (`cutover-monitor schema`).
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(FileSchema)).expect("schema serializes")
}

// ---------------------------------------------------------------------------
// The migration's phases: plain data; which one is in force is migration.rs's.
// ---------------------------------------------------------------------------

/// The value of `serving` (and of `cutover_expected_serving_env_info{env}`)
/// when no environment should serve, e.g. while data moves.
pub const NONE: &str = "none";

/// A phase of the migration night, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before the window: old serves, new must get ready.
    Preparation,
    /// Services stopped, data moving: nothing has to serve.
    Window,
    /// DNS and MX point at new: new serves.
    Switched,
    /// Old is being switched off: new serves.
    Decommission,
}

impl Phase {
    /// Every phase, in order: the label values of `cutover_migration_phase`.
    pub const ALL: [Phase; 4] = [Phase::Preparation, Phase::Window, Phase::Switched, Phase::Decommission];

    /// The label value and the name in the check file and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparation => "preparation",
            Phase::Window => "window",
            Phase::Switched => "switched",
            Phase::Decommission => "decommission",
        }
    }

    /// Who serves when the check file does not say.
    pub fn default_serving(self) -> &'static str {
        match self {
            Phase::Preparation => "old",
            Phase::Window => NONE,
            Phase::Switched | Phase::Decommission => "new",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Phase, String> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown phase `{s}`: expected preparation, window, switched or decommission"))
    }
}

// ---------------------------------------------------------------------------
// Schema and validation.
// ---------------------------------------------------------------------------

/// `migration:` in the check file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationSpec {
    /// The phases in time order; each lasts until its `end`, or until the next one starts.
    pub phases: Vec<PhaseSpec>,
}

/// One phase of `migration.phases`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    /// `preparation`, `window`, `switched` or `decommission`.
    pub name: Phase,
    /// When it starts, RFC 3339, e.g. `2025-06-14T22:00:00+02:00`.
    pub start: Rfc3339,
    /// When it ends; when omitted, it lasts until the next phase starts.
    pub end: Option<Rfc3339>,
    /// The environment that should serve: a pinned environment's name or
    /// `none`; `old` for preparation, `none` for window, `new` after.
    pub serving: Option<String>,
}

/// A point in time written as RFC 3339 (`2025-06-14T22:00:00Z`, or with an
/// offset), checked while the config loads.
#[derive(Debug, Clone, PartialEq)]
pub struct Rfc3339 {
    /// Unix seconds.
    pub unix: f64,
}

impl<'de> Deserialize<'de> for Rfc3339 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            .map(|t| Rfc3339 {
                unix: t.unix_timestamp_nanos() as f64 / 1e9,
            })
            .map_err(|e| {
                de::Error::custom(format!(
                    "expected an RFC 3339 time like `2025-06-14T22:00:00+02:00`, got `{text}` ({e})"
                ))
            })
    }
}

impl JsonSchema for Rfc3339 {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rfc3339".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time", "examples": ["2025-06-14T22:00:00+02:00"]})
    }
}

/// One validated phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseWindow {
    /// Which phase.
    #[serde(rename = "name")]
    pub phase: Phase,
    /// Start, Unix seconds.
    pub start: f64,
    /// End as written, Unix seconds.
    pub end: Option<f64>,
    /// The environment that should serve, or [`NONE`].
    pub serving: String,
}

/// The validated `migration` section; empty when the file has none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Migration {
    /// Phases in time order.
    pub phases: Vec<PhaseWindow>,
}

/// Validates `migration:`, recording every problem with its position.
fn load_migration(l: &mut Loader, value: Option<Value>, environments: &[Arc<Environment>]) -> Migration {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Migration::default();
    };
    // Each phase on its own, so every problem is reported, not just the first.
    let Value::Mapping(mut map) = value else {
        l.error("migration", "expected a mapping with `phases`");
        return Migration::default();
    };
    for key in map.keys() {
        if key.as_str() != Some("phases") {
            let name = key.as_str().unwrap_or("?");
            l.error(
                format!("migration.{name}"),
                format!("unknown field `{name}`, expected `phases`"),
            );
        }
    }
    let items = match map.remove("phases") {
        Some(Value::Sequence(items)) if !items.is_empty() => items,
        Some(Value::Sequence(_)) | None => {
            l.error(
                "migration.phases",
                "list at least one phase, e.g. `- {name: switched, start: 2025-06-14T23:00:00+02:00}`",
            );
            return Migration::default();
        }
        Some(_) => {
            l.error("migration.phases", "expected a list of phases");
            return Migration::default();
        }
    };
    let mut out: Vec<PhaseWindow> = Vec::new();
    let mut prev_at = 0;
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("migration.phases[{i}]");
        let Some(p) = l.parse::<PhaseSpec>(item, &at) else {
            continue;
        };
        if out.iter().any(|w| w.phase == p.name) {
            l.error(format!("{at}.name"), format!("phase `{}` is listed twice", p.name));
        }
        if let Some(end) = &p.end {
            if end.unix <= p.start.unix {
                l.error(
                    format!("{at}.end"),
                    format!(
                        "phase `{}` ends ({}) before it starts ({})",
                        p.name,
                        timestamp(end.unix),
                        timestamp(p.start.unix)
                    ),
                );
            }
        }
        let serving = p
            .serving
            .clone()
            .unwrap_or_else(|| p.name.default_serving().to_string());
        if serving != NONE {
            let field = if p.serving.is_some() {
                format!("{at}.serving")
            } else {
                format!("{at}.name")
            };
            match environments.iter().find(|e| e.name == serving).map(|e| &e.kind) {
                Some(EnvKind::Pinned(_)) => {}
                Some(EnvKind::Live(_)) => l.error(
                    field,
                    format!("`{serving}` follows DNS: name the pinned environment that should serve, or `none`"),
                ),
                None if p.serving.is_some() => l.error(
                    field,
                    format!("unknown environment `{serving}`: expected `none` or {}", env_names(environments)),
                ),
                None => l.error(
                    field,
                    format!(
                        "phase `{}` is served by `{serving}` unless `serving` says otherwise, and there is no environment `{serving}`",
                        p.name
                    ),
                ),
            }
        }
        if let Some(prev) = out.last() {
            if p.name < prev.phase {
                l.error(
                    format!("{at}.name"),
                    format!(
                        "phase `{}` comes after `{}` (migration.phases[{prev_at}]): list phases in the order preparation, window, switched, decommission",
                        p.name, prev.phase
                    ),
                );
            } else if p.start.unix <= prev.start {
                l.error(
                    format!("{at}.start"),
                    format!(
                        "phase `{}` starts ({}) no later than `{}` (migration.phases[{prev_at}], {}): phases follow each other in time",
                        p.name,
                        timestamp(p.start.unix),
                        prev.phase,
                        timestamp(prev.start)
                    ),
                );
            } else if let Some(end) = prev.end.filter(|e| *e > p.start.unix) {
                l.error(
                    format!("{at}.start"),
                    format!(
                        "phase `{}` starts ({}) before `{}` (migration.phases[{prev_at}]) ends ({}): phases must not overlap",
                        p.name,
                        timestamp(p.start.unix),
                        prev.phase,
                        timestamp(end)
                    ),
                );
            }
        }
        prev_at = i;
        out.push(PhaseWindow {
            phase: p.name,
            start: p.start.unix,
            end: p.end.map(|e| e.unix),
            serving,
        });
    }
    Migration { phases: out }
}

fn env_names(environments: &[Arc<Environment>]) -> String {
    let names: Vec<String> = environments
        .iter()
        .filter(|e| matches!(e.kind, EnvKind::Pinned(_)))
        .map(|e| format!("`{}`", e.name))
        .collect();
    if names.is_empty() {
        "a pinned environment".into()
    } else {
        format!("one of {}", names.join(", "))
    }
}

// ---------------------------------------------------------------------------
// Validated configuration: what the daemon runs.
// ---------------------------------------------------------------------------

/// A password or token. Its value is reachable only through [`Secret::expose`];
/// `Debug` prints a placeholder so it cannot leak through logging.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret read outside the check file (the `phase` command's web password).
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value, for handing to a protocol library. Never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A resolved credential.
#[derive(Debug, Clone)]
pub struct Credential {
    /// Login name.
    pub username: String,
    /// The password, loaded from its variable or file.
    pub password: Secret,
}

/// Named credentials, shared by the checks that refer to them.
pub type Credentials = BTreeMap<String, Arc<Credential>>;

/// How an environment is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum EnvKind {
    /// Always these addresses, whatever DNS says: old and new before the switch.
    Pinned(Vec<IpAddr>),
    /// Whatever the resolver hands out at probe time, as users see it.
    Live(ResolverAddr),
}

/// A named environment (`old`, `new`, `live`, or any name).
#[derive(Debug, Clone, PartialEq)]
pub struct Environment {
    /// The `env` label value.
    pub name: String,
    /// Pinned or live.
    pub kind: EnvKind,
}

/// A validated check.
#[derive(Debug)]
pub struct Check {
    /// The `check` label value.
    pub name: String,
    /// Environments it runs in.
    pub envs: Vec<Arc<Environment>>,
    /// Time between runs.
    pub interval: Duration,
    /// Deadline for one run.
    pub timeout: Duration,
    /// System roots plus the configured CA file.
    pub roots: Arc<RootCertStore>,
    /// The protocol-specific spec.
    pub kind: KindSpec,
}

/// A check with what was built from it: its probe, in the daemon (the
/// loader builds nothing itself; see [`load`]).
#[derive(Clone)]
pub struct LoadedCheck<P> {
    /// The validated check.
    pub check: Arc<Check>,
    /// Its probe.
    pub probe: P,
}

/// The validated configuration, each check with what `P` the layer above
/// built from it (its probe).
#[derive(Clone)]
pub struct Config<P> {
    /// The file it came from.
    pub path: PathBuf,
    /// Environments in file order.
    pub environments: Vec<Arc<Environment>>,
    /// Checks in file order.
    pub checks: Vec<LoadedCheck<P>>,
    /// Slots for probe runs in flight (`defaults.max_concurrent_probes`).
    pub probe_slots: Arc<tokio::sync::Semaphore>,
    /// The migration's phases (`migration`); empty without that section.
    pub migration: Migration,
    /// Credential usernames, so status surfaces can blank them out of server replies.
    pub usernames: Vec<String>,
}

impl<P> Config<P> {
    /// The pinned environment an address belongs to, for labelling `live` answers.
    pub fn env_of(&self, ip: IpAddr) -> Option<&str> {
        self.environments.iter().find_map(|e| match &e.kind {
            EnvKind::Pinned(addrs) if addrs.contains(&ip) => Some(e.name.as_str()),
            _ => None,
        })
    }
}

// ---------------------------------------------------------------------------
// Errors with positions.
// ---------------------------------------------------------------------------

/// A problem with one field of a check's spec, found while building its
/// probe; the loader turns it into a [`ConfigError`] at that field's position.
#[derive(Debug, Clone)]
pub struct FieldError {
    /// Field path relative to the check, e.g. `url` or `expect.status`.
    pub field: String,
    /// What is wrong and what is expected instead.
    pub message: String,
}

impl FieldError {
    /// Shorthand used by probe constructors.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// One problem in a check file, with where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The check file.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem is not at a place in the file.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// The field path, e.g. `checks[2].timeout`.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: a problem of the file as a whole, without a position.
        if self.line == 0 {
            write!(f, "{}: ", self.file.display())?;
        } else {
            write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        }
        if !self.field.is_empty() {
            write!(f, "field `{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// The most a secret file (password, HMAC key) may hold.
pub const SECRET_FILE_LIMIT: u64 = 64 * 1024;

/// Reads a small operator-named file (a secret, a key, a certificate) without
/// hanging on what is no file: a FIFO, `/dev/zero` or a directory is refused
/// before reading (opened non-blocking, so a FIFO without a writer does not
/// block), and at most `limit` bytes are read. The error is the reason only
/// (the caller names the file and field): an I/O error's kind, or why the
/// file was refused.
pub fn read_small_file(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.kind().to_string())?;
    let meta = file.metadata().map_err(|e| e.kind().to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.kind().to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("larger than the limit of {limit} bytes"));
    }
    Ok(bytes)
}

/// Every problem found in a check file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// One problem with the file as a whole (unreadable, not a mapping), at
    /// `line:col` when known and `0:0` otherwise.
    pub(crate) fn whole(file: &Path, line: usize, col: usize, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            line,
            col,
            field: String::new(),
            message: message.into(),
        }])
    }

    /// A YAML syntax error, at the position serde_yaml gives.
    pub(crate) fn yaml(file: &Path, e: &serde_yaml::Error) -> Self {
        let (line, col) = e.location().map(|p| (p.line(), p.column())).unwrap_or((0, 0));
        Self::whole(file, line, col, e.to_string())
    }
}

/// Field path -> position of its key (or, for sequence items, the item).
struct Positions(HashMap<String, (usize, usize)>);

impl Positions {
    fn index(text: &str) -> Positions {
        let mut indexer = Indexer::default();
        // Syntax errors are reported by serde_yaml with their own position.
        let _ = yaml_rust2::parser::Parser::new_from_str(text).load(&mut indexer, false);
        Positions(indexer.positions)
    }

    /// The position of `field`, or of its nearest ancestor that has one.
    fn find(&self, field: &str) -> (usize, usize) {
        let mut path = field;
        loop {
            if let Some(pos) = self.0.get(path) {
                return *pos;
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return self.0.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}

#[derive(Default)]
struct Indexer {
    stack: Vec<Frame>,
    positions: HashMap<String, (usize, usize)>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

impl Indexer {
    /// Called for every node; returns its path when it is a value (not a key).
    fn node(&mut self, scalar: Option<&str>, mark: yaml_rust2::scanner::Marker) -> Option<String> {
        let pos = (mark.line(), mark.col() + 1);
        match self.stack.last_mut() {
            None => {
                self.positions.insert(String::new(), pos);
                Some(String::new())
            }
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    let name = scalar.unwrap_or("?").to_string();
                    let full = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    self.positions.insert(full, pos);
                    *key = Some(name);
                    None
                }
                Some(name) => Some(if path.is_empty() {
                    name
                } else {
                    format!("{path}.{name}")
                }),
            },
            Some(Frame::Seq { path, next }) => {
                let full = format!("{path}[{next}]");
                *next += 1;
                self.positions.insert(full.clone(), pos);
                Some(full)
            }
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for Indexer {
    fn on_event(&mut self, ev: yaml_rust2::parser::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::parser::Event;
        match ev {
            Event::Scalar(ref s, ..) => {
                self.node(Some(s), mark);
            }
            Event::Alias(_) => {
                self.node(None, mark);
            }
            Event::MappingStart(..) => {
                let path = self.node(None, mark).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.node(None, mark).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// Collects errors while loading.
///
/// Also used for the web config file, so its errors read the same.
pub(crate) struct Loader<'a> {
    file: &'a Path,
    positions: Positions,
    errors: Vec<ConfigError>,
}

impl<'a> Loader<'a> {
    /// A loader for `text`, read from `file`.
    pub(crate) fn new(file: &'a Path, text: &str) -> Self {
        Loader {
            file,
            positions: Positions::index(text),
            errors: Vec::new(),
        }
    }

    /// Every error recorded so far.
    pub(crate) fn finish(self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// Records a problem with `field`, at its position in the file.
    pub(crate) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        let (line, col) = self.positions.find(&field);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            col,
            field,
            message: message.into(),
        });
    }

    /// Deserializes one section, recording an error with its field path.
    pub(crate) fn parse<T: DeserializeOwned>(&mut self, value: Value, at: &str) -> Option<T> {
        match serde_path_to_error::deserialize(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let mut sub = e.path().to_string();
                let message = e.into_inner().to_string();
                // Internally tagged enums lose the unknown key from the path.
                if let Some(key) = message
                    .strip_prefix("unknown field `")
                    .and_then(|m| m.split('`').next())
                {
                    if !sub.ends_with(key) {
                        sub = if sub == "." {
                            key.to_string()
                        } else {
                            format!("{sub}.{key}")
                        };
                    }
                }
                let field = match sub.as_str() {
                    "." | "?" => at.to_string(),
                    s if at.is_empty() => s.to_string(),
                    s if s.starts_with('[') => format!("{at}{s}"),
                    s => format!("{at}.{s}"),
                };
                self.error(field, message);
                None
            }
        }
    }

    /// `path` relative to the loaded file's directory, as users write them.
    pub(crate) fn relative(&self, path: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    fn roots(
        &mut self,
        ca_file: Option<&Path>,
        field: &str,
        cache: &mut HashMap<PathBuf, Arc<RootCertStore>>,
    ) -> Arc<RootCertStore> {
        let key = ca_file.map(|p| self.relative(p)).unwrap_or_default();
        if let Some(store) = cache.get(&key) {
            return store.clone();
        }
        let mut store = RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = store.add(cert);
        }
        if ca_file.is_some() {
            match CertificateDer::pem_file_iter(&key).and_then(|it| it.collect::<Result<Vec<_>, _>>()) {
                Ok(certs) if certs.is_empty() => {
                    self.error(field, format!("{}: no PEM certificate in file", key.display()))
                }
                Ok(certs) => {
                    for cert in certs {
                        if let Err(e) = store.add(cert) {
                            self.error(field, format!("{}: {e}", key.display()));
                        }
                    }
                }
                Err(e) => self.error(field, format!("{}: {e}", key.display())),
            }
        }
        let store = Arc::new(store);
        cache.insert(key, store.clone());
        store
    }
}

/// Builds what runs a check (its probe) from the validated check, or names the
/// field that is wrong; the loader reports it at that field's position.
pub type Build<'a, P> = &'a dyn Fn(&Check, &Credentials) -> Result<P, FieldError>;

/// Reads and validates a check file, reporting every problem at once; `build`
/// makes each check's probe (the layer above passes its own, so specs stay
/// plain data and know no probe).
pub fn load<P>(path: &Path, build: Build<P>) -> Result<Config<P>, ConfigErrors> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigErrors::whole(path, 0, 0, format!("cannot read: {e}")))?;
    parse(path, &text, build)
}

/// Validates check-file text; `path` is used in messages and for relative paths.
pub fn parse<P>(path: &Path, text: &str, build: Build<P>) -> Result<Config<P>, ConfigErrors> {
    let mut l = Loader::new(path, text);
    let root: Value = serde_yaml::from_str(text).map_err(|e| ConfigErrors::yaml(path, &e))?;
    let Value::Mapping(mut root) = root else {
        l.error("", "expected a mapping with `environments` and `checks`");
        return Err(ConfigErrors(l.errors));
    };
    for key in root.keys() {
        match key.as_str() {
            Some("defaults" | "environments" | "credentials" | "checks" | "migration") => {}
            other => l.error(
                other.unwrap_or("?"),
                format!(
                    "unknown section `{}`, expected one of `defaults`, `environments`, `credentials`, `checks`, `migration`",
                    other.unwrap_or("?")
                ),
            ),
        }
    }
    let defaults: DefaultsSpec = match root.remove("defaults") {
        Some(v) => l.parse(v, "defaults").unwrap_or_default(),
        None => DefaultsSpec::default(),
    };
    let environments = load_environments(&mut l, root.remove("environments"));
    let credentials = load_credentials(&mut l, root.remove("credentials"));
    let checks = load_checks(
        &mut l,
        root.remove("checks"),
        &defaults,
        &environments,
        &credentials,
        build,
    );
    let migration = load_migration(&mut l, root.remove("migration"), &environments);
    let max_concurrent_probes = defaults.max_concurrent_probes.unwrap_or(DEFAULT_MAX_CONCURRENT_PROBES);
    if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&max_concurrent_probes) {
        l.error("defaults.max_concurrent_probes", "must be at least 1");
    }
    l.finish()?;
    Ok(Config {
        path: path.to_owned(),
        environments,
        checks,
        probe_slots: Arc::new(tokio::sync::Semaphore::new(max_concurrent_probes)),
        migration,
        usernames: credentials.values().map(|c| c.username.clone()).collect(),
    })
}

fn entries(l: &mut Loader, value: Option<Value>, section: &str) -> Vec<(String, Value)> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Mapping(m)) => m
            .into_iter()
            .filter_map(|(k, v)| match k {
                Value::String(k) => Some((k, v)),
                other => {
                    l.error(section, format!("names must be strings, got {other:?}"));
                    None
                }
            })
            .collect(),
        Some(_) => {
            l.error(section, "expected a mapping of names to definitions");
            Vec::new()
        }
    }
}

fn load_environments(l: &mut Loader, value: Option<Value>) -> Vec<Arc<Environment>> {
    if value.is_none() {
        l.error("", "missing section `environments`");
    }
    let mut out = Vec::new();
    for (name, v) in entries(l, value, "environments") {
        let at = format!("environments.{name}");
        let Some(spec) = l.parse::<EnvironmentSpec>(v, &at) else {
            continue;
        };
        let kind = match (spec.addresses.is_empty(), spec.resolver) {
            (false, None) => EnvKind::Pinned(spec.addresses),
            (true, Some(r)) => EnvKind::Live(r),
            (false, Some(_)) => {
                l.error(&at, "set either `addresses` (pinned) or `resolver` (live), not both");
                continue;
            }
            (true, None) => {
                l.error(
                    &at,
                    "set `addresses` (pinned environment) or `resolver` (live environment, e.g. `system`)",
                );
                continue;
            }
        };
        out.push(Arc::new(Environment { name, kind }));
    }
    out
}

fn load_credentials(l: &mut Loader, value: Option<Value>) -> Credentials {
    let mut out = Credentials::new();
    for (name, v) in entries(l, value, "credentials") {
        let at = format!("credentials.{name}");
        if let Value::Mapping(m) = &v {
            if m.contains_key("password") {
                l.error(
                    format!("{at}.password"),
                    "inline passwords are not allowed: put the password in an environment variable (`password_env`) or a file (`password_file`)",
                );
                continue;
            }
        }
        let Some(spec) = l.parse::<CredentialSpec>(v, &at) else {
            continue;
        };
        let password = match (&spec.password_env, &spec.password_file) {
            (Some(var), None) => match std::env::var(var) {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    l.error(
                        format!("{at}.password_env"),
                        format!("credential `{name}`: environment variable `{var}` is not set or empty"),
                    );
                    continue;
                }
            },
            (None, Some(file)) => {
                let file = l.relative(file);
                match read_small_file(&file, SECRET_FILE_LIMIT).map(|b| String::from_utf8_lossy(&b).into_owned()) {
                    Ok(p) => {
                        warn_if_readable_by_others(&file, &format!("credential `{name}`"));
                        p.trim_end_matches(['\r', '\n']).to_string()
                    }
                    Err(e) => {
                        l.error(
                            format!("{at}.password_file"),
                            format!("credential `{name}`: cannot read {}: {e}", file.display()),
                        );
                        continue;
                    }
                }
            }
            _ => {
                l.error(
                    &at,
                    format!("credential `{name}`: set exactly one of `password_env` or `password_file`"),
                );
                continue;
            }
        };
        out.insert(
            name,
            Arc::new(Credential {
                username: spec.username,
                password: Secret(password),
            }),
        );
    }
    out
}

/// Warns (naming the file, never its content) when a file holding a secret can
/// be read by its group or by others: anyone on the monitoring host could log
/// in as the probe account.
pub(crate) fn warn_if_readable_by_others(file: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(file) else { return };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        tracing::warn!(
            file = %file.display(), mode = format!("{mode:04o}"),
            "{what}: secret file is readable by group or others; restrict it with `chmod 600`"
        );
    }
}

fn load_checks<P>(
    l: &mut Loader,
    value: Option<Value>,
    defaults: &DefaultsSpec,
    environments: &[Arc<Environment>],
    credentials: &Credentials,
    build: Build<P>,
) -> Vec<LoadedCheck<P>> {
    let items = match value {
        Some(Value::Sequence(items)) => items,
        None => {
            l.error("", "missing section `checks`");
            return Vec::new();
        }
        Some(_) => {
            l.error("checks", "expected a list of checks");
            return Vec::new();
        }
    };
    let mut roots_cache = HashMap::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("checks[{i}]");
        let Value::Mapping(mut map) = item else {
            l.error(&at, "expected a mapping with `name` and `kind`");
            continue;
        };
        // Split the common fields from the kind's own, so both sides can
        // refuse unknown fields.
        let mut common = Mapping::new();
        for key in ["name", "envs", "interval", "timeout", "ca_file"] {
            if let Some(v) = map.remove(key) {
                common.insert(key.into(), v);
            }
        }
        let kind_name = map.get("kind").and_then(Value::as_str).map(str::to_owned);
        let Some(common) = l.parse::<CommonSpec>(Value::Mapping(common), &at) else {
            continue;
        };
        if kind_name.is_none() {
            l.error(
                format!("{at}.kind"),
                format!(
                    "missing field `kind` (one of {})",
                    Kind::ALL.map(|k| format!("`{}`", k.as_str())).join(", ")
                ),
            );
            continue;
        }
        let Some(mut kind) = l.parse::<KindSpec>(Value::Mapping(map), &at) else {
            continue;
        };
        if let KindSpec::Mailflow(spec) = &mut kind {
            // Watchers connect to a pinned environment's address.
            for (j, w) in spec.watch.iter_mut().enumerate() {
                match environments.iter().find(|e| e.name == w.env).map(|e| &e.kind) {
                    Some(EnvKind::Pinned(addrs)) => w.addresses = addrs.clone(),
                    Some(EnvKind::Live(_)) => l.error(
                        format!("{at}.watch[{j}].env"),
                        format!(
                            "`{}` follows DNS: watch pinned environments (old, new), where mail lands",
                            w.env
                        ),
                    ),
                    None => l.error(
                        format!("{at}.watch[{j}].env"),
                        format!("unknown environment `{}`", w.env),
                    ),
                }
            }
        }
        if let KindSpec::HostedDomains(spec) = &mut kind {
            spec.domains_path = l.relative(&spec.domains_file);
        }
        if let KindSpec::MailboxParity(spec) = &mut kind {
            spec.accounts_path = l.relative(&spec.accounts_file);
        }
        if !seen.insert(common.name.clone()) {
            l.error(format!("{at}.name"), format!("duplicate check name `{}`", common.name));
        }
        let interval = match kind {
            KindSpec::Mailflow(_) => common.interval.map_or(DEFAULT_MAILFLOW_INTERVAL, |d| d.0),
            KindSpec::HostedDomains(_) | KindSpec::MailboxParity(_) => {
                common.interval.map_or(DEFAULT_AUDIT_INTERVAL, |d| d.0)
            }
            _ => common.interval.or(defaults.interval).map_or(DEFAULT_INTERVAL, |d| d.0),
        };
        let timeout = match kind {
            // An audit takes minutes: it may use most of its interval.
            KindSpec::HostedDomains(_) | KindSpec::MailboxParity(_) => {
                common.timeout.map_or(interval - interval / 10, |d| d.0)
            }
            _ => common.timeout.or(defaults.timeout).map_or(DEFAULT_TIMEOUT, |d| d.0),
        };
        if interval.is_zero() {
            l.error(format!("{at}.interval"), "must be above 0s");
        }
        if timeout >= interval {
            let field = if common.timeout.is_some() {
                "timeout"
            } else {
                "interval"
            };
            l.error(
                format!("{at}.{field}"),
                format!(
                    "timeout ({}) must be below the interval ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            );
        }
        let envs = if common.envs.is_empty() {
            environments.to_vec()
        } else {
            let mut envs = Vec::new();
            for (j, name) in common.envs.iter().enumerate() {
                match environments.iter().find(|e| &e.name == name) {
                    Some(e) => envs.push(e.clone()),
                    None => l.error(format!("{at}.envs[{j}]"), format!("unknown environment `{name}`")),
                }
            }
            envs
        };
        let (ca_file, ca_field) = match (&common.ca_file, &defaults.ca_file) {
            (Some(f), _) => (Some(f.as_path()), format!("{at}.ca_file")),
            (None, Some(f)) => (Some(f.as_path()), "defaults.ca_file".to_string()),
            (None, None) => (None, String::new()),
        };
        let roots = l.roots(ca_file, &ca_field, &mut roots_cache);
        let check = Arc::new(Check {
            name: common.name,
            envs,
            interval,
            timeout,
            roots,
            kind,
        });
        if matches!(check.kind, KindSpec::Dns(_) | KindSpec::HostedDomains(_)) && !common.envs.is_empty() {
            // It runs on its own resolvers; its expectations may still use every environment.
            l.error(
                format!("{at}.envs"),
                format!(
                    "a `{}` check asks its own resolvers, not environments: remove `envs`",
                    check.kind.name()
                ),
            );
            continue;
        }
        if matches!(check.kind, KindSpec::MailboxParity(_)) && !common.envs.is_empty() {
            l.error(
                format!("{at}.envs"),
                "a `mailbox_parity` check compares `old_env` with `new_env`: remove `envs`",
            );
            continue;
        }
        match build(&check, credentials) {
            Ok(probe) => out.push(LoadedCheck { check, probe }),
            Err(e) => l.error(format!("{at}.{}", e.field), e.message),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match crate::probe::parse(Path::new("c.yaml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const ENVS: &str = "environments:\n  old: {addresses: [127.0.0.10]}\n  live: {resolver: system}\n";

    #[test]
    fn a_bare_number_is_not_a_duration() {
        let text =
            format!("{ENVS}checks:\n  - name: w\n    kind: tcp\n    host: a.test\n    port: 1\n    interval: 30\n");
        assert_eq!(
            errors(&text),
            vec!["c.yaml:9:5: field `checks[0].interval`: expected a duration like `30s`, got `30`"]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_position() {
        let text = format!(
            "{ENVS}checks:\n  - name: a\n    kind: tcp\n    host: a.test\n    port: 1\n    timeout: 40s\n  - name: a\n    kind: tcp\n    hots: b.test\n  - name: c\n    kind: http\n    url: https://c.test/\n    envs: [nope]\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert_eq!(
            errs[0],
            "c.yaml:9:5: field `checks[0].timeout`: timeout (40s) must be below the interval (30s)"
        );
        assert!(
            errs[1].starts_with("c.yaml:12:5: field `checks[1].hots`: unknown field `hots`"),
            "{}",
            errs[1]
        );
        assert_eq!(
            errs[2],
            "c.yaml:16:12: field `checks[2].envs[0]`: unknown environment `nope`"
        );
    }

    #[test]
    fn duplicate_names_and_inline_passwords_are_refused() {
        let text = format!(
            "{ENVS}credentials:\n  probe:\n    username: u\n    password: hunter2\nchecks:\n  - {{name: a, kind: tcp, host: a.test, port: 1}}\n  - {{name: a, kind: tcp, host: a.test, port: 2}}\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(
            errs[0].starts_with("c.yaml:7:5: field `credentials.probe.password`: inline passwords are not allowed")
        );
        assert!(!errs[0].contains("hunter2"));
        assert_eq!(errs[1], "c.yaml:10:6: field `checks[1].name`: duplicate check name `a`");
    }

    #[test]
    fn a_missing_secret_names_the_credential_not_a_value() {
        let text = format!(
            "{ENVS}credentials:\n  probe:\n    username: u\n    password_env: CUTOVER_TEST_UNSET_VARIABLE\nchecks: []\n"
        );
        assert_eq!(
            errors(&text),
            vec![
                "c.yaml:7:5: field `credentials.probe.password_env`: credential `probe`: environment variable `CUTOVER_TEST_UNSET_VARIABLE` is not set or empty"
            ]
        );
    }

    #[test]
    fn envs_default_to_all_and_timeouts_inherit() {
        let text = format!(
            "{ENVS}defaults: {{interval: 5s, timeout: 2s}}\nchecks:\n  - {{name: a, kind: tcp, host: a.test, port: 1}}\n"
        );
        let config = crate::probe::parse(Path::new("c.yaml"), &text).unwrap();
        let check = &config.checks[0].check;
        assert_eq!(
            check.envs.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["old", "live"]
        );
        assert_eq!(
            (check.interval, check.timeout),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!(config.env_of("127.0.0.10".parse().unwrap()), Some("old"));
        assert_eq!(config.env_of("127.0.0.20".parse().unwrap()), None);
    }

    #[test]
    fn secret_debug_hides_the_value() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(<redacted>)");
    }
}
