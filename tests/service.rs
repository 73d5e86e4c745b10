//! Running it like a service: the lifecycle flag guards state changes, the
//! web config file (exporter-toolkit format) brings TLS, basic auth and
//! headers, its errors name file, line and field, reloads rotate it, nothing
//! served carries a secret, and a shared password file is warned about.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Daemon, Scrape, TestCa, lab};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion};

const SECS: Duration = Duration::from_secs(1);

const ONE_CHECK: &str = "defaults: {interval: 1s, timeout: 800ms}\nenvironments:\n  old: {addresses: [127.0.0.10]}\nchecks:\n  - {name: imaps, kind: tcp, host: imap.example.test, port: 993}\n";

#[test]
fn state_changing_endpoints_answer_403_without_the_lifecycle_flag_and_sighup_still_reloads() {
    lab();
    let d = Daemon::start(ONE_CHECK);
    for method in ["POST", "PUT"] {
        let (status, body) = d.http(method, "/-/reload").unwrap();
        assert_eq!(status, 403, "{method}: {body}");
        assert!(
            body.contains("--web.enable-lifecycle"),
            "the answer names the flag: {body}"
        );
    }
    assert_eq!(d.http("GET", "/-/reload").unwrap().0, 405, "GET never changes state");
    assert_eq!(d.http("POST", "/metrics").unwrap().0, 405);

    let two = format!("{ONE_CHECK}  - {{name: smtps, kind: tcp, host: smtp.example.test, port: 465}}\n");
    std::fs::write(&d.config, &two).unwrap();
    assert_eq!(d.reload().0, 403);
    std::thread::sleep(SECS / 2);
    assert_eq!(
        d.scrape().get("cutover_check_instances", &[]),
        Some(1.0),
        "a refused reload changes nothing"
    );
    d.signal("HUP");
    d.wait_for("cutover_check_instances", &[], |v| v == 2.0, 5 * SECS);

    let d = Daemon::start_with(ONE_CHECK, &["--web.enable-lifecycle"]);
    std::fs::write(&d.config, &two).unwrap();
    assert_eq!(d.reload(), (200, "config reloaded\n".to_string()));
    assert_eq!(d.scrape().get("cutover_check_instances", &[]), Some(2.0));
}

/// PEM text of one DER item.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn client(ca_pem: &str, versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(
        ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One HTTPS request; returns (status, lower-cased head, body).
