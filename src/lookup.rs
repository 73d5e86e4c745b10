//! DNS lookups for audits of thousands of domains, politely: every query is
//! paced by its resolver's rate limit, retried on another resolver when one
//! fails, counted by result, and asked once per audit when several domains
//! need the same answer (a provider's SPF include, a shared MX host).
//!
//! Memory stays bounded by the concurrency, not the domain count: answers
//! about a domain that is being audited (its MX, TXT, `_dmarc`, `autoconfig`
//! names) are kept only while it is ([`Lookups::scope`]); answers about other
//! names — the ones domains share — for the whole audit.
//!
//! The SPF evaluator (mail-auth) resolves what a policy refers to with its own
//! resolver; [`Lookups::relay`] gives it a DNS server on loopback that answers
//! from here, so its queries obey the same limit, cache and counters.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::RecordType;
use tokio::net::UdpSocket;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::resolve::{self, QueryError, normalize};

/// Largest reply the relay sends over UDP (hickory's receive buffer).
const RELAY_MAX_REPLY: usize = 4096;

/// What one query came to, as counted in `cutover_hosted_domains_queries_total`.
/// A closed set: each value is a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryResult {
    /// NOERROR, with or without records.
    Noerror,
    /// The name does not exist.
    Nxdomain,
    /// The server failed (often: the domain's own servers are broken).
    Servfail,
    /// The server refused to answer.
    Refused,
    /// Another response code.
    OtherRcode,
    /// No answer within `query_timeout`.
    Timeout,
    /// A network error or an undecodable reply.
    Error,
}

impl QueryResult {
    /// Every result, so counters start at 0.
    pub const ALL: [QueryResult; 7] = [
        Self::Noerror,
        Self::Nxdomain,
        Self::Servfail,
        Self::Refused,
        Self::OtherRcode,
        Self::Timeout,
        Self::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Noerror => "noerror",
            Self::Nxdomain => "nxdomain",
            Self::Servfail => "servfail",
            Self::Refused => "refused",
            Self::OtherRcode => "other_rcode",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).expect("listed")
    }
}

/// The final answer to a lookup, after retries.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A reply that answers the question: NOERROR (maybe without records) or NXDOMAIN.
    Reply(Arc<Message>),
    /// Every attempt failed; the last failure, e.g. `SERVFAIL from 127.0.0.30:53`.
    Failed(QueryResult, String),
}

impl Answer {
    /// Whether the name does not exist.
    pub fn is_nxdomain(&self) -> bool {
        matches!(self, Answer::Reply(m) if m.metadata.response_code == ResponseCode::NXDomain)
    }

    /// The reply, when there is one.
    pub fn reply(&self) -> Option<&Message> {
        match self {
            Answer::Reply(m) => Some(m),
            Answer::Failed(..) => None,
        }
    }
}

/// The most queries a resolver may get at once: what the rate allows in this
/// long. It lets queries through on tokio's 1 ms timer at rates above
/// 1,000/s, and caps what a stalled process sends when it wakes up.
const BURST_WINDOW: Duration = Duration::from_millis(10);

/// One resolver with its pace: a token bucket holding at most
/// [`BURST_WINDOW`] worth of queries, so over any span `t` it gets at most
/// `rate × t + burst` queries, however the process is scheduled.
struct Resolver {
    name: String,
    addr: SocketAddr,
    /// Queries per second.
    rate: f64,
    /// The bucket's size, at least 1.
    burst: f64,
    /// Tokens and when they were counted. Waiters queue on this lock in
    /// order (tokio's mutex is fair), so each gets its query out in turn.
    bucket: tokio::sync::Mutex<(f64, Instant)>,
    counts: [AtomicU64; QueryResult::ALL.len()],
}

impl Resolver {
    fn new(name: &str, addr: SocketAddr, rate: f64) -> Resolver {
        let burst = (rate * BURST_WINDOW.as_secs_f64()).max(1.0);
        Resolver {
            name: name.to_string(),
            addr,
            rate,
            burst,
            // Full at the start: an audit may begin with one burst.
            bucket: tokio::sync::Mutex::new((burst, Instant::now())),
            counts: Default::default(),
        }
    }

    /// Waits until this resolver may get one more query.
    async fn pace(&self) {
        let mut bucket = self.bucket.lock().await;
        loop {
            let now = Instant::now();
            let (tokens, counted) = *bucket;
            let tokens = (tokens + (now - counted).as_secs_f64() * self.rate).min(self.burst);
            if tokens >= 1.0 {
                *bucket = (tokens - 1.0, now);
                return;
            }
            *bucket = (tokens, now);
            // Still holding the lock: whoever queued next waits behind us.
            tokio::time::sleep(Duration::from_secs_f64((1.0 - tokens) / self.rate)).await;
        }
    }
}

