//! `kind: dns` — what each resolver answers for the records that move, compared
//! with their old and new values: "who still sees the old IPs, and until when?".
//!
//! A dns check runs once per resolver, not per environment (see
//! [`Probe::own_targets`]): each instance asks its resolver for every watched
//! record through [`resolve::query_transport`], the function the `live`
//! environment uses too, so the live view and the DNS view cannot disagree.
//! Each answer set becomes an [`AnswerState`]. The probe object is shared by the
//! check's instances and lives until a reload, so it also remembers every
//! resolver's last answer and returns the cross-resolver summaries (cutover
//! ratio, propagation deadline) with each run.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};

use super::{Failure, FailureReason, FieldError, InPhase, Measurement, Probe, Run};
use crate::config::{Check, DnsRecordSpec, DnsRecordType, DnsSpec, EnvKind};
use crate::resolve::{self, QueryError, Transport};

/// What a DNS run measured for each record.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    /// One resolver's answer for one record.
    Answer {
        /// The record's name as configured.
        record: String,
        /// Its type, e.g. `A`.
        rtype: &'static str,
        /// The resolver's name.
        resolver: String,
        /// How the answer compares with the expected sets.
        state: AnswerState,
        /// Lowest TTL in the answer; none without an answer.
        ttl: Option<u32>,
        /// Query duration in seconds.
        seconds: f64,
        /// Whether the UDP answer was truncated and the query repeated over TCP.
        tcp: bool,
        /// Whether the state differs from the resolver's previous one.
        changed: bool,
    },
    /// A record's summary across the check's resolvers: every instance of the
    /// check reports it, the latest run wins.
    Summary {
        /// The record's name as configured.
        record: String,
        /// Its type.
        rtype: &'static str,
        /// Resolvers asked so far.
        resolvers: usize,
        /// Of which answering `new`.
        answering_new: usize,
        /// When every resolver still answering old will have expired it, when known.
        deadline: Option<f64>,
        /// The expected old and new answers are the same: the record does not
        /// move, so it has no cutover to count.
        unchanged: bool,
    },
}

/// How one resolver's answer for one record compares with the expected values.
/// A closed set: each value is a label value of `cutover_dns_answer_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnswerState {
    /// Only old values.
    Old,
    /// Only new values.
    New,
    /// Old and new values together.
    Mixed,
    /// At least one value that is neither old nor new.
    Other,
    /// The name exists but has no record of this type (an empty NOERROR).
    Nodata,
    /// The name does not exist.
    Nxdomain,
    /// SERVFAIL, or any other way the server failed to answer: another error
    /// code, a malformed reply, a network error.
    Servfail,
    /// The server refused the query (REFUSED).
    Refused,
    /// No answer within the check's timeout.
    Timeout,
}

impl AnswerState {
    /// Every state, for the stateset metric.
    pub const ALL: [AnswerState; 9] = [
        Self::Old,
        Self::New,
        Self::Mixed,
        Self::Other,
        Self::Nodata,
        Self::Nxdomain,
        Self::Servfail,
        Self::Refused,
        Self::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Old => "old",
            Self::New => "new",
            Self::Mixed => "mixed",
            Self::Other => "other",
            Self::Nodata => "nodata",
            Self::Nxdomain => "nxdomain",
            Self::Servfail => "servfail",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
        }
    }

    /// Whether the resolver answered: then the instance succeeds and the state
    /// is the information; otherwise the resolver itself is failing.
    pub fn is_answer(self) -> bool {
        !matches!(self, Self::Servfail | Self::Refused | Self::Timeout)
    }

    /// Whether a resolver in this state may still hand out the old values.
    fn serves_old(self) -> bool {
        matches!(self, Self::Old | Self::Mixed)
    }
}

/// A built `dns` check.
pub struct DnsProbe {
    resolvers: Vec<(String, IpAddr)>,
    port: u16,
    records: Vec<Watched>,
    query_timeout: Duration,
    /// Last answer per (record index, resolver name), across instances.
    seen: Mutex<HashMap<(usize, String), Seen>>,
}

