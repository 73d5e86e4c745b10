//! `kind: smtp` — one SMTP session per run, every step timed as a phase and its
//! reply code exported, in one of three modes: `mx` (a local recipient is
//! accepted, nothing is sent), `submission` (AUTH PLAIN succeeds, optionally one
//! small message is sent) and `relay_check` (an external recipient is refused
//! without AUTH).
//!
//! The session is written here over [`super::connect`] and [`super::tls_handshake`]
//! instead of lettre's transport: lettre folds connect, banner and EHLO into one
//! call and reports only the last reply, while this probe must time and report
//! each step, and check that the certificate is recorded like every other
//! probe's. lettre still validates addresses and formats the probe message.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::future::BoxFuture;
use lettre::Address;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use regex::Regex;
use rustls::RootCertStore;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{Failure, FailureReason, FieldError, InPhase, Measurement, Probe, Run};
use crate::config::{Check, Credential, Credentials, SmtpMode, SmtpSpec, SmtpTls};

/// The last reply code a server gave at one step of an SMTP session, so a
/// 4xx at RCPT reads differently from one at AUTH.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// The step: banner, ehlo, starttls, auth, mail_from, rcpt_to, data, quit.
    pub step: &'static str,
    /// The reply code.
    pub code: u16,
}

/// The EHLO name when the check sets none: a name that can never be a real host.
pub const DEFAULT_HELO: &str = "cutover-monitor.invalid";
/// Longest reply line we read (Postfix' own `line_length_limit` is 2048).
pub const MAX_LINE: usize = 4096;
/// Most lines in one reply; an EHLO reply has a dozen or so.
pub const MAX_REPLY_LINES: usize = 100;

/// A built `smtp` check.
pub struct SmtpProbe {
    check: String,
    host: String,
    port: u16,
    mode: SmtpMode,
    tls: SmtpTls,
    helo: String,
    credential: Option<Arc<Credential>>,
    /// `None` is the null reverse path `<>`.
    mail_from: Option<Address>,
    rcpt_to: Option<Address>,
    banner: Option<Regex>,
    ehlo: Option<Regex>,
    /// Each required extension as upper-case words: keyword, then parameters.
    extensions: Vec<Vec<String>>,
    roots: Arc<RootCertStore>,
}

impl SmtpProbe {
    /// Validates the spec and resolves its credential by name.
    pub fn new(spec: &SmtpSpec, check: &Check, credentials: &Credentials) -> Result<Self, FieldError> {
        let port = spec.port.unwrap_or(match (spec.tls, spec.mode) {
            (SmtpTls::Implicit, _) => 465,
            (_, SmtpMode::Submission) => 587,
            (_, SmtpMode::Mx | SmtpMode::RelayCheck) => 25,
        });
        if port == 0 {
            return Err(FieldError::new("port", "must be between 1 and 65535"));
        }
        let helo = spec.helo.clone().unwrap_or_else(|| DEFAULT_HELO.to_string());
        let helo_ok = helo
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'));
        if helo.is_empty() || !helo_ok {
            return Err(FieldError::new(
                "helo",
                format!("expected a host name like `{DEFAULT_HELO}`, got {helo:?}"),
            ));
        }
        let credential = match (&spec.credentials, spec.mode) {
            (None, SmtpMode::Submission) => {
                return Err(FieldError::new(
                    "credentials",
                    "`submission` logs in: name a `credentials` entry",
                ));
            }
            (None, _) => None,
            (Some(_), SmtpMode::Mx) => {
                return Err(FieldError::new(
                    "credentials",
                    "`mx` mode does not log in: remove `credentials`",
                ));
            }
            (Some(_), SmtpMode::RelayCheck) => {
                return Err(FieldError::new(
                    "credentials",
                    "`relay_check` must test without AUTH: remove `credentials`",
                ));
            }
            (Some(name), SmtpMode::Submission) => Some(credentials.get(name).cloned().ok_or_else(|| {
                let known: Vec<&str> = credentials.keys().map(String::as_str).collect();
                FieldError::new(
                    "credentials",
                    format!("unknown credential `{name}` (defined: {})", list(&known)),
                )
            })?),
        };
        if spec.mode == SmtpMode::Submission && spec.tls == SmtpTls::None {
            return Err(FieldError::new(
                "tls",
                "`submission` sends a password: use `starttls` or `implicit`, not `none`",
            ));
        }
        let mail_from = match (&spec.mail_from, &credential) {
            (Some(text), _) if text.is_empty() || text == "<>" => None,
            (Some(text), _) => Some(address("mail_from", text)?),
            (None, Some(cred)) => Some(cred.username.parse().map_err(|_| {
                FieldError::new(
                    "mail_from",
                    "required: the credential's username is not an address to send from",
                )
            })?),
            (None, None) => None,
        };
        let rcpt_to = spec.rcpt_to.as_deref().map(|t| address("rcpt_to", t)).transpose()?;
        if rcpt_to.is_none() && spec.mode != SmtpMode::Submission {
            let what = match spec.mode {
                SmtpMode::Mx => "a local recipient the server must accept",
                _ => "an external recipient the server must refuse without AUTH",
            };
            return Err(FieldError::new("rcpt_to", format!("required: {what}")));
        }
        let mut extensions = Vec::new();
        for (i, ext) in spec.expect.extensions.iter().enumerate() {
            let words: Vec<String> = ext.split_whitespace().map(str::to_ascii_uppercase).collect();
            if words.is_empty() {
                return Err(FieldError::new(
                    format!("expect.extensions[{i}]"),
                    "expected an EHLO keyword like `SIZE` or `AUTH PLAIN`",
                ));
            }
            extensions.push(words);
        }
        Ok(SmtpProbe {
            check: check.name.clone(),
            host: spec.host.clone(),
            port,
            mode: spec.mode,
            tls: spec.tls,
            helo,
            credential,
            mail_from,
            rcpt_to,
            banner: spec.expect.banner.as_ref().map(|p| p.0.clone()),
            ehlo: spec.expect.ehlo.as_ref().map(|p| p.0.clone()),
            extensions,
            roots: check.roots.clone(),
        })
    }
}

