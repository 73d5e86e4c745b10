//! The bodies of the fuzz targets: one function per parser that reads text
//! someone else wrote (a check file, a web config, a server's replies, a DNS
//! answer, a probe mail's marker). cargo-fuzz calls them from
//! `fuzz/fuzz_targets/*.rs`; the stable harness `tests/fuzz.rs` includes this
//! file and calls them on random and mutated inputs. Each one panics only when
//! the code under test breaks a promise (a panic, or an oracle below).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use cutover_monitor::probe::dns::classify_wire;
use cutover_monitor::probe::imap::{Bounded, MAX_SESSION_BYTES};
use cutover_monitor::probe::mailflow::{marker, verify};
use cutover_monitor::probe::smtp::{self, MAX_REPLY_LINES};
use cutover_monitor::web_config;
use hickory_resolver::proto::rr::RecordType;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Every target, by the name of its corpus directory and cargo-fuzz binary.
pub const TARGETS: &[&str] = &[
    "config",
    "web_config",
    "smtp_reply",
    "imap_stream",
    "dns_answer",
    "mail_marker",
];

/// Runs the target called `name` on one input.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "config" => check_file(data),
        "web_config" => web_config_file(data),
        "smtp_reply" => smtp_reply(data),
        "imap_stream" => imap_stream(data),
        "dns_answer" => dns_answer(data),
        "mail_marker" => mail_marker(data),
        other => panic!("no fuzz target `{other}`"),
    }
}

/// Where relative paths in fuzzed files point: a directory that does not
/// exist, so a fuzzed `password_file: x` reads nothing from the machine.
fn nowhere() -> &'static Path {
    Path::new("/nonexistent/cutover-monitor-fuzz/checks.yaml")
}

/// Files the loaders would open on the fuzzer's say-so and that never end or
/// block (`/dev/zero`, `/dev/stdin`): the loaders read what the operator
/// names, so such inputs are skipped rather than fuzzed.
fn names_a_device(text: &str) -> bool {
    ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p))
}

/// The check-file loader: any text gives a config or errors, and the errors
/// format (they compute line and column from the text).
pub fn check_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if names_a_device(text) {
        return;
    }
    if let Err(errors) = cutover_monitor::probe::parse(nowhere(), text) {
        assert!(!errors.0.is_empty(), "an error result without errors");
        let _ = errors.to_string();
    }
}

/// The web-config loader (exporter-toolkit format).
pub fn web_config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if names_a_device(text) {
        return;
    }
    if let Err(errors) = web_config::parse(nowhere(), text) {
        assert!(!errors.0.is_empty(), "an error result without errors");
        let _ = errors.to_string();
    }
}

/// The first input byte picks how many bytes each read hands out (0: all at
/// once), so parsers see their input split at every possible place.
fn split(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&n, rest)) if n != 0 => (usize::from(n % 32) + 1, rest),
        Some((_, rest)) => (usize::MAX, rest),
        None => (usize::MAX, data),
    }
}

/// The SMTP reply reader, and the line parser on every line of the input.
pub fn smtp_reply(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else { continue };
        if let Some((code, _, text)) = smtp::parse_line(line) {
            assert!((200..600).contains(&code), "code {code} from {line:?}");
            assert!(line.ends_with(text), "text {text:?} is not the end of {line:?}");
        }
    }
    let (chunk, wire) = split(data);
    let (replies, _failure) = block_on(smtp::read_replies(Served::new(wire, chunk), "fuzz", 1000));
    for reply in &replies {
        assert!((200..600).contains(&reply.code), "reply code {}", reply.code);
        assert!(reply.lines.len() <= MAX_REPLY_LINES, "{} lines", reply.lines.len());
        assert!(reply.lines.iter().all(|l| !l.contains('\n')), "a line with a line feed");
        let _ = reply.summary();
    }
}

/// IMAP responses as the probe reads them: through [`Bounded`] (the literal
/// guard) into async-imap's parser, until the stream ends or fails.
pub fn imap_stream(data: &[u8]) {
    let (chunk, wire) = split(data);
    block_on(async {
        let mut client = async_imap::Client::new(Bounded::new(Served::new(wire, chunk)));
        for _ in 0..10_000 {
            match client.read_response().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
    // The guard alone, reading everything: never more than a session's cap.
    let (chunk, wire) = split(data);
    let read = block_on(async {
        let mut all = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut Bounded::new(Served::new(wire, chunk)), &mut all).await;
        all.len()
    });
    assert!(
        read as u64 <= MAX_SESSION_BYTES && read <= wire.len(),
        "read {read} bytes"
    );
}

/// DNS answer classification. Input: a byte choosing the record type, the
/// `old` values (comma-separated) up to a newline, the `new` values likewise,
/// then the reply in wire format.
pub fn dns_answer(data: &[u8]) {
    const TYPES: [RecordType; 7] = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::MX,
        RecordType::TXT,
        RecordType::SRV,
        RecordType::CNAME,
        RecordType::PTR,
    ];
    let Some((&t, rest)) = data.split_first() else { return };
    let rtype = TYPES[usize::from(t) % TYPES.len()];
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let (Some(old), Some(new), Some(wire)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let values = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (old, new) = (values(old), values(new));
    let old: Vec<&str> = old.iter().map(String::as_str).collect();
    let new: Vec<&str> = new.iter().map(String::as_str).collect();
    if let Ok((state, _ttl)) = classify_wire(rtype, &old, &new, wire) {
        let _ = state.as_str();
    }
}

/// The probe-mail marker check. Input: key, instance and marker value, one
/// per line. Besides not panicking: whatever verifies must be exactly the
/// marker the key makes for that id, and a made marker must verify.
pub fn mail_marker(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (Some(key), Some(instance), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    if let Some(id) = verify(key.as_bytes(), instance, value) {
        let made = marker(key.as_bytes(), instance, &id);
        // The tag's hex may come in either case; everything else exactly.
        let words: Vec<String> = value
            .split_whitespace()
            .map(|w| {
                if w.starts_with("mac=") {
                    w.to_ascii_lowercase()
                } else {
                    w.to_string()
                }
            })
            .collect();
        assert_eq!(
            made.split_whitespace().collect::<Vec<_>>(),
            words,
            "verified a marker the key did not make"
        );
    }
    if !instance.is_empty() && !instance.contains(char::is_whitespace) {
        let id: String = value.bytes().take(16).map(|b| format!("{:x}", b & 15)).collect();
        if !id.is_empty() {
            let made = marker(key.as_bytes(), instance, &id);
            assert_eq!(
                verify(key.as_bytes(), instance, &made),
                Some(id),
                "own marker {made:?} did not verify"
            );
        }
    }
}

/// Runs a future on this thread's runtime; a server that could make the
/// parser wait forever ends the case after a few seconds instead.
fn block_on<F: Future>(fut: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime");
    }
    RT.with(|rt| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), fut).await })
            .expect("the parser waited on a finished input for 5 s")
    })
}

/// A server that sends `data` in reads of at most `chunk` bytes, then EOF,
/// and swallows whatever the client writes.
#[derive(Debug)]
pub struct Served {
    data: Vec<u8>,
    at: usize,
    chunk: usize,
}

impl Served {
    fn new(data: &[u8], chunk: usize) -> Self {
        Served {
            data: data.to_vec(),
            at: 0,
            chunk,
        }
    }
}

impl AsyncRead for Served {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = (self.data.len() - self.at).min(self.chunk).min(buf.remaining());
        buf.put_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Served {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
