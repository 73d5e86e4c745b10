//! `kind: hosted_domains` — which customer domains still point at the old
//! environment? A hosted mail provider serves its customers' own domains; a
//! domain whose MX host is its own A record at an old address keeps receiving
//! mail on the old servers (lost once they are switched off), and one whose SPF
//! lists only the old addresses has the new servers' mail fail SPF.
//!
//! Each audit reads every domain's MX (and the addresses of MX hosts that are
//! not the provider's), SPF, DMARC and autoconfig names (`autoconfig`,
//! `autodiscover`, SRV `_autodiscover._tcp`, `_imaps._tcp`, `_submission._tcp`)
//! through [`Lookups`]: rate-limited per resolver, retried, cached for what
//! domains share. SPF is evaluated for the new outbound addresses by the
//! `mail-auth` crate (includes, redirects, the RFC 7208 lookup limits) over the
//! same lookups. Every domain gets each [`Finding`] that applies, the offending
//! records and a suggested fix; the check publishes only counts per finding
//! (`cutover_hosted_domains`), the rows go to `/api/v1/domains` and the
//! `domains` command.
//!
//! One instance per check (its [`Probe::own_targets`] is its first resolver);
//! the run succeeds when the audit finished with answers, whatever it found.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::proto::op::Message;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::spf::{Macro, Mechanism, Qualifier, Spf};
use mail_auth::{MessageAuthenticator, Parameters, SpfResult};
use serde::{Deserialize, Serialize};

use super::{Failure, FailureReason, FieldError, Measurement, Probe, Run};
use crate::config::{Check, EnvKind, HostedDomainsSpec};
use crate::lookup::{Answer, Lookups, QueryResult, ResolverCounts};
use crate::resolve::normalize;

/// Largest domains file read (a million domains fit in far less).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Longest line taken as a domain (a DNS name has at most 253 characters).
const MAX_LINE: usize = 1024;

/// Input problems kept with their text; the rest are only counted.
const MAX_PROBLEMS_KEPT: usize = 20;

/// The receiving host's name in SPF's `%{r}` macro: we receive nothing.
const RECEIVER: &str = "cutover-monitor.invalid";

/// What an audit found about a domain. A closed set: each value is a label
/// value of `cutover_hosted_domains` and a filter of `/api/v1/domains`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    /// Nothing points at the old environment and SPF passes for the new one.
    Ok,
    /// An MX host that is not the provider's resolves to an old inbound address.
    MxOldIp,
    /// No MX host is the provider's or at its addresses: not ours to judge.
    MxForeign,
    /// The SPF record has an `ip4:`/`ip6:` that covers an old outbound address.
    SpfOldIpLiteral,
    /// SPF does not give `pass` for a new outbound address.
    SpfFailsNew,
    /// The SPF policy is broken: several records, bad syntax, too many lookups.
    SpfPermerror,
    /// An autoconfig/autodiscover name or SRV target resolves to an old address.
    AutoconfigOldIp,
    /// A lookup failed (SERVFAIL, timeout) after retries on every resolver.
    DnsError,
    /// The domain does not exist.
    Nxdomain,
}

impl Finding {
    /// Every finding, in report order.
    pub const ALL: [Finding; 9] = [
        Self::Ok,
        Self::MxOldIp,
        Self::MxForeign,
        Self::SpfOldIpLiteral,
        Self::SpfFailsNew,
        Self::SpfPermerror,
        Self::AutoconfigOldIp,
        Self::DnsError,
        Self::Nxdomain,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::MxOldIp => "mx_old_ip",
            Self::MxForeign => "mx_foreign",
            Self::SpfOldIpLiteral => "spf_old_ip_literal",
            Self::SpfFailsNew => "spf_fails_new",
            Self::SpfPermerror => "spf_permerror",
            Self::AutoconfigOldIp => "autoconfig_old_ip",
            Self::DnsError => "dns_error",
            Self::Nxdomain => "nxdomain",
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

/// One domain's result. Domains that are `ok` carry no records or fixes, so a
/// report of 100,000 mostly fine domains stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainRow {
    /// The domain, lower case, as ASCII (IDNs in punycode).
    pub domain: String,
    /// Every finding that applies, in [`Finding::ALL`] order; `[ok]` when none.
    pub findings: Vec<Finding>,
    /// The offending records, as DNS shows them, e.g. `TXT "v=spf1 ip4:192.0.2.10 -all"`.
    pub records: Vec<String>,
    /// What the customer should change, one line per problem.
    pub fixes: Vec<String>,
}

impl DomainRow {
    /// Whether the row has `finding`.
    pub fn has(&self, finding: Finding) -> bool {
        self.findings.contains(&finding)
    }
}

/// Problems with the domains file: each skipped line is counted, the first
/// ones are kept with their line number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputSummary {
    /// The file, as resolved.
    pub file: PathBuf,
    /// Lines read.
    pub lines: usize,
    /// Lines that were not a valid domain, skipped.
    pub invalid: usize,
    /// Lines repeating a domain listed before, skipped.
    pub duplicates: usize,
    /// The first problems: `line N: message`.
    pub problems: Vec<String>,
}