fn address(field: &str, text: &str) -> Result<Address, FieldError> {
    text.trim_start_matches('<')
        .trim_end_matches('>')
        .parse()
        .map_err(|e| FieldError::new(field, format!("expected an address like `probe@example.test`: {e}")))
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

impl Probe for SmtpProbe {
    fn hostname(&self) -> &str {
        &self.host
    }

    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.session(ip, run, None))
    }
}

/// A message mailflow sends through [`SmtpProbe::send`], and how far it got:
/// kept outside the session's future so a timeout can still tell whether the
/// message may have been accepted.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    /// The complete message (headers and body).
    pub message: Vec<u8>,
    /// The message was written after DATA's 354: it may have been accepted
    /// even if no reply came.
    pub data_sent: bool,
    /// The reply to the message (250) and when it arrived, Unix seconds.
    pub accepted: Option<(Reply, f64)>,
}

impl SmtpProbe {
    /// Sends `out.message` in one session (DATA in every mode), recording in
    /// `out` how far it got. Used by mailflow.
    pub(crate) async fn send(&self, ip: IpAddr, run: &mut Run, out: &mut Outgoing) -> Result<(), Failure> {
        self.session(ip, run, Some(out)).await
    }

    async fn session(&self, ip: IpAddr, run: &mut Run, out: Option<&mut Outgoing>) -> Result<(), Failure> {
        {
            let addr = SocketAddr::new(ip, self.port);
            let tcp = super::connect(ip, self.port, run).await?;
            let io: Box<dyn Io> = match self.tls {
                SmtpTls::Implicit => Box::new(
                    super::tls_handshake(tcp, &self.host, &self.roots, &[], run)
                        .await
                        .in_phase("tls")?,
                ),
                SmtpTls::Starttls | SmtpTls::None => Box::new(tcp),
            };
            let mut session = Session::new(io, format!("{} ({addr})", self.host));
            let result = self.converse(&mut session, addr, run, out).await;
            if let Err(f) = &result {
                // The server is still talking: say goodbye instead of dropping it.
                if matches!(
                    f.reason,
                    FailureReason::Smtp4xx
                        | FailureReason::Smtp5xx
                        | FailureReason::AuthFailed
                        | FailureReason::ContentMismatch
                        | FailureReason::StarttlsMissing
                ) {
                    session.abandon().await;
                }
            }
            result
        }
    }