/// One watched record with its expected values, normalized for comparison.
struct Watched {
    /// The `record` label: the name as written.
    label: String,
    /// The name asked for (the reverse name for a PTR written as an address).
    query: String,
    rtype: RecordType,
    old: BTreeSet<String>,
    new: BTreeSet<String>,
}

/// What one query brought back.
struct Answer {
    state: AnswerState,
    ttl: Option<u32>,
    took: Duration,
    at: f64,
    tcp: bool,
    failure: Option<Failure>,
}

impl DnsProbe {
    /// Validates the spec. Expected values are parsed and normalized here, so
    /// a typo is a config error, not an `other` at 3 a.m.
    pub fn new(spec: &DnsSpec, check: &Check) -> Result<Self, FieldError> {
        if spec.resolvers.is_empty() {
            return Err(FieldError::new(
                "resolvers",
                "name at least one resolver, e.g. `authoritative: 192.0.2.53`",
            ));
        }
        if spec.port == 0 {
            return Err(FieldError::new("port", "must be between 1 and 65535"));
        }
        let mut resolvers: Vec<(String, IpAddr)> = Vec::new();
        for (name, ip) in &spec.resolvers {
            if let Some((other, _)) = resolvers.iter().find(|(_, a)| a == ip) {
                return Err(FieldError::new(
                    format!("resolvers.{name}"),
                    format!("{ip} is already resolver `{other}`"),
                ));
            }
            resolvers.push((name.clone(), *ip));
        }
        if spec.records.is_empty() {
            return Err(FieldError::new(
                "records",
                "list at least one record, e.g. `{name: imap.example.com, type: A, expect_env_addresses: true}`",
            ));
        }
        let mut records: Vec<Watched> = Vec::new();
        for (i, r) in spec.records.iter().enumerate() {
            let w = watched(r, check).map_err(|(field, message)| {
                let field = if field.is_empty() {
                    format!("records[{i}]")
                } else {
                    format!("records[{i}].{field}")
                };
                FieldError::new(field, message)
            })?;
            if records.iter().any(|o| o.label == w.label && o.rtype == w.rtype) {
                return Err(FieldError::new(
                    format!("records[{i}]"),
                    format!("{} {} is watched twice", w.label, w.rtype),
                ));
            }
            records.push(w);
        }
        Ok(DnsProbe {
            resolvers,
            port: spec.port,
            records,
            query_timeout: resolve::query_timeout(check.timeout),
            seen: Mutex::new(HashMap::new()),
        })
    }

    async fn ask(&self, server: SocketAddr, record: &Watched) -> Answer {
        let start = Instant::now();
        let reply = resolve::query_transport(server, &record.query, record.rtype, self.query_timeout).await;
        let took = start.elapsed();
        let at = crate::unix_now();
        let what = format!("{} {}", record.label, record.rtype);
        let failed = |state, failure: Failure| Answer {
            state,
            ttl: None,
            took,
            at,
            tcp: false,
            failure: Some(failure),
        };
        let (msg, transport) = match reply {
            Ok(reply) => reply,
            Err(QueryError::Timeout(..)) => {
                return failed(
                    AnswerState::Timeout,
                    Failure::new(
                        FailureReason::Timeout,
                        format!(
                            "{what}: no answer from {server} within {}",
                            humantime::format_duration(self.query_timeout)
                        ),
                    ),
                );
            }
            Err(QueryError::Io(_, e)) => {
                let mut failure = Failure::io(&e);
                failure.detail = format!("{what}: asking {server}: {}", failure.detail);
                return failed(AnswerState::Servfail, failure);
            }
            Err(e @ QueryError::Malformed(_)) => {
                return failed(
                    AnswerState::Servfail,
                    Failure::new(FailureReason::Protocol, format!("{what}: {e}")),
                );
            }
        };
        let (state, ttl) = classify(record, &msg);
        let failure = (!state.is_answer()).then(|| {
            let code = msg.metadata.response_code;
            Failure::new(FailureReason::Dns, format!("{what}: {server} answered {code}"))
        });
        Answer {
            state,
            ttl,
            took,
            at,
            tcp: transport == Transport::Tcp,
            failure,
        }
    }
}

