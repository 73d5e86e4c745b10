//! `kind: mail_auth` — will mail sent from the new outbound addresses
//! authenticate? For every outbound address of every environment: the domain's
//! SPF verdict, and whether the address's reverse name (PTR) resolves back to
//! it (FCrDNS); once per domain: whether the DKIM key and the DMARC record
//! exist and parse.
//!
//! One instance per check (see [`Probe::own_targets`]: its one target is the
//! resolver), evaluating every environment in the same run.
//!
//! The records this module reads itself — the domain's SPF TXT, PTR and the
//! forward lookups of FCrDNS, DKIM, DMARC — go through [`resolve::query`], like
//! the `dns` probe and `live`. SPF is evaluated by the `mail-auth` crate, never
//! by hand: it gets the domain's SPF record from us through its TXT cache and
//! resolves what the policy refers to (`include:`, `a`, `mx`, `exists`, ...)
//! with its own hickory resolver, pointed at the same server with caching off.
//! Its cache cannot say which names it is missing (its `get` sees only a
//! borrowed key of an unknown type), so those cannot be handed in too.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dmarc::Dmarc;
use mail_auth::spf::Spf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{DnsError, MessageAuthenticator, Parameters, ResolverCache, SpfResult, Txt};

use super::{Failure, FailureReason, FieldError, InPhase, Measurement, Probe, Run};
use crate::config::{Check, EnvKind, MailAuthSpec, ResolverAddr};
use crate::resolve::{self, QueryError};

/// What a `mail_auth` run measured about the outbound side, labelled by the
/// outbound environment and address rather than the instance's.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    /// The SPF verdict of `domain`'s policy for one outbound address.
    Spf {
        /// The domain whose policy was evaluated.
        domain: String,
        /// The outbound environment.
        env: String,
        /// Its address.
        address: String,
        /// The verdict.
        result: SpfVerdict,
    },
    /// The outbound address's PTR name resolves back to it (FCrDNS).
    Ptr {
        /// The outbound environment.
        env: String,
        /// Its address.
        address: String,
        /// Forward-confirmed.
        ok: bool,
    },
    /// The DKIM key record of a selector exists and parses.
    Dkim {
        /// The signing domain.
        domain: String,
        /// The selector.
        selector: String,
        /// Exists and parses.
        ok: bool,
    },
    /// `_dmarc.<domain>` exists and parses.
    Dmarc {
        /// The domain.
        domain: String,
        /// Exists and parses.
        ok: bool,
    },
}

/// Reverse names followed per address, as SPF's `ptr` does (RFC 7208 §5.5).
const MAX_PTR_NAMES: usize = 10;

/// The receiving host's name in SPF's `%{r}` macro: we receive nothing.
const RECEIVER: &str = "cutover-monitor.invalid";

/// An SPF result (RFC 7208 §2.6). A closed set: each value is a label value of
/// `cutover_spf_result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpfVerdict {
    /// The address is authorized.
    Pass,
    /// The address is explicitly not authorized (`-all`).
    Fail,
    /// Probably not authorized (`~all`): receivers mark or junk the mail.
    SoftFail,
    /// The policy says nothing about the address (`?all`).
    Neutral,
    /// The domain publishes no SPF record.
    None,
    /// The policy is broken: unparseable, too many lookups, missing include.
    PermError,
    /// A lookup failed transiently.
    TempError,
}

impl SpfVerdict {
    /// Every result, for the stateset metric.
    pub const ALL: [SpfVerdict; 7] = [
        Self::Pass,
        Self::Fail,
        Self::SoftFail,
        Self::Neutral,
        Self::None,
        Self::PermError,
        Self::TempError,
    ];

    /// The label value, as RFC 7208 writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::SoftFail => "softfail",
            Self::Neutral => "neutral",
            Self::None => "none",
            Self::PermError => "permerror",
            Self::TempError => "temperror",
        }
    }
}

impl From<SpfResult> for SpfVerdict {
    fn from(r: SpfResult) -> Self {
        match r {
            SpfResult::Pass => Self::Pass,
            SpfResult::Fail => Self::Fail,
            SpfResult::SoftFail => Self::SoftFail,
            SpfResult::Neutral => Self::Neutral,
            SpfResult::None => Self::None,
            SpfResult::PermError => Self::PermError,
            SpfResult::TempError => Self::TempError,
        }
    }
}

/// A built `mail_auth` check.
pub struct MailAuthProbe {
    /// Lower case, without the trailing dot.
    domain: String,
    server: SocketAddr,
    /// Environment name and its addresses, in config order.
    outbound: Vec<(String, Vec<IpAddr>)>,
    require_pass: Vec<String>,
    dkim_selector: Option<String>,
    helo: String,
    query_timeout: Duration,
}

