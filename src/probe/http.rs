//! `kind: http` — one request (plus redirects on the same host) to the
//! production URL, sent to the environment's address, with `Host`, SNI and the
//! certificate check all using the production hostname.
//!
//! Built on hyper's connection API rather than a pooled client so that each
//! step (connect, tls, first byte, transfer) is timed on its own and every run
//! opens a fresh connection, as a user arriving after the switch would.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HOST, HeaderName, HeaderValue, LOCATION, USER_AGENT};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use regex::Regex;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Failure, FailureReason, FieldError, InPhase, Probe, Run};
use crate::config::{Check, HttpSpec};

/// The largest body we read; a webmail login page is far below this.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// A built `http` check.
pub struct HttpProbe {
    url: Uri,
    host: String,
    method: Method,
    headers: HeaderMap,
    max_redirects: u32,
    status: Vec<u16>,
    body_contains: Option<String>,
    body_regex: Option<Regex>,
    header_patterns: Vec<(HeaderName, Regex)>,
    roots: Arc<RootCertStore>,
}

impl HttpProbe {
    /// Validates the spec.
    pub fn new(spec: &HttpSpec, check: &Check) -> Result<Self, FieldError> {
        let url: Uri = spec
            .url
            .parse()
            .map_err(|e| FieldError::new("url", format!("invalid URL: {e}")))?;
        match url.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(FieldError::new("url", "expected an http:// or https:// URL")),
        }
        let host = url
            .host()
            .ok_or_else(|| FieldError::new("url", "the URL has no host"))?
            .to_ascii_lowercase();
        let method = Method::from_bytes(spec.method.as_bytes())
            .map_err(|_| FieldError::new("method", format!("invalid HTTP method `{}`", spec.method)))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let field = format!("headers.{name}");
            let n =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| FieldError::new(&field, "invalid header name"))?;
            let v = HeaderValue::from_str(value).map_err(|_| FieldError::new(&field, "invalid header value"))?;
            headers.insert(n, v);
        }
        let mut header_patterns = Vec::new();
        for (name, pattern) in &spec.expect.headers {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| FieldError::new(format!("expect.headers.{name}"), "invalid header name"))?;
            header_patterns.push((n, pattern.0.clone()));
        }
        if let Some(bad) = spec.expect.status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(FieldError::new(
                "expect.status",
                format!("{bad} is not an HTTP status code"),
            ));
        }
        Ok(HttpProbe {
            url,
            host,
            method,
            headers,
            max_redirects: spec.max_redirects,
            status: spec.expect.status.clone(),
            body_contains: spec.expect.body_contains.clone(),
            body_regex: spec.expect.body_regex.as_ref().map(|p| p.0.clone()),
            header_patterns,
            roots: check.roots.clone(),
        })
    }

    fn status_ok(&self, status: StatusCode) -> bool {
        if self.status.is_empty() {
            status.is_success()
        } else {
            self.status.contains(&status.as_u16())
        }
    }
}

impl Probe for HttpProbe {
    fn hostname(&self) -> &str {
        &self.host
    }

    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let mut url = self.url.clone();
            let mut hops = 0;
            loop {
                let https = url.scheme_str() == Some("https");
                let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
                let tcp = super::connect(ip, port, run).await?;
                let response = if https {
                    let stream = super::tls_handshake(tcp, &self.host, &self.roots, &[b"http/1.1"], run)
                        .await
                        .in_phase("tls")?;
                    self.exchange(stream, &url, run).await?
                } else {
                    self.exchange(tcp, &url, run).await?
                };
                let (status, headers, body) = response;
                if status.is_redirection() && hops < self.max_redirects {
                    if let Some(next) = redirect_target(&url, &headers) {
                        if next.host().is_some_and(|h| h.eq_ignore_ascii_case(&self.host)) {
                            hops += 1;
                            url = next;
                            continue;
                        }
                        return Err(Failure::new(
                            FailureReason::UnexpectedStatus,
                            format!(
                                "{status} redirect to another host ({next}); only {} is pinned",
                                self.host
                            ),
                        ));
                    }
                }
                return self.verify(status, &headers, &body);
            }
        })
    }
}

type Response = (StatusCode, HeaderMap, Bytes);