impl Probe for DnsProbe {
    /// Never resolved (a dns check has no `live` instance); names the first record.
    fn hostname(&self) -> &str {
        &self.records[0].query
    }

    fn own_targets(&self) -> Option<Vec<(String, IpAddr)>> {
        Some(self.resolvers.clone())
    }

    /// A record without an answer (NXDOMAIN, SERVFAIL, silence) fails the
    /// check; when the check names new's values, new is not ready without it.
    fn judges(&self) -> Vec<String> {
        match self.records.iter().any(|r| !r.new.is_empty()) {
            true => vec!["new".to_string()],
            false => Vec::new(),
        }
    }

    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let Some((resolver, _)) = self.resolvers.iter().find(|(_, a)| *a == ip) else {
                return Err(Failure::new(
                    FailureReason::Protocol,
                    format!("{ip} is not a resolver of this check"),
                ));
            };
            let server = SocketAddr::new(ip, self.port);
            let asks = futures::future::join_all(self.records.iter().map(|r| self.ask(server, r)));
            let answers = run.phase("query", asks).await;

            let mut seen = self.seen.lock().expect("dns state lock");
            for (i, (record, answer)) in self.records.iter().zip(&answers).enumerate() {
                let entry = seen.entry((i, resolver.clone())).or_default();
                let changed = entry.observe(answer.state, answer.ttl, answer.at);
                run.measurements.push(Measurement::Dns(Measured::Answer {
                    record: record.label.clone(),
                    rtype: type_label(record.rtype),
                    resolver: resolver.clone(),
                    state: answer.state,
                    ttl: answer.ttl,
                    seconds: answer.took.as_secs_f64(),
                    tcp: answer.tcp,
                    changed,
                }));
            }
            for (i, record) in self.records.iter().enumerate() {
                let states = self
                    .resolvers
                    .iter()
                    .filter_map(|(name, _)| seen.get(&(i, name.clone())));
                let (resolvers, answering_new, deadline) = summarize(states);
                run.measurements.push(Measurement::Dns(Measured::Summary {
                    record: record.label.clone(),
                    rtype: type_label(record.rtype),
                    resolvers,
                    answering_new,
                    deadline,
                    unchanged: record.old == record.new,
                }));
            }
            drop(seen);

            let mut failures = answers.into_iter().filter_map(|a| a.failure);
            match failures.next() {
                None => Ok(()),
                Some(mut first) => {
                    let more = failures.count();
                    if more > 0 {
                        first.detail.push_str(&format!(" (and {more} more)"));
                    }
                    Err(first).in_phase("query")
                }
            }
        })
    }
}

/// The `type` label value.
pub fn type_label(rtype: RecordType) -> &'static str {
    match rtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::MX => "MX",
        RecordType::TXT => "TXT",
        RecordType::CNAME => "CNAME",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        _ => "other",
    }
}

fn record_type(t: DnsRecordType) -> RecordType {
    match t {
        DnsRecordType::A => RecordType::A,
        DnsRecordType::Aaaa => RecordType::AAAA,
        DnsRecordType::Mx => RecordType::MX,
        DnsRecordType::Txt => RecordType::TXT,
        DnsRecordType::Cname => RecordType::CNAME,
        DnsRecordType::Srv => RecordType::SRV,
        DnsRecordType::Ptr => RecordType::PTR,
    }
}

