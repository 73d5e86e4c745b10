//! Servers that misbehave on purpose, in this process: a banner that never
//! ends, a body or header line that never ends, a huge literal, one byte per
//! second, a reset mid-reply, invalid UTF-8, and garbage where TLS should be.
//! Every probe kind must end each with the right reason within its timeout
//! plus 100 ms, and the daemon must stay bounded in memory and descriptors
//! while hundreds of them misbehave at once.
//!
//! Real servers cannot produce these faults on demand, hence the fakes.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, Scrape, lab};
use cutover_monitor::probe::{FailureReason, Outcome};
use cutover_monitor::{probe, scheduler};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The timeout every hostile check runs with.
const TIMEOUT: Duration = Duration::from_secs(1);
/// What a run may take beyond its timeout.
const GRACE: Duration = Duration::from_millis(100);

/// How a fake server treats each connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Writes `prefix`, then `a` forever, never a line end.
    Endless(&'static [u8]),
    /// Writes `reply` one byte per second.
    Trickle(&'static [u8]),
    /// Writes `prefix`, then resets the connection.
    Reset(&'static [u8]),
    /// Writes `reply` (garbage, invalid UTF-8...) and keeps the connection open.
    Send(&'static [u8]),
    /// Accepts and never says a word.
    Hang,
}

/// Keeps the connection open, reading (and dropping) what the client sends
/// until it closes.
async fn hold(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
}

async fn misbehave(mut s: TcpStream, fault: Fault) {
    match fault {
        Fault::Endless(prefix) => {
            if s.write_all(prefix).await.is_err() {
                return;
            }
            let chunk = [b'a'; 16 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        }
        Fault::Trickle(reply) => {
            for b in reply {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            hold(s).await;
        }
        Fault::Reset(prefix) => {
            let _ = s.write_all(prefix).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
        Fault::Send(reply) => {
            let _ = s.write_all(reply).await;
            hold(s).await;
        }
        Fault::Hang => hold(s).await,
    }
}

/// Starts a fake TCP server on 127.0.0.1; returns its port.
async fn serve(fault: Fault) -> u16 {
    serve_when(fault, false).await
}

/// Like [`serve`], but misbehaves only once the HTTP request head arrived, as
/// a web server does. (One that speaks first fails as `protocol`, sooner.)
async fn serve_http(fault: Fault) -> u16 {
    serve_when(fault, true).await
}

async fn serve_when(fault: Fault, after_request: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while after_request && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                misbehave(s, fault).await
            });
        }
    });
    port
}

/// The config around some checks: one environment at 127.0.0.1.
fn config(checks: &str) -> (tempfile::TempDir, probe::Config) {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "Hostile-Test-Password").unwrap();
    let yaml = format!(
        "defaults: {{interval: 10s, timeout: {}ms}}\nenvironments:\n  local: {{addresses: [127.0.0.1]}}\ncredentials:\n  probe: {{username: probe@hostile.test, password_file: \"{}\"}}\nchecks:\n{checks}",
        TIMEOUT.as_millis(),
        password.display()
    );
    let config = probe::parse(Path::new("hostile.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    (dir, config)
}

/// Runs every instance of `checks` once, each in its own task as the
/// scheduler does; returns each check's outcome and wall time.
async fn run(checks: &str) -> Vec<(String, Outcome, Duration)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (_dir, config) = config(checks);
    let config = std::sync::Arc::new(config);
    let runs = scheduler::instances(&config).into_iter().map(|spec| {
        let config = config.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let outcome = scheduler::run_once(&spec, &config).await;
            (spec.inst.check.clone(), outcome, start.elapsed())
        })
    });
    futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// Asserts each check (named after the reason it must end with) failed with