    async fn converse(
        &self,
        s: &mut Session,
        addr: SocketAddr,
        run: &mut Run,
        out: Option<&mut Outgoing>,
    ) -> Result<(), Failure> {
        let banner = run.phase("banner", s.read_reply()).await.in_phase("banner")?;
        s.expect(run, "banner", &banner, 2).in_phase("banner")?;
        expect_match(&self.banner, s, "banner", &banner).in_phase("banner")?;

        let mut ehlo = self.ehlo(s, run).await?;
        if self.tls == SmtpTls::Starttls {
            if !ehlo.offers(&["STARTTLS".to_string()]) {
                return Err(Failure::new(
                    FailureReason::StarttlsMissing,
                    format!("{} does not offer STARTTLS in its EHLO reply", s.server),
                ))
                .in_phase("starttls");
            }
            let reply = run
                .phase("starttls", s.command("STARTTLS"))
                .await
                .in_phase("starttls")?;
            s.expect(run, "starttls", &reply, 2).in_phase("starttls")?;
            let raw = s.take_plain().in_phase("starttls")?;
            let secured = super::tls_handshake(raw, &self.host, &self.roots, &[], run)
                .await
                .in_phase("tls")?;
            s.resume(Box::new(secured));
            ehlo = self.ehlo(s, run).await?;
        }
        expect_match(&self.ehlo, s, "EHLO reply", &ehlo.reply).in_phase("ehlo")?;
        for want in &self.extensions {
            if !ehlo.offers(want) {
                return Err(Failure::new(
                    FailureReason::ContentMismatch,
                    format!(
                        "{} does not offer {} (EHLO: {})",
                        s.server,
                        want.join(" "),
                        ehlo.reply.lines[1..].join(", ")
                    ),
                ))
                .in_phase("ehlo");
            }
        }

        if let Some(cred) = &self.credential {
            self.auth(s, cred, &ehlo, run).await?;
        }
        let from = self.mail_from.as_ref().map_or(String::new(), ToString::to_string);
        let reply = run
            .phase("mail_from", s.command(&format!("MAIL FROM:<{from}>")))
            .await
            .in_phase("mail_from")?;
        s.expect(run, "mail_from", &reply, 2).in_phase("mail_from")?;

        let Some(rcpt) = &self.rcpt_to else {
            return self.finish(s, run).await;
        };
        let reply = run
            .phase("rcpt_to", s.command(&format!("RCPT TO:<{rcpt}>")))
            .await
            .in_phase("rcpt_to")?;
        if self.mode == SmtpMode::RelayCheck {
            record(run, "rcpt_to", reply.code);
            return match reply.code / 100 {
                5 => self.finish(s, run).await,
                2 => {
                    // Never DATA: withdraw the envelope, then report the relay
                    // even if the goodbye goes wrong.
                    let _ = self.finish(s, run).await;
                    Err(Failure::new(
                        FailureReason::OpenRelay,
                        format!(
                            "{} accepted external recipient <{rcpt}> without AUTH: {}",
                            s.server,
                            reply.summary()
                        ),
                    ))
                    .in_phase("rcpt_to")
                }
                4 => Err(Failure::new(
                    FailureReason::Smtp4xx,
                    format!(
                        "{} deferred external recipient <{rcpt}> instead of refusing it: {}",
                        s.server,
                        reply.summary()
                    ),
                ))
                .in_phase("rcpt_to"),
                _ => Err(s.classify("RCPT TO", &reply)).in_phase("rcpt_to"),
            };
        }
        s.expect(run, "rcpt_to", &reply, 2).in_phase("rcpt_to")?;

        if let Some(out) = out {
            let reply = run.phase("data", s.command("DATA")).await.in_phase("data")?;
            s.expect(run, "data", &reply, 3).in_phase("data")?;
            out.data_sent = true;
            let reply = run.phase("data", s.data(&out.message)).await.in_phase("data")?;
            s.expect(run, "data", &reply, 2).in_phase("data")?;
            out.accepted = Some((reply, crate::unix_now()));
            return self.quit(s, run).await;
        }
        if self.mode == SmtpMode::Submission {
            let message = self.message(addr, rcpt)?;
            let reply = run.phase("data", s.command("DATA")).await.in_phase("data")?;
            s.expect(run, "data", &reply, 3).in_phase("data")?;
            let reply = run.phase("data", s.data(&message)).await.in_phase("data")?;
            s.expect(run, "data", &reply, 2).in_phase("data")?;
            return self.quit(s, run).await;
        }
        self.finish(s, run).await
    }