type Key = (String, RecordType);
type Cell = Arc<OnceCell<Answer>>;

#[derive(Default)]
struct Cache {
    /// Names outside every domain being audited: shared, kept for the audit.
    shared: HashMap<Key, Cell>,
    /// Per domain being audited: its own names, dropped when it is done.
    scoped: HashMap<String, HashMap<Key, Cell>>,
}

/// The lookups of one audit. Cheap to share (`Arc`); dropped with the audit.
pub struct Lookups {
    resolvers: Vec<Resolver>,
    query_timeout: Duration,
    attempts: usize,
    rotation: AtomicUsize,
    cache: Mutex<Cache>,
}

/// One resolver's counts by result, for the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolverCounts {
    /// The resolver's name in the config.
    pub resolver: String,
    /// `(result, queries)` for every [`QueryResult`].
    pub counts: Vec<(QueryResult, u64)>,
}

impl Lookups {
    /// `resolvers` as `(name, address)`, each allowed `rate` queries per
    /// second; a failed query is tried again on the next resolver, up to
    /// `attempts` queries in all.
    pub fn new(resolvers: &[(String, SocketAddr)], rate: f64, query_timeout: Duration, attempts: usize) -> Lookups {
        Lookups {
            resolvers: resolvers
                .iter()
                .map(|(name, addr)| Resolver::new(name, *addr, rate))
                .collect(),
            query_timeout,
            attempts: attempts.max(1),
            rotation: AtomicUsize::new(0),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The answer for `name`/`rtype`: from the cache, from a query already in
    /// flight for it, or asked now.
    pub async fn get(&self, name: &str, rtype: RecordType) -> Answer {
        let key = (normalize(name), rtype);
        let cell = {
            let mut cache = self.cache.lock().expect("cache lock");
            let cache = &mut *cache;
            let map = match owner(&cache.scoped, &key.0) {
                Some(domain) => cache.scoped.get_mut(&domain).expect("owner exists"),
                None => &mut cache.shared,
            };
            map.entry(key.clone()).or_default().clone()
        };
        cell.get_or_init(|| self.fetch(&key.0, rtype)).await.clone()
    }

    /// Marks `domain` as being audited until the guard drops: answers about it
    /// and its subdomains are kept that long, then forgotten.
    pub fn scope(&self, domain: &str) -> Scope<'_> {
        let domain = normalize(domain);
        self.cache
            .lock()
            .expect("cache lock")
            .scoped
            .entry(domain.clone())
            .or_default();
        Scope { lookups: self, domain }
    }

    /// Queries sent so far, per resolver and result.
    pub fn counts(&self) -> Vec<ResolverCounts> {
        self.resolvers
            .iter()
            .map(|r| ResolverCounts {
                resolver: r.name.clone(),
                counts: QueryResult::ALL
                    .iter()
                    .map(|q| (*q, r.counts[q.index()].load(Ordering::Relaxed)))
                    .collect(),
            })
            .collect()
    }

    async fn fetch(&self, name: &str, rtype: RecordType) -> Answer {
        let first = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut last = Answer::Failed(QueryResult::Error, "no resolver".into());
        for attempt in 0..self.attempts {
            let resolver = &self.resolvers[(first + attempt) % self.resolvers.len()];
            resolver.pace().await;
            let (result, answer) = match resolve::query(resolver.addr, name, rtype, self.query_timeout).await {
                Ok(msg) => match msg.metadata.response_code {
                    ResponseCode::NoError => (QueryResult::Noerror, Answer::Reply(Arc::new(msg))),
                    ResponseCode::NXDomain => (QueryResult::Nxdomain, Answer::Reply(Arc::new(msg))),
                    code => {
                        let result = match code {
                            ResponseCode::ServFail => QueryResult::Servfail,
                            ResponseCode::Refused => QueryResult::Refused,
                            _ => QueryResult::OtherRcode,
                        };
                        let shown = match result {
                            QueryResult::Servfail => "SERVFAIL".to_string(),
                            QueryResult::Refused => "REFUSED".to_string(),
                            _ => code.to_string(),
                        };
                        let detail = format!("{name} {rtype}: {} answered {shown}", resolver.name);
                        (result, Answer::Failed(result, detail))
                    }
                },
                Err(QueryError::Timeout(..)) => {
                    let detail = format!(
                        "{name} {rtype}: no answer from {} within {}",
                        resolver.name,
                        humantime::format_duration(self.query_timeout)
                    );
                    (QueryResult::Timeout, Answer::Failed(QueryResult::Timeout, detail))
                }
                Err(e) => {
                    let detail = format!("{name} {rtype}: {}: {e}", resolver.name);
                    (QueryResult::Error, Answer::Failed(QueryResult::Error, detail))
                }
            };
            resolver.counts[result.index()].fetch_add(1, Ordering::Relaxed);
            if let Answer::Reply(_) = answer {
                return answer;
            }
            last = answer;
        }
        last
    }

    /// Starts a DNS server on a loopback port that answers from [`Lookups::get`]
    /// (SERVFAIL when the lookup failed). It stops when the returned [`Relay`]
    /// drops.
    pub async fn relay(self: &Arc<Self>) -> std::io::Result<Relay> {
        let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let addr = socket.local_addr()?;
        let lookups = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(lookups) = lookups.upgrade() else {
                    return;
                };
                let socket = socket.clone();
                tokio::spawn(async move {
                    let reply = relay_reply(&lookups, request).await;
                    if let Ok(bytes) = reply.to_vec() {
                        let _ = socket.send_to(&bytes, peer).await;
                    }
                });
            }
        });
        Ok(Relay { addr, task })
    }
}

