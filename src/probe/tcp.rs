//! `kind: tcp` — connect, optionally wrap in TLS right away, optionally match
//! the first line the server sends. Covers any port no richer probe knows yet
//! (ActiveSync, CalDAV/CardDAV reachability, a raw MX banner).

use std::net::IpAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use regex::Regex;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Failure, FailureReason, FieldError, InPhase, Probe, Run};
use crate::config::{Check, TcpSpec};

/// The longest banner line we read before calling the reply oversize.
pub const MAX_LINE: usize = 4096;

/// A built `tcp` check.
pub struct TcpProbe {
    host: String,
    port: u16,
    tls: bool,
    banner: Option<Regex>,
    roots: Arc<RootCertStore>,
}

impl TcpProbe {
    /// Validates the spec.
    pub fn new(spec: &TcpSpec, check: &Check) -> Result<Self, FieldError> {
        if spec.port == 0 {
            return Err(FieldError::new("port", "must be between 1 and 65535"));
        }
        Ok(TcpProbe {
            host: spec.host.clone(),
            port: spec.port,
            tls: spec.tls,
            banner: spec.expect_banner.as_ref().map(|p| p.0.clone()),
            roots: check.roots.clone(),
        })
    }
}

impl Probe for TcpProbe {
    fn hostname(&self) -> &str {
        &self.host
    }

    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let tcp = super::connect(ip, self.port, run).await?;
            if self.tls {
                let stream = super::tls_handshake(tcp, &self.host, &self.roots, &[], run)
                    .await
                    .in_phase("tls")?;
                self.check_banner(stream, run).await
            } else {
                self.check_banner(tcp, run).await
            }
        })
    }
}

impl TcpProbe {
    async fn check_banner<S: AsyncRead + Unpin>(&self, mut stream: S, run: &mut Run) -> Result<(), Failure> {
        let Some(want) = &self.banner else { return Ok(()) };
        let line = run
            .phase("banner", read_line(&mut stream, MAX_LINE))
            .await
            .in_phase("banner")?;
        if want.is_match(&line) {
            Ok(())
        } else {
            Err(Failure::new(
                FailureReason::ContentMismatch,
                format!("banner {line:?} does not match /{want}/"),
            ))
            .in_phase("banner")
        }
    }
}

/// Reads one line (without its line ending), refusing more than `max` bytes and
/// text that is not UTF-8.
pub async fn read_line<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> Result<String, Failure> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream.read(&mut byte).await.map_err(|e| Failure::io(&e))?;
        if n == 0 {
            return Err(Failure::new(
                FailureReason::Protocol,
                "connection closed before a complete line",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= max {
            return Err(Failure::new(
                FailureReason::Oversize,
                format!("line longer than {max} bytes"),
            ));
        }
        line.push(byte[0]);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| Failure::new(FailureReason::Protocol, "line is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_must_be_text() {
        let mut ok: &[u8] = b"* OK ready\r\nrest";
        assert_eq!(read_line(&mut ok, 100).await.unwrap(), "* OK ready");
        let mut long: &[u8] = &[b'a'; 200];
        assert_eq!(
            read_line(&mut long, 100).await.unwrap_err().reason,
            FailureReason::Oversize
        );
        let mut binary: &[u8] = b"\xff\xfe\n";
        assert_eq!(
            read_line(&mut binary, 100).await.unwrap_err().reason,
            FailureReason::Protocol
        );
        let mut cut: &[u8] = b"* OK";
        assert_eq!(
            read_line(&mut cut, 100).await.unwrap_err().reason,
            FailureReason::Protocol
        );
    }
}
