//! Shared harness for the integration tests: the lab of real servers, the
//! daemon as a user runs it, and its metrics as a user reads them.
//!
//! Every test here needs the lab (`tests/lab/up`). When it is not running the
//! test fails with a message saying so: it never skips.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The lab's facts, from `tests/lab/env`.
#[derive(Debug, Clone)]
pub struct Lab {
    /// `CUTOVER_LAB_*` variables without the prefix, e.g. `CA`, `PASSWORD_FILE`.
    pub vars: HashMap<String, String>,
}

impl Lab {
    /// One variable, e.g. `lab.var("CA")`.
    pub fn var(&self, name: &str) -> &str {
        self.vars
            .get(name)
            .unwrap_or_else(|| panic!("tests/lab/env has no CUTOVER_LAB_{name}"))
    }

    /// The lab password (tests use it to prove it never leaks).
    pub fn password(&self) -> &str {
        self.var("PASSWORD")
    }

    /// Replaces `{{CA}}`, `{{PASSWORD_FILE}}`, `{{LAB_DIR}}` in a config.
    pub fn render(&self, yaml: &str) -> String {
        yaml.replace("{{CA}}", self.var("CA"))
            .replace("{{PASSWORD_FILE}}", self.var("PASSWORD_FILE"))
            .replace("{{LAB_DIR}}", self.var("DIR"))
    }
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The lab, checked to be up (webmail answers on both environments).
pub fn lab() -> Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        for addr in ["127.0.0.10:443", "127.0.0.20:443", "127.0.0.10:993", "127.0.0.20:993"] {
            let addr: SocketAddr = addr.parse().unwrap();
            if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
                panic!("the lab is not running ({addr} refuses): run tests/lab/up first");
            }
        }
        let out = Command::new(root().join("tests/lab/env"))
            .output()
            .expect("run tests/lab/env");
        assert!(
            out.status.success(),
            "tests/lab/env failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut vars = HashMap::new();
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            if let Some((k, v)) = line.strip_prefix("export CUTOVER_LAB_").and_then(|l| l.split_once('=')) {
                vars.insert(k.to_string(), v.trim_matches('\'').to_string());
            }
        }
        Lab { vars }
    })
    .clone()
}