/// The reply the relay sends for `request`.
async fn relay_reply(lookups: &Lookups, request: Message) -> Message {
    let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let Some(query) = request.queries.first().cloned() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    reply.add_query(query.clone());
    match lookups.get(&query.name().to_ascii(), query.query_type()).await {
        Answer::Reply(msg) => {
            reply.metadata.response_code = msg.metadata.response_code;
            reply.add_answers(msg.answers.iter().cloned());
            reply.add_authorities(msg.authorities.iter().cloned());
            if reply.to_vec().map_or(true, |b| b.len() > RELAY_MAX_REPLY) {
                reply.answers.clear();
                reply.authorities.clear();
                reply.metadata.truncation = true;
            }
        }
        Answer::Failed(..) => reply.metadata.response_code = ResponseCode::ServFail,
    }
    reply
}

/// A running relay; see [`Lookups::relay`].
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// See [`Lookups::scope`].
pub struct Scope<'a> {
    lookups: &'a Lookups,
    domain: String,
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        if let Ok(mut cache) = self.lookups.cache.lock() {
            cache.scoped.remove(&self.domain);
        }
    }
}

/// The domain being audited that `name` is, or is under (the longest one).
fn owner(scoped: &HashMap<String, HashMap<Key, Cell>>, name: &str) -> Option<String> {
    let mut rest = name;
    loop {
        if scoped.contains_key(rest) {
            return Some(rest.to_string());
        }
        rest = rest.split_once('.')?.1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_belong_to_the_longest_domain_being_audited() {
        let mut scoped: HashMap<String, HashMap<Key, Cell>> = HashMap::new();
        scoped.insert("a.test".into(), HashMap::new());
        scoped.insert("b.a.test".into(), HashMap::new());
        assert_eq!(owner(&scoped, "a.test").as_deref(), Some("a.test"));
        assert_eq!(owner(&scoped, "_dmarc.a.test").as_deref(), Some("a.test"));
        assert_eq!(owner(&scoped, "mx.b.a.test").as_deref(), Some("b.a.test"));
        assert_eq!(owner(&scoped, "spf.provider.test"), None);
        assert_eq!(owner(&scoped, "xa.test"), None);
    }

    #[tokio::test]
    async fn queries_never_exceed_the_rate_plus_the_burst() {
        // 100/s: a burst of 1 (10 ms worth), then one query per 10 ms.
        let resolver = Resolver::new("r", "127.0.0.1:9".parse().unwrap(), 100.0);
        let start = Instant::now();
        let mut sent = Vec::new();
        for _ in 0..21 {
            resolver.pace().await;
            sent.push(start.elapsed());
        }
        // Over any span t, at most 100 x t + 1 queries.
        for (i, a) in sent.iter().enumerate() {
            for (j, b) in sent.iter().enumerate().skip(i + 1) {
                let allowed = 100.0 * (*b - *a).as_secs_f64() + 1.0;
                assert!((j - i + 1) as f64 <= allowed + 1e-9, "{sent:?}");
            }
        }
        assert!(sent[20] >= Duration::from_millis(199), "{sent:?}");
        // A stall does not make up for lost time beyond the burst.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let woke = Instant::now();
        resolver.pace().await;
        resolver.pace().await;
        assert!(
            woke.elapsed() >= Duration::from_millis(9),
            "two queries after a stall came too fast"
        );
    }
}