/// One finished audit; the daemon keeps the last one under `--storage.path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// The check's name.
    pub check: String,
    /// When the audit started, Unix seconds.
    pub started_at: f64,
    /// How long it took, seconds.
    pub duration_seconds: f64,
    /// One row per listed domain, in file order.
    pub domains: Vec<DomainRow>,
    /// What was skipped from the file.
    pub input: InputSummary,
    /// Queries sent, per resolver and result (counted once, not kept on disk).
    #[serde(skip)]
    pub queries: Vec<ResolverCounts>,
}

impl AuditReport {
    /// Domains per finding, every finding present (0 when none).
    pub fn counts(&self) -> BTreeMap<Finding, usize> {
        let mut counts: BTreeMap<Finding, usize> = Finding::ALL.iter().map(|f| (*f, 0)).collect();
        for row in &self.domains {
            for f in &row.findings {
                *counts.entry(*f).or_default() += 1;
            }
        }
        counts
    }
}

/// Which way a domain's findings moved between two audits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// To `ok`.
    Fixed,
    /// From `ok` to a problem.
    Regressed,
    /// From one problem to another.
    Changed,
}

impl Direction {
    /// Every direction, for counters that start at 0.
    pub const ALL: [Direction; 3] = [Self::Fixed, Self::Regressed, Self::Changed];

    /// The label value and the API's and the log's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Regressed => "regressed",
            Self::Changed => "changed",
        }
    }
}

/// A domain whose findings differ from the previous audit's: the change log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The domain.
    pub domain: String,
    /// Fixed, regressed or changed.
    pub direction: Direction,
    /// Findings before.
    pub before: Vec<Finding>,
    /// Findings now.
    pub after: Vec<Finding>,
    /// When the audit that saw it finished, Unix seconds.
    pub at: f64,
}

/// The domains whose findings changed from `before` to `now`. Domains new to
/// the list (or no longer on it) are not changes: nobody fixed anything.
pub fn changes(before: &AuditReport, now: &AuditReport) -> Vec<Change> {
    let previous: std::collections::HashMap<&str, &[Finding]> = before
        .domains
        .iter()
        .map(|r| (r.domain.as_str(), r.findings.as_slice()))
        .collect();
    let at = now.started_at + now.duration_seconds;
    now.domains
        .iter()
        .filter_map(|row| {
            let was = *previous.get(row.domain.as_str())?;
            if was == row.findings.as_slice() {
                return None;
            }
            let ok = |f: &[Finding]| f == [Finding::Ok];
            let direction = if ok(&row.findings) {
                Direction::Fixed
            } else if ok(was) {
                Direction::Regressed
            } else {
                Direction::Changed
            };
            Some(Change {
                domain: row.domain.clone(),
                direction,
                before: was.to_vec(),
                after: row.findings.clone(),
                at,
            })
        })
        .collect()
}

/// How far an audit is, for a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Domains finished.
    pub done: AtomicUsize,
    /// Domains in the audit.
    pub total: AtomicUsize,
}

/// A built `hosted_domains` check.
pub struct HostedDomainsProbe {
    name: String,
    domains: Arc<Vec<String>>,
    input: InputSummary,
    resolvers: Vec<(String, SocketAddr)>,
    mx_hosts: Vec<String>,
    spf_include: String,
    provider_domains: Vec<String>,
    old_inbound: Vec<IpAddr>,
    new_inbound: Vec<IpAddr>,
    old_outbound: Vec<IpAddr>,
    new_outbound: Vec<IpAddr>,
    ask_aaaa: bool,
    /// Whether the skipped lines of the file were logged (once per load).
    warned: std::sync::atomic::AtomicBool,
    rate_limit: f64,
    concurrency: usize,
    query_timeout: Duration,
    attempts: usize,
    helo: String,
}

/// A host name from the config: lower case, no trailing dot, a valid DNS name.
fn host_name(field: &str, text: &str) -> Result<String, FieldError> {
    let name = normalize(text);
    if name.is_empty() || !name.contains('.') || Name::from_utf8(&name).is_err() {
        return Err(FieldError::new(
            field,
            format!("expected a host name like `mx.example.com`, got `{text}`"),
        ));
    }
    Ok(name)
}