impl HttpProbe {
    async fn exchange<S>(&self, stream: S, url: &Uri, run: &mut Run) -> Result<Response, Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("HTTP handshake: {e}")))?;
        // The connection task must end with this run, also when the scheduler's
        // timeout drops us mid-request: a hung server must not keep a socket.
        let _conn = AbortOnDrop(tokio::spawn(conn));
        let host_header = match url.port_u16() {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        };
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(path)
            .header(HOST, host_header)
            .header(USER_AGENT, concat!("cutover-monitor/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("building request: {e}")))?;
        request.headers_mut().extend(self.headers.clone());
        let response = run
            .phase("first_byte", sender.send_request(request))
            .await
            .map_err(hyper_failure)
            .in_phase("first_byte")?;
        let (parts, body) = response.into_parts();
        let body = run
            .phase("transfer", Limited::new(body, MAX_BODY).collect())
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Failure::new(FailureReason::Oversize, format!("body larger than {MAX_BODY} bytes"))
                } else {
                    Failure::new(FailureReason::Network, format!("reading body: {e}"))
                }
            })
            .in_phase("transfer")?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    fn verify(&self, status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Result<(), Failure> {
        if !self.status_ok(status) {
            return Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!("status {status}"),
            ));
        }
        for (name, pattern) in &self.header_patterns {
            let value = headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
            if !pattern.is_match(value) {
                return Err(Failure::new(
                    FailureReason::ContentMismatch,
                    format!("header {name}: {value:?} does not match /{pattern}/"),
                ));
            }
        }
        let text = String::from_utf8_lossy(body);
        if let Some(needle) = &self.body_contains {
            if !text.contains(needle.as_str()) {
                return Err(Failure::new(
                    FailureReason::ContentMismatch,
                    format!("body does not contain {needle:?}"),
                ));
            }
        }
        if let Some(pattern) = &self.body_regex {
            if !pattern.is_match(&text) {
                return Err(Failure::new(
                    FailureReason::ContentMismatch,
                    format!("body does not match /{pattern}/"),
                ));
            }
        }
        Ok(())
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hyper_failure(e: hyper::Error) -> Failure {
    let source = std::error::Error::source(&e);
    // A request canceled because the connection failed first (say, the server
    // spoke before being asked) carries the connection's error.
    if let Some(cause) = source.and_then(|s| s.downcast_ref::<hyper::Error>()) {
        if e.is_canceled() {
            return match std::error::Error::source(cause).and_then(|s| s.downcast_ref::<std::io::Error>()) {
                Some(io) => Failure::io(io),
                None if cause.is_parse_too_large() => Failure::new(FailureReason::Oversize, format!("HTTP: {cause}")),
                None => Failure::new(FailureReason::Protocol, format!("HTTP: {cause}")),
            };
        }
    }
    let io = source.and_then(|s| s.downcast_ref::<std::io::Error>());
    match io {
        Some(io) => Failure::io(io),
        // A status line or header block beyond hyper's buffer limit (~400 KiB).
        None if e.is_parse_too_large() => Failure::new(FailureReason::Oversize, format!("HTTP: {e}")),
        None if e.is_parse() || e.is_incomplete_message() => {
            Failure::new(FailureReason::Protocol, format!("HTTP: {e}"))
        }
        None => Failure::new(FailureReason::Network, format!("HTTP: {e}")),
    }
}

/// The absolute URL a redirect points to, resolving a relative `Location`.
fn redirect_target(base: &Uri, headers: &HeaderMap) -> Option<Uri> {
    let location = headers.get(LOCATION)?.to_str().ok()?;
    if location.contains("://") {
        return location.parse().ok();
    }
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let base_path = base.path();
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        format!("{dir}{location}")
    };
    Uri::builder()
        .scheme(base.scheme_str()?)
        .authority(base.authority()?.as_str())
        .path_and_query(path)
        .build()
        .ok()
}

/// The TLS config of the kinds that hold an HTTP session over reqwest
/// (webmail_login, dav): the check's roots only, ring as the provider (no
/// second crypto provider in the binary), HTTP/1.1 by ALPN.
pub fn session_tls(roots: &Arc<rustls::RootCertStore>) -> Result<rustls::ClientConfig, FieldError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FieldError::new("url", format!("TLS setup: {e}")))?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// A reqwest session for one run, pinned: it connects to `ip:port` while URL,
/// `Host`, SNI and certificate keep `host`; it follows no redirect (each is
/// judged by the probe), uses no proxy and speaks HTTP/1.1.
pub fn session(tls: &rustls::ClientConfig, host: &str, port: u16, ip: IpAddr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls.clone())
        .resolve(host, std::net::SocketAddr::new(ip, port))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http1_only()
        .user_agent(concat!("cutover-monitor/", env!("CARGO_PKG_VERSION")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(base: &str, loc: &str) -> Option<String> {
        let mut h = HeaderMap::new();
        h.insert(LOCATION, HeaderValue::from_str(loc).unwrap());
        redirect_target(&base.parse().unwrap(), &h).map(|u| u.to_string())
    }

    #[test]
    fn redirects_resolve_against_the_current_url() {
        assert_eq!(
            location("http://w.test/", "https://w.test/").as_deref(),
            Some("https://w.test/")
        );
        assert_eq!(
            location("https://w.test/a/b", "/login").as_deref(),
            Some("https://w.test/login")
        );
        assert_eq!(
            location("https://w.test/a/b", "c?x=1").as_deref(),
            Some("https://w.test/a/c?x=1")
        );
    }
}