    /// EHLO as phase `ehlo`; called again after STARTTLS, as RFC 3207 requires.
    async fn ehlo(&self, s: &mut Session, run: &mut Run) -> Result<Ehlo, Failure> {
        let reply = run
            .phase("ehlo", s.command(&format!("EHLO {}", self.helo)))
            .await
            .in_phase("ehlo")?;
        s.expect(run, "ehlo", &reply, 2).in_phase("ehlo")?;
        Ok(Ehlo { reply })
    }

    /// AUTH PLAIN with an initial response. The token never leaves this
    /// function, and the session redacts it from everything the server says.
    async fn auth(&self, s: &mut Session, cred: &Credential, ehlo: &Ehlo, run: &mut Run) -> Result<(), Failure> {
        if !ehlo.offers(&["AUTH".to_string(), "PLAIN".to_string()]) {
            let offered = ehlo
                .params("AUTH")
                .map_or("no AUTH at all".to_string(), |p| format!("AUTH {}", p.join(" ")));
            return Err(Failure::new(
                FailureReason::AuthFailed,
                format!("{} does not offer AUTH PLAIN ({offered})", s.server),
            ))
            .in_phase("auth");
        }
        let password = cred.password.expose();
        let token = BASE64.encode(format!("\0{}\0{password}", cred.username));
        s.redact.push(token.clone());
        s.redact.extend(secret_forms(password));
        let reply = run
            .phase("auth", s.command(&format!("AUTH PLAIN {token}")))
            .await
            .in_phase("auth")?;
        record(run, "auth", reply.code);
        match reply.code {
            235 => Ok(()),
            534 | 535 => Err(Failure::new(
                FailureReason::AuthFailed,
                format!(
                    "{} refused the credentials of {}: {}",
                    s.server,
                    cred.username,
                    reply.summary()
                ),
            )),
            _ => Err(s.classify("AUTH", &reply)),
        }
        .in_phase("auth")
    }

    /// RSET and QUIT as phase `quit`: the envelope is withdrawn, nothing is sent.
    async fn finish(&self, s: &mut Session, run: &mut Run) -> Result<(), Failure> {
        let reply = run.phase("quit", s.command("RSET")).await.in_phase("quit")?;
        s.expect(run, "rset", &reply, 2).in_phase("quit")?;
        self.quit(s, run).await
    }

    async fn quit(&self, s: &mut Session, run: &mut Run) -> Result<(), Failure> {
        let reply = run.phase("quit", s.command("QUIT")).await.in_phase("quit")?;
        s.expect(run, "quit", &reply, 2).in_phase("quit")
    }

    /// The probe message: small, plain text, and saying where it came from so
    /// a person finding it in a mailbox knows what it is.
    fn message(&self, addr: SocketAddr, rcpt: &Address) -> Result<Vec<u8>, Failure> {
        let from = self.mail_from.clone().unwrap_or_else(|| rcpt.clone());
        let message = Message::builder()
            .from(Mailbox::new(Some("cutover-monitor".into()), from))
            .to(Mailbox::new(None, rcpt.clone()))
            .subject(format!("cutover-monitor probe {} via {addr}", self.check))
            .header(ContentType::TEXT_PLAIN)
            .body(format!(
                "Probe message from cutover-monitor, check `{}`, submitted to {} at {addr}.\r\nIt can be deleted.\r\n",
                self.check, self.host
            ))
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("building the probe message: {e}")))
            .in_phase("data")?;
        Ok(message.formatted())
    }
}

/// Fails unless `pattern` (if any) matches the text of the reply's first line.
fn expect_match(pattern: &Option<Regex>, s: &Session, what: &str, reply: &Reply) -> Result<(), Failure> {
    match pattern {
        Some(p) if !p.is_match(reply.first()) => Err(Failure::new(
            FailureReason::ContentMismatch,
            format!("{what} of {} {:?} does not match /{p}/", s.server, reply.first()),
        )),
        _ => Ok(()),
    }
}

/// Sets the step's last reply code, once per step even when it repeats (EHLO
/// after STARTTLS, DATA's two replies).
fn record(run: &mut Run, step: &'static str, code: u16) {
    run.measurements
        .retain(|m| !matches!(m, Measurement::Smtp(Measured { step: s, .. }) if *s == step));
    run.measurements.push(Measurement::Smtp(Measured { step, code }));
}