/// Builds one watched record; errors are (field relative to the record, message).
fn watched(spec: &DnsRecordSpec, check: &Check) -> Result<Watched, (String, String)> {
    let rtype = record_type(spec.rtype);
    let err = |field: &str, message: String| (field.to_string(), message);
    let label = resolve::normalize(&spec.name);
    let query = match (rtype, spec.name.parse::<IpAddr>()) {
        (RecordType::PTR, Ok(ip)) => Name::from(ip).to_ascii(),
        _ => {
            Name::from_utf8(&spec.name).map_err(|e| err("name", format!("invalid DNS name `{}`: {e}", spec.name)))?;
            label.clone()
        }
    };
    let (old, new) = if spec.expect_env_addresses {
        if !matches!(rtype, RecordType::A | RecordType::AAAA) {
            return Err(err(
                "expect_env_addresses",
                format!("only A and AAAA records take environments' addresses, not {rtype}"),
            ));
        }
        if !spec.old.is_empty() || !spec.new.is_empty() {
            return Err(err(
                "expect_env_addresses",
                "list `old`/`new` or take them from the environments, not both".into(),
            ));
        }
        let addresses = |env: &str| -> Result<BTreeSet<String>, (String, String)> {
            let pinned = check.envs.iter().find_map(|e| match &e.kind {
                EnvKind::Pinned(addrs) if e.name == env => Some(addrs),
                _ => None,
            });
            let Some(addrs) = pinned else {
                return Err(err(
                    "expect_env_addresses",
                    format!("needs a pinned environment named `{env}` (with `addresses`)"),
                ));
            };
            Ok(addrs
                .iter()
                .filter(|ip| ip.is_ipv4() == (rtype == RecordType::A))
                .map(IpAddr::to_string)
                .collect())
        };
        (addresses("old")?, addresses("new")?)
    } else {
        let parse = |field: &str, values: &[String]| -> Result<BTreeSet<String>, (String, String)> {
            values
                .iter()
                .enumerate()
                .map(|(j, v)| expected_value(rtype, v).map_err(|m| err(&format!("{field}[{j}]"), m)))
                .collect()
        };
        (parse("old", &spec.old)?, parse("new", &spec.new)?)
    };
    if old.is_empty() && new.is_empty() {
        let message = if spec.expect_env_addresses {
            format!("the `old` and `new` environments have no {rtype} addresses")
        } else {
            "list the expected values in `old` and/or `new` (or `expect_env_addresses: true` for A/AAAA)".into()
        };
        return Err(err("", message));
    }
    Ok(Watched {
        label,
        query,
        rtype,
        old,
        new,
    })
}

fn checked_name(text: &str) -> Result<String, String> {
    Name::from_utf8(text).map_err(|e| format!("invalid DNS name `{text}`: {e}"))?;
    Ok(resolve::normalize(text))
}

/// Parses an expected value into the form [`answer_value`] produces.
fn expected_value(rtype: RecordType, text: &str) -> Result<String, String> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let number = |s: &str, what: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("`{text}`: {what} must be a number from 0 to 65535"))
    };
    match rtype {
        RecordType::A => text
            .parse::<Ipv4Addr>()
            .map(|ip| ip.to_string())
            .map_err(|_| format!("`{text}` is not an IPv4 address")),
        RecordType::AAAA => text
            .parse::<Ipv6Addr>()
            .map(|ip| ip.to_string())
            .map_err(|_| format!("`{text}` is not an IPv6 address")),
        RecordType::MX => match fields[..] {
            [pref, host] => Ok(format!("{} {}", number(pref, "the preference")?, checked_name(host)?)),
            _ => Err(format!(
                "`{text}`: expected `PREFERENCE HOST`, e.g. `10 mx.example.com`"
            )),
        },
        RecordType::SRV => match fields[..] {
            [prio, weight, port, target] => Ok(format!(
                "{} {} {} {}",
                number(prio, "the priority")?,
                number(weight, "the weight")?,
                number(port, "the port")?,
                checked_name(target)?
            )),
            _ => Err(format!(
                "`{text}`: expected `PRIORITY WEIGHT PORT TARGET`, e.g. `0 5 993 imap.example.com`"
            )),
        },
        RecordType::CNAME | RecordType::PTR => checked_name(text),
        _ => Ok(text.to_string()),
    }
}

