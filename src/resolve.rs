//! Asking a DNS server directly, with no cache in between.
//!
//! The `live` environment and the DNS probe both use [`query`], so a check's
//! live view and the DNS view cannot disagree about what a resolver answered.
//! Messages are built and parsed by hickory-proto; this module only moves them
//! over UDP, retrying over TCP when the answer is truncated.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::config::ResolverAddr;

/// Largest DNS message we accept over TCP (the protocol's own limit).
const MAX_TCP_MESSAGE: usize = 65_535;

/// Why a query got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The server did not answer in time.
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// Network error talking to the server.
    #[error("talking to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    /// The name or the reply could not be encoded or decoded.
    #[error("{0}")]
    Malformed(String),
}

/// Sends one query for `name`/`rtype` to `server` and returns the raw reply
/// (any response code), falling back to TCP when the UDP reply is truncated.
pub async fn query(
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> Result<Message, QueryError> {
    query_transport(server, name, rtype, timeout)
        .await
        .map(|(reply, _)| reply)
}

/// How a reply arrived, for the DNS probe's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The UDP reply was complete.
    Udp,
    /// The UDP reply was truncated; the query was repeated over TCP.
    Tcp,
}

/// [`query`], also saying whether the reply came over TCP.
pub async fn query_transport(
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> Result<(Message, Transport), QueryError> {
    let name = Name::from_utf8(name).map_err(|e| QueryError::Malformed(format!("invalid name {name:?}: {e}")))?;
    let id: u16 = rand_id();
    let mut request = Message::new(id, MessageType::Query, OpCode::Query);
    request.metadata.recursion_desired = true;
    request.add_query(Query::query(name, rtype));
    let bytes = request.to_vec().map_err(|e| QueryError::Malformed(e.to_string()))?;
    let exchange = async {
        let reply = over_udp(server, &bytes, id).await?;
        if reply.metadata.truncation {
            Ok((over_tcp(server, &bytes).await?, Transport::Tcp))
        } else {
            Ok((reply, Transport::Udp))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| QueryError::Timeout(server, timeout))?
}

async fn over_udp(server: SocketAddr, request: &[u8], id: u16) -> Result<Message, QueryError> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("literal");
    let io = |e| QueryError::Io(server, e);
    let socket = UdpSocket::bind(bind).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    socket.send(request).await.map_err(io)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        // Ignore stray datagrams that do not answer our id.
        if let Ok(reply) = Message::from_vec(&buf[..n]) {
            if reply.metadata.id == id {
                return Ok(reply);
            }
        }
    }
}

async fn over_tcp(server: SocketAddr, request: &[u8]) -> Result<Message, QueryError> {
    let io = |e| QueryError::Io(server, e);
    let mut stream = TcpStream::connect(server).await.map_err(io)?;
    let len = u16::try_from(request.len()).map_err(|_| QueryError::Malformed("query too large".into()))?;
    stream.write_all(&len.to_be_bytes()).await.map_err(io)?;
    stream.write_all(request).await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let len = usize::from(u16::from_be_bytes(len)).min(MAX_TCP_MESSAGE);
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await.map_err(io)?;
    Message::from_vec(&buf).map_err(|e| QueryError::Malformed(format!("reply from {server}: {e}")))
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() as u16
}

/// Time a query leaves to the check's timeout, so a silent resolver is
/// reported by the probe itself (as `timeout`, with its metrics), not cut off
/// by the scheduler: 100 ms, or a tenth of a short timeout.
pub fn query_timeout(check_timeout: Duration) -> Duration {
    const QUERY_MARGIN: Duration = Duration::from_millis(100);
    check_timeout.saturating_sub(QUERY_MARGIN.min(check_timeout / 10))
}

/// Each TXT record of an answer, its character strings joined; none unless
/// the answer is NOERROR.
pub fn txt_strings(msg: &Message) -> Vec<Vec<u8>> {
    if msg.metadata.response_code != ResponseCode::NoError {
        return Vec::new();
    }
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_resolver::proto::rr::RData::TXT(txt) => {
                Some(txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect())
            }
            _ => None,
        })
        .collect()
}

/// A DNS name as compared, cached and labelled: lower case, without the
/// trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Why a name could not be resolved for a live environment. Its own type, so
/// this module sits below the probes; they map it onto their reasons.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Nothing answered in time.
    #[error("{0}")]
    Timeout(String),
    /// An answer without addresses, an error code, or a resolver failure.
    #[error("{0}")]
    NoAddress(String),
}

/// Resolves `host` the way a user of a live environment would: through the
/// system resolver or by asking the configured server for A and AAAA.
pub async fn lookup(resolver: ResolverAddr, host: &str, timeout: Duration) -> Result<Vec<IpAddr>, LookupError> {
    let dns = LookupError::NoAddress;
    match resolver {
        ResolverAddr::System => {
            let addrs = tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0)))
                .await
                .map_err(|_| LookupError::Timeout(format!("resolving {host}")))?
                .map_err(|e| dns(format!("resolving {host}: {e}")))?;
            let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            if ips.is_empty() {
                return Err(dns(format!("{host} has no addresses")));
            }
            Ok(ips)
        }
        ResolverAddr::Server(server) => {
            let (a, aaaa) = tokio::join!(
                query(server, host, RecordType::A, timeout),
                query(server, host, RecordType::AAAA, timeout)
            );
            let mut ips = Vec::new();
            let mut problems = Vec::new();
            for reply in [a, aaaa] {
                match reply {
                    Ok(msg) if msg.metadata.response_code == ResponseCode::NoError => {
                        ips.extend(msg.answers.iter().filter_map(|r| r.data.ip_addr()))
                    }
                    Ok(msg) => problems.push(format!("{}", msg.metadata.response_code)),
                    Err(QueryError::Timeout(..)) if ips.is_empty() => {
                        return Err(LookupError::Timeout(format!("no answer from {server} for {host}")));
                    }
                    Err(e) => problems.push(e.to_string()),
                }
            }
            if ips.is_empty() {
                let why = if problems.is_empty() {
                    "no A/AAAA records".to_string()
                } else {
                    problems.join(", ")
                };
                return Err(dns(format!("resolving {host} at {server}: {why}")));
            }
            Ok(ips)
        }
    }
}