impl MailAuthProbe {
    /// Validates the spec against the check's environments (all of them: a
    /// check with its own targets takes no `envs`).
    pub fn new(spec: &MailAuthSpec, check: &Check) -> Result<Self, FieldError> {
        let domain = resolve::normalize(&spec.domain);
        if domain.is_empty() || Name::from_utf8(&domain).is_err() {
            return Err(FieldError::new(
                "domain",
                format!("expected a domain name like `example.com`, got `{}`", spec.domain),
            ));
        }
        let server = match spec.resolver {
            ResolverAddr::Server(addr) => addr,
            ResolverAddr::System => {
                return Err(FieldError::new(
                    "resolver",
                    "the records are asked of one DNS server directly: write `IP` or `IP:port`",
                ));
            }
        };
        let pinned = |name: &str| {
            check.envs.iter().find(|e| e.name == name).map(|e| match &e.kind {
                EnvKind::Pinned(addrs) => Some(addrs.clone()),
                EnvKind::Live(_) => None,
            })
        };
        let outbound: Vec<(String, Vec<IpAddr>)> = if spec.outbound.is_empty() {
            let all: Vec<_> = check
                .envs
                .iter()
                .filter_map(|e| match &e.kind {
                    EnvKind::Pinned(addrs) => Some((e.name.clone(), addrs.clone())),
                    EnvKind::Live(_) => None,
                })
                .collect();
            if all.is_empty() {
                return Err(FieldError::new(
                    "outbound",
                    "no environment with `addresses` to evaluate: define one",
                ));
            }
            all
        } else {
            let mut out: Vec<(String, Vec<IpAddr>)> = Vec::new();
            for (i, name) in spec.outbound.iter().enumerate() {
                let field = format!("outbound[{i}]");
                match pinned(name) {
                    None => return Err(FieldError::new(field, format!("unknown environment `{name}`"))),
                    Some(None) => {
                        return Err(FieldError::new(
                            field,
                            format!("`{name}` is live; outbound addresses must be pinned (`addresses`)"),
                        ));
                    }
                    Some(Some(_)) if out.iter().any(|(n, _)| n == name) => {
                        return Err(FieldError::new(field, format!("`{name}` is listed twice")));
                    }
                    Some(Some(addrs)) => out.push((name.clone(), addrs)),
                }
            }
            out
        };
        let require_pass = match &spec.require_pass {
            None => outbound
                .iter()
                .filter(|(n, _)| n == "new")
                .map(|(n, _)| n.clone())
                .collect(),
            Some(names) => {
                for (i, name) in names.iter().enumerate() {
                    if !outbound.iter().any(|(n, _)| n == name) {
                        return Err(FieldError::new(
                            format!("require_pass[{i}]"),
                            format!("`{name}` is not an outbound environment of this check"),
                        ));
                    }
                }
                names.clone()
            }
        };
        if let Some(selector) = &spec.dkim_selector
            && Name::from_utf8(format!("{selector}._domainkey.{domain}")).is_err()
        {
            return Err(FieldError::new(
                "dkim_selector",
                format!("`{selector}` does not make a DNS name"),
            ));
        }
        let helo = match &spec.helo {
            Some(h) if Name::from_utf8(h).is_err() => {
                return Err(FieldError::new("helo", format!("expected a host name, got `{h}`")));
            }
            Some(h) => resolve::normalize(h),
            None => domain.clone(),
        };
        Ok(MailAuthProbe {
            domain,
            server,
            outbound,
            require_pass,
            dkim_selector: spec.dkim_selector.clone(),
            helo,
            query_timeout: resolve::query_timeout(check.timeout),
        })
    }

    /// One query through [`resolve::query`]. An answer (NOERROR or NXDOMAIN)
    /// comes back; anything else is kept in `problems`, which fail the run.
    async fn ask(&self, name: &str, rtype: RecordType, problems: &Mutex<Vec<Failure>>) -> Option<Message> {
        let server = self.server;
        let failure = match resolve::query(server, name, rtype, self.query_timeout).await {
            Ok(msg)
                if matches!(
                    msg.metadata.response_code,
                    ResponseCode::NoError | ResponseCode::NXDomain
                ) =>
            {
                return Some(msg);
            }
            Ok(msg) => Failure::new(
                FailureReason::Dns,
                format!("{name} {rtype}: {server} answered {}", msg.metadata.response_code),
            ),
            Err(QueryError::Timeout(..)) => Failure::new(
                FailureReason::Timeout,
                format!(
                    "{name} {rtype}: no answer from {server} within {}",
                    humantime::format_duration(self.query_timeout)
                ),
            ),
            Err(e) => Failure::new(FailureReason::Dns, format!("{name} {rtype}: {e}")),
        };
        problems.lock().expect("problems lock").push(failure);
        None
    }