/// One answer record's value in comparable form; `None` for other types.
fn answer_value(data: &RData) -> Option<String> {
    let name = |n: &Name| resolve::normalize(&n.to_ascii());
    Some(match data {
        RData::A(a) => a.0.to_string(),
        RData::AAAA(a) => a.0.to_string(),
        RData::MX(mx) => format!("{} {}", mx.preference, name(&mx.exchange)),
        RData::SRV(srv) => format!("{} {} {} {}", srv.priority, srv.weight, srv.port, name(&srv.target)),
        RData::CNAME(c) => name(&c.0),
        RData::PTR(p) => name(&p.0),
        RData::TXT(txt) => txt.txt_data.iter().map(|s| String::from_utf8_lossy(s)).collect(),
        _ => return None,
    })
}

/// Classifies a reply; the TTL is the lowest in the answer, or the negative
/// caching TTL (from the SOA) for NXDOMAIN and NODATA.
fn classify(record: &Watched, msg: &Message) -> (AnswerState, Option<u32>) {
    let negative_ttl = || {
        msg.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })
    };
    match msg.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return (AnswerState::Nxdomain, negative_ttl()),
        ResponseCode::Refused => return (AnswerState::Refused, None),
        _ => return (AnswerState::Servfail, None),
    }
    let values: BTreeSet<String> = msg
        .answers
        .iter()
        .filter(|r| r.record_type() == record.rtype)
        .filter_map(|r| answer_value(&r.data))
        .collect();
    let ttl = if values.is_empty() {
        negative_ttl()
    } else {
        // A CNAME on the way expires with the records it led to.
        msg.answers.iter().map(|r| r.ttl).min()
    };
    (compare(&values, &record.old, &record.new), ttl)
}

/// Classifies a raw reply for an `rtype` record expected to hold `old` or
/// `new` (values as written in a check file), as a run does; `Err` when a
/// value or the reply does not parse. Public for the fuzz harness (fuzz/).
pub fn classify_wire(
    rtype: RecordType,
    old: &[&str],
    new: &[&str],
    wire: &[u8],
) -> Result<(AnswerState, Option<u32>), String> {
    let parse = |values: &[&str]| -> Result<BTreeSet<String>, String> {
        values.iter().map(|v| expected_value(rtype, v)).collect()
    };
    let record = Watched {
        label: String::new(),
        query: String::new(),
        rtype,
        old: parse(old)?,
        new: parse(new)?,
    };
    let msg = Message::from_vec(wire).map_err(|e| e.to_string())?;
    Ok(classify(&record, &msg))
}

/// Compares an answer set with the expected sets. Exact matches first (`new`
/// before `old`, so a record that does not change counts as done), then
/// subsets, so a resolver handing out one of two old addresses is still `old`.
fn compare(values: &BTreeSet<String>, old: &BTreeSet<String>, new: &BTreeSet<String>) -> AnswerState {
    if values == new {
        AnswerState::New
    } else if values == old {
        AnswerState::Old
    } else if values.is_empty() {
        AnswerState::Nodata
    } else if values.is_subset(old) {
        AnswerState::Old
    } else if values.is_subset(new) {
        AnswerState::New
    } else if values.iter().all(|v| old.contains(v) || new.contains(v)) {
        AnswerState::Mixed
    } else {
        AnswerState::Other
    }
}

/// What the check remembers of one resolver's answers for one record.
#[derive(Debug, Default)]
struct Seen {
    state: Option<AnswerState>,
    /// Whether its last answer (failures aside) was old or mixed.
    on_old: bool,
    /// When its cached old answer expires: last seen + TTL.
    old_until: f64,
    /// When it was first seen answering something else after old or mixed.
    left_old_at: Option<f64>,
}