/// that reason within the timeout plus [`GRACE`].
fn assert_reasons(results: &[(String, Outcome, Duration)]) {
    let mut report = String::new();
    let mut ok = true;
    for (check, outcome, took) in results {
        let want = check.split('.').next().unwrap();
        let got = outcome
            .result
            .as_ref()
            .err()
            .map(|f| f.reason.as_str())
            .unwrap_or("success");
        let detail = outcome.result.as_ref().err().map(|f| f.to_string()).unwrap_or_default();
        let fine = got == want && *took <= TIMEOUT + GRACE;
        ok &= fine;
        report += &format!(
            "{} {check:<28} {got:<14} {took:>8.3?}  {detail}\n",
            if fine { "ok " } else { "BAD" }
        );
    }
    println!("{report}");
    assert!(ok, "wrong reason or too slow:\n{report}");
    let names: Vec<&str> = results.iter().map(|(c, _, _)| c.split('.').next().unwrap()).collect();
    assert!(
        names
            .iter()
            .all(|n| FailureReason::ALL.iter().any(|r| r.as_str() == *n))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_ends_every_hostile_banner_with_its_reason_in_time() {
    let endless = serve(Fault::Endless(b"OK ")).await;
    let trickle = serve(Fault::Trickle(b"OK slowly\r\n")).await;
    let reset = serve(Fault::Reset(b"OK hal")).await;
    let binary = serve(Fault::Send(b"OK \xff\xfe\xfd\r\n")).await;
    let garbage = serve(Fault::Send(b"\x16\x03\x01\xff\xffnot TLS at all\r\n")).await;
    let tcp = |name: &str, port: u16, tls: bool| {
        format!(
            "  - {{name: {name}, kind: tcp, host: hostile.test, port: {port}, tls: {tls}, expect_banner: \"^OK\"}}\n"
        )
    };
    let checks = [
        tcp("oversize.endless-banner", endless, false),
        tcp("timeout.trickle", trickle, false),
        tcp("network.reset", reset, false),
        tcp("protocol.invalid-utf8", binary, false),
        tcp("tls_handshake.garbage", garbage, true),
    ]
    .concat();
    assert_reasons(&run(&checks).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_ends_every_hostile_reply_with_its_reason_in_time() {
    let body = serve_http(Fault::Endless(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")).await;
    let header = serve_http(Fault::Endless(b"HTTP/1.1 200 OK\r\nX-Endless: ")).await;
    let trickle = serve_http(Fault::Trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let reset = serve_http(Fault::Reset(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")).await;
    let binary = serve_http(Fault::Send(b"HTTP/1.1 \xff\xfe\xfd\r\n\r\n")).await;
    let garbage = serve(Fault::Send(b"\x16\x03\x01\xff\xffnot TLS at all\r\n")).await;
    let http = |name: &str, scheme: &str, port: u16| {
        format!("  - {{name: {name}, kind: http, url: \"{scheme}://hostile.test:{port}/\"}}\n")
    };
    let checks = [
        http("oversize.endless-body", "http", body),
        http("oversize.endless-header", "http", header),
        http("timeout.trickle", "http", trickle),
        http("network.reset", "http", reset),
        http("protocol.invalid-utf8", "http", binary),
        http("tls_handshake.garbage", "https", garbage),
    ]
    .concat();
    assert_reasons(&run(&checks).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_ends_every_hostile_greeting_with_its_reason_in_time() {
    let endless = serve(Fault::Endless(b"* OK ")).await;
    let literal = serve(Fault::Send(b"* OK [ALERT {999999999}\r\n")).await;
    let trickle = serve(Fault::Trickle(b"* OK slowly\r\n")).await;
    let reset = serve(Fault::Reset(b"* OK hal")).await;
    let binary = serve(Fault::Send(b"\xff\xfe\xfd OK\r\n")).await;
    let garbage = serve(Fault::Send(b"\x16\x03\x01\xff\xffnot TLS at all\r\n")).await;
    let imap = |name: &str, port: u16, tls: &str| {
        format!("  - {{name: {name}, kind: imap, host: hostile.test, port: {port}, tls: {tls}, credentials: probe}}\n")
    };
    let checks = [
        imap("oversize.endless-greeting", endless, "none"),
        imap("oversize.huge-literal", literal, "none"),
        imap("timeout.trickle", trickle, "none"),
        imap("network.reset", reset, "none"),
        imap("protocol.invalid-utf8", binary, "none"),
        imap("tls_handshake.garbage", garbage, "implicit"),
    ]
    .concat();
    assert_reasons(&run(&checks).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_ends_every_hostile_reply_with_its_reason_in_time() {
    let endless = serve(Fault::Endless(b"220 ")).await;
    let lines: &'static [u8] = Box::leak(b"220-more\r\n".repeat(1000).into_boxed_slice());
    let long = serve(Fault::Send(lines)).await;
    let trickle = serve(Fault::Trickle(b"220 slowly\r\n")).await;
    let reset = serve(Fault::Reset(b"220 hal")).await;
    let binary = serve(Fault::Send(b"220 \xff\xfe\xfd\r\n")).await;
    let garbage = serve(Fault::Send(b"\x16\x03\x01\xff\xffnot TLS at all\r\n")).await;
    let smtp = |name: &str, port: u16, tls: &str| {
        format!(
            "  - {{name: {name}, kind: smtp, host: hostile.test, port: {port}, tls: {tls}, mode: mx, rcpt_to: a@hostile.test}}\n"
        )
    };
    let checks = [
        smtp("oversize.endless-banner", endless, "none"),
        smtp("oversize.endless-reply", long, "none"),
        smtp("timeout.trickle", trickle, "none"),
        smtp("network.reset", reset, "none"),
        smtp("protocol.invalid-utf8", binary, "none"),
        smtp("tls_handshake.garbage", garbage, "implicit"),
    ]
    .concat();
    assert_reasons(&run(&checks).await);
}

/// How a fake DNS server answers over TCP, after a truncated UDP reply sent
/// the client there.
#[derive(Clone, Copy)]
enum DnsFault {
    /// UDP answers are garbage (never a reply to the query).
    UdpGarbage,
    /// TCP: the full 64 KiB length, then one byte per second.
    TcpTrickle,
    /// TCP: a length, part of the message, then a reset.
    TcpReset,
    /// TCP: a length and that many bytes of garbage.
    TcpGarbage,
}

/// A fake DNS server on one port, UDP and TCP; returns the port.
async fn serve_dns(fault: DnsFault) -> u16 {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let port = udp.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let reply = match fault {
                DnsFault::UdpGarbage => b"\xff\xfe garbage that answers nothing".to_vec(),
                // The query echoed back as a response with TC set: go to TCP.
                _ => {
                    let mut r = buf[..n].to_vec();
                    r[2] |= 0x82;
                    r
                }
            };
            let _ = udp.send_to(&reply, peer).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            let fault = match fault {
                DnsFault::TcpTrickle => Fault::Trickle(b"\xff\xffslowly"),
                DnsFault::TcpReset => Fault::Reset(b"\x01\x00\x12\x34\x81"),
                _ => Fault::Send(b"\x00\x0c\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
            };
            tokio::spawn(misbehave(s, fault));
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_ends_every_hostile_answer_with_its_reason_in_time() {
    let dns = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    kind: dns\n    resolvers: {{hostile: 127.0.0.1}}\n    port: {port}\n    records: [{{name: a.hostile.test, type: A, old: [127.0.0.10], new: [127.0.0.20]}}]\n"
        )
    };
    let checks = [
        dns("timeout.udp-garbage", serve_dns(DnsFault::UdpGarbage).await),
        dns("timeout.tcp-trickle", serve_dns(DnsFault::TcpTrickle).await),
        dns("network.tcp-reset", serve_dns(DnsFault::TcpReset).await),
        dns("protocol.tcp-garbage", serve_dns(DnsFault::TcpGarbage).await),
    ]
    .concat();
    assert_reasons(&run(&checks).await);
}

/// `process_resident_memory_bytes` and `process_open_fds` of the daemon.
fn footprint(d: &Daemon) -> (f64, f64) {
    let s = d.scrape();
    (
        s.get("process_resident_memory_bytes", &[]).unwrap(),
        s.get("process_open_fds", &[]).unwrap(),
    )
}

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn the_daemon_stays_bounded_against_hundreds_of_hostile_servers() {
    lab();
    let servers = tokio::runtime::Runtime::new().unwrap();
    let faults: Vec<(&str, &str, Fault)> = vec![
        ("imap", "greeting", Fault::Endless(b"* OK ")),
        ("smtp", "banner", Fault::Endless(b"220 ")),
        ("tcp", "escape", Fault::Send(ESCAPES)),
        ("http", "body", Fault::Endless(b"HTTP/1.1 200 OK\r\n\r\n")),
        ("http", "header", Fault::Endless(b"HTTP/1.1 200 OK\r\nX-Endless: ")),
        (
            "http",
            "reset",
            Fault::Reset(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"),
        ),
        ("https", "garbage", Fault::Send(b"\x16\x03\x01\xff\xffnot TLS")),
        ("tcp", "banner", Fault::Endless(b"OK ")),
        ("tcp", "trickle", Fault::Trickle(b"OK slowly\r\n")),
        ("tcp", "binary", Fault::Send(b"\xff\xfe\xfd\r\n")),
        ("tcp", "hang", Fault::Hang),
    ];
    const PER_FAULT: usize = 22;
    let mut checks = String::new();
    for (kind, name, fault) in &faults {
        for i in 0..PER_FAULT {
            let port = servers.block_on(serve_when(*fault, *kind == "http"));
            checks += &match *kind {
                "tcp" => format!(
                    "  - {{name: {kind}-{name}-{i}, kind: tcp, host: hostile.test, port: {port}, expect_banner: \"^OK\"}}\n"
                ),
                "imap" => format!(
                    "  - {{name: {kind}-{name}-{i}, kind: imap, host: hostile.test, port: {port}, tls: none, credentials: probe}}\n"
                ),
                "smtp" => format!(
                    "  - {{name: {kind}-{name}-{i}, kind: smtp, host: hostile.test, port: {port}, tls: none, mode: mx, rcpt_to: a@hostile.test}}\n"
                ),
                scheme => {
                    format!("  - {{name: {kind}-{name}-{i}, kind: http, url: \"{scheme}://hostile.test:{port}/\"}}\n")
                }
            };
        }
    }
    let yaml = format!(
        "defaults: {{interval: 1s, timeout: 900ms}}\nenvironments:\n  local: {{addresses: [127.0.0.1]}}\ncredentials:\n  probe: {{username: u, password_file: \"{{{{PASSWORD_FILE}}}}\"}}\nchecks:\n{checks}"
    );
    let d = Daemon::start(&yaml);
    let (rss_start, fds_start) = footprint(&d);
    let instances = (faults.len() * PER_FAULT) as f64;
    let ran_often = |s: &Scrape| s.sum("cutover_probe_runs_total", &[]) >= 4.0 * instances;
    d.wait_until(
        "every hostile instance ran about four times",
        ran_often,
        Duration::from_secs(30),
    );
    let (rss_busy, fds_busy) = footprint(&d);
    let s = d.scrape();
    let mut reasons: Vec<(String, f64)> = Vec::new();
    for (labels, v) in s.series("cutover_probe_failures_total") {
        let reason = labels.iter().find(|(k, _)| k == "reason").unwrap().1.clone();
        match reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, total)) => *total += v,
            None => reasons.push((reason, v)),
        }
    }
    assert_eq!(s.sum("cutover_probe_success", &[]), 0.0, "no hostile server passes");

    // The servers go away: connections close, descriptors must come back.
    servers.shutdown_timeout(Duration::from_secs(1));
    let refused = |s: &Scrape| {
        s.series("cutover_probe_failures_total")
            .iter()
            .filter(|(l, _)| l.iter().any(|(k, v)| k == "reason" && v == "refused"))
            .count() as f64
            >= instances
    };
    d.wait_until("every instance saw its server gone", refused, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let (rss_end, fds_end) = footprint(&d);
    println!(
        "{instances} hostile instances; RSS start {:.1} MiB, busy {:.1} MiB, after {:.1} MiB (growth {:.1} MiB); \
         open fds start {fds_start}, busy {fds_busy}, after {fds_end}; failures by reason {reasons:?}",
        rss_start / MIB,
        rss_busy / MIB,
        rss_end / MIB,
        (rss_busy.max(rss_end) - rss_start) / MIB,
    );
    assert!(
        rss_busy - rss_start < 64.0 * MIB,
        "RSS grew by {:.1} MiB",
        (rss_busy - rss_start) / MIB
    );
    assert!(
        rss_end - rss_start < 64.0 * MIB,
        "RSS grew by {:.1} MiB",
        (rss_end - rss_start) / MIB
    );
    assert!(fds_end <= fds_start + 5.0, "open fds {fds_start} -> {fds_end}");
    for reason in [
        "oversize",
        "timeout",
        "network",
        "protocol",
        "tls_handshake",
        "content_mismatch",
    ] {
        assert!(
            reasons.iter().any(|(r, v)| r == reason && *v > 0.0),
            "no {reason}: {reasons:?}"
        );
    }
    let logs = d.logs();
    assert!(logs.contains("pwned"), "the hostile banner was logged: {logs}");
    assert!(
        !logs.contains('\x1b') && !logs.contains('\u{202e}'),
        "raw escapes in the log"
    );
}

/// A banner with terminal escapes (clear screen, set title), a bidi override
/// and more text than a failure detail keeps.
const ESCAPES: &[u8] = b"NO \x1b[2J\x1b]0;pwned\x07 \xe2\x80\xae gnp.exe xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn server_text_reaches_failures_escaped_and_truncated() {
    let tcp = serve(Fault::Send(ESCAPES)).await;
    let smtp = serve(Fault::Send(b"554 \x1b[2J\x1b]0;pwned\x07 \xe2\x80\xae go away\r\n")).await;
    let imap = serve(Fault::Send(b"* BYE \x1b[2J\x1b]0;pwned\x07 \xe2\x80\xae go away\r\n")).await;
    let checks = format!(
        "  - {{name: tcp, kind: tcp, host: hostile.test, port: {tcp}, expect_banner: \"^OK\"}}\n  - {{name: smtp, kind: smtp, host: hostile.test, port: {smtp}, tls: none, mode: mx, rcpt_to: a@hostile.test}}\n  - {{name: imap, kind: imap, host: hostile.test, port: {imap}, tls: none, credentials: probe}}\n"
    );
    for (check, outcome, _) in run(&checks).await {
        let detail = &outcome.result.as_ref().expect_err(&check).detail;
        println!("{check}: {detail}");
        assert!(detail.contains("pwned"), "{check}: the server's text is kept: {detail}");
        let raw = detail
            .chars()
            .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c));
        assert!(!raw, "{check}: raw control or bidi characters in {detail:?}");
        assert!(detail.len() <= 320, "{check}: {} bytes", detail.len());
    }
}

#[test]
fn a_thousand_hung_targets_wait_for_probe_slots_instead_of_taking_descriptors() {
    lab();
    let servers = tokio::runtime::Runtime::new().unwrap();
    let port = servers.block_on(serve(Fault::Hang));
    const SLOTS: usize = 50;
    let checks: String = (0..1000)
        .map(|i| format!("  - {{name: hung-{i}, kind: tcp, host: hostile.test, port: {port}, expect_banner: x}}\n"))
        .collect();
    let yaml = format!(
        "defaults: {{interval: 2s, timeout: 500ms, max_concurrent_probes: {SLOTS}}}\nenvironments:\n  local: {{addresses: [127.0.0.1]}}\nchecks:\n{checks}"
    );
    let d = Daemon::start(&yaml);
    let (_, fds_start) = footprint(&d);
    let mut fds_max = fds_start;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        fds_max = fds_max.max(footprint(&d).1);
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = d.scrape();
    let runs = s.sum("cutover_probe_runs_total", &[]);
    let timeouts = s.sum("cutover_probe_failures_total", &[("reason", "timeout")]);
    let waited = s.get("cutover_probe_queue_wait_seconds_sum", &[]).unwrap();
    let queued = s.get("cutover_probe_queue_wait_seconds_count", &[]).unwrap();
    println!(
        "1000 hung targets, {SLOTS} slots: open fds start {fds_start}, max {fds_max}; {runs} runs, {timeouts} timeouts; \
         queue wait {waited:.1} s over {queued} runs"
    );
    // One socket per run in flight, plus the scrape's own connection.
    assert!(
        fds_max <= fds_start + SLOTS as f64 + 5.0,
        "fds {fds_start} -> {fds_max}"
    );
    // A scrape may fall between a run's count and its failure's.
    assert!(
        runs >= 300.0 && timeouts >= runs - SLOTS as f64,
        "{runs} runs, {timeouts} timeouts"
    );
    // Families are gathered one after another: runs may finish in between.
    assert!(
        waited > 0.0 && queued >= runs - SLOTS as f64,
        "the wait is visible: {waited} s over {queued} of {runs} runs"
    );
}