    /// Whether a TXT record at `name` parses as `T` (DKIM key, DMARC policy).
    async fn record_parses<T: TxtRecordParser>(&self, name: &str, problems: &Mutex<Vec<Failure>>) -> bool {
        self.ask(name, RecordType::TXT, problems)
            .await
            .is_some_and(|msg| first_parsed::<T>(&resolve::txt_strings(&msg)).is_ok())
    }

    /// Forward-confirmed reverse DNS: a PTR name of `ip` resolves to `ip`.
    async fn fcrdns(&self, ip: IpAddr, problems: &Mutex<Vec<Failure>>) -> bool {
        let Some(reply) = self.ask(&Name::from(ip).to_ascii(), RecordType::PTR, problems).await else {
            return false;
        };
        let names: Vec<String> = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(ptr) => Some(ptr.0.to_ascii()),
                _ => None,
            })
            .take(MAX_PTR_NAMES)
            .collect();
        let rtype = if ip.is_ipv4() { RecordType::A } else { RecordType::AAAA };
        let forward = futures::future::join_all(names.iter().map(|n| self.ask(n, rtype, problems))).await;
        forward
            .iter()
            .flatten()
            .any(|msg| msg.answers.iter().any(|r| r.data.ip_addr() == Some(ip)))
    }

    /// The crate's resolver for what an SPF policy refers to: the same server,
    /// no cache (every run asks afresh), no hosts file, one try per query.
    fn authenticator(&self) -> Result<MessageAuthenticator, Failure> {
        let mut server = NameServerConfig::udp_and_tcp(self.server.ip());
        for connection in &mut server.connections {
            connection.port = self.server.port();
        }
        let mut opts = ResolverOpts::default();
        opts.timeout = self.query_timeout;
        opts.attempts = 0;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![server]), opts).map_err(|e| {
            Failure::new(
                FailureReason::Dns,
                format!("setting up SPF lookups at {}: {e}", self.server),
            )
        })
    }
}

impl Probe for MailAuthProbe {
    fn hostname(&self) -> &str {
        &self.domain
    }

    fn judges(&self) -> Vec<String> {
        self.require_pass.clone()
    }

    fn own_targets(&self) -> Option<Vec<(String, IpAddr)>> {
        Some(vec![("resolver".to_string(), self.server.ip())])
    }

    fn run<'a>(&'a self, _resolver: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let problems = Mutex::new(Vec::new());
            let problems = &problems;
            let addresses: Vec<(&str, IpAddr)> = self
                .outbound
                .iter()
                .flat_map(|(env, ips)| ips.iter().map(move |ip| (env.as_str(), *ip)))
                .collect();
            let dkim_name = self
                .dkim_selector
                .as_ref()
                .map(|s| format!("{s}._domainkey.{}", self.domain));
            let dmarc_name = format!("_dmarc.{}", self.domain);
            let lookups = async {
                tokio::join!(
                    self.ask(&self.domain, RecordType::TXT, problems),
                    async {
                        match &dkim_name {
                            Some(name) => Some(self.record_parses::<DomainKey>(name, problems).await),
                            None => None,
                        }
                    },
                    self.record_parses::<Dmarc>(&dmarc_name, problems),
                    futures::future::join_all(addresses.iter().map(|(_, ip)| self.fcrdns(*ip, problems))),
                )
            };
            let (spf_reply, dkim_ok, dmarc_ok, ptr_ok) = run.phase("lookup", lookups).await;
            for ((env, ip), ok) in addresses.iter().zip(ptr_ok) {
                run.measurements.push(Measurement::MailAuth(Measured::Ptr {
                    env: env.to_string(),
                    address: ip.to_string(),
                    ok,
                }));
            }
            if let (Some(selector), Some(ok)) = (&self.dkim_selector, dkim_ok) {
                run.measurements.push(Measurement::MailAuth(Measured::Dkim {
                    domain: self.domain.clone(),
                    selector: selector.clone(),
                    ok,
                }));
            }
            run.measurements.push(Measurement::MailAuth(Measured::Dmarc {
                domain: self.domain.clone(),
                ok: dmarc_ok,
            }));