fn https(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
) -> std::io::Result<(u16, String, String)> {
    let tcp = TcpStream::connect_timeout(&addr, 2 * SECS)?;
    tcp.set_read_timeout(Some(30 * SECS))?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(tls.clone(), name).map_err(std::io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    let authorization = auth
        .map(|(u, p)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            format!("Authorization: Basic {token}\r\n")
        })
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// The daemon behind a web config; killed when dropped.
struct Served {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Served {
    fn start(config: &Path, web: &Path, tls: &Arc<ClientConfig>, auth: (&str, &str)) -> Served {
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
        let log = web.with_file_name("daemon.log");
        let child = common::bin()
            .arg("run")
            .arg("--config.file")
            .arg(config)
            .arg("--web.config.file")
            .arg(web)
            .args(["--web.enable-lifecycle", "--web.listen-address", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let mut served = Served { child, addr, log };
        let deadline = Instant::now() + 10 * SECS;
        loop {
            if let Some(status) = served.child.try_wait().unwrap() {
                panic!("daemon exited with {status}: {}", served.logs());
            }
            if matches!(https(addr, tls, "GET", "/-/ready", Some(auth)), Ok((200, _, _))) {
                return served;
            }
            assert!(
                Instant::now() < deadline,
                "not ready over TLS within 10s: {}",
                served.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn web_yaml(hash: &str, min_version: &str) -> String {
    format!(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: {min_version}\nhttp_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n    X-Frame-Options: deny\nbasic_auth_users:\n  prometheus: {hash}\nauth_excluded_paths: [/-/healthy]\n"
    )
}

#[test]
fn a_web_config_brings_tls_basic_auth_and_headers_rotates_on_reload_and_serves_no_secret() {
    let lab = lab();
    let ca = TestCa::new("cutover-monitor test web CA");
    let (cert, key) = ca.leaf(&["localhost"], false);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), pem("CERTIFICATE", &cert)).unwrap();
    let key_file = dir.path().join("server.key");
    std::fs::write(&key_file, pem("PRIVATE KEY", &key)).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let password = "Scrape-Password-Known-To-The-Test";
    let web = dir.path().join("web.yml");
    std::fs::write(&web, web_yaml(&bcrypt::hash(password, 4).unwrap(), "TLS13")).unwrap();
    let checks = dir.path().join("checks.yaml");
    let yaml = "defaults: {interval: 1s, timeout: 900ms, ca_file: \"{{CA}}\"}\nenvironments:\n  new: {addresses: [127.0.0.20]}\ncredentials:\n  probe: {username: probe@example.test, password_file: \"{{PASSWORD_FILE}}\"}\nchecks:\n  - {name: imap, kind: imap, host: imap.example.test, credentials: probe}\n  - {name: web, kind: http, url: \"https://webmail.example.test/\"}\n";
    std::fs::write(&checks, lab.render(yaml)).unwrap();

    let tls13 = client(&ca.pem, &[&rustls::version::TLS13]);
    let d = Served::start(&checks, &web, &tls13, ("prometheus", password));
    let get = |path: &str, auth: Option<(&str, &str)>| https(d.addr, &tls13, "GET", path, auth).unwrap();

    let (status, head, _) = get("/metrics", None);
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: basic"), "{head}");
    assert!(
        head.contains("x-content-type-options: nosniff") && head.contains("x-frame-options: deny"),
        "{head}"
    );
    assert_eq!(get("/metrics", Some(("prometheus", "wrong"))).0, 401);
    assert_eq!(get("/metrics", Some(("nobody", password))).0, 401);
    let (status, _, body) = get("/metrics", Some(("prometheus", password)));
    assert_eq!(status, 200);
    assert!(body.contains("cutover_build_info"), "{body}");
    assert_eq!(get("/-/healthy", None).0, 200, "auth_excluded_paths");

    // TLS only, TLS 1.3 only, and really our certificate.
    let (plain, _) = common::http(d.addr, "GET", "/metrics").map_or((0, String::new()), |r| r);
    assert_eq!(plain, 0, "plain HTTP gets no HTTP answer");
    let tls12 = client(&ca.pem, &[&rustls::version::TLS12]);
    assert!(
        https(d.addr, &tls12, "GET", "/-/healthy", None).is_err(),
        "min_version TLS13 refuses TLS 1.2"
    );
    let stranger = client(&TestCa::new("another CA").pem, &[&rustls::version::TLS13]);
    assert!(https(d.addr, &stranger, "GET", "/-/healthy", None).is_err());

    // Nothing served carries the probe's or the scrape's password.
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let mut secrets = Vec::new();
    for (user, pass) in [("probe@example.test", lab.password()), ("prometheus", password)] {
        secrets.extend([
            pass.to_string(),
            b64(pass.to_string()),
            b64(format!("\0{user}\0{pass}")),
            b64(format!("{user}:{pass}")),
        ]);
    }
    let auth = Some(("prometheus", password));
    let deadline = Instant::now() + 10 * SECS;
    while Scrape::parse(&get("/metrics", auth).2).get("cutover_probe_success", &[("check", "imap")]) != Some(1.0) {
        assert!(Instant::now() < deadline, "imap never succeeded: {}", d.logs());
        std::thread::sleep(SECS / 5);
    }
    for path in [
        "/metrics",
        "/",
        "/probe?check=imap",
        "/probe?check=web",
        "/-/ready",
        "/-/healthy",
        "/nope",
    ] {
        for auth in [auth, None, Some(("prometheus", "wrong"))] {
            let (status, head, body) = get(path, auth);
            assert!(status != 0, "{path}");
            for s in &secrets {
                assert!(
                    !head.contains(&s.to_ascii_lowercase()) && !body.contains(s.as_str()),
                    "{path} leaks a secret form"
                );
            }
        }
    }

    // Rotation: a new password applies on reload, the old one stops working.
    let rotated = "Rotated-Scrape-Password";
    std::fs::write(&web, web_yaml(&bcrypt::hash(rotated, 4).unwrap(), "TLS13")).unwrap();
    let (status, _, body) = https(d.addr, &tls13, "POST", "/-/reload", auth).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(get("/metrics", auth).0, 401);
    let auth = Some(("prometheus", rotated));
    assert_eq!(get("/metrics", auth).0, 200);

    // A broken web config is refused with its position and keeps the last one.
    std::fs::write(&web, web_yaml(&bcrypt::hash(rotated, 4).unwrap(), "TLS11")).unwrap();
    let (status, _, body) = https(d.addr, &tls13, "POST", "/-/reload", auth).unwrap();
    assert_eq!(status, 500, "{body}");
    let at = format!("{}:4:3: field `tls_server_config.min_version`", web.display());
    assert!(body.contains(&at), "{body}");
    let (status, _, body) = get("/metrics", auth);
    assert_eq!(status, 200);
    assert_eq!(
        Scrape::parse(&body).get("cutover_config_last_reload_successful", &[]),
        Some(0.0)
    );
    for s in &secrets {
        assert!(!d.logs().contains(s.as_str()), "the log leaks a secret form");
    }
}

#[test]
fn validate_names_the_web_config_file_line_and_field_and_never_a_hash() {
    let (dir, checks) = common::write_config(ONE_CHECK);
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n  client_auth_type: RequireAnyClientCert\n  cipher_suite: [x]\nbasic_auth_users:\n  alice: hunter2\n",
    )
    .unwrap();
    let (code, stdout, stderr) = common::validate(&checks, Some(&web));
    assert_ne!(code, 0, "{stdout}");
    let file = web.display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "{file}:5:3: field `tls_server_config.cipher_suite`: unknown field"
        )),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{file}:7:3: field `basic_auth_users.alice`: user `alice`: not a bcrypt hash"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n  client_auth_type: RequireAnyClientCert\n",
    )
    .unwrap();
    let (_, _, stderr) = common::validate(&checks, Some(&web));
    let dir = dir.path().display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}:2:3: field `tls_server_config.cert_file`: cannot read {dir}/missing.pem"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}:3:3: field `tls_server_config.key_file`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:4:3: field `tls_server_config.client_auth_type`: RequireAnyClientCert accepts"
        )),
        "{stderr}"
    );
}

#[test]
fn a_password_file_readable_by_others_is_warned_about_by_name_only() {
    let secret = "Group-Readable-Secret-42";
    let (dir, _) = common::write_config(ONE_CHECK);
    let file = dir.path().join("probe.password");
    std::fs::write(&file, secret).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let yaml = format!(
        "environments:\n  old: {{addresses: [127.0.0.10]}}\ncredentials:\n  probe: {{username: u, password_file: \"{}\"}}\nchecks:\n  - {{name: imap, kind: imap, host: imap.example.test, credentials: probe}}\n",
        file.display()
    );
    let checks = dir.path().join("shared.yaml");
    std::fs::write(&checks, yaml).unwrap();
    let validate = |checks: &Path| common::validate(checks, None);
    let (code, stdout, stderr) = validate(&checks);
    assert_eq!(code, 0, "a warning, not an error: {stdout}{stderr}");
    assert!(stderr.contains("readable by group or others"), "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("credential `probe`"),
        "{stderr}"
    );
    assert!(!stderr.contains(secret) && !stdout.contains(secret), "{stderr}");

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, stderr) = validate(&checks);
    assert_eq!(code, 0);
    assert!(!stderr.contains("readable"), "{stderr}");
}