/// Runs a lab script (`svc`, `dns`, `user`, `customers`), asserts it
/// succeeded and returns what it printed.
pub fn lab_script(args: &[&str]) -> String {
    let out = Command::new(root().join("tests/lab").join(args[0]))
        .args(&args[1..])
        .output()
        .expect("run lab script");
    assert!(
        out.status.success(),
        "tests/lab/{} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a lab script now and its `restore` counterpart when dropped, even when
/// the test panics, so one test's fault never leaks into the next.
pub struct Restore(Vec<String>);

impl Drop for Restore {
    fn drop(&mut self) {
        let args: Vec<&str> = self.0.iter().map(String::as_str).collect();
        let _ = lab_script(&args);
    }
}

/// `lab_fault(&["svc","stop","new","nginx"], &["svc","start","new","nginx"])`.
pub fn lab_fault(fault: &[&str], restore: &[&str]) -> Restore {
    let guard = Restore(restore.iter().map(|s| s.to_string()).collect());
    lab_script(fault);
    guard
}

/// `dns set STATE` now; when dropped `dns set old`, then `dns flush`: the
/// lagging resolver would otherwise serve STATE's answers to the next test
/// for up to their TTL (300 s), should anything have asked it meanwhile.
pub fn dns_fault(state: &str) -> (Restore, Restore) {
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect();
    let guard = (
        Restore(strings(&["dns", "set", "old"])),
        Restore(strings(&["dns", "flush"])),
    );
    lab_script(&["dns", "set", state]);
    guard
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a rendered config into a fresh temporary directory.
pub fn write_config(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checks.yaml");
    std::fs::write(&path, lab().render(yaml)).unwrap();
    (dir, path)
}

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cutover-monitor"))
}

/// Runs `cutover-monitor check` on a config; returns (exit code, stdout, stderr).
pub fn check_cmd(yaml: &str, args: &[&str]) -> (i32, String, String) {
    let (_dir, path) = write_config(yaml);
    let out = bin()
        .arg("check")
        .arg("--config.file")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    decode(out)
}

/// Runs `cutover-monitor validate` on a check file (and a web config);
/// returns (exit code, stdout, stderr).
pub fn validate(config: &std::path::Path, web: Option<&std::path::Path>) -> (i32, String, String) {
    let mut cmd = bin();
    cmd.arg("validate").arg("--config.file").arg(config);
    if let Some(web) = web {
        cmd.arg("--web.config.file").arg(web);
    }
    decode(cmd.output().unwrap())
}

/// Exit code, stdout and stderr of a finished command.
pub fn decode(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The daemon, running on a free port; killed when dropped.
pub struct Daemon {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    /// The config file it runs (rewrite it and call `reload`).
    pub config: PathBuf,
    /// Its stderr log.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `cutover-monitor run` on a rendered config and waits for `/-/ready`.
    pub fn start(yaml: &str) -> Daemon {
        Self::start_with(yaml, &[])
    }

    /// Like `start`, with extra arguments (e.g. `--log.level trace`).
    pub fn start_with(yaml: &str, args: &[&str]) -> Daemon {
        let (dir, config) = write_config(yaml);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.path().join("daemon.log");
        // The ledger goes to the test's own directory unless the test picks one.
        let storage = dir.path().join("data");
        let mut default_storage = vec!["--storage.path", storage.to_str().unwrap()];
        if args.contains(&"--storage.path") {
            default_storage.clear();
        }
        let child = bin()
            .arg("run")
            .args(&default_storage)
            .arg("--config.file")
            .arg(&config)
            .arg("--web.listen-address")
            .arg(addr.to_string())
            .args(args)
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("stdout.log")).unwrap(),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let mut daemon = Daemon {
            child,
            addr,
            config,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("daemon exited with {status}: {}", daemon.logs());
            }
            if matches!(daemon.http("GET", "/-/ready"), Ok((200, _))) {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready within 10s: {}",
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A plain HTTP/1.1 request to the daemon; returns (status, body).
    pub fn http(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        http(self.addr, method, path)
    }

    /// `/metrics`, parsed.
    pub fn scrape(&self) -> Scrape {
        let (status, body) = self.http("GET", "/metrics").expect("scrape");
        assert_eq!(status, 200, "{body}");
        Scrape::parse(&body)
    }

    /// Waits until `name{labels}` satisfies `pred`; panics with the last scrape
    /// and the log when it does not within `timeout`.
    pub fn wait_for(&self, name: &str, labels: &[(&str, &str)], pred: impl Fn(f64) -> bool, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let scrape = self.scrape();
            if let Some(v) = scrape.get(name, labels) {
                if pred(v) {
                    return v;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}{labels:?} did not reach the expected value within {timeout:?}; now {:?}\n{}\nlog:\n{}",
                    scrape.get(name, labels),
                    scrape.matching(name),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `pred` holds for a scrape; panics naming `what` otherwise.
    pub fn wait_until(&self, what: &str, pred: impl Fn(&Scrape) -> bool, timeout: Duration) -> Scrape {
        let deadline = Instant::now() + timeout;
        loop {
            let scrape = self.scrape();
            if pred(&scrape) {
                return scrape;
            }
            if Instant::now() > deadline {
                panic!("{what}: not within {timeout:?}\n{}\nlog:\n{}", scrape.text, self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// POST /-/reload; returns (status, body).
    pub fn reload(&self) -> (u16, String) {
        self.http("POST", "/-/reload").expect("reload request")
    }

    /// Sends a signal to the daemon process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit; returns how long it took.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait().unwrap().is_some() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client, so tests depend on nothing but the daemon.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    request(addr, method, path, &[], "")
}

/// Like [`http`], with extra request headers and a body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(s, "{head}\r\n{body}")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Label pairs of one series.
pub type Labels = Vec<(String, String)>;

/// A parsed Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The raw text.
    pub text: String,
    samples: Vec<(String, Labels, f64)>,
}

impl Scrape {
    /// Parses sample lines (comments skipped).
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or(f64::NAN);
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// The value of the one series of `name` carrying (at least) `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, ls, _)| n == name && labels.iter().all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, _, v)| *v)
            .collect();
        assert!(found.len() <= 1, "{name}{labels:?} matches {} series", found.len());
        found.first().copied()
    }

    /// The sum over every series of `name` carrying (at least) `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, ls, _)| n == name && labels.iter().all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, _, v)| *v)
            .sum()
    }

    /// Every series of `name` with its labels.
    pub fn series(&self, name: &str) -> Vec<(Labels, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }

    /// The lines of `name`, for failure messages.
    pub fn matching(&self, name: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.starts_with(name))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_labels(text: &str) -> Labels {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), value));
        rest = &after[end..];
    }
    out
}

/// A certificate authority made for one test, to build certificates the lab
/// CA would never issue (wrong name, expired).
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

impl TestCa {
    /// A fresh CA.
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let pem = issuer.pem();
        TestCa { issuer, pem }
    }

    /// A server certificate for `names`; `expired` puts its validity in the past.
    pub fn leaf(&self, names: &[&str], expired: bool) -> (Vec<u8>, Vec<u8>) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

/// A TLS server on 127.0.0.1 that completes handshakes with `cert` and then
/// writes `banner`; returns its port. Runs until the test process ends.
pub fn tls_server(cert: (Vec<u8>, Vec<u8>), banner: &'static [u8]) -> u16 {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.0)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.1)),
        )
        .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let Ok(mut conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::Stream::new(&mut conn, &mut stream);
                let _ = tls.write_all(banner);
                let _ = tls.flush();
                std::thread::sleep(Duration::from_millis(200));
            });
        }
    });
    port
}

/// A TCP server on 127.0.0.1 that accepts and then never says anything.
pub fn hung_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}