impl Seen {
    /// Takes in an answer seen at `at`; returns whether the state changed.
    fn observe(&mut self, state: AnswerState, ttl: Option<u32>, at: f64) -> bool {
        let changed = self.state.is_some_and(|s| s != state);
        self.state = Some(state);
        if state.serves_old() {
            self.on_old = true;
            self.old_until = at + f64::from(ttl.unwrap_or(0));
            self.left_old_at = None;
        } else if state.is_answer() && self.on_old {
            self.on_old = false;
            self.left_old_at = Some(at);
        }
        // A failing resolver says nothing about its cache: keep what we knew.
        changed
    }
}

/// (resolvers asked so far, of which answering `new`, propagation deadline).
///
/// The deadline is the latest time at which a resolver still serving old (or
/// mixed) values will have expired them: its last-seen time plus its TTL. When
/// none serves old any more, it is the time the last one was seen to switch;
/// when none was ever seen serving old, there is none.
fn summarize<'a>(seen: impl Iterator<Item = &'a Seen>) -> (usize, usize, Option<f64>) {
    let (mut asked, mut new) = (0, 0);
    let (mut until, mut switched): (Option<f64>, Option<f64>) = (None, None);
    let max = |a: Option<f64>, b: f64| Some(a.map_or(b, |a| a.max(b)));
    for s in seen {
        asked += 1;
        if s.state == Some(AnswerState::New) {
            new += 1;
        }
        if s.on_old {
            until = max(until, s.old_until);
        } else if let Some(at) = s.left_old_at {
            switched = max(switched, at);
        }
    }
    (asked, new, until.or(switched))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(values: &[&str]) -> BTreeSet<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn answers_compare_as_sets() {
        let (old, new) = (set(&["10.0.0.1", "10.0.0.2"]), set(&["10.0.0.9"]));
        let cases: &[(&[&str], AnswerState)] = &[
            (&["10.0.0.2", "10.0.0.1"], AnswerState::Old),
            (&["10.0.0.2"], AnswerState::Old),
            (&["10.0.0.9"], AnswerState::New),
            (&["10.0.0.1", "10.0.0.9"], AnswerState::Mixed),
            (&["10.0.0.1", "10.0.0.7"], AnswerState::Other),
            (&[], AnswerState::Nodata),
        ];
        for (answer, want) in cases {
            assert_eq!(compare(&set(answer), &old, &new), *want, "{answer:?}");
        }
        // A record that does not change is done; a record that goes away is new when gone.
        assert_eq!(compare(&set(&["a"]), &set(&["a"]), &set(&["a"])), AnswerState::New);
        assert_eq!(compare(&set(&[]), &set(&["a"]), &set(&[])), AnswerState::New);
    }

    #[test]
    fn expected_values_are_normalized_like_answers() {
        use hickory_resolver::proto::rr::rdata::{MX, SRV, TXT};
        let name = |n: &str| Name::from_utf8(n).unwrap();
        let mx = RData::MX(MX::new(10, name("MX.Example.TEST.")));
        assert_eq!(
            expected_value(RecordType::MX, "10  mx.example.test").unwrap(),
            answer_value(&mx).unwrap()
        );
        let srv = RData::SRV(SRV::new(0, 5, 993, name("imap.example.test.")));
        assert_eq!(
            expected_value(RecordType::SRV, "0 5 993 IMAP.example.test.").unwrap(),
            answer_value(&srv).unwrap()
        );
        let txt = RData::TXT(TXT::new(vec!["v=spf1 ".into(), "-all".into()]));
        assert_eq!(
            expected_value(RecordType::TXT, "v=spf1 -all").unwrap(),
            answer_value(&txt).unwrap()
        );
        assert_eq!(
            expected_value(RecordType::AAAA, "2001:DB8::0:1").unwrap(),
            "2001:db8::1"
        );
        assert!(
            expected_value(RecordType::MX, "mx.example.test")
                .unwrap_err()
                .contains("PREFERENCE HOST")
        );
        assert!(expected_value(RecordType::A, "2001:db8::1").is_err());
    }

    fn config_errors(checks: &str) -> Vec<String> {
        let text = format!(
            "environments:\n  old: {{addresses: [127.0.0.10]}}\n  new: {{addresses: [127.0.0.20]}}\nchecks:\n{checks}"
        );
        match crate::probe::parse(std::path::Path::new("c.yaml"), &text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_dns_check_runs_per_resolver_and_refuses_envs_and_bad_values() {
        let ok = "  - name: d\n    kind: dns\n    resolvers: {a: 127.0.0.30, b: 127.0.0.31}\n    records:\n      - {name: imap.example.test, type: A, expect_env_addresses: true}\n";
        let config = crate::probe::parse(
            std::path::Path::new("c.yaml"),
            &format!(
                "environments:\n  old: {{addresses: [127.0.0.10]}}\n  new: {{addresses: [127.0.0.20]}}\nchecks:\n{ok}"
            ),
        )
        .unwrap();
        let instances = crate::scheduler::instances(&config);
        let labels: Vec<_> = instances
            .iter()
            .map(|s| (s.inst.env.as_str(), s.inst.address.as_str()))
            .collect();
        assert_eq!(labels, [("a", "127.0.0.30"), ("b", "127.0.0.31")]);

        assert_eq!(
            config_errors(&format!("{ok}    envs: [old]\n")),
            [
                "c.yaml:10:5: field `checks[0].envs`: a `dns` check asks its own resolvers, not environments: remove `envs`"
            ]
        );
        let bad = "  - name: d\n    kind: dns\n    resolvers: {a: 127.0.0.30}\n    records:\n      - {name: example.test, type: MX, old: [mx.example.test], new: [\"10 mx\"]}\n";
        let errs = config_errors(bad);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "c.yaml:9:46: field `checks[0].records[0].old[0]`: `mx.example.test`: expected `PREFERENCE HOST`"
            ),
            "{errs:?}"
        );
        let txt_from_envs = "  - name: d\n    kind: dns\n    resolvers: {a: 127.0.0.30}\n    records:\n      - {name: example.test, type: TXT, expect_env_addresses: true}\n";
        let errs = config_errors(txt_from_envs);
        assert!(
            errs[0].contains("records[0].expect_env_addresses`: only A and AAAA"),
            "{errs:?}"
        );
    }

    #[test]
    fn the_deadline_follows_the_last_resolver_serving_old() {
        let (mut auth, mut lagging) = (Seen::default(), Seen::default());
        assert!(!auth.observe(AnswerState::Old, Some(300), 1000.0));
        lagging.observe(AnswerState::Old, Some(300), 1000.0);
        // The authoritative switches; the lagging one keeps its cached answer.
        assert!(auth.observe(AnswerState::New, Some(300), 1010.0));
        lagging.observe(AnswerState::Old, Some(280), 1020.0);
        assert_eq!(summarize([&auth, &lagging].into_iter()), (2, 1, Some(1300.0)));
        // A timeout says nothing about its cache.
        lagging.observe(AnswerState::Timeout, None, 1030.0);
        assert_eq!(summarize([&auth, &lagging].into_iter()), (2, 1, Some(1300.0)));
        // Once nobody serves old, the deadline is when the last one switched.
        lagging.observe(AnswerState::New, Some(300), 1040.0);
        assert_eq!(summarize([&auth, &lagging].into_iter()), (2, 2, Some(1040.0)));
        // Never seen old: no deadline.
        let mut fresh = Seen::default();
        fresh.observe(AnswerState::New, Some(300), 1.0);
        assert_eq!(summarize([&fresh].into_iter()), (1, 1, None));
    }
}