/// The fragments of `secret` that appear in any base64 text containing it, at
/// each of the three byte alignments, so an echo can be found wherever the
/// secret sat in the encoded string.
pub fn secret_forms(secret: &str) -> Vec<String> {
    let mut forms = vec![secret.to_string()];
    for shift in 0..3 {
        let mut bytes = vec![0u8; shift];
        bytes.extend_from_slice(secret.as_bytes());
        let encoded = BASE64.encode(&bytes);
        let (start, end) = (4 * shift.div_ceil(3), 4 * ((shift + secret.len()) / 3));
        if end >= start + 4 {
            forms.push(encoded[start..end].to_string());
        }
    }
    forms
}

/// The server's EHLO reply: its name on the first line, an extension per line after.
struct Ehlo {
    reply: Reply,
}

impl Ehlo {
    /// The parameters of an extension keyword, if offered. `AUTH=PLAIN` (old
    /// style) counts as `AUTH PLAIN`.
    fn params(&self, keyword: &str) -> Option<Vec<String>> {
        self.reply.lines.iter().skip(1).find_map(|line| {
            let mut words = line.split([' ', '=']).filter(|w| !w.is_empty());
            let first = words.next()?;
            first
                .eq_ignore_ascii_case(keyword)
                .then(|| words.map(str::to_ascii_uppercase).collect())
        })
    }

    /// Whether the keyword `want[0]` is offered with every parameter in `want[1..]`.
    fn offers(&self, want: &[String]) -> bool {
        let Some((keyword, wanted)) = want.split_first() else {
            return true;
        };
        self.params(keyword)
            .is_some_and(|params| wanted.iter().all(|w| params.iter().any(|p| p.eq_ignore_ascii_case(w))))
    }
}

// ---------------------------------------------------------------------------
// The session: bounded reply reading and one command at a time.
// ---------------------------------------------------------------------------

/// A stream before or after TLS, so one session type covers STARTTLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One SMTP conversation: writes commands, reads replies with bounded lines,
/// names the server in every error and redacts secrets from replies.
struct Session {
    io: Option<BufReader<Box<dyn Io>>>,
    server: String,
    /// Texts that must never appear in anything taken from a reply.
    redact: Vec<String>,
}

impl Session {
    fn new(io: Box<dyn Io>, server: String) -> Session {
        Session {
            io: Some(BufReader::new(io)),
            server,
            redact: Vec::new(),
        }
    }

    fn stream(&mut self) -> Result<&mut BufReader<Box<dyn Io>>, Failure> {
        self.io
            .as_mut()
            .ok_or_else(|| Failure::new(FailureReason::Network, "the session ended during STARTTLS"))
    }

    /// Sends one command line and reads its reply.
    async fn command(&mut self, line: &str) -> Result<Reply, Failure> {
        let io = self.stream()?;
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        io.write_all(&bytes).await.map_err(|e| Failure::io(&e))?;
        io.flush().await.map_err(|e| Failure::io(&e))?;
        self.read_reply().await
    }

    /// Sends a message after DATA's 354: dot-stuffed, CRLF line ends, ending
    /// with the lone dot; returns the reply to the message.
    async fn data(&mut self, message: &[u8]) -> Result<Reply, Failure> {
        let io = self.stream()?;
        io.write_all(&dot_stuff(message)).await.map_err(|e| Failure::io(&e))?;
        io.flush().await.map_err(|e| Failure::io(&e))?;
        self.read_reply().await
    }

