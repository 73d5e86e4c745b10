//! Talking to a running daemon's HTTP API, for `cutover-monitor phase`: a
//! phase set by hand must reach the daemon that exports the metrics alerts
//! read, not a copy of its logic.
//!
//! Plain HTTP/1.1 only. Basic auth, when the daemon's web config asks for it,
//! takes the password from the `CUTOVER_WEB_PASSWORD` environment variable,
//! never from the command line (where `ps` would show it).

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::config::Secret;

/// Environment variable holding the basic-auth password for `--web.username`.
pub const PASSWORD_ENV: &str = "CUTOVER_WEB_PASSWORD";

/// How long one API call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the daemon listens and how to log in.
pub struct Daemon {
    /// `--web.listen-address` of the running daemon.
    pub addr: SocketAddr,
    /// Basic-auth user and password, when its web config asks for them.
    pub login: Option<(String, Secret)>,
}

/// Why an API call failed; each says which daemon and what to try.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered.
    #[error(
        "cannot reach the daemon at {addr}: {source} (is `cutover-monitor run` listening there? see --web.listen-address)"
    )]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The exchange broke off or was not HTTP (e.g. the daemon serves TLS).
    #[error(
        "talking to the daemon at {addr} failed: {message} (this command speaks plain HTTP; with TLS on, use curl)"
    )]
    Http {
        /// Where.
        addr: SocketAddr,
        /// What broke.
        message: String,
    },
    /// No answer within the deadline.
    #[error("the daemon at {addr} did not answer within {}s", TIMEOUT.as_secs())]
    Timeout {
        /// Where.
        addr: SocketAddr,
    },
}

impl Daemon {
    /// The daemon at `addr`, with the password for `username` from [`PASSWORD_ENV`].
    pub fn new(addr: SocketAddr, username: Option<String>) -> Result<Daemon, String> {
        let login = match username {
            None => None,
            Some(user) => match std::env::var(PASSWORD_ENV) {
                Ok(p) if !p.is_empty() => Some((user, Secret::new(p))),
                _ => {
                    return Err(format!(
                        "--web.username is set: put the password in the environment variable {PASSWORD_ENV}"
                    ));
                }
            },
        };
        Ok(Daemon { addr, login })
    }

    /// Sends one request; returns the status and the body as text.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, String), ClientError> {
        tokio::time::timeout(TIMEOUT, self.exchange(method, path, json))
            .await
            .unwrap_or(Err(ClientError::Timeout { addr: self.addr }))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, String), ClientError> {
        let addr = self.addr;
        let http = |e: hyper::Error| ClientError::Http {
            addr,
            message: e.to_string(),
        };
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, addr.to_string());
        if let Some((user, password)) = &self.login {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.expose()));
            request = request.header(AUTHORIZATION, format!("Basic {token}"));
        }
        let body = match json {
            Some(v) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).map_err(|e| ClientError::Http {
            addr,
            message: e.to_string(),
        })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(http)?.to_bytes();
        conn.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