impl HostedDomainsProbe {
    /// Validates the spec and reads the domains file.
    pub fn new(spec: &HostedDomainsSpec, check: &Check) -> Result<Self, FieldError> {
        if spec.resolvers.is_empty() {
            return Err(FieldError::new(
                "resolvers",
                "name at least one resolver, e.g. `main: 192.0.2.53`",
            ));
        }
        if !(spec.rate_limit.is_finite() && spec.rate_limit > 0.0) {
            return Err(FieldError::new(
                "rate_limit",
                "expected queries per second above 0, e.g. `50`",
            ));
        }
        if spec.concurrency == 0 {
            return Err(FieldError::new("concurrency", "must be at least 1"));
        }
        if spec.mx_hosts.is_empty() {
            return Err(FieldError::new("mx_hosts", "list the provider's MX host names"));
        }
        let mx_hosts = spec
            .mx_hosts
            .iter()
            .enumerate()
            .map(|(i, h)| host_name(&format!("mx_hosts[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        let spf_include = host_name("spf_include", &spec.spf_include)?;
        let provider_domains = if spec.provider_domains.is_empty() {
            let mut parents: Vec<String> = mx_hosts
                .iter()
                .chain([&spf_include])
                .filter_map(|h| h.split_once('.').map(|(_, p)| p.to_string()))
                .filter(|p| p.contains('.'))
                .collect();
            parents.sort();
            parents.dedup();
            parents
        } else {
            spec.provider_domains
                .iter()
                .enumerate()
                .map(|(i, d)| host_name(&format!("provider_domains[{i}]"), d))
                .collect::<Result<Vec<_>, _>>()?
        };
        let pinned = |field: &str, name: &str| -> Result<Vec<IpAddr>, FieldError> {
            match check.envs.iter().find(|e| e.name == name).map(|e| &e.kind) {
                Some(EnvKind::Pinned(addrs)) => Ok(addrs.clone()),
                Some(EnvKind::Live(_)) => Err(FieldError::new(
                    field,
                    format!("`{name}` follows DNS; the audit compares with pinned addresses (`addresses`)"),
                )),
                None => Err(FieldError::new(field, format!("unknown environment `{name}`"))),
            }
        };
        let old_inbound = pinned("old_env", &spec.old_env)?;
        let new_inbound = pinned("new_env", &spec.new_env)?;
        for env in spec.outbound.keys() {
            if env != &spec.old_env && env != &spec.new_env {
                return Err(FieldError::new(
                    format!("outbound.{env}"),
                    format!("expected `{}` or `{}`", spec.old_env, spec.new_env),
                ));
            }
        }
        let outbound = |env: &str, inbound: &[IpAddr]| spec.outbound.get(env).cloned().unwrap_or(inbound.to_vec());
        let old_outbound = outbound(&spec.old_env, &old_inbound);
        let new_outbound = outbound(&spec.new_env, &new_inbound);
        let helo = match &spec.helo {
            Some(h) => host_name("helo", h)?,
            None => mx_hosts[0].clone(),
        };
        let (domains, input) = read_domains(&spec.domains_path).map_err(|e| FieldError::new("domains_file", e))?;
        let ask_aaaa = old_inbound.iter().chain(&old_outbound).any(IpAddr::is_ipv6);
        Ok(HostedDomainsProbe {
            name: check.name.clone(),
            domains: Arc::new(domains),
            input,
            resolvers: spec
                .resolvers
                .iter()
                .map(|(name, ip)| (name.clone(), SocketAddr::new(*ip, spec.port)))
                .collect(),
            mx_hosts,
            spf_include,
            provider_domains,
            old_inbound,
            new_inbound,
            old_outbound,
            new_outbound,
            ask_aaaa,
            warned: Default::default(),
            rate_limit: spec.rate_limit,
            concurrency: spec.concurrency,
            query_timeout: spec.query_timeout.map_or(Duration::from_secs(2), |d| d.0),
            attempts: spec.retries as usize + 1,
            helo,
        })
    }

    /// Audits every domain. The report is complete even when resolvers fail
    /// (those domains get `dns_error`); `progress` counts finished domains.
    pub async fn audit(&self, progress: &Progress) -> Result<AuditReport, Failure> {
        let started_at = crate::unix_now();
        let start = Instant::now();
        progress.total.store(self.domains.len(), Ordering::Relaxed);
        let lookups = Arc::new(Lookups::new(
            &self.resolvers,
            self.rate_limit,
            self.query_timeout,
            self.attempts,
        ));
        let relay = lookups
            .relay()
            .await
            .map_err(|e| Failure::new(FailureReason::Network, format!("starting the SPF lookup relay: {e}")))?;
        let auth = self.authenticator(relay.addr)?;
        let mut rows: Vec<Option<DomainRow>> = vec![None; self.domains.len()];
        let mut done = futures::stream::iter(0..self.domains.len())
            .map(|i| self.audit_numbered(i, &lookups, &auth))
            .buffer_unordered(self.concurrency);
        while let Some((i, row)) = done.next().await {
            rows[i] = Some(row);
            progress.done.fetch_add(1, Ordering::Relaxed);
        }
        drop(done);
        drop(relay);
        let queries = lookups.counts();
        let answered: u64 = queries
            .iter()
            .flat_map(|r| &r.counts)
            .filter(|(q, _)| matches!(q, QueryResult::Noerror | QueryResult::Nxdomain))
            .map(|(_, n)| n)
            .sum();
        if answered == 0 && !self.domains.is_empty() {
            let names: Vec<&str> = self.resolvers.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Failure::new(
                FailureReason::Dns,
                format!(
                    "no resolver answered any query ({}); keeping the last audit",
                    names.join(", ")
                ),
            ));
        }
        Ok(AuditReport {
            check: self.name.clone(),
            started_at,
            duration_seconds: start.elapsed().as_secs_f64(),
            domains: rows.into_iter().map(|r| r.expect("every domain audited")).collect(),
            input: self.input.clone(),
            queries,
        })
    }

    /// The SPF evaluator, resolving through the relay: no cache of its own,
    /// no hosts file, a deadline long enough for rate-limited queues.
    fn authenticator(&self, relay: SocketAddr) -> Result<MessageAuthenticator, Failure> {
        let mut server = NameServerConfig::udp(relay.ip());
        for connection in &mut server.connections {
            connection.port = relay.port();
        }
        let mut opts = ResolverOpts::default();
        // The relay always answers (SERVFAIL when the lookup failed); waiting
        // is only its rate limit queue.
        opts.timeout = Duration::from_secs(3600);
        opts.attempts = 0;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![server]), opts)
            .map_err(|e| Failure::new(FailureReason::Dns, format!("setting up SPF evaluation: {e}")))
    }