    /// Reads one reply, single- or multi-line (`250-...` up to `250 ...`).
    async fn read_reply(&mut self) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        let mut code = None;
        loop {
            let line = self.read_line().await?;
            let Some((c, more, text)) = parse_line(&line) else {
                return Err(Failure::new(
                    FailureReason::Protocol,
                    format!("{} sent a line that is not an SMTP reply: {:?}", self.server, line),
                ));
            };
            if code.is_some_and(|first| first != c) {
                return Err(Failure::new(
                    FailureReason::Protocol,
                    format!("{} changed the reply code within one reply: {:?}", self.server, line),
                ));
            }
            code = Some(c);
            lines.push(text.to_string());
            if !more {
                return Ok(Reply { code: c, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(Failure::new(
                    FailureReason::Oversize,
                    format!("{} sent a reply of more than {MAX_REPLY_LINES} lines", self.server),
                ));
            }
        }
    }

    async fn read_line(&mut self) -> Result<String, Failure> {
        let server = self.server.clone();
        let io = self.stream()?;
        let mut buf = Vec::new();
        io.take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| Failure::io(&e))?;
        if buf.last() != Some(&b'\n') {
            return Err(if buf.len() > MAX_LINE {
                Failure::new(
                    FailureReason::Oversize,
                    format!("{server} sent a reply line longer than {MAX_LINE} bytes"),
                )
            } else {
                Failure::new(
                    FailureReason::Network,
                    format!("{server} closed the connection mid-conversation"),
                )
            });
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let mut line = String::from_utf8(buf).map_err(|_| {
            Failure::new(
                FailureReason::Protocol,
                format!("{server} sent a reply that is not UTF-8"),
            )
        })?;
        for secret in &self.redact {
            line = line.replace(secret.as_str(), "<redacted>");
        }
        Ok(line)
    }

    /// Records the step's reply code and fails unless its class is `want`
    /// (2 for completion, 3 for DATA's go-ahead).
    fn expect(&self, run: &mut Run, step: &'static str, reply: &Reply, want: u16) -> Result<(), Failure> {
        record(run, step, reply.code);
        if reply.code / 100 == want {
            Ok(())
        } else {
            Err(self.classify(verb(step), reply))
        }
    }

    /// The failure for an unwanted reply, by its class.
    fn classify(&self, verb: &str, reply: &Reply) -> Failure {
        let reason = match reply.code / 100 {
            4 => FailureReason::Smtp4xx,
            5 => FailureReason::Smtp5xx,
            _ => FailureReason::Protocol,
        };
        Failure::new(
            reason,
            format!("{} answered {verb} with {}", self.server, reply.summary()),
        )
    }

    /// The plain stream for the TLS handshake after STARTTLS's 220. Anything
    /// the server sent beyond that reply would be injected into the TLS session
    /// (CVE-2011-0411 style), so it is refused.
    fn take_plain(&mut self) -> Result<Box<dyn Io>, Failure> {
        let io = self
            .io
            .take()
            .ok_or_else(|| Failure::new(FailureReason::Network, "the session ended during STARTTLS"))?;
        if !io.buffer().is_empty() {
            return Err(Failure::new(
                FailureReason::Protocol,
                format!("{} sent data after its STARTTLS reply, before TLS", self.server),
            ));
        }
        Ok(io.into_inner())
    }

    /// Continues the session over the TLS stream.
    fn resume(&mut self, io: Box<dyn Io>) {
        self.io = Some(BufReader::new(io));
    }

    /// Best-effort QUIT after a failure, without waiting for the reply.
    async fn abandon(&mut self) {
        if let Some(io) = self.io.as_mut() {
            let _ = io.write_all(b"QUIT\r\n").await;
            let _ = io.flush().await;
        }
    }
}

/// The command a step sends, for messages.
fn verb(step: &str) -> &'static str {
    match step {
        "banner" => "the connection (banner)",
        "ehlo" => "EHLO",
        "starttls" => "STARTTLS",
        "auth" => "AUTH",
        "mail_from" => "MAIL FROM",
        "rcpt_to" => "RCPT TO",
        "data" => "DATA",
        "rset" => "RSET",
        "quit" => "QUIT",
        _ => "a command",
    }
}

/// One SMTP reply: its code and the text of each line (without code and separator).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The text of each line.
    pub lines: Vec<String>,
}

impl Reply {
    /// The first line's text: the server's name in a banner or EHLO reply.
    pub fn first(&self) -> &str {
        self.lines.first().map_or("", String::as_str)
    }

    /// Code and text on one line, for failure details.
    pub fn summary(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
            .trim_end()
            .to_string()
    }
}

/// Reads replies from `stream` the way a probe does until one fails (or
/// `max` were read): the reply reader, public for the fuzz harness (fuzz/).
pub async fn read_replies<S>(stream: S, server: &str, max: usize) -> (Vec<Reply>, Option<Failure>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut session = Session::new(Box::new(stream), server.to_string());
    let mut replies = Vec::new();
    while replies.len() < max {
        match session.read_reply().await {
            Ok(reply) => replies.push(reply),
            Err(failure) => return (replies, Some(failure)),
        }
    }
    (replies, None)
}