            // The crate reads the domain's own record from us, the rest itself.
            let txt = TxtCache::default();
            txt.supply(fqdn(&self.domain), spf_entry(spf_reply.as_ref(), self.server));
            let auth = self.authenticator().in_phase("spf")?;
            let sender = format!("postmaster@{}", self.domain);
            let evaluations = futures::future::join_all(addresses.iter().map(|(_, ip)| {
                let params = SpfParameters::verify_mail_from(*ip, &self.helo, RECEIVER, &sender);
                let auth = &auth;
                let txt = &txt;
                async move { auth.verify_spf(Parameters::new(params).with_txt_cache(txt)).await }
            }));
            let outputs = run.phase("spf", evaluations).await;
            let mut misses = Vec::new();
            for ((env, ip), output) in addresses.iter().zip(outputs) {
                let result = SpfVerdict::from(output.result());
                if result != SpfVerdict::Pass && self.require_pass.iter().any(|r| r == env) {
                    misses.push(format!("{env} {ip} gets {}", result.as_str()));
                }
                run.measurements.push(Measurement::MailAuth(Measured::Spf {
                    domain: self.domain.clone(),
                    env: env.to_string(),
                    address: ip.to_string(),
                    result,
                }));
            }

            let problems = std::mem::take(&mut *problems.lock().expect("problems lock"));
            // A silent resolver says more than what it did answer.
            let first = problems
                .iter()
                .position(|f| f.reason == FailureReason::Timeout)
                .unwrap_or(0);
            if let Some(mut failure) = problems.get(first).cloned() {
                if problems.len() > 1 {
                    failure.detail.push_str(&format!(" (and {} more)", problems.len() - 1));
                }
                return Err(failure).in_phase("lookup");
            }
            if !misses.is_empty() {
                return Err(Failure::new(
                    FailureReason::ContentMismatch,
                    format!("SPF of {} does not pass: {}", self.domain, misses.join(", ")),
                ))
                .in_phase("spf");
            }
            Ok(())
        })
    }
}

/// A TXT cache the crate reads from; also stores what it looks up itself
/// (includes, redirects), so the run's other addresses reuse those answers.
#[derive(Default)]
struct TxtCache(Mutex<HashMap<Box<str>, Txt>>);

impl ResolverCache<Box<str>, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().expect("txt cache lock").get(name).cloned()
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().expect("txt cache lock").remove(name)
    }

    fn insert(&self, key: Box<str>, value: Txt, _valid_until: std::time::Instant) {
        self.0.lock().expect("txt cache lock").insert(key, value);
    }
}

impl TxtCache {
    /// Hands the crate a record we looked up ourselves.
    fn supply(&self, key: Box<str>, value: Txt) {
        self.0.lock().expect("txt cache lock").insert(key, value);
    }
}

/// The cache key the crate uses: lower case with the trailing dot.
fn fqdn(domain: &str) -> Box<str> {
    format!("{domain}.").into()
}

/// The domain's SPF record as the crate's own lookup would have cached it:
/// the record, its parse error, "not found", or a resolver error (temperror).
fn spf_entry(reply: Option<&Message>, server: SocketAddr) -> Txt {
    let error = |e: DnsError| Txt::Error(mail_auth::Error::Dns(e));
    let Some(msg) = reply else {
        return error(DnsError::Resolver(format!("no answer from {server}")));
    };
    let records = resolve::txt_strings(msg);
    if msg.metadata.response_code == ResponseCode::NXDomain || records.is_empty() {
        return error(DnsError::RecordNotFound(msg.metadata.response_code));
    }
    first_parsed::<Spf>(&records).into()
}

/// The crate's rule for a TXT set (as in its `txt_lookup`): the first record
/// that parses as `T`, else the last error.
fn first_parsed<T: TxtRecordParser>(records: &[Vec<u8>]) -> mail_auth::Result<T> {
    let mut result = Err(mail_auth::Error::Dns(DnsError::InvalidRecordType));
    for record in records {
        result = T::parse(record);
        if result.is_ok() {
            break;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed<T: TxtRecordParser>(records: &[&str]) -> bool {
        let records: Vec<Vec<u8>> = records.iter().map(|r| r.as_bytes().to_vec()).collect();
        first_parsed::<T>(&records).is_ok()
    }

    #[test]
    fn records_are_picked_and_parsed_by_the_crate() {
        assert!(parsed::<Spf>(&[
            "google-site-verification=x",
            "v=spf1 ip4:192.0.2.1 -all"
        ]));
        assert!(!parsed::<Spf>(&["google-site-verification=x"]));
        assert!(parsed::<Dmarc>(&["v=DMARC1; p=reject"]));
        assert!(!parsed::<Dmarc>(&["v=spf1 -all"]));
        assert!(parsed::<DomainKey>(&[
            "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
        ]));
        // An empty key is a revoked one.
        assert!(!parsed::<DomainKey>(&["v=DKIM1; p="]));
    }

    #[test]
    fn verdicts_are_the_rfc_names() {
        let names: Vec<&str> = SpfVerdict::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(
            names,
            ["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
        );
        assert_eq!(SpfVerdict::from(SpfResult::SoftFail), SpfVerdict::SoftFail);
    }
}