    fn is_provider(&self, host: &str) -> bool {
        let host = normalize(host);
        self.mx_hosts.contains(&host)
            || self.provider_domains.iter().any(|d| {
                host.strip_suffix(d.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
            })
    }

    async fn audit_numbered(&self, i: usize, lookups: &Lookups, auth: &MessageAuthenticator) -> (usize, DomainRow) {
        (i, self.audit_domain(&self.domains[i], lookups, auth).await)
    }

    async fn audit_domain(&self, domain: &str, lookups: &Lookups, auth: &MessageAuthenticator) -> DomainRow {
        let _scope = lookups.scope(domain);
        let mut row = Row::default();
        let mx = lookups.get(domain, RecordType::MX).await;
        match &mx {
            Answer::Failed(_, detail) => {
                row.dns_error(detail);
                return row.finish(domain);
            }
            a if a.is_nxdomain() => {
                row.add(
                    Finding::Nxdomain,
                    format!("{domain}: NXDOMAIN"),
                    "the domain does not exist in DNS: remove it from the list, or ask the customer whether it expired",
                );
                return row.finish(domain);
            }
            _ => {}
        }
        let (mut mx_row, mut spf_row, mut autoconfig_row) = (Row::default(), Row::default(), Row::default());
        tokio::join!(
            self.check_mx(domain, mx.reply(), lookups, &mut mx_row),
            self.check_spf(domain, lookups, auth, &mut spf_row),
            self.check_autoconfig(domain, lookups, &mut autoconfig_row),
        );
        for part in [mx_row, spf_row, autoconfig_row] {
            row.absorb(part);
        }
        row.finish(domain)
    }

    /// The addresses `host` resolves to, or why not.
    async fn addresses(&self, host: &str, lookups: &Lookups) -> Result<Vec<IpAddr>, String> {
        let mut types = vec![RecordType::A];
        if self.ask_aaaa {
            types.push(RecordType::AAAA);
        }
        let mut ips = Vec::new();
        for rtype in types {
            match lookups.get(host, rtype).await {
                Answer::Reply(msg) => ips.extend(msg.answers.iter().filter_map(|r| r.data.ip_addr())),
                Answer::Failed(_, detail) => return Err(detail),
            }
        }
        Ok(ips)
    }

    async fn check_mx(&self, domain: &str, reply: Option<&Message>, lookups: &Lookups, row: &mut Row) {
        let hosts: Vec<(u16, String)> = reply
            .map(|m| {
                m.answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, normalize(&mx.exchange.to_ascii()))),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if hosts.is_empty() {
            row.add(
                Finding::MxForeign,
                format!("{domain}: no MX record"),
                format!(
                    "none needed from the provider: mail for {domain} is not routed to it (add `MX 10 {}.` if it should be)",
                    self.mx_hosts[0]
                ),
            );
            return;
        }
        let mut ours = false;
        let mut old = Vec::new();
        for (pref, host) in &hosts {
            if self.is_provider(host) {
                ours = true;
                continue;
            }
            match self.addresses(host, lookups).await {
                Err(detail) => row.dns_error(&detail),
                Ok(ips) => {
                    if ips.iter().any(|ip| self.new_inbound.contains(ip)) {
                        ours = true;
                    }
                    let stale: Vec<&IpAddr> = ips.iter().filter(|ip| self.old_inbound.contains(ip)).collect();
                    if !stale.is_empty() {
                        ours = true;
                        old.push((*pref, host.clone(), stale.into_iter().copied().collect::<Vec<_>>()));
                    }
                }
            }
        }
        for (pref, host, ips) in old {
            let list = join(&ips);
            row.add(
                Finding::MxOldIp,
                format!("MX {pref} {host}. -> A {list} (old)"),
                format!(
                    "point the MX at {}. instead of {host} (which resolves to the old address {list}), or change {host}'s address to {}",
                    self.mx_hosts[0],
                    self.replacement(&ips)
                ),
            );
        }
        if !ours && !row.has(Finding::DnsError) {
            let list: Vec<String> = hosts.iter().map(|(p, h)| format!("MX {p} {h}.")).collect();
            row.add(
                Finding::MxForeign,
                list.join(", "),
                "none from the provider: mail for this domain goes elsewhere; confirm with the customer that this is intended",
            );
        }
    }

    /// The new addresses to suggest in place of `old` ones.
    fn replacement(&self, old: &[IpAddr]) -> String {
        let wanted: Vec<IpAddr> = self
            .new_inbound
            .iter()
            .filter(|ip| old.iter().any(|o| o.is_ipv4() == ip.is_ipv4()))
            .copied()
            .collect();
        join(&wanted)
    }

    /// SPF, and DMARC's policy where SPF fails: with `p=reject` a failing SPF
    /// means bounced mail, not spam-foldered mail.
    async fn check_spf(&self, domain: &str, lookups: &Lookups, auth: &MessageAuthenticator, row: &mut Row) {
        let dmarc_name = format!("_dmarc.{domain}");
        let ((), dmarc) = tokio::join!(
            self.check_spf_policy(domain, lookups, auth, row),
            lookups.get(&dmarc_name, RecordType::TXT)
        );
        if !(row.has(Finding::SpfFailsNew) || row.has(Finding::SpfPermerror)) {
            return;
        }
        let strict = dmarc.reply().and_then(|msg| {
            txt_records(msg)
                .into_iter()
                .find(|t| t.to_ascii_lowercase().starts_with("v=dmarc1"))
                .filter(|t| dmarc_policy(t).is_some_and(|p| p == "reject" || p == "quarantine"))
        });
        if let Some(record) = strict {
            push_new(&mut row.records, format!("{dmarc_name}. TXT {record:?}"));
            push_new(
                &mut row.fixes,
                "urgent: the DMARC policy asks receivers to reject or quarantine mail that fails SPF (unless DKIM passes)".into(),
            );
        }
    }

    async fn check_spf_policy(&self, domain: &str, lookups: &Lookups, auth: &MessageAuthenticator, row: &mut Row) {
        let records: Vec<String> = match lookups.get(domain, RecordType::TXT).await {
            Answer::Failed(_, detail) => return row.dns_error(&detail),
            Answer::Reply(msg) => txt_records(&msg).into_iter().filter(|t| is_spf(t)).collect(),
        };
        let include = &self.spf_include;
        let record = match records.as_slice() {
            [] => return,
            [one] => one,
            many => {
                let shown: Vec<String> = many.iter().map(|r| format!("TXT {r:?}")).collect();
                row.add(
                    Finding::SpfPermerror,
                    shown.join(", "),
                    format!(
                        "publish one SPF record: merge the {} `v=spf1` TXT records into one (RFC 7208 §4.5 makes several a permerror), with include:{include}",
                        many.len()
                    ),
                );
                return;
            }
        };
        let shown = format!("TXT {record:?}");
        let spf = match Spf::parse(record.as_bytes()) {
            Ok(spf) => spf,
            Err(e) => {
                row.add(
                    Finding::SpfPermerror,
                    shown,
                    format!("fix the SPF record's syntax ({e}); it should contain include:{include}"),
                );
                return;
            }
        };
        let has_include = spf.directives.iter().any(|d| {
            matches!(&d.mechanism, Mechanism::Include { macro_string: Macro::Literal(target) }
                if normalize(&String::from_utf8_lossy(target)) == *include)
        });
        let literals = old_literals(&spf, &self.old_outbound);
        for literal in &literals {
            let fix = if has_include {
                format!("remove {literal} from the SPF record (include:{include} already authorizes the new servers)")
            } else {
                format!("replace {literal} with include:{include} in the SPF record")
            };
            row.add(Finding::SpfOldIpLiteral, shown.clone(), fix);
        }
        let sender = format!("postmaster@{domain}");
        for ip in &self.new_outbound {
            let params = SpfParameters::verify_mail_from(*ip, &self.helo, RECEIVER, &sender);
            let result = auth.verify_spf(Parameters::new(params)).await.result();
            match result {
                SpfResult::Pass | SpfResult::None => {}
                SpfResult::TempError => {
                    row.dns_error(&format!("SPF evaluation for {ip}: a lookup failed (temperror)"));
                }
                SpfResult::PermError => {
                    row.add(
                        Finding::SpfPermerror,
                        shown.clone(),
                        format!(
                            "the SPF record does not evaluate (more than 10 DNS lookups, or an include without an SPF record): reduce it to at most 10 lookups, with include:{include}"
                        ),
                    );
                    break;
                }
                other => {
                    let verdict = crate::probe::mail_auth::SpfVerdict::from(other).as_str();
                    let fix = if literals.is_empty() {
                        format!(
                            "add include:{include} to the SPF record, before its `all` (the new server {ip} gets {verdict})"
                        )
                    } else {
                        format!(
                            "the new server {ip} gets {verdict}: replacing the old address with include:{include} fixes it"
                        )
                    };
                    row.add(Finding::SpfFailsNew, shown.clone(), fix);
                }
            }
        }
    }

    async fn check_autoconfig(&self, domain: &str, lookups: &Lookups, row: &mut Row) {
        for label in ["autoconfig", "autodiscover"] {
            let name = format!("{label}.{domain}");
            let answer = lookups.get(&name, RecordType::A).await;
            let Answer::Reply(msg) = answer else {
                if let Answer::Failed(_, detail) = answer {
                    row.dns_error(&detail);
                }
                continue;
            };
            // Following a CNAME to the provider is what customers should do.
            let via_provider = msg.answers.iter().any(|r| match &r.data {
                RData::CNAME(c) => self.is_provider(&c.0.to_ascii()),
                _ => false,
            });
            let old: Vec<IpAddr> = msg
                .answers
                .iter()
                .filter_map(|r| r.data.ip_addr())
                .filter(|ip| self.old_inbound.contains(ip))
                .collect();
            if !via_provider && !old.is_empty() {
                let list = join(&old);
                row.add(
                    Finding::AutoconfigOldIp,
                    format!("{name}. A {list} (old)"),
                    format!(
                        "make {name} a CNAME to the provider's autoconfig host, or change its address to {}",
                        self.replacement(&old)
                    ),
                );
            }
        }
        for service in ["_autodiscover._tcp", "_imaps._tcp", "_submission._tcp"] {
            let name = format!("{service}.{domain}");
            let targets: Vec<(String, String)> = match lookups.get(&name, RecordType::SRV).await {
                Answer::Failed(_, detail) => {
                    row.dns_error(&detail);
                    continue;
                }
                Answer::Reply(msg) => msg
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SRV(srv) => Some((
                            normalize(&srv.target.to_ascii()),
                            format!(
                                "{name}. SRV {} {} {} {}",
                                srv.priority,
                                srv.weight,
                                srv.port,
                                srv.target.to_ascii()
                            ),
                        )),
                        _ => None,
                    })
                    .collect(),
            };
            for (target, shown) in targets {
                if target.is_empty() || self.is_provider(&target) {
                    continue;
                }
                match self.addresses(&target, lookups).await {
                    Err(detail) => row.dns_error(&detail),
                    Ok(ips) => {
                        let old: Vec<IpAddr> = ips.into_iter().filter(|ip| self.old_inbound.contains(ip)).collect();
                        if !old.is_empty() {
                            let list = join(&old);
                            row.add(
                                Finding::AutoconfigOldIp,
                                format!("{shown} -> A {list} (old)"),
                                format!(
                                    "point {name} at a provider host name, or change {target}'s address to {}",
                                    self.replacement(&old)
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `ip4:`/`ip6:` mechanisms (qualifier `+`) of `spf` that cover an old address,
/// written as in the record.
fn old_literals(spf: &Spf, old: &[IpAddr]) -> Vec<String> {
    let mut out = Vec::new();
    for d in spf.directives.iter().filter(|d| d.qualifier == Qualifier::Pass) {
        let covered = match &d.mechanism {
            Mechanism::Ip4 { addr, mask } => old.iter().any(|ip| match ip {
                IpAddr::V4(v4) => u32::from(*v4) & mask == u32::from(*addr) & mask,
                IpAddr::V6(_) => false,
            }),
            Mechanism::Ip6 { addr, mask } => old.iter().any(|ip| match ip {
                IpAddr::V6(v6) => u128::from(*v6) & mask == u128::from(*addr) & mask,
                IpAddr::V4(_) => false,
            }),
            _ => false,
        };
        if covered {
            out.push(mechanism_text(&d.mechanism));
        }
    }
    out
}

/// An `ip4`/`ip6` mechanism as written (`ip4:192.0.2.10`, `ip4:192.0.2.0/24`).
fn mechanism_text(m: &Mechanism) -> String {
    match m {
        Mechanism::Ip4 { addr, mask } if *mask == u32::MAX => format!("ip4:{addr}"),
        Mechanism::Ip4 { addr, mask } => format!("ip4:{addr}/{}", mask.count_ones()),
        Mechanism::Ip6 { addr, mask } if *mask == u128::MAX => format!("ip6:{addr}"),
        Mechanism::Ip6 { addr, mask } => format!("ip6:{addr}/{}", mask.count_ones()),
        _ => String::new(),
    }
}

/// Each TXT record of a reply as text (the SPF probe's reading of TXT sets).
fn txt_records(msg: &Message) -> Vec<String> {
    crate::resolve::txt_strings(msg)
        .into_iter()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .collect()
}

/// The `p=` tag of a DMARC record, lower case.
fn dmarc_policy(record: &str) -> Option<String> {
    record
        .split(';')
        .filter_map(|tag| tag.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("p"))
        .map(|(_, v)| v.trim().to_ascii_lowercase())
}

/// Whether a TXT record is an SPF policy (RFC 7208 §4.5: `v=spf1`, then a space or the end).
fn is_spf(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower == "v=spf1" || lower.starts_with("v=spf1 ")
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}

/// Findings of one domain with their records and fixes, deduplicated. The
/// three checks of a domain run concurrently, each filling its own.
#[derive(Default)]
struct Row {
    findings: Vec<Finding>,
    records: Vec<String>,
    fixes: Vec<String>,
}

impl Row {
    fn add(&mut self, finding: Finding, record: impl Into<String>, fix: impl Into<String>) {
        push_new(&mut self.findings, finding);
        push_new(&mut self.records, record.into());
        push_new(&mut self.fixes, fix.into());
    }

    fn dns_error(&mut self, detail: &str) {
        self.add(
            Finding::DnsError,
            crate::probe::sanitize(detail),
            "the domain's DNS did not answer (SERVFAIL or timeout after retries): ask the customer to check their DNS servers; the next audit re-checks",
        );
    }

    fn has(&self, finding: Finding) -> bool {
        self.findings.contains(&finding)
    }

    fn absorb(&mut self, other: Row) {
        other.findings.into_iter().for_each(|f| push_new(&mut self.findings, f));
        other.records.into_iter().for_each(|r| push_new(&mut self.records, r));
        other.fixes.into_iter().for_each(|x| push_new(&mut self.fixes, x));
    }

    fn finish(mut self, domain: &str) -> DomainRow {
        self.findings.sort();
        if self.findings.is_empty() {
            self.findings.push(Finding::Ok);
        }
        DomainRow {
            domain: domain.to_string(),
            findings: self.findings,
            records: self.records,
            fixes: self.fixes,
        }
    }
}

fn push_new<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

impl Probe for HostedDomainsProbe {
    fn hostname(&self) -> &str {
        &self.name
    }

    fn own_targets(&self) -> Option<Vec<(String, IpAddr)>> {
        let (_, first) = &self.resolvers[0];
        Some(vec![("audit".to_string(), first.ip())])
    }

    fn eager(&self) -> bool {
        true
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
                    "domains file has lines that are skipped"
                );
            }
            let progress = Progress::default();
            let report = run.phase("audit", self.audit(&progress)).await?;
            run.measurements.push(Measurement::HostedDomains(Arc::new(report)));
            Ok(())
        })
    }
}

/// Reads a domains file: one domain per line, `#` comments, blank lines.
/// Invalid lines and repeats are skipped and counted; an unreadable file, one
/// over [`MAX_FILE_BYTES`] or one without any domain is an error.
pub fn read_domains(path: &Path) -> Result<(Vec<String>, InputSummary), String> {
    read_list(path, "domain", domain_name)
}

/// Reads a list file (domains, mail accounts): one `noun` per line made
/// canonical by `parse`, `#` comments, blank lines. Invalid lines and repeats
/// are skipped and counted, the first ones named with their line; an
/// unreadable file, one over [`MAX_FILE_BYTES`] or one without any entry is
/// an error. Memory stays bounded by the entries kept, whatever the file holds.
pub fn read_list(
    path: &Path,
    noun: &str,
    parse: impl Fn(&str) -> Result<String, String>,
) -> Result<(Vec<String>, InputSummary), String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?;
    if meta.is_dir() {
        return Err(format!(
            "cannot read {shown}: Is a directory; expected a file with one {noun} per line"
        ));
    }
    let size = meta.len();
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{shown} is {size} bytes; the limit is {MAX_FILE_BYTES} (split the list over several checks)"
        ));
    }
    let mut reader = BufReader::new(file.take(MAX_FILE_BYTES + 1));
    let mut summary = InputSummary {
        file: path.to_path_buf(),
        ..InputSummary::default()
    };
    let mut domains = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        // Read at most MAX_LINE + 1 bytes of a line, then skip to its end, so
        // a file without newlines cannot make one huge allocation.
        let n = read_line_bounded(&mut reader, &mut line).map_err(|e| format!("cannot read {shown}: {e}"))?;
        if n == 0 {
            break;
        }
        summary.lines += 1;
        let number = summary.lines;
        let problem = |summary: &mut InputSummary, message: String| {
            if summary.problems.len() < MAX_PROBLEMS_KEPT {
                summary.problems.push(format!("{shown}:{number}: {message}"));
            }
        };
        if line.len() > MAX_LINE {
            summary.invalid += 1;
            problem(&mut summary, format!("line longer than {MAX_LINE} bytes"));
            continue;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            summary.invalid += 1;
            problem(&mut summary, "not UTF-8 text".into());
            continue;
        };
        let text = text.split('#').next().unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        match parse(text) {
            Err(message) => {
                summary.invalid += 1;
                problem(&mut summary, message);
            }
            Ok(domain) => {
                if seen.contains(&domain) {
                    summary.duplicates += 1;
                    problem(&mut summary, format!("`{domain}` is listed before; skipped"));
                } else {
                    seen.insert(domain.clone());
                    domains.push(domain);
                }
            }
        }
    }
    if domains.is_empty() {
        return Err(format!(
            "{shown} lists no {noun} ({} lines{})",
            summary.lines,
            summary
                .problems
                .first()
                .map(|p| format!("; first problem: {p}"))
                .unwrap_or_default()
        ));
    }
    domains.shrink_to_fit();
    Ok((domains, summary))
}