/// Splits one reply line into code, whether more lines follow, and text.
/// RFC 5321 §4.2: three digits, the first 2-5, then `-`, space or nothing.
pub fn parse_line(line: &str) -> Option<(u16, bool, &str)> {
    let digits = line.get(..3)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = digits.parse().ok()?;
    if !(200..600).contains(&code) {
        return None;
    }
    match line.as_bytes().get(3) {
        None => Some((code, false, "")),
        Some(b' ') => Some((code, false, &line[4..])),
        Some(b'-') => Some((code, true, &line[4..])),
        Some(_) => None,
    }
}

/// DATA transparency (RFC 5321 §4.5.2): a line starting with `.` gets
/// another; bare LF becomes CRLF; the lone-dot terminator is appended.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    let mut line_start = true;
    let mut prev = 0u8;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        line_start = b == b'\n';
        prev = b;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reply(wire: &[u8]) -> Result<Reply, Failure> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        server.write_all(wire).await.unwrap();
        drop(server);
        let mut s = Session::new(Box::new(client), "mx.test (127.0.0.1:25)".into());
        s.read_reply().await
    }

    #[tokio::test]
    async fn multi_line_replies_are_read_to_their_last_line() {
        let r = reply(b"250-mx-old.example.test\r\n250-SIZE 10240000\r\n250 AUTH PLAIN LOGIN\r\nnext")
            .await
            .unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, ["mx-old.example.test", "SIZE 10240000", "AUTH PLAIN LOGIN"]);
        let ehlo = Ehlo { reply: r };
        assert!(ehlo.offers(&["AUTH".into(), "PLAIN".into()]));
        assert!(ehlo.offers(&["SIZE".into()]));
        assert!(!ehlo.offers(&["STARTTLS".into()]));
        assert!(!ehlo.offers(&["AUTH".into(), "CRAM-MD5".into()]));
        assert_eq!(reply(b"220\r\n").await.unwrap().lines, [""]);
        assert_eq!(reply(b"421 4.3.2 bye\n").await.unwrap().code, 421);
    }

    #[tokio::test]
    async fn malformed_and_endless_replies_are_refused() {
        let reason = |r: Result<Reply, Failure>| r.unwrap_err().reason;
        assert_eq!(reason(reply(b"HELLO there\r\n").await), FailureReason::Protocol);
        assert_eq!(reason(reply(b"250-a\r\n251 b\r\n").await), FailureReason::Protocol);
        assert_eq!(reason(reply(b"199 too low\r\n").await), FailureReason::Protocol);
        assert_eq!(reason(reply(b"250x\r\n").await), FailureReason::Protocol);
        assert_eq!(reason(reply(b"220 \xff\xfe\r\n").await), FailureReason::Protocol);
        assert_eq!(reason(reply(b"250-a\r\n").await), FailureReason::Network);
        assert_eq!(reason(reply(b"").await), FailureReason::Network);
        let long = [b"220 ".as_slice(), &[b'a'; MAX_LINE + 10], b"\r\n"].concat();
        assert_eq!(reason(reply(&long).await), FailureReason::Oversize);
        let many = b"250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert_eq!(reason(reply(&many).await), FailureReason::Oversize);
    }

    #[test]
    fn old_style_auth_lines_count() {
        let ehlo = Ehlo {
            reply: Reply {
                code: 250,
                lines: vec!["mx".into(), "AUTH=PLAIN LOGIN".into()],
            },
        };
        assert!(ehlo.offers(&["AUTH".into(), "PLAIN".into()]));
        assert_eq!(ehlo.params("auth"), Some(vec!["PLAIN".into(), "LOGIN".into()]));
    }

    #[test]
    fn data_is_dot_stuffed_and_terminated() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n..\r\n"), b"a\r\n..b\r\n...\r\n.\r\n");
        assert_eq!(dot_stuff(b".x\nend"), b"..x\r\nend\r\n.\r\n");
    }

    #[tokio::test]
    async fn echoed_credentials_are_redacted() {
        let password = "correct horse battery";
        let token = BASE64.encode(format!("\0probe@example.test\0{password}"));
        let (client, mut server) = tokio::io::duplex(4096);
        let echo = format!("535 5.7.8 bad {token} / {password} / {}\r\n", BASE64.encode(password));
        server.write_all(echo.as_bytes()).await.unwrap();
        let mut s = Session::new(Box::new(client), "smtp.test".into());
        s.redact.push(token.clone());
        s.redact.extend(secret_forms(password));
        let r = s.read_reply().await.unwrap();
        let text = r.summary();
        assert!(!text.contains(&token) && !text.contains(password), "{text}");
        for form in secret_forms(password) {
            assert!(!text.contains(&form), "{text} contains {form}");
        }
        assert!(text.starts_with("535 5.7.8 bad <redacted>"), "{text}");
    }

    fn build(kind_yaml: &str) -> Result<SmtpProbe, FieldError> {
        let kind: crate::config::KindSpec = serde_yaml::from_str(kind_yaml).unwrap();
        let crate::config::KindSpec::Smtp(spec) = &kind else {
            panic!("not an smtp spec: {kind_yaml}")
        };
        let check = Check {
            name: "t".into(),
            envs: Vec::new(),
            interval: std::time::Duration::from_secs(30),
            timeout: std::time::Duration::from_secs(5),
            roots: Arc::new(RootCertStore::empty()),
            kind: kind.clone(),
        };
        SmtpProbe::new(spec, &check, &Credentials::new())
    }

    #[test]
    fn ports_default_by_mode_and_tls() {
        let port = |y: &str| {
            build(&format!("{{kind: smtp, host: mx.test, rcpt_to: a@b.test, {y}}}"))
                .unwrap()
                .port
        };
        assert_eq!(port("mode: mx"), 25);
        assert_eq!(port("mode: relay-check"), 25);
        assert_eq!(port("mode: mx, tls: implicit"), 465);
        assert_eq!(port("mode: mx, port: 2525"), 2525);
        let p = build("{kind: smtp, host: mx.test, mode: mx, rcpt_to: a@b.test}").unwrap();
        assert_eq!((p.helo.as_str(), p.mail_from.is_none()), (DEFAULT_HELO, true));
    }

    #[test]
    fn specs_that_cannot_work_are_refused_with_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret-value\n").unwrap();
        let errors = |check: &str| {
            let text = format!(
                "environments:\n  old: {{addresses: [127.0.0.10]}}\ncredentials:\n  probe: {{username: probe@example.test, password_file: {}}}\nchecks:\n  - {{name: s, kind: smtp, host: smtp.test, {check}}}\n",
                file.display()
            );
            match crate::probe::parse(std::path::Path::new("c.yaml"), &text) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        let cases = [
            ("mode: submission", "`checks[0].credentials`: `submission` logs in"),
            (
                "mode: submission, credentials: nope",
                "unknown credential `nope` (defined: probe)",
            ),
            (
                "mode: submission, credentials: probe, tls: none",
                "`checks[0].tls`: `submission` sends a password",
            ),
            ("mode: mx", "`checks[0].rcpt_to`: required: a local recipient"),
            (
                "mode: relay_check",
                "`checks[0].rcpt_to`: required: an external recipient",
            ),
            (
                "mode: relay_check, rcpt_to: x@ext.test, credentials: probe",
                "must test without AUTH",
            ),
            (
                "mode: mx, rcpt_to: not an address",
                "`checks[0].rcpt_to`: expected an address",
            ),
            ("mode: mx, rcpt_to: a@b.test, helo: 'x y'", "`checks[0].helo`"),
            (
                "mode: mx, rcpt_to: a@b.test, expect: {extensions: ['']}",
                "`checks[0].expect.extensions[0]`",
            ),
            ("mode: open", "unknown variant `open`"),
        ];
        for (check, want) in cases {
            let got = errors(check);
            assert!(got.contains(want), "{check}: {got}");
            assert!(!got.contains("s3cret"), "{got}");
        }
        assert_eq!(
            errors("mode: submission, credentials: probe, rcpt_to: probe@example.test"),
            ""
        );
    }

    #[test]
    fn secret_forms_are_found_in_any_base64_containing_the_secret() {
        let secret = "hunter2-is-long";
        for prefix in ["", "\0", "\0u\0", "\0probe@example.test\0"] {
            let encoded = BASE64.encode(format!("{prefix}{secret}"));
            assert!(
                secret_forms(secret).iter().skip(1).any(|f| encoded.contains(f)),
                "{prefix:?}: {encoded}"
            );
        }
    }
}