/// Appends one line (without its end) to `out`, keeping at most
/// `MAX_LINE + 1` bytes of it; returns the bytes consumed (0 at the end).
fn read_line_bounded(reader: &mut impl BufRead, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(consumed);
        }
        let (chunk, end) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = (MAX_LINE + 1).saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = end.unwrap_or(buf.len());
        reader.consume(used);
        consumed += used;
        if end.is_some() {
            if out.last() == Some(&b'\r') {
                out.pop();
            }
            return Ok(consumed);
        }
    }
}

/// A customer domain as written in the file, checked and made canonical.
pub fn domain_name(text: &str) -> Result<String, String> {
    if text.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{}` is not one domain (one per line)",
            crate::probe::sanitize(text)
        ));
    }
    // Plain names are checked as written; IDNs are converted to punycode first.
    let ascii = if text.is_ascii() {
        normalize(text)
    } else {
        let name = Name::from_utf8(text.trim_end_matches('.')).map_err(|_| {
            format!(
                "`{}` is not a domain name (not a valid internationalized name)",
                crate::probe::sanitize(text)
            )
        })?;
        normalize(&name.to_ascii())
    };
    let labels: Vec<&str> = ascii.split('.').collect();
    if labels.len() < 2 {
        return Err(format!(
            "`{}` is not a domain (expected a name like `example.com`)",
            crate::probe::sanitize(text)
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if let Some(bad) = labels.iter().find(|l| !label_ok(l)) {
        return Err(format!(
            "`{}` is not a domain name: label `{}` (letters, digits and inner hyphens only)",
            crate::probe::sanitize(text),
            crate::probe::sanitize(bad)
        ));
    }
    if ascii.len() > 253 {
        return Err(format!("`{}…` is longer than 253 characters", &ascii[..40]));
    }
    Ok(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_file(text: &[u8]) -> Result<(Vec<String>, InputSummary), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("domains.txt");
        std::fs::write(&path, text).unwrap();
        read_domains(&path)
    }

    #[test]
    fn domains_are_canonical_and_bad_lines_are_named() {
        let (domains, summary) = parse_file(
            b"# customers\nExample.COM.\n\nb\xc3\xbccher.test  # IDN\nexample.com\nnot a domain\n-bad-.test\ncom\nfoo_bar.test\r\nok.test\r\n",
        )
        .unwrap();
        assert_eq!(domains, ["example.com", "xn--bcher-kva.test", "ok.test"]);
        assert_eq!((summary.lines, summary.invalid, summary.duplicates), (10, 4, 1));
        let problems = summary.problems.join("\n");
        for expected in [
            "domains.txt:5: `example.com` is listed before; skipped",
            "domains.txt:6: `not a domain` is not one domain",
            "domains.txt:7: `-bad-.test` is not a domain name: label `-bad-`",
            "domains.txt:8: `com` is not a domain",
            "domains.txt:9: `foo_bar.test` is not a domain name: label `foo_bar`",
        ] {
            assert!(problems.contains(expected), "missing {expected:?} in\n{problems}");
        }
    }

    #[test]
    fn a_file_without_domains_or_unreadable_is_an_error() {
        let err = parse_file(b"# nothing\n\nnot a domain\n").unwrap_err();
        assert!(err.contains("lists no domain (3 lines; first problem:"), "{err}");
        let err = read_domains(Path::new("/nonexistent/domains.txt")).unwrap_err();
        assert!(
            err.starts_with("cannot read /nonexistent/domains.txt: No such file"),
            "{err}"
        );
    }

    #[test]
    fn a_huge_line_is_skipped_without_reading_it_whole() {
        let mut text = vec![b'a'; 5 << 20];
        text.extend_from_slice(b"\nok.test\n");
        let (domains, summary) = parse_file(&text).unwrap();
        assert_eq!(domains, ["ok.test"]);
        assert_eq!(summary.invalid, 1);
        assert!(summary.problems[0].ends_with(":1: line longer than 1024 bytes"));
    }

    #[test]
    fn old_literals_cover_addresses_and_networks() {
        let old: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap()];
        let spf = Spf::parse(b"v=spf1 ip4:192.0.2.10 ip4:192.0.2.0/24 -ip4:192.0.2.10 ip4:198.51.100.1 ip6:2001:db8::/64 include:x.test -all").unwrap();
        assert_eq!(
            old_literals(&spf, &old),
            ["ip4:192.0.2.10", "ip4:192.0.2.0/24", "ip6:2001:db8::/64"]
        );
        let spf = Spf::parse(b"v=spf1 ip4:198.51.100.0/24 ~all").unwrap();
        assert!(old_literals(&spf, &old).is_empty());
    }

    #[test]
    fn spf_records_are_told_from_other_txt() {
        assert!(is_spf("v=spf1 -all"));
        assert!(is_spf("V=SPF1"));
        assert!(!is_spf("v=spf10 -all"));
        assert!(!is_spf("google-site-verification=abc"));
    }

    #[test]
    fn findings_parse_from_their_labels() {
        for f in Finding::ALL {
            assert_eq!(Finding::parse(f.as_str()), Ok(f));
        }
        let err = Finding::parse("spf").unwrap_err();
        assert!(err.contains("unknown finding `spf`; one of ok, mx_old_ip"), "{err}");
    }
}
